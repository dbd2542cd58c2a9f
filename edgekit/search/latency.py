"""p90 latency of a target this machine cannot run and no device is given for: estimated.

With `--device-results` (results files `edgekit run` wrote for bundles of the same target), a per-artifact model
is fitted to them: least squares p90 = a + b * MACs when there are at least `MIN_LINE_POINTS` results with
different MACs, else one ratio p90 / MACs. Without results: MACs over a rough int8 throughput per architecture.

A results file does not hold the MACs of the model it measured; its bundle's manifest does (`macs` of each
artifact), or for a bundle older than that, the report.json of the build the bundle sits in (DIR/bundles/T/).
So a results file must stay in its bundle folder, where `edgekit run` writes it (results.json,
results-HOST.json). Each point also carries the measured peak RSS, the artifact's file size and runtime, for the
peak-memory estimate (edgekit.search.memory).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgekit.errors import ConfigError
from edgekit.runner.runner import SCHEMA_FILE, latency_of

MIN_LINE_POINTS = 3
GMACS_PER_S = {"x86_64": 20.0, "aarch64": 4.0}  # rough int8 throughput, for the MACs-based estimate
HINT = "pass results files `edgekit run` wrote, still in their bundle folders"


@dataclass(frozen=True)
class Point:
    artifact: str  # the artifact's name in its bundle, e.g. onnx_int8 (format and precision)
    macs: int
    p90_ms: float
    path: str
    peak_rss_mb: float | None = None  # for the peak-memory estimate (edgekit.search.memory)
    size_bytes: int | None = None  # the artifact file's
    runtime: str | None = None


def _fail(path: Path, what: str) -> ConfigError:
    return ConfigError(f"--device-results '{path}' {what}; {HINT}")


def files(paths: list[str]) -> list[tuple[Path, bool]]:
    """Each results file with whether it was named itself (True) or found in a named folder (False)."""
    found: list[tuple[Path, bool]] = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            inside = sorted(p for p in path.rglob("results*.json") if p.is_file() and p.name != SCHEMA_FILE)
            if not inside:
                raise _fail(path, "holds no results*.json file")
            found += [(p, False) for p in inside]
        elif path.is_file():
            found.append((path, True))
        else:
            raise _fail(path, "does not exist")
    return found


def _json(path: Path, what: str) -> object:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or not UTF-8
        raise _fail(path, f"{what} cannot be read as JSON ({type(exc).__name__})") from exc


def _results(path: Path) -> dict:
    data = _json(path, "")
    if not isinstance(data, dict) or not isinstance(data.get("target"), str) or "bundle_id" not in data:
        raise _fail(path, "is not a results file of `edgekit run` (no target or bundle_id)")
    return data


def entry_of(path: Path, result: dict, artifact: str) -> dict:
    """The artifact's entry in the manifest of the bundle the results file sits in (and measured)."""
    manifest_path = path.parent / "manifest.json"
    if not manifest_path.is_file():
        raise _fail(path, "is not in its bundle folder (no manifest.json beside it), so the MACs of what it "
                          "measured are unknown")
    manifest = _json(manifest_path, f"(its bundle's {manifest_path.name})")
    if not isinstance(manifest, dict) or manifest.get("bundle_id") != result["bundle_id"]:
        raise _fail(path, f"measured bundle {result['bundle_id']}, not the bundle beside it "
                          f"({manifest.get('bundle_id') if isinstance(manifest, dict) else '?'})")
    entry = next((a for a in manifest.get("artifacts", []) if a.get("name") == artifact), None)
    if entry is None:
        raise _fail(path, f"measured artifact '{artifact}', which its bundle's manifest does not list")
    return entry


