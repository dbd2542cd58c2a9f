"""Run an aarch64 bundle with edgekit's runner on this x86 machine under qemu user-mode emulation.

Everything comes from the package registries and is cached under the cache directory (see
`files.cache_dir`): a Debian arm64 sysroot with the target's Python (a private apt root, `apt-get
--download-only`, each .deb unpacked; about 40 packages, 16 MB), and the aarch64 wheels of the target's pinned
runtime and numpy (`pip install --only-binary=:all: --platform manylinux_2_X_aarch64 --target SITE`). The runner
then runs as `qemu-aarch64-static -cpu CPU -L SYSROOT SYSROOT/usr/bin/python3.X runner.py ...`.

Emulated outputs are real and are compared with the x86 run of the same bundle and pinned runtime version;
emulated timings and memory are not the device's, so results say `emulated: true` and carry no latency figure.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from edgekit.device import runtime_check as rc
from edgekit.errors import EmulationUnavailable
from edgekit.files import READY, cache_dir, locked
from edgekit.formats import requirements
from edgekit.runner import RUNNER, error_line

QEMU = "qemu-aarch64-static"
SKIP_MESSAGE = (f"emulated check skipped: {QEMU} not found; install qemu-user-static to enable "
                f"(apt-get install qemu-user-static)")
DEBIAN = {"3.11": ("bookworm", 36)}  # target python -> (Debian suite that ships it, its glibc minor version)
SYSROOT_PACKAGES = ("libstdc++6", "libgomp1")  # python3.X is added; apt resolves the rest
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
MIRROR = "http://deb.debian.org/debian"
QEMU_CPUS = ("cortex-a53", "cortex-a57", "cortex-a72", "cortex-a76", "neoverse-n1")
DEFAULT_CPU = "cortex-a72"
# qemu emulates every spin-wait of a runtime's thread pool: with the Pi's 4 threads on a 2-core x86 machine,
# tflite-runtime 2.14 took 116 ms per fp32 inference instead of 5.6 ms on one thread. Outputs are what is
# checked here (timings under qemu mean nothing), so the emulated runs use one thread.
EMULATED_THREADS = 1
# onnxruntime reads /proc/cpuinfo at import and crashes under qemu on an x86 one; qemu -L finds this one first
CPUINFO = "".join(f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
                  f"CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\n"
                  f"CPU revision\t: 3\n\n" for i in range(4))
DUMP_SCRIPT = '''"""Writes an artifact's float outputs on every eval.npz sample with edgekit's runner code."""
import json, sys
from pathlib import Path
import numpy as np
bundle, name, out, threads = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
sys.path.insert(0, sys.argv[5])  # edgekit's runner, never the bundle's copy
import runner
manifest = json.loads((bundle / "manifest.json").read_text())
runner.check_files(bundle, manifest)
spec = {a["name"]: a for a in manifest["artifacts"]}[name]
artifact = runner.Artifact(bundle / spec["file"], spec, threads or manifest["target"]["threads"])
with np.load(bundle / "eval.npz") as f:
    x = f["x"]
np.save(out, np.stack([artifact.predict(x[i : i + 1])[0] for i in range(len(x))]))
'''


def qemu() -> str | None:
    return shutil.which(QEMU)


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise EmulationUnavailable(f"{what} failed: {last}")


def _apt_options(root: Path) -> list[str]:
    return ["-o", f"Dir={root}", "-o", f"Dir::State::status={root}/var/lib/dpkg/status",
            "-o", "APT::Architecture=arm64", "-o", "APT::Architectures::=arm64",
            "-o", "Dir::Etc::trusted=/etc/apt/trusted.gpg", "-o", "Dir::Etc::trustedparts=/etc/apt/trusted.gpg.d",
            "-qq"]


def _download_debs(root: Path, suite: str, python_version: str) -> list[Path]:
    """A private apt root for arm64 Debian: `apt-get update`, then download the packages and their dependencies."""
    if not shutil.which("apt-get") or not Path(KEYRING).is_file():
        raise EmulationUnavailable("the arm64 sysroot needs apt-get and Debian's archive keyring "
                                   "(apt-get install debian-archive-keyring)")
    for sub in ("etc/apt/apt.conf.d", "etc/apt/preferences.d", "etc/apt/sources.list.d", "var/lib/dpkg",
                "var/lib/apt/lists/partial", "var/cache/apt/archives/partial"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "var/lib/dpkg/status").touch()
    (root / "etc/apt/sources.list").write_text(f"deb [arch=arm64 signed-by={KEYRING}] {MIRROR} {suite} main\n")
    opts = _apt_options(root)
    _run(["apt-get", *opts, "update"], f"apt-get update for Debian {suite} arm64")
    _run(["apt-get", *opts, "install", "-y", "--download-only", "--no-install-recommends",
          f"python{python_version}", *SYSROOT_PACKAGES], f"downloading python{python_version} for arm64")
    return sorted((root / "var/cache/apt/archives").glob("*.deb"))


def _unpack(debs: list[Path], dest: Path) -> None:
    """Unpacks .debs like dpkg would, keeping Debian's merged /usr (bin, lib, sbin are links into usr/)."""
    for sub in ("bin", "lib", "sbin"):
        (dest / "usr" / sub).mkdir(parents=True, exist_ok=True)
        (dest / sub).symlink_to(f"usr/{sub}")
    for deb in debs:
        tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        untar = subprocess.run(["tar", "-x", "--keep-directory-symlink", "-C", str(dest)], stdin=tar.stdout,
                               capture_output=True, text=True)
        tar.stdout.close()
        if tar.wait() != 0 or untar.returncode != 0:
            raise EmulationUnavailable(f"cannot unpack {deb.name}: {untar.stderr.strip()[-200:]}")
    (dest / "proc").mkdir(exist_ok=True)
    (dest / "proc" / "cpuinfo").write_text(CPUINFO)


