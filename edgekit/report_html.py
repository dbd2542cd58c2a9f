"""report.html: one self-contained page (inline CSS and SVG, no scripts, no network) for one or more builds,
bundles or results files, rendered from edgekit/templates/report.html.j2 with Jinja2.

Every number in the page comes from a file of the build: report.json (stages, artifacts, budgets,
recommendations), the bundles' results*.json (the runner's runs here and on devices, with the raw latency
samples) and fidelity/*.json (layer by layer). Table cells carry the exact value in `data-value`, so a test
(or a script) can check the page against those files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from edgekit import report, report_plots
from edgekit.errors import EdgekitError
from edgekit.files import lock_held, stage_files
from edgekit.runner.runner import latency_of

TEMPLATE = "report.html.j2"
FIDELITY_TOP = 10  # layers shown per int8 artifact


@dataclass
class Source:
    """One thing to show: a build folder, a bundle folder or a single results file."""

    label: str
    path: Path
    report: dict | None = None  # report.json of a build
    results: list[tuple[str, dict]] = field(default_factory=list)  # (bundle/file label, results file)
    fidelity: list[dict] = field(default_factory=list)
    budgets: dict = field(default_factory=dict)  # target -> {"latency_ms", "memory_mb"} from the manifests
    sensitivity: dict | None = None  # sensitivity.json of `edgekit sensitivity --out DIR`


def _read(path: Path, fix: str = "rebuild it") -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:  # as `edgekit compare` reads them
        raise EdgekitError(f"'{path}' cannot be read as JSON ({type(exc).__name__}); {fix}") from exc


RESULTS_FIX = "write it again with `edgekit run`, or move it out of the bundle"


def _bundle_results(bundle: Path, source: Source) -> None:
    manifest = bundle / "manifest.json"
    if manifest.is_file():
        m = _read(manifest)
        source.budgets[m["target"]["name"]] = m["target"].get("budgets") or {}
    for path in sorted(bundle.glob("results*.json")):
        if path.name == "results.schema.json":
            continue
        source.results.append((f"{bundle.name}/{path.stem}", _read(path, RESULTS_FIX)))


def load(path: Path, label: str) -> Source:
    """A build folder (report.json), a bundle folder (manifest.json) or a results file."""
    source = Source(label, path)
    if path.is_file():
        data = _read(path, "pass a results.json written by `edgekit run`")
        if "latency_ms" not in data:
            raise EdgekitError(f"'{path}' is not a results file; pass a build folder, a bundle folder or a "
                               "results.json written by `edgekit run`")
        source.results.append((path.stem, data))
    elif (path / "report.json").is_file():
        source.report = _read(path / "report.json")
        for bundle in sorted(p for p in (path / "bundles").glob("*") if p.is_dir()):
            _bundle_results(bundle, source)
        source.fidelity = [_read(p) for p in sorted((path / "fidelity").glob("*.json"))]
        found = [p for p in (path / "sensitivity.json", path / "sensitivity" / "sensitivity.json") if p.is_file()]
        source.sensitivity = _read(found[0]) if found else None
    elif (path / "manifest.json").is_file():
        _bundle_results(path, source)
    elif (path / "config.yaml").is_file() and (path / "stages").is_dir():  # a build that stopped before its report
        if lock_held(path):
            raise EdgekitError(f"'{path}' is a build still running (it holds its lock, no report.json yet): report it "
                               "when it has finished")
        raise EdgekitError(f"'{path}' is a build that did not finish (no report.json yet): continue it with "
                           f"`edgekit build --resume {path}` (--allow-fidelity-miss when it stopped at the fidelity "
                           "gate), then report it")
    else:
        raise EdgekitError(f"'{path}' is neither a build folder (report.json), a bundle folder (manifest.json) "
                           "nor a results file")
    return source


def labels(paths: list[Path]) -> list[str]:
    """The shortest path endings that tell the sources apart."""
    parts = [p.resolve().parts[1:] for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        found = ["/".join(p[-depth:]) for p in parts]
        if len(set(found)) == len(found):
            return found
    return [f"{p}#{i + 1}" for i, p in enumerate(map(str, paths))]


# --- what the template shows --------------------------------------------------------------------------------

def _stage_rows(rep: dict, build: Path) -> list[dict]:
    rows = []
    for s in rep["stages"]:
        folder = build / "stages" / s["name"]
        if "files" not in s and folder.is_dir():  # a report.json from before real sizes: read the folder
            s = {**s, **stage_files(folder)}
        rows.append({"name": s["name"], "accuracy": s.get("accuracy"), "params": s.get("params"),
                     "macs": s.get("macs"), "size_bytes": s.get("size_bytes"), "size_file": s.get("size_file"),
                     "files": s.get("files") or {}, "seconds": s.get("seconds"), "cached_from": s.get("cached_from")})
    return rows


def _artifact_row(row: dict, budgets: dict) -> dict:
    lat, source = report._latency(row)
    measured = row.get("measured") or {}
    check = row.get("budget") or report.budget_check(budgets.get(row["target"], {}), (lat or {}).get("p90"),
                                                     measured.get("peak_rss_mb"))
    return {**row, "p50_ms": (lat or {}).get("p50"), "p90_ms": (lat or {}).get("p90"), "latency_source": source,
            "peak_rss_mb": measured.get("peak_rss_mb"), "budget": check, "budget_cell": report.budget_cell(check),
            "check_cell": check_cell(row.get("runtime_check"))}


def check_cell(check: dict | None) -> str:
    """The pinned-runtime check of one artifact in a few words: its verdict, where it ran, and whether the verdict
    came from the check cache (the same bytes passed before) rather than a run now."""
    if not check:
        return "-"
    verdict = {True: "ok", False: "FAILED", None: "skipped"}[check.get("ok")]
    where = "qemu" if check.get("emulated") else check.get("arch") or ""
    cached = check.get("cached")
    when = f", cached: passed {cached.get('checked_utc') or 'before'}" if cached else ""
    return f"{verdict} ({check.get('runtime', '?')} {check.get('version', '')} {where}{when})".replace("  ", " ")


def _targets(rep: dict, budgets: dict) -> list[dict]:
    rows = [_artifact_row(r, budgets) for r in rep["artifacts"]]
    out = []
    for b in rep["bundles"]:
        mine = [r for r in rows if r["target"] == b["target"]]
        for r in mine:
            r["vs_fp32"] = report._ratio(r, rep["artifacts"])
        first = mine[0]["budget"] if mine else {}
        out.append({"name": b["target"], "rows": mine, "recommended": b.get("recommended") or {},
                    "budgets": {"latency_ms": first.get("latency_ms"), "memory_mb": first.get("memory_mb")}})
    return out


def _run_rows(source: Source) -> list[dict]:
    """Every artifact of every results file: the runner's runs here and on devices."""
    rows = []
    for file_label, data in source.results:
        host = (data.get("remote") or {}).get("host")
        emulated = (data.get("environment") or {}).get("emulated")
        where = f"@{host}" if host else ("emulated" if emulated else "here")
        for name, r in (data.get("artifacts") or {data["artifact"]: data}).items():
            latency = latency_of(r) or dict.fromkeys(("p50", "p90", "p99", "max", "runs"))  # None: accuracy only
            check = report.budget_check(source.budgets.get(r.get("target"), {}), latency["p90"], r.get("peak_rss_mb"))
            rows.append({"id": f"{source.label}/{file_label}/{name}", "file": file_label, "artifact": name,
                         "target": r.get("target"), "where": where, "host": host, "valid": r.get("valid", True),
                         "invalid_reasons": r.get("invalid_reasons") or [], "runtime": r["runtime"],
                         "accuracy": r.get("accuracy"), "latency": latency, "peak_rss_mb": r.get("peak_rss_mb"),
                         "device": (r.get("environment") or {}).get("device_model")
                         or (r.get("environment") or {}).get("cpu"),
                         "samples": (latency_of(r) and r.get("latency_samples_ms")) or [], "budget": check,
                         "budget_cell": report.budget_cell(check)})
    return rows


