"""Check each bundled artifact with the runtime version its target pins, in an isolated environment.

The build's own environment has whatever TensorFlow / LiteRT / onnxruntime versions edgekit needs; the device
has one runtime at the version the target profile pins. So each artifact is loaded and run by the bundle's own
`runner.py` inside a venv that holds only numpy and `<package>==<pinned version>`, created once under the
cache directory (`$EDGEKIT_CACHE`, else `$XDG_CACHE_HOME/edgekit`, else `~/.cache/edgekit`) and reused. An op
version the pinned runtime cannot run is reported with the op, its version and what to change.

For an aarch64 target this runs the x86 wheel of the same pinned version (which proves op support by version);
`edgekit.device.emulate` adds a run of the aarch64 wheel under qemu user-mode emulation.

Two things keep this cheap: one child process per runtime checks all of a bundle's artifacts for that runtime
(CHECK_SCRIPT; a child that crashes has its unchecked artifacts re-run one per child, so the crash is pinned on
the right one), and a pass is remembered under cache_dir()/checks, keyed by what decides the result (`cache_key`:
the artifact's and eval data's sha256, the manifest record, runtime package, pinned version, python, check kind,
the runner's and the check's code). Bytes already passed are not run again and the report says `cached`; a
failure or a skipped check is never stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from edgekit import formats
from edgekit.errors import EdgekitError, RuntimeEnvError
from edgekit.files import READY, cache_dir, cached_record, locked, store_record
from edgekit.formats import requirements
from edgekit.runner import OP_VERSION, RUNNER, error_line
from edgekit.runner.runner import EVAL_FILE

RUN_TIMEOUT_S = 600
PIP_NETWORK = ("--retries", "2", "--timeout", "60")  # offline: give up soon and say the check was skipped
# The check is about what the runtime can load and compute, not speed (`edgekit run` measures that): one thread,
# since a Pi's 4 XNNPACK threads on a 2-core machine spin-wait (tflite-runtime 2.14 fp32: 31 s instead of 2 s).
CHECK_THREADS = 1
NO_CHECK = {r.name: "needs a CUDA device; the ONNX file is checked by the verify stage on the CPU"
            for r in formats.runtimes().values() if r.gpu}
CACHE_SECTION = "checks"
NO_CACHE_ENV = "EDGEKIT_NO_CHECK_CACHE"  # set (non-empty): run every check, read no cached pass
CACHE_VERSION = 1  # raise it when what a check computes changes: every earlier pass is then run again
CHECK_SCRIPT = '''"""Checks artifacts of a bundle in one process with edgekit's runner code: a JSON line each."""
import json, sys
from pathlib import Path
import numpy as np
bundle, out, threads, mode, dumps = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
names = sys.argv[7:]
sys.path.insert(0, sys.argv[6])  # edgekit's runner, never the bundle's copy
import runner

def dump(name):
    manifest = json.loads((bundle / "manifest.json").read_text())
    runner.check_files(bundle, manifest)
    spec = {a["name"]: a for a in manifest["artifacts"]}[name]
    artifact = runner.Artifact(bundle / spec["file"], spec, int(threads))
    with np.load(bundle / "eval.npz") as f:
        x = f["x"]
    np.save(str(Path(dumps) / (name + ".npy")), np.stack([artifact.predict(x[i : i + 1])[0] for i in range(len(x))]))

def outputs_too(kept):
    """runner.accuracy that also keeps every sample's outputs: one pass instead of two (under qemu, ~20x slower)."""
    def accuracy(artifact, x, y):
        outs = np.stack([artifact.predict(x[i : i + 1])[0] for i in range(len(x))])
        kept.append(outs)
        return int((outs.argmax(1) == y).sum()) / len(x)  # what runner.accuracy computes: hits / samples
    return accuracy