def sysroot(python_version: str = "3.11", log=print) -> Path:
    """A Debian arm64 userland holding `python3.X`; made once under the cache directory, then reused."""
    if python_version not in DEBIAN:
        raise EmulationUnavailable(f"no Debian arm64 sysroot recipe for Python {python_version}; "
                                   f"known: {', '.join(DEBIAN)}")
    suite, _ = DEBIAN[python_version]
    dest = cache_dir() / "emulate" / f"sysroot-{suite}-arm64"
    with locked(dest):
        if not (dest / READY).is_file():
            _make_sysroot(dest, suite, python_version, log)
    return dest


def _make_sysroot(dest: Path, suite: str, python_version: str, log) -> None:
    log(f"  [emulate] making a Debian {suite} arm64 sysroot with python{python_version} in {dest} "
        f"(once: about 40 packages, 16 MB) ...")
    apt_root = cache_dir() / "emulate" / f"apt-{suite}-arm64"
    debs = _download_debs(apt_root, suite, python_version)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _unpack(debs, tmp)
    if not (tmp / "usr/bin" / f"python{python_version}").is_file():
        raise EmulationUnavailable(f"the arm64 sysroot has no python{python_version} after unpacking")
    (tmp / READY).write_text(f"{len(debs)} packages\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    shutil.rmtree(apt_root, ignore_errors=True)  # the downloaded .debs: unpacked, no longer needed


def platform_tags(python_version: str) -> list[str]:
    """pip's --platform takes no ranges: every manylinux tag the sysroot's glibc can load."""
    _, glibc = DEBIAN[python_version]
    tags = []
    for minor in range(glibc, 16, -1):
        tags += ["--platform", f"manylinux_2_{minor}_aarch64"]
    return tags + ["--platform", "manylinux2014_aarch64"]


def site(package: str, version: str, python_version: str = "3.11", log=print) -> Path:
    """The aarch64 wheels of `package==version` and numpy, unpacked into a folder for PYTHONPATH."""
    dest = cache_dir() / "emulate" / f"site-{package}-{version}-aarch64-py{python_version}"
    with locked(dest):
        if not (dest / READY).is_file():
            _install_wheels(dest, package, version, python_version, log)
    return dest


def _install_wheels(dest: Path, package: str, version: str, python_version: str, log) -> None:
    log(f"  [emulate] installing the aarch64 wheels of {package}=={version} into {dest} (once) ...")
    shutil.rmtree(dest, ignore_errors=True)
    abi = "cp" + python_version.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", *rc.PIP_NETWORK,
           "--only-binary=:all:", *platform_tags(python_version), "--python-version", python_version,
           "--implementation", "cp", "--abi", abi, "--target", str(dest), *requirements(package, version)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(dest, ignore_errors=True)
        raise EmulationUnavailable(f"no aarch64 {abi} wheels of {package}=={version}: {rc.pip_failure(proc)}")
    (dest / READY).write_text(" ".join(requirements(package, version)) + "\n")


def cpu_for(description: str) -> str:
    """The qemu CPU model named in the target's description (e.g. "Cortex-A76"), else cortex-a72."""
    found = re.search(r"(cortex-a\d+|neoverse-n1)", description.lower())
    return found.group(1) if found and found.group(1) in QEMU_CPUS else DEFAULT_CPU


class Emulator:
    """qemu-aarch64-static with a sysroot and one site folder: runs a python script as the device would."""

    def __init__(self, root: Path, site_dir: Path, python_version: str, cpu: str) -> None:
        self.prefix = [qemu() or QEMU, "-cpu", cpu, "-L", str(root)]
        self.python = root / "usr" / "bin" / f"python{python_version}"
        self.env = rc.clean_env({"PYTHONPATH": str(site_dir)})
        self.cpu = cpu

    def runner(self, bundle: Path, artifact: str) -> tuple[dict | None, str | None]:
        return rc.run_runner(self.python, bundle, artifact, prefix=self.prefix, env=self.env,
                             threads=EMULATED_THREADS)

    def batch(self, bundle: Path, names: list[str], dumps: Path) -> dict[str, dict]:
        """Accuracy and outputs (dumps/NAME.npy) of every named artifact in one emulated child."""
        return rc.run_batch(self.python, bundle, names, prefix=self.prefix, env=self.env, threads=EMULATED_THREADS,
                            mode="both", dumps=dumps)

    def dump(self, bundle: Path, artifact: str, out: Path) -> str | None:
        return dump_outputs([*self.prefix, str(self.python)], bundle, artifact, out, self.env, EMULATED_THREADS)


def dump_outputs(python: list[str], bundle: Path, artifact: str, out: Path, env: dict,
                 threads: int = 0) -> str | None:
    """Runs DUMP_SCRIPT: the artifact's outputs on every eval sample to `out` (.npy); returns an error or None.

    threads 0: the manifest's thread count."""
    script = out.with_name("dump_outputs.py")
    script.write_text(DUMP_SCRIPT)
    try:
        proc = subprocess.run([*python, str(script), str(bundle), artifact, str(out), str(threads), str(RUNNER.parent)],
                              capture_output=True, text=True, env=env, timeout=rc.RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"writing the outputs did not finish in {rc.RUN_TIMEOUT_S} s"
    return None if proc.returncode == 0 and out.is_file() else error_line(proc.stderr, proc.returncode)


def compare(x86: np.ndarray, emulated: np.ndarray, spec: dict) -> dict:
    """Emulated vs x86 outputs: identical, or within one output quantization step (int8 outputs)."""
    diff = float(np.abs(x86 - emulated).max()) if x86.shape == emulated.shape else float("inf")
    out = {"identical": bool(x86.shape == emulated.shape and np.array_equal(x86, emulated)), "max_abs_diff": diff,
           "top1_agreement": float((x86.argmax(1) == emulated.argmax(1)).mean()) if diff != float("inf") else 0.0}
    scale = spec.get("output", {}).get("scale")
    if spec.get("output", {}).get("dtype") in ("int8", "uint8") and scale:
        out["int8_steps"] = int(round(diff / scale)) if diff != float("inf") else None  # dequantized: k * scale
        out["ok"] = out["int8_steps"] is not None and out["int8_steps"] <= 1
    else:  # float outputs: the same kernels in another instruction set; allow rounding-order differences
        out["ok"] = diff <= 1e-4 * max(1.0, float(np.abs(x86).max()))
    return out


def _reference_python(spec: dict, python_version: str, log) -> Path:
    return rc.runtime_python(rc.package_of(spec["runtime"]), spec["runtime_version"], python_version, log)


def verify_artifact(emu: Emulator, bundle: Path, spec: dict, manifest: dict, log=print) -> dict:
    """The bundle's runner under emulation, plus its outputs against the x86 run of the same pinned runtime."""
    return verify_runtime(emu, bundle, [spec], manifest, log)[spec["name"]]


def verify_runtime(emu: Emulator, bundle: Path, specs: list[dict], manifest: dict, log=print) -> dict[str, dict]:
    """Artifacts of one runtime: one qemu child runs them all (accuracy and outputs), one x86 child of the same
    pinned version writes the outputs they are compared with."""
    names = [s["name"] for s in specs]
    python_version = manifest["target"].get("python", "3.11")
    with tempfile.TemporaryDirectory() as tmp:
        emu_dir, x86_dir = Path(tmp) / "emulated", Path(tmp) / "x86"
        emu_dir.mkdir()
        x86_dir.mkdir()
        emulated = emu.batch(bundle, names, emu_dir)
        ran = [n for n in names if "error" not in emulated[n]]
        reference, x86 = None, {}
        if ran:
            try:
                reference = str(_reference_python(specs[0], python_version, log))
            except rc.RuntimeEnvError as exc:  # no x86 wheel to compare with: say so, fail nothing
                reference = exc
        if isinstance(reference, str):
            x86 = rc.run_batch(reference, bundle, ran, env=rc.clean_env(), threads=EMULATED_THREADS, mode="dump",
                               dumps=x86_dir)
        return {s["name"]: _assemble(emu, s, manifest, emulated[s["name"]], reference, x86.get(s["name"]),
                                     emu_dir, x86_dir) for s in specs}


def _assemble(emu: Emulator, spec: dict, manifest: dict, emulated: dict, reference, x86: dict | None,
              emu_dir: Path, x86_dir: Path) -> dict:
    """One artifact's emulated runtime_check from its qemu record and the x86 outputs."""
    check = rc.check_result(spec, "aarch64", True, emulated.get("results"), emulated.get("error")) | {
        "cpu": emu.cpu, "threads": EMULATED_THREADS}
    if "error" in emulated:
        return check
    if isinstance(reference, Exception):
        return check | {"ok": None, "skipped": f"no x86 run to compare with: {reference}"}
    error = None if emulated.get("dumped") else "the emulated run wrote no outputs"
    error = error or (x86 or {}).get("error") or (None if (x86 or {}).get("dumped") else "the x86 run wrote no outputs")
    if error is not None:
        return check | {"ok": False, "error": f"writing outputs failed: {error}"}
    name = spec["name"]
    check["outputs_vs_x86"] = compare(np.load(x86_dir / f"{name}.npy"), np.load(emu_dir / f"{name}.npy"), spec)
    results = emulated["results"]
    tolerance = manifest["target"].get("accuracy_tolerance_pp", 1.0) / 100.0
    check["manifest_accuracy"] = spec["reference"]["accuracy"]
    check["accuracy_ok"] = abs(check["accuracy"] - check["manifest_accuracy"]) <= tolerance
    problems = _problems(check, tolerance)
    check["ok"] = bool(check["ok"] and not problems)
    if problems:
        check["error"] = check.get("error") or "; ".join(problems)
    check["note"] = "emulated: timings and memory under qemu are not the device's and are not reported"
    check["runtime_seen"] = results["runtime"]
    check["numpy"] = results.get("environment", {}).get("numpy")
    return check


def _problems(check: dict, tolerance: float) -> list[str]:
    cmp, found = check["outputs_vs_x86"], []
    if not cmp["ok"]:
        steps = f" ({cmp['int8_steps']} int8 steps)" if cmp.get("int8_steps") is not None else ""
        found.append(f"emulated outputs differ from x86 by up to {cmp['max_abs_diff']:.3g}{steps}")
    if not check["accuracy_ok"]:
        found.append(f"emulated accuracy {check['accuracy']:.4f} is more than {tolerance * 100:.1f} pp from the "
                     f"manifest's {check['manifest_accuracy']:.4f}")
    return found


def make_emulator(manifest: dict, spec: dict, log=print) -> Emulator:
    python_version = manifest["target"].get("python", "3.11")
    root = sysroot(python_version, log)
    site_dir = site(rc.package_of(spec["runtime"]), spec["runtime_version"], python_version, log)
    return Emulator(root, site_dir, python_version, cpu_for(manifest["target"].get("description", "")))


def emulated_key(bundle: Path, manifest: dict, spec: dict) -> str | None:
    """The cache key of an emulated check: the native key's parts plus the qemu CPU, threads, the sysroot and the
    accuracy tolerance (what `_problems` compares with)."""
    python_version = manifest["target"].get("python", "3.11")
    suite = DEBIAN.get(python_version, ("?",))[0]
    ready = cache_dir() / "emulate" / f"sysroot-{suite}-arm64" / READY
    extra = {"cpu": cpu_for(manifest["target"].get("description", "")), "emulated_threads": EMULATED_THREADS,
             "tolerance_pp": manifest["target"].get("accuracy_tolerance_pp", 1.0),
             "sysroot": ready.read_text() if ready.is_file() else None, "qemu": qemu(),
             "emulate_code_sha256": rc.file_sha256(Path(__file__))}
    return rc.cache_key(bundle, manifest, spec, "aarch64-emulated", python_version, extra)


def verify_bundle(bundle: Path, log=print) -> dict:
    """Every artifact of an aarch64 bundle under emulation: {artifact name: emulated runtime_check}. Passes of the
    same bytes come from the cache; the rest run in one qemu child (and one x86 child) per runtime."""
    if qemu() is None:
        raise EmulationUnavailable(SKIP_MESSAGE)
    manifest = json.loads((bundle / "manifest.json").read_text())
    if manifest["target"]["arch"] != "aarch64":
        raise EmulationUnavailable(f"'{bundle}' is a {manifest['target']['arch']} bundle; emulation is for aarch64")

    def run_group(specs: list[dict]) -> dict[str, dict]:
        return verify_runtime(make_emulator(manifest, specs[0], log), bundle, specs, manifest, log)

    return rc.check_all(manifest, "aarch64", True, lambda spec: emulated_key(bundle, manifest, spec), run_group,
                        "emulated child under qemu, then their x86 outputs", describe, log)


def describe(check: dict) -> str:
    cmp = check.get("outputs_vs_x86")
    if check["ok"] is None or cmp is None:
        return rc.describe(check)
    steps = f", {cmp['int8_steps']} int8 step(s)" if cmp.get("int8_steps") is not None else ""
    same = "identical to x86" if cmp["identical"] else f"max |diff| vs x86 {cmp['max_abs_diff']:.3g}{steps}"
    return (f"{'ok' if check['ok'] else 'FAILED'} ({check['runtime']} {check['version']}, qemu {check['cpu']}): "
            f"outputs {same}; accuracy {check['accuracy']:.4f} (manifest {check['manifest_accuracy']:.4f})"
            + rc.from_cache(check))