def _fidelity(source: Source) -> list[dict]:
    return [{"artifact": f["artifact"], "misses": f.get("misses") or [], "layers": f.get("layers", [])[:FIDELITY_TOP],
             "count": len(f.get("layers", []))} for f in source.fidelity]


def _sensitivity(result: dict | None) -> dict | None:
    if not result or not result.get("layers"):
        return None
    rows = [{"id": f"sens-{i}", "layer": name, "drops": drops}
            for i, (name, drops) in enumerate(result["layers"].items())]
    return {"baseline": result.get("baseline"), "ratios": [str(r) for r in result.get("ratios", [])], "rows": rows,
            "svg": report_plots.sensitivity(result)}


def build_view(source: Source) -> dict:
    rep = source.report
    view = {"label": source.label, "path": str(source.path), "runs": _run_rows(source),
            "fidelity": _fidelity(source), "sensitivity": _sensitivity(source.sensitivity), "stages": [],
            "targets": [], "config_yaml": None, "versions": {}, "model": None,
            "over_budget": [], "warnings": [], "cached_stages": {}}  # a results file or bundle has no build report
    if rep:
        view.update(stages=_stage_rows(rep, source.path), targets=_targets(rep, source.budgets),
                    model=report.model_line(rep["config"]),
                    config_yaml=yaml.safe_dump(report.shown_config(rep["config"]), sort_keys=False),
                    versions={"edgekit": rep.get("edgekit_version"), **(rep.get("versions") or {})},
                    over_budget=rep.get("over_budget", []), warnings=rep.get("warnings", []),
                    cached_stages=rep.get("cached_stages") or {})
    return view