def one(name):
    record, kept, plain = {"name": name}, [], runner.accuracy
    try:
        if mode in ("accuracy", "both"):
            runner.accuracy = outputs_too(kept) if mode == "both" else plain
            record["results"] = runner.run(runner._args([str(bundle), "--artifact", name, "--threads", threads,
                                                         "--mode", "accuracy"]))
        if kept:
            np.save(str(Path(dumps) / (name + ".npy")), kept[0])
            record["dumped"] = True
        elif mode == "dump":
            dump(name)
            record["dumped"] = True
    except SystemExit as exc:
        record["error"] = str(exc)
    except Exception as exc:
        record["error"] = type(exc).__name__ + ": " + str(exc)
    finally:
        runner.accuracy = plain
    return record

with open(out, "a") as f:
    for name in names:
        f.write(json.dumps(one(name)) + "\\n")
        f.flush()
'''


_FAILED: dict[str, str] = {}  # environment folder -> why it could not be made (once per process)


def package_of(runtime: str) -> str:
    return formats.runtime(runtime).package


def base_python(version: str) -> str:
    """`pythonX.Y` of the target when installed here, else the interpreter running edgekit."""
    return shutil.which(f"python{version}") or sys.executable


def pip_failure(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in (proc.stderr or "").splitlines() if ln.startswith("ERROR")]
    return (lines or [f"exit code {proc.returncode}"])[-1]


def runtime_python(package: str, version: str, python: str = "3.11", log=print) -> Path:
    """The python of a venv holding exactly `package==version` and numpy; made once, then reused."""
    env_dir = cache_dir() / "runtimes" / f"{package}-{version}-x86_64-py{python}"
    py = env_dir / "bin" / "python"
    if str(env_dir) in _FAILED:  # tried in this process already: say it again, don't download again
        raise RuntimeEnvError(_FAILED[str(env_dir)])
    with locked(env_dir):
        if not ((env_dir / READY).is_file() and py.exists()):
            _make_venv(env_dir, package, version, python, log)
    return py


def _make_venv(env_dir: Path, package: str, version: str, python: str, log) -> None:
    shutil.rmtree(env_dir, ignore_errors=True)
    log(f"  [runtime-check] installing {package}=={version} into {env_dir} (once; reused afterwards) ...")
    made = subprocess.run([base_python(python), "-m", "venv", str(env_dir)], capture_output=True, text=True)
    if made.returncode != 0:
        raise RuntimeEnvError(f"cannot create a venv for {package}=={version}: {made.stderr.strip()[-200:]}")
    proc = subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q",
                           "--disable-pip-version-check", *PIP_NETWORK, *requirements(package, version)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(env_dir, ignore_errors=True)
        _FAILED[str(env_dir)] = f"cannot install {package}=={version} from the package index: {pip_failure(proc)}"
        raise RuntimeEnvError(_FAILED[str(env_dir)])
    (env_dir / READY).write_text(" ".join(requirements(package, version)) + "\n")


def advice(error: str, runtime: str, version: str) -> dict:
    """Names the op and its version when the runtime lacks it, and says what to change."""
    found = OP_VERSION.search(error)
    if not found:
        return {}
    op, op_version = found.group("op"), int(found.group("version"))
    hint = (f"{runtime} {version} cannot run {op} version {op_version}, which this artifact needs. Either export "
            f"a full-integer model (TFLiteConverter with a representative_dataset and "
            f"supported_ops=[TFLITE_BUILTINS_INT8]; dynamic-range/hybrid quantization, i.e. Optimize.DEFAULT "
            f"without a representative dataset, needs {op} v{op_version}), or pin a newer runtime in the target "
            f"profile (e.g. artifacts with `runtime: litert` and `runtimes: {{litert: \"2.1.0\"}}`: "
            f"ai-edge-litert 2.1.0 runs it).")
    return {"op": op, "op_version": op_version, "hint": hint}


def run_runner(python: Path | str, bundle: Path, artifact: str, *, prefix: list[str] | None = None,
               env: dict | None = None, threads: int | None = None) -> tuple[dict | None, str | None]:
    """Runs edgekit's runner.py on one artifact of the bundle, accuracy only (a check needs no timings):
    (results, None) or (None, one-line error)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        cmd = [*(prefix or []), str(python), str(RUNNER), str(bundle), "--artifact", artifact,
               "--out", str(out), *(["--threads", str(threads)] if threads else []), "--mode", "accuracy"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return None, f"the runner did not finish in {RUN_TIMEOUT_S} s"
        if proc.returncode != 0 or not out.is_file():
            return None, error_line(proc.stderr, proc.returncode)
        return json.loads(out.read_text()), None


def run_batch(python: Path | str, bundle: Path, names: list[str], *, prefix: list[str] | None = None,
              env: dict | None = None, threads: int = CHECK_THREADS, mode: str = "accuracy",
              dumps: Path | None = None) -> dict[str, dict]:
    """Runs CHECK_SCRIPT once for all `names` (accuracy with edgekit's runner, and/or outputs written to
    `dumps`/NAME.npy): {name: {"results": ..., "dumped": True} or {"error": one line}}.

    A child that dies leaves the artifacts it did not finish: each of them runs again in a child of its own, so a
    crash is reported for the artifact that caused it and the others still get their results."""
    with tempfile.TemporaryDirectory() as tmp:
        out, script = Path(tmp) / "checks.jsonl", Path(tmp) / "check.py"
        script.write_text(CHECK_SCRIPT)
        cmd = [*(prefix or []), str(python), str(script), str(bundle), str(out), str(threads), mode,
               str(dumps or "-"), str(RUNNER.parent), *names]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT_S * len(names))
            died = None if proc.returncode == 0 else error_line(proc.stderr, proc.returncode)
        except subprocess.TimeoutExpired:
            died = f"the runner did not finish in {RUN_TIMEOUT_S * len(names)} s"
        lines = out.read_text().splitlines() if out.is_file() else []
    records = {}
    for line in lines:
        record = json.loads(line)
        if "error" in record:
            record["error"] = error_line(record["error"], 1)
        records[record.pop("name")] = record
    missing = [n for n in names if n not in records]
    if missing and len(names) == 1:
        return {names[0]: {"error": died or "the runner wrote no result"}}
    for name in missing:  # the child died on one of these: one child each from here on
        records |= run_batch(python, bundle, [name], prefix=prefix, env=env, threads=threads, mode=mode, dumps=dumps)
    return records


def clean_env(extra: dict | None = None) -> dict:
    """A child environment that sees no user site-packages nor this process's PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return env | {"PYTHONNOUSERSITE": "1", "TF_CPP_MIN_LOG_LEVEL": "3"} | (extra or {})


def check_result(spec: dict, arch: str, emulated: bool, results: dict | None, error: str | None) -> dict:
    """The report's `runtime_check` entry for one artifact."""
    check = {"runtime": spec["runtime"], "version": spec["runtime_version"], "arch": arch, "emulated": emulated,
             "ok": error is None}
    if error is not None:
        check["error"] = error
        check.update(advice(error, spec["runtime"], spec["runtime_version"]))
        return check
    ran = results["runtime"]
    if ran["name"] != spec["runtime"] or ran["version"] != spec["runtime_version"]:
        check.update(ok=False, error=f"the runner used {ran['name']} {ran['version']}, not the pinned "
                                     f"{spec['runtime']} {spec['runtime_version']}")
    check["accuracy"] = results["accuracy"]
    return check


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(bundle: Path, manifest: dict, spec: dict, kind: str, python_version: str,
              extra: dict | None = None) -> str | None:
    """What decides a check's result, hashed; None when the bundle's files do not match the manifest's sha256
    (then the runner must run, and say so)."""
    try:
        artifact, data = file_sha256(bundle / spec["file"]), file_sha256(bundle / EVAL_FILE)
    except (OSError, KeyError, TypeError):
        return None
    files = manifest.get("files", {})
    if artifact != files.get(spec["file"]) or data != files.get(EVAL_FILE):
        return None
    material = {"kind": kind, "cache_version": CACHE_VERSION, "artifact_sha256": artifact, "eval_sha256": data,
                "package": package_of(spec["runtime"]), "runtime_version": spec["runtime_version"],
                "python": python_version, "artifact": spec, "runner_sha256": file_sha256(RUNNER),
                "check_code_sha256": file_sha256(Path(__file__)),
                "threads": CHECK_THREADS} | (extra or {})
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()


def cached_check(key: str | None) -> dict | None:
    """A pass stored for this key, marked as coming from the cache; never with $EDGEKIT_NO_CHECK_CACHE set (every
    check then runs, as a test of the checks themselves needs)."""
    if os.environ.get(NO_CACHE_ENV):
        return None
    record = cached_record(CACHE_SECTION, key) if key else None
    if not record or record.get("check", {}).get("ok") is not True:
        return None
    return record["check"] | {"cached": {"key": key, "checked_utc": record.get("checked_utc")}}


def remember(key: str | None, check: dict) -> None:
    """Store a pass (only a pass: a failure or a skip is checked again next time)."""
    if key and check.get("ok") is True and "cached" not in check:
        store_record(CACHE_SECTION, key, {"check": check, "checked_utc": datetime.now(UTC).isoformat(
            timespec="seconds")})


def skipped(spec: dict, arch: str, emulated: bool, why: str) -> dict:
    return {"runtime": spec["runtime"], "version": spec["runtime_version"], "arch": arch, "emulated": emulated,
            "ok": None, "skipped": why}


def check_artifact(bundle: Path, spec: dict, python_version: str = "3.11", log=print) -> dict:
    """Loads and runs one artifact with its pinned runtime version (x86 wheel), through edgekit's runner."""
    if spec["runtime"] in NO_CHECK:
        return skipped(spec, "x86_64", False, NO_CHECK[spec["runtime"]])
    return check_runtime(bundle, [spec], python_version, log)[spec["name"]]


def check_runtime(bundle: Path, specs: list[dict], python_version: str, log=print) -> dict[str, dict]:
    """All `specs` (one runtime and version) in one child process of the pinned runtime's venv."""
    spec0 = specs[0]
    try:
        py = runtime_python(package_of(spec0["runtime"]), spec0["runtime_version"], python_version, log)
    except RuntimeEnvError as exc:
        return {s["name"]: skipped(s, "x86_64", False, str(exc)) for s in specs}
    records = run_batch(py, bundle, [s["name"] for s in specs], env=clean_env(), threads=CHECK_THREADS)
    return {s["name"]: check_result(s, "x86_64", False, records[s["name"]].get("results"),
                                    records[s["name"]].get("error")) for s in specs}


def by_runtime(specs: list[dict]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for spec in specs:
        groups.setdefault((spec["runtime"], spec["runtime_version"]), []).append(spec)
    return groups


def check_all(manifest: dict, arch: str, emulated: bool, key_of, run_group, how: str, describe_fn, log) -> dict:
    """Each artifact of a manifest: skipped (a GPU runtime), a pass of the same key from the cache, or run by
    `run_group(specs)` once per runtime and remembered when it passes. Shared by the native and emulated checks."""
    tag, target = ("emulate" if emulated else "runtime-check"), manifest["target"]["name"]
    checks, keys, todo = {}, {}, []
    for spec in manifest["artifacts"]:
        if spec["runtime"] in NO_CHECK:
            checks[spec["name"]] = skipped(spec, arch, emulated, NO_CHECK[spec["runtime"]])
            continue
        keys[spec["name"]] = key_of(spec)
        checks[spec["name"]] = cached_check(keys[spec["name"]])
        if checks[spec["name"]] is None:
            todo.append(spec)
    for (runtime, version), specs in by_runtime(todo).items():
        log(f"  [{tag}] {target}: {runtime} {version}, {len(specs)} artifact(s) in one {how} ...")
        t0 = time.perf_counter()
        for name, check in run_group(specs).items():
            remember(keys[name], check)
            checks[name] = check
        log(f"  [{tag}] {target}: {runtime} {version} done in {time.perf_counter() - t0:.1f} s")
    for name, check in checks.items():
        log(f"  [{tag}] {target}/{name}: {describe_fn(check)}")
    return checks


def check_bundle(bundle: Path, log=print) -> dict[str, dict]:
    """runtime_check per artifact of a bundle (native, with each artifact's pinned runtime version): passes of the
    same bytes come from the cache; the rest run in one child per runtime."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    python_version = manifest["target"].get("python", "3.11")
    return check_all(manifest, "x86_64", False,
                     lambda spec: cache_key(bundle, manifest, spec, "x86_64", python_version),
                     lambda specs: check_runtime(bundle, specs, python_version, log), "child process", describe, log)


def from_cache(check: dict) -> str:
    cached = check.get("cached")
    return f" [cached: these bytes passed on {cached['checked_utc']}; not run again]" if cached else ""


def describe(check: dict) -> str:
    where = f"{check['runtime']} {check['version']} on {check['arch']}" + (" (emulated)" if check["emulated"] else "")
    if check["ok"] is None:
        return f"skipped ({where}): {check['skipped']}"
    if check["ok"]:
        return f"ok ({where}, accuracy {check['accuracy']:.4f}){from_cache(check)}"
    return f"FAILED ({where}): {check.get('hint') or check['error']}"


def failures(report: dict) -> list[str]:
    """One line per artifact whose pinned runtime cannot run it."""
    return [f"{a['target']}/{a['name']}: {a['runtime_check'].get('hint') or a['runtime_check'].get('error')}"
            for a in report["artifacts"] if a.get("runtime_check", {}).get("ok") is False]


def raise_on_failures(report: dict) -> None:
    """After report.json is written: a bundle whose pinned runtime cannot run an artifact fails the build."""
    failed = failures(report)
    if failed:
        raise EdgekitError("the runtime pinned by the target cannot run an artifact (details in report.json, "
                           "artifacts[].runtime_check):\n  " + "\n  ".join(failed))


def _versus_x86(check: dict) -> str:
    cmp = check.get("outputs_vs_x86")
    if cmp is None:
        return "-"
    if cmp["identical"]:
        return "identical"
    steps = f" ({cmp['int8_steps']} int8 step(s))" if cmp.get("int8_steps") is not None else ""
    return f"max|diff| {cmp['max_abs_diff']:.2g}{steps}"


def table(result: dict) -> str:
    """`edgekit check`'s table; emulated runs show no latency, since qemu's timings are not the device's."""
    lines = [f"{'artifact':<20} {'runtime':<22} {'arch':<8} {'emulated':<8} {'check':<7} {'acc':>6} "
             f"{'manifest':>8}  outputs vs x86"]
    for name, c in result["artifacts"].items():
        status = {True: "ok", False: "FAILED", None: "skipped"}[c["ok"]]
        acc = f"{c['accuracy']:.4f}" if "accuracy" in c else "-"
        ref = f"{c['manifest_accuracy']:.4f}" if "manifest_accuracy" in c else "-"
        lines.append(f"{name:<20} {c['runtime'] + ' ' + c['version']:<22} {c['arch']:<8} "
                     f"{'yes' if c['emulated'] else 'no':<8} {status:<7} {acc:>6} {ref:>8}  {_versus_x86(c)}")
        detail = c.get("hint") or c.get("error") or c.get("skipped") or from_cache(c).strip(" []")
        if detail:
            lines.append(f"    {detail}")
    emulation = result.get("emulation")
    if emulation and not emulation["ran"]:
        lines.append(emulation["message"])
    elif emulation:
        lines.append("latency and memory: not shown for emulated runs (qemu's timings are not the device's)")
    return "\n".join(lines)
