"""`edgekit run` and `edgekit compare`: measure a bundle's artifacts with edgekit's own runner, check each
result against the runner's JSON schema, and put several results side by side.

Each artifact runs in a child process: a damaged model can crash its runtime, not edgekit, and the
runner process imports only what a device has (numpy and the runtime). A bundle may come from anyone: its own
runner.py is never executed here (it runs on the device), and its manifest may only name files inside it.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from edgekit.device.manifest import read_manifest
from edgekit.errors import BundleError, EdgekitError
from edgekit.files import write_bytes
from edgekit.runner import RUNNER, error_line, runner
from edgekit.runner.runner import latency_of
from edgekit.targets import host_arch

SCHEMA_PATH = RUNNER.with_name(runner.SCHEMA_FILE)


def schema(bundle: Path | None = None) -> dict:
    """The results schema that ships in the bundle, else the one of this edgekit."""
    path = bundle / runner.SCHEMA_FILE if bundle is not None else SCHEMA_PATH
    return json.loads((path if path.is_file() else SCHEMA_PATH).read_text())


def validate(result: dict, bundle: Path | None = None, where: str = "result") -> None:
    """Raise BundleError naming the first field that breaks the results schema."""
    try:
        import jsonschema
    except ImportError:  # without jsonschema: the required top-level keys only
        missing = [k for k in schema(bundle)["required"] if k not in result]
        if missing:
            raise BundleError(f"{where} does not follow the results schema: '{missing[0]}' is missing") from None
        return
    validator = jsonschema.Draft202012Validator(schema(bundle))
    error = jsonschema.exceptions.best_match(validator.iter_errors(result))
    if error is not None:
        path = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise BundleError(f"{where} does not follow the results schema at {path}: {error.message}")


def runner_args(threads: int | None = None, mode: str | None = None, overrides: dict | None = None) -> list[str]:
    """Command-line options of runner.py for these settings (None: the manifest's)."""
    args = ["--threads", str(threads)] if threads else []
    args += ["--mode", mode] if mode else []
    for key, value in (overrides or {}).items():
        if key not in runner.RUN_DEFAULTS:
            raise EdgekitError(f"unknown run setting '{key}'; valid: {', '.join(runner.RUN_DEFAULTS)}")
        if value is not None:
            args += ["--" + key.replace("_", "-"), str(value)]
    return args


def run_artifact(bundle: Path, name: str, threads: int | None = None, mode: str | None = None,
                 overrides: dict | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        cmd = [sys.executable, str(RUNNER), str(bundle), "--artifact", name, "--out", str(out)]
        proc = subprocess.run(cmd + runner_args(threads, mode, overrides), capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            raise BundleError(f"the runner failed on artifact {name} of '{bundle}': "
                              f"{error_line(proc.stderr, proc.returncode)}")
        result = json.loads(out.read_text())
    validate(result, None, f"the result of {name}")  # edgekit's runner wrote it: edgekit's schema
    return result


def refuse_other_arch(bundle: Path, manifest: dict) -> None:
    """A bundle for another CPU would run here on this machine's wheels and report this machine's numbers."""
    arch = manifest["target"].get("arch")
    if arch and arch != host_arch():
        raise BundleError(f"'{bundle}' is a bundle for {arch} ({manifest['target']['name']}) and this machine is "
                          f"{host_arch()}: measure it on the device with `edgekit run {bundle} --host USER@DEVICE`, "
                          f"or check it here under emulation with `edgekit check {bundle} --emulate`")


def choose(manifest: dict, artifacts: list[str] | None, where: str) -> list[str]:
    names = [a["name"] for a in manifest["artifacts"]]
    unknown = [n for n in artifacts or [] if n not in names]
    if unknown:
        raise BundleError(f"no artifact '{unknown[0]}' in '{where}'; valid: {', '.join(names)}")
    return artifacts or names


def summary(manifest: dict, results: dict) -> dict:
    """The results file: the primary artifact's result (or the first one run) plus all of them."""
    lead = manifest["primary"] if manifest["primary"] in results else next(iter(results))
    return {**results[lead], "artifacts": results}


def write_results(path: Path, data: dict) -> None:
    write_bytes(path, (runner.dumps(data) + "\n").encode())


def run_bundle(bundle: Path, out: Path | None = None, artifacts: list[str] | None = None,
               threads: int | None = None, log=print, mode: str | None = None,
               overrides: dict | None = None) -> dict:
    """Run the chosen artifacts (default: all); the results file leads with the primary artifact."""
    manifest = read_manifest(bundle)
    refuse_other_arch(bundle, manifest)
    results = {}
    for name in choose(manifest, artifacts, str(bundle)):
        log(f"  measuring {manifest['target']['name']}/{name} ...")
        results[name] = run_artifact(bundle, name, threads, mode, overrides)
    if out is None:  # some artifacts run again: the bundle's results file keeps the others' measurements
        earlier = _earlier(bundle / "results.json", manifest)
        results = {**earlier, **{name: combined(r, earlier.get(name)) for name, r in results.items()}}
    data = summary(manifest, {a["name"]: results[a["name"]] for a in manifest["artifacts"] if a["name"] in results})
    write_results(out or bundle / "results.json", data)
    return data


TIMED = ("latency_ms", "latency_samples_ms", "throughput_per_s", "timing", "memory", "peak_rss_mb",
         "peak_rss_after_load_mb", "peak_rss_delta_mb", "valid", "invalid_reasons")  # what a timing run says


def combined(new: dict, old: dict | None) -> dict:
    """A `--mode accuracy` run keeps the earlier timing of the same bytes, a `--mode latency` run their earlier
    accuracy: the bundle's results file then holds both (mode all), and `combined` says which came from before."""
    if old is None or new.get("mode") in (None, "all"):
        return new
    before = old.get("combined") or {}  # an earlier combined record: its parts' own runs
    if new["mode"] == "accuracy" and latency_of(old) is not None:
        return {**new, **{k: old[k] for k in TIMED if k in old}, "mode": "all",
                "combined": {"timing_from": before.get("timing_from") or old.get("started_utc")}}
    if new["mode"] == "latency" and old.get("accuracy") is not None:
        return {**new, "accuracy": old["accuracy"], "mode": "all",
                "combined": {"accuracy_from": before.get("accuracy_from") or old.get("started_utc")}}
    return new


def _earlier(path: Path, manifest: dict) -> dict:
    """The measurements a bundle's results file holds of artifacts whose bytes are still the bundle's."""
    try:
        earlier = json.loads(path.read_text()).get("artifacts") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    digests = {a["name"]: manifest["files"].get(a["file"]) for a in manifest["artifacts"]}
    return {name: r for name, r in earlier.items() if isinstance(r, dict) and name in digests
            and r.get("artifact_sha256") == digests[name]}


# --- compare -----------------------------------------------------------------------------------------------

COLUMNS = (  # header, number format (None: text), value from one artifact's result
    ("run", None, lambda r: r["_label"]),
    ("artifact", None, lambda r: r["_artifact"]),
    ("target", None, lambda r: r.get("target")),
    ("device", None, lambda r: r["environment"].get("device_model") or r["environment"].get("cpu")),
    ("runtime", None, lambda r: f"{r['runtime']['name']} {r['runtime']['version']}"),
    ("accel", None, lambda r: r["runtime"].get("accelerator")),
    ("thr", "d", lambda r: r.get("threads")),
    ("acc", ".4f", lambda r: r.get("accuracy")),
    ("load_ms", ".2f", lambda r: r["load_ms"]),
    ("first_ms", ".3f", lambda r: r["first_inference_ms"]),
    ("p50_ms", ".4f", lambda r: (latency_of(r) or {}).get("p50")),
    ("p90_ms", ".4f", lambda r: (latency_of(r) or {}).get("p90")),
    ("p99_ms", ".4f", lambda r: (latency_of(r) or {}).get("p99")),
    ("mean_ms", ".4f", lambda r: (latency_of(r) or {}).get("mean")),
    ("std_ms", ".4f", lambda r: (latency_of(r) or {}).get("std")),
    ("runs", "d", lambda r: (latency_of(r) or {}).get("runs")),
    ("per_s", ".1f", lambda r: r.get("throughput_per_s") if latency_of(r) else None),
    ("rss_d_mb", ".1f", lambda r: r.get("peak_rss_delta_mb")),
    ("valid", None, lambda r: _validity(r)),
)


def _validity(result: dict) -> str:
    if result.get("valid", True):
        return "yes"
    return "NO: " + "; ".join(result.get("invalid_reasons") or ["marked invalid"])


def what_it_is(data: object, path: Path) -> str | None:
    """What a JSON file that is not a results file looks like, with the file to pass instead; None for a
    results file."""
    if not isinstance(data, dict):
        return f"'{path}' is not a results file (it holds a JSON {type(data).__name__})"
    if "latency_ms" in data and "artifact" in data:
        return None
    if "stages" in data and "bundles" in data:
        targets = data.get("targets") or ["x86-64"]
        return f"'{path}' is a build report; pass {path.parent}/bundles/{targets[0]}/results.json"
    if path.name == "manifest.json" or ("artifacts" in data and "target" in data and "primary" in data):
        return (f"'{path}' is a bundle manifest; measure the bundle with `edgekit run {path.parent}` and pass "
                f"{path.parent}/results.json")
    if "layers" in data and "misses" in data:
        return f"'{path}' is a fidelity record (see `edgekit debug`); pass a results.json written by `edgekit run`"
    if path.name == "check.json" or "emulated" in data and "artifacts" in data:
        return f"'{path}' is a runtime check (`edgekit check`); pass a results.json written by `edgekit run`"
    if "name" in data and "accuracy" in data and "params" in data:
        return f"'{path}' is a stage's metrics.json; pass a results.json written by `edgekit run`"
    return f"'{path}' is not a results file (no latency_ms); pass a results.json written by `edgekit run`"


def _load_results(path: Path) -> dict:
    if path.is_dir():
        hint = f"pass {path}/results.json" if (path / "results.json").is_file() else \
            "pass a results.json written by `edgekit run`"
        raise EdgekitError(f"'{path}' is a folder; {hint}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgekitError(f"'{path}' cannot be read as JSON ({type(exc).__name__}); pass a results.json written "
                           "by `edgekit run`") from exc
    problem = what_it_is(data, path)
    if problem:
        raise EdgekitError(problem)
    validate(data, None, f"'{path}'")
    return data


def _base_parts(path: Path, data: dict) -> tuple[list[str], str]:
    """Folder names that place a results file (most specific last, 'bundles' left out) and its device host."""
    host = (data.get("remote") or {}).get("host")
    if path.name.startswith("results"):
        parts = [p for p in path.resolve().parent.parts[1:] if p != "bundles"]
        host = host or path.stem.removeprefix("results").removeprefix("-") or None
    else:
        parts = [p for p in path.resolve().parent.parts[1:] if p != "bundles"] + [path.stem]
    return parts, f"@{host}" if host else ""


def run_labels(paths: list[Path], datas: list[dict]) -> list[str]:
    """The shortest labels (build/target[@host], from the end of each path) that tell the files apart."""
    bases = [_base_parts(p, d) for p, d in zip(paths, datas, strict=True)]
    longest = max(len(parts) for parts, _ in bases)
    for depth in range(1, longest + 1):
        labels = ["/".join(parts[-depth:]) + host for parts, host in bases]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{label}#{i + 1}" for i, label in enumerate(labels)]


def _rows_of(data: dict, label: str) -> list[dict]:
    results = data.get("artifacts") or {data["artifact"]: data}
    return [{**r, "_label": label, "_artifact": name} for name, r in results.items()]


def _text(value: object, spec: str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return format(value, spec) if spec and isinstance(value, int | float) else str(value)


def aligned(header: list[str], table: list[list[str]], numeric: list[bool]) -> str:
    """Columns as wide as their longest cell: numbers right-aligned, text left-aligned, nothing cut."""
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w)
                         for c, w, num in zip(cells, widths, numeric, strict=True)).rstrip()

    return "\n".join([line(header), *(line(row) for row in table)])


def compare(paths: list[Path], csv_path: Path | None = None) -> str:
    """A side-by-side table of every artifact of every results file; with csv_path the same values as CSV."""
    paths = [Path(p) for p in paths]
    datas = [_load_results(p) for p in paths]
    rows = [row for d, label in zip(datas, run_labels(paths, datas), strict=True) for row in _rows_of(d, label)]
    if not rows:
        raise EdgekitError("no results to compare; pass results.json files written by `edgekit run`")
    values = [[getter(r) for _, _, getter in COLUMNS] for r in rows]
    if csv_path is not None:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        with csv_path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([h for h, _, _ in COLUMNS])
            writer.writerows(values)
    table = [[_text(v, spec) for v, (_, spec, _) in zip(row, COLUMNS, strict=True)] for row in values]
    return aligned([h for h, _, _ in COLUMNS], table, [spec is not None for _, spec, _ in COLUMNS])


def compare_table(result: dict) -> str:
    """The table `edgekit run` prints: one line per artifact of one results file."""
    lines = [f"{'artifact':<20} {'runtime':<22} {'acc':>6} {'load ms':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
             f"{'RSS +MB':>7} valid"]
    for name, r in result["artifacts"].items():
        rt = f"{r['runtime']['name']} {r['runtime']['version']}"
        lat, acc = latency_of(r) or {}, r["accuracy"]
        acc_text = f"{acc:>6.3f}" if acc is not None else f"{'-':>6}"
        ms = " ".join(f"{_text(lat.get(k), '.4f'):>8}" for k in ("p50", "p90", "p99"))
        lines.append(f"{name:<20} {rt:<22} {acc_text} {r['load_ms']:>8.1f} {ms} {r['peak_rss_delta_mb']:>7.1f} "
                     + ("yes" if r["valid"] else "NO: " + "; ".join(r["invalid_reasons"])))
    return "\n".join(lines)