# --- figures -----------------------------------------------------------------------------------------------

def _short(prefix: str, name: str, many: bool) -> str:
    return f"{prefix}/{name}" if many else name


def _points(views: list[dict]) -> tuple[list[dict], list[dict]]:
    """(accuracy vs p90 latency, accuracy vs size): the build's artifacts and every device run."""
    many = len(views) > 1
    lat, size = [], []
    for series, v in enumerate(views):
        for t in v["targets"]:
            for r in t["rows"]:
                label = f"{v['label']}/{t['name']}/{r['name']}"
                short = _short(v["label"], f"{t['name']}/{r['name']}", many)
                size.append({"label": label, "short": short, "x": r["size_bytes"] / 1024, "y": r["accuracy"],
                             "kind": "local", "series": series})
                if r["p90_ms"] is not None:
                    lat.append({"label": label, "short": short, "x": r["p90_ms"], "y": r["accuracy"],
                                "kind": "local", "source": r["latency_source"], "series": series})
        for run in v["runs"]:
            if run["host"] or not v["targets"]:  # device runs; a build's own local runs are its artifacts above
                kind = "device" if run["valid"] else "invalid"
                lat.append({"label": run["id"], "short": _short(v["label"], f"{run['artifact']}{run['where']}", many),
                            "x": run["latency"]["p90"], "y": run["accuracy"], "kind": kind, "source": "run",
                            "series": series})
    lat = [p for p in lat if p["y"] is not None and p["x"] is not None]
    for prefix, points in (("lat", lat), ("size", size)):
        front = set(report_plots.pareto_front([{**p, "id": i} for i, p in enumerate(points)]))
        for i, p in enumerate(points):
            p.update(id=f"pt-{prefix}-{i}", on_front=i in front)
    return lat, size


def figures(views: list[dict]) -> dict:
    lat, size = _points(views)
    curves = [{"id": "", "label": _short(v["label"], f"{r['file']}/{r['artifact']}", len(views) > 1),
               "samples": r["samples"], "latency": r["latency"], "n": len(r["samples"]), "valid": r["valid"]}
              for v in views for r in v["runs"] if r["samples"]]
    for i, c in enumerate(curves):
        c["id"] = f"dist-{i}"
    return {
        "latency_points": lat, "size_points": size, "curves": curves,
        "latency_svg": report_plots.tradeoff(lat, "p90 latency, ms", "accuracy vs latency", log_x=True)
        if lat else None,
        "size_svg": report_plots.tradeoff(size, "file size, KB", "accuracy vs size") if size else None,
        "distribution_svg": report_plots.latency_distribution(curves) if curves else None,
    }


# --- the page ----------------------------------------------------------------------------------------------

def _environment():
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("edgekit", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _num
    env.filters["kb"] = lambda b: _num(None if b is None else b / 1024, ".1f")
    return env


def _num(value: object, spec: str = ".4f") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, spec)


def render(paths: list[Path]) -> str:
    sources = [load(Path(p), label) for p, label in zip(paths, labels([Path(p) for p in paths]), strict=True)]
    views = [build_view(s) for s in sources]
    return _environment().get_template(TEMPLATE).render(views=views, figures=figures(views),
                                                        title=" vs ".join(v["label"] for v in views))


def write(paths: list[Path], out: Path) -> Path:
    from edgekit.files import write_bytes

    write_bytes(out, render(paths).encode())
    return out