def macs_of(path: Path, result: dict, entry: dict) -> int:
    """The MACs of the model an artifact came from: its bundle's manifest, else the bundle's build report."""
    if isinstance(entry.get("macs"), int):
        return entry["macs"]
    report_path = path.parent.parent.parent / "report.json"  # DIR/bundles/TARGET/results.json -> DIR/report.json
    report = _json(report_path, "(the build's report.json)") if report_path.is_file() else {}
    stage = next((s for s in report.get("stages", []) if s.get("name") == entry.get("source_stage")), {})
    if not isinstance(stage.get("macs"), int):
        raise _fail(path, "comes from a bundle whose manifest predates MACs and whose build report.json is not "
                          f"at {report_path}; measure a bundle built by this edgekit")
    return stage["macs"]


def load(paths: list[str], target: str) -> list[Point]:
    """The valid results for `target` in these files and folders (a named file for another target is an error;
    in a folder it is passed over)."""
    points: list[Point] = []
    others: set[str] = set()
    for path, named in files(paths):
        result = _results(path)
        if result["target"] != target:
            if named:
                raise _fail(path, f"holds results for target '{result['target']}', not '{target}'")
            others.add(result["target"])
            continue
        for name, r in (result.get("artifacts") or {result.get("artifact"): result}).items():
            p90 = (r.get("latency_ms") or {}).get("p90") if isinstance(r, dict) else None
            if not isinstance(p90, (int, float)) or not isinstance(name, str):
                raise _fail(path, f"has no latency_ms.p90 for artifact '{name}'")
            if r.get("valid") is False or latency_of(r) is None:  # throttled while timing, or accuracy only
                continue
            entry = entry_of(path, result, name)
            peak = r.get("peak_rss_mb")
            points.append(Point(name, macs_of(path, result, entry), float(p90), str(path),
                                float(peak) if isinstance(peak, (int, float)) else None, entry.get("size_bytes"),
                                entry.get("runtime") or (r.get("runtime") or {}).get("name")))
    if not points:
        seen = f" (they are for {', '.join(sorted(others))})" if others else ""
        raise ConfigError(f"--device-results: no valid results for target '{target}'{seen}; measure a {target} "
                          f"bundle with `edgekit run BUNDLE --host USER@DEVICE` and pass its results file")
    return points


@dataclass(frozen=True)
class Estimate:
    p90_ms: float
    source: str  # what trials.json/csv, the plot and the console show
    how: str  # the model, in words


def fit(points: list[Point], artifact: str) -> tuple[float, float, int, str]:
    """(a, b, points used, in words) of p90 = a + b * MACs for one artifact (all artifacts' points when it has none)."""
    import numpy as np

    own = [p for p in points if p.artifact == artifact]
    use = own or points
    what = f"{len(use)} {artifact} results" if own else f"{len(use)} results of other artifacts ({artifact}: none)"
    x = np.array([p.macs for p in use], dtype=float)
    y = np.array([p.p90_ms for p in use])
    if len(use) >= MIN_LINE_POINTS and len(set(x)) >= 2:
        b, a = np.polyfit(x, y, 1)
        if b > 0 and a >= 0:  # a line that falls with MACs, or goes below 0 ms, is noise: the ratio is safer
            how = f"p90 = {a:.4g} ms + {b * 1e6:.4g} ms per MMAC, least squares over {what}"
            return float(a), float(b), len(use), how
    ratio = float(y.sum() / x.sum()) if x.sum() > 0 else 0.0
    return 0.0, ratio, len(use), f"p90 = {ratio * 1e6:.4g} ms per MMAC, the ratio over {what}"


def estimate(macs: int | None, artifact: str, arch: str, points: list[Point] | None) -> Estimate:
    macs = macs or 0
    if points:
        a, b, n, how = fit(points, artifact)
        return Estimate(round(a + b * macs, 4), f"estimated (fitted to {n} device results)", how)
    rate = GMACS_PER_S.get(arch, 4.0)
    return Estimate(round(macs / (rate * 1e9) * 1e3, 4), "estimated (MACs)",
                    f"MACs / {rate:g} GMAC/s (no device results: pass --device-results or --host)")
