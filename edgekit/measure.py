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

from edgekit.errors import BundleError, EdgekitError
from edgekit.manifest import read_manifest
from edgekit.runner import RUNNER, error_line, runner
from edgekit.stages.base import write_bytes
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
                          f"or check it here under emulation with `edgekit verify {bundle} --emulate`")


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
    data = summary(manifest, results)
    write_results(out or bundle / "results.json", data)
    return data


# --- compare -----------------------------------------------------------------------------------------------

COLUMNS = (  # header, width, value from one artifact's result
    ("run", 28, lambda r: r["_label"]),
    ("target", 10, lambda r: r.get("target")),
    ("device", 18, lambda r: r["environment"].get("device_model") or r["environment"].get("cpu")),
    ("runtime", 22, lambda r: f"{r['runtime']['name']} {r['runtime']['version']}"),
    ("accel", 14, lambda r: r["runtime"].get("accelerator")),
    ("thr", 3, lambda r: r.get("threads")),
    ("acc", 6, lambda r: r.get("accuracy")),
    ("load_ms", 8, lambda r: r["load_ms"]),
    ("first_ms", 8, lambda r: r["first_inference_ms"]),
    ("p50_ms", 8, lambda r: r["latency_ms"]["p50"]),
    ("p90_ms", 8, lambda r: r["latency_ms"]["p90"]),
    ("p99_ms", 8, lambda r: r["latency_ms"]["p99"]),
    ("mean_ms", 8, lambda r: r["latency_ms"]["mean"]),
    ("std_ms", 8, lambda r: r["latency_ms"]["std"]),
    ("runs", 7, lambda r: r["latency_ms"]["runs"]),
    ("per_s", 9, lambda r: r.get("throughput_per_s")),
    ("rss_d_mb", 8, lambda r: r.get("peak_rss_delta_mb")),
    ("valid", 5, lambda r: r.get("valid")),
)


def _rows_of(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EdgekitError(f"'{path}' cannot be read as a results JSON: {type(exc).__name__}") from exc
    validate(data, None, f"'{path}'")
    results = data.get("artifacts") or {data["artifact"]: data}
    label = path.parent.name if path.name.startswith("results") else path.stem
    host = data.get("remote", {}).get("host")
    return [{**r, "_label": f"{label}{'@' + host if host else ''}/{name}"} for name, r in results.items()]


def _cell(value: object, width: int) -> str:
    if isinstance(value, bool) or value is None:
        text = "-" if value is None else ("yes" if value else "NO")
    elif isinstance(value, float):
        text = f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    else:
        text = str(value)
    return text[:width].rjust(width) if isinstance(value, int | float) else text[:width].ljust(width)


def compare(paths: list[Path], csv_path: Path | None = None) -> str:
    """A side-by-side table of every artifact of every results file; the same values go to CSV."""
    rows = [row for p in paths for row in _rows_of(Path(p))]
    if not rows:
        raise EdgekitError("no results to compare; pass results.json files written by `edgekit run`")
    table = [[getter(r) for _, _, getter in COLUMNS] for r in rows]
    if csv_path is not None:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        with csv_path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([h for h, _, _ in COLUMNS])
            writer.writerows(table)
    lines = [" ".join(h.ljust(w) if i < 5 else h.rjust(w) for i, (h, w, _) in enumerate(COLUMNS))]
    lines += [" ".join(_cell(v, w) for v, (_, w, _) in zip(row, COLUMNS, strict=True)) for row in table]
    return "\n".join(lines)


def compare_table(result: dict) -> str:
    """The table `edgekit run` prints: one line per artifact of one results file."""
    lines = [f"{'artifact':<20} {'runtime':<22} {'acc':>6} {'load ms':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
             f"{'RSS +MB':>7} valid"]
    for name, r in result["artifacts"].items():
        rt = f"{r['runtime']['name']} {r['runtime']['version']}"
        lat, acc = r["latency_ms"], r["accuracy"]
        acc_text = f"{acc:>6.3f}" if acc is not None else f"{'-':>6}"
        lines.append(f"{name:<20} {rt:<22} {acc_text} {r['load_ms']:>8.1f} {lat['p50']:>8.4f} {lat['p90']:>8.4f} "
                     f"{lat['p99']:>8.4f} {r['peak_rss_delta_mb']:>7.1f} "
                     + ("yes" if r["valid"] else "NO: " + "; ".join(r["invalid_reasons"])))
    return "\n".join(lines)
