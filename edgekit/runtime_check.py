"""Check each bundled artifact with the runtime version its target pins, in an isolated environment.

The build's own environment has whatever TensorFlow / LiteRT / onnxruntime versions edgekit needs; the device
has one runtime at the version the target profile pins. So each artifact is loaded and run by the bundle's own
`runner.py` inside a venv that holds only numpy and `<package>==<pinned version>`, created once under the
cache directory (`$EDGEKIT_CACHE`, else `$XDG_CACHE_HOME/edgekit`, else `~/.cache/edgekit`) and reused. An op
version the pinned runtime cannot run is reported with the op, its version and what to change.

For an aarch64 target this runs the x86 wheel of the same pinned version (which proves op support by version);
`edgekit.emulate` adds a run of the aarch64 wheel under qemu user-mode emulation.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from edgekit import formats
from edgekit.errors import EdgekitError, RuntimeEnvError
from edgekit.files import READY, cache_dir, locked
from edgekit.formats import requirements
from edgekit.runner import OP_VERSION, RUNNER, error_line

RUN_TIMEOUT_S = 600
PIP_NETWORK = ("--retries", "2", "--timeout", "60")  # offline: give up soon and say the check was skipped
# The check is about what the runtime can load and compute, not speed (`edgekit run` measures that): one thread,
# since a Pi's 4 XNNPACK threads on a 2-core machine spin-wait (tflite-runtime 2.14 fp32: 31 s instead of 2 s).
CHECK_THREADS = 1
NO_CHECK = {r.name: "needs a CUDA device; the ONNX file is checked by the verify stage on the CPU"
            for r in formats.runtimes().values() if r.gpu}


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


def check_artifact(bundle: Path, spec: dict, python_version: str = "3.11", log=print) -> dict:
    """Loads and runs one artifact with its pinned runtime version (x86 wheel), through edgekit's runner."""
    runtime, version = spec["runtime"], spec["runtime_version"]
    if runtime in NO_CHECK:
        return {"runtime": runtime, "version": version, "arch": "x86_64", "emulated": False, "ok": None,
                "skipped": NO_CHECK[runtime]}
    try:
        py = runtime_python(package_of(runtime), version, python_version, log)
    except RuntimeEnvError as exc:
        return {"runtime": runtime, "version": version, "arch": "x86_64", "emulated": False, "ok": None,
                "skipped": str(exc)}
    results, error = run_runner(py, bundle, spec["name"], env=clean_env(), threads=CHECK_THREADS)
    return check_result(spec, "x86_64", False, results, error)


def check_bundle(bundle: Path, log=print) -> dict[str, dict]:
    """runtime_check per artifact of a bundle (native, with each artifact's pinned runtime version)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    python_version = manifest["target"].get("python", "3.11")
    checks = {}
    for spec in manifest["artifacts"]:
        check = check_artifact(bundle, spec, python_version, log)
        checks[spec["name"]] = check
        log(f"  [runtime-check] {manifest['target']['name']}/{spec['name']}: {describe(check)}")
    return checks


def describe(check: dict) -> str:
    where = f"{check['runtime']} {check['version']} on {check['arch']}" + (" (emulated)" if check["emulated"] else "")
    if check["ok"] is None:
        return f"skipped ({where}): {check['skipped']}"
    if check["ok"]:
        return f"ok ({where}, accuracy {check['accuracy']:.4f})"
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
        detail = c.get("hint") or c.get("error") or c.get("skipped")
        if detail:
            lines.append(f"    {detail}")
    emulation = result.get("emulation")
    if emulation and not emulation["ran"]:
        lines.append(emulation["message"])
    elif emulation:
        lines.append("latency and memory: not shown for emulated runs (qemu's timings are not the device's)")
    return "\n".join(lines)
