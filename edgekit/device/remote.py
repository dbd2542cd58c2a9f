"""`edgekit run BUNDLE --host user@host`: run a bundle on a device over SSH with the system's OpenSSH client.

Steps: probe the device (architecture, Python, numpy, the pinned runtime), optionally make a venv there and
install the pinned runtime (`--setup`), copy the bundle as a tar.gz (only the files its manifest lists, as
regular files inside it) and check its sha256 on arrival, run the bundle's own runner once per artifact (on the
device), bring the results back (validated against the results schema) and write them next to the bundle in one
atomic step, then remove the remote folder unless asked to keep it, also when a step failed.

Security: keys only (BatchMode: never a password prompt, no password on any command line); host keys are
checked against edgekit's own known-hosts file. An unknown key is refused unless --accept-new-host-key (then
it is pinned there); a changed key is always refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from edgekit import formats
from edgekit.device import measure
from edgekit.device.manifest import bundle_files
from edgekit.errors import CommandFailed, ConnectionLost, HostKeyError, RemoteError

ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64"}
RUNTIME_MODULES = {"numpy": "numpy", "onnxruntime": "onnxruntime", "onnxruntime-gpu": "onnxruntime",
                   "litert": "ai_edge_litert", "tflite-runtime": "tflite_runtime"}
PROBE = """\
import json, platform, sys
mods = {}
for name, mod in MODULES:
    try:
        mods[name] = getattr(__import__(mod), "__version__", "unknown")
    except Exception:
        mods[name] = None
try:
    import onnxruntime
    providers = onnxruntime.get_available_providers()
except Exception:
    providers = []
print(json.dumps({"machine": platform.machine(), "python": ".".join(map(str, sys.version_info[:3])),
                  "executable": sys.executable, "modules": mods, "onnx_providers": providers}))
""".replace("MODULES", repr(sorted(RUNTIME_MODULES.items())))
PYTHON_HINT = ("pass --python with the path of a Python 3 on the device (e.g. --python python3 or --python "
               "'~/edgekit-venv/bin/python')")
CHECK_ARCHIVE = "import hashlib,sys; print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())"


def default_known_hosts() -> Path:
    if os.environ.get("EDGEKIT_KNOWN_HOSTS"):
        return Path(os.environ["EDGEKIT_KNOWN_HOSTS"])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "edgekit" / "known_hosts"


@dataclass
class Connection:
    """One device: `user@host`, port, key file and edgekit's known-hosts file (host keys pinned there)."""

    host: str
    port: int | None = None
    identity: str | None = None
    accept_new_host_key: bool = False
    known_hosts: Path = field(default_factory=default_known_hosts)
    connect_timeout_s: int = 10

    @property
    def hostname(self) -> str:
        return self.host.rsplit("@", 1)[-1]

    def options(self) -> list[str]:
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        opts = {"BatchMode": "yes", "PasswordAuthentication": "no", "KbdInteractiveAuthentication": "no",
                "StrictHostKeyChecking": "accept-new" if self.accept_new_host_key else "yes",
                "UserKnownHostsFile": str(self.known_hosts), "GlobalKnownHostsFile": "/dev/null",
                "UpdateHostKeys": "no", "ConnectTimeout": str(self.connect_timeout_s),
                "ServerAliveInterval": "5", "ServerAliveCountMax": "3"}
        args = [a for k, v in opts.items() for a in ("-o", f"{k}={v}")]
        if self.identity:
            args += ["-i", str(self.identity), "-o", "IdentitiesOnly=yes"]
        if self.port:
            args += ["-p", str(self.port)]
        return args

    def ssh(self, command: str, step: str, *, stdin=None, timeout: float | None = None) -> bytes:
        """Run a shell command on the device; its stdout, or an error that says which step failed and why."""
        argv = ["ssh", *self.options(), self.host, command]
        try:
            proc = subprocess.run(argv, stdin=stdin if stdin is not None else subprocess.DEVNULL,
                                  capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise ConnectionLost(f"{self.host} did not answer within {timeout:.0f} s while {step}") from exc
        if proc.returncode == 255:
            raise ssh_error(self, step, proc.stderr.decode(errors="replace"))
        if proc.returncode != 0:
            raise command_error(self, step, proc)
        return proc.stdout


def command_error(conn: Connection, step: str, proc: subprocess.CompletedProcess) -> RemoteError:
    """A command on the device failed: its last real line of stderr, and what to do where that is known."""
    lines = [ln for ln in proc.stderr.decode(errors="replace").splitlines() if ln.strip()
             and not ln.startswith(("INFO:", "WARNING:"))]
    last = (lines or [f"exit code {proc.returncode}"])[-1]
    if "No space left on device" in proc.stderr.decode(errors="replace"):
        return RemoteError(f"{conn.host} is out of disk space: {step} failed ({last}). Free space in the device's "
                           "$TMPDIR (default /tmp), then run again")
    return CommandFailed(f"on {conn.host}, {step} failed: {last}", last)


def ssh_error(conn: Connection, step: str, stderr: str) -> RemoteError:
    """ssh's own failures (exit code 255) turned into what the user has to do."""
    where = f"[{conn.hostname}]:{conn.port}" if conn.port else conn.hostname
    if "IDENTIFICATION HAS CHANGED" in stderr or "has changed and you have requested strict" in stderr:
        return HostKeyError(
            f"the host key of {conn.host} has CHANGED since it was pinned in {conn.known_hosts}: refused. This "
            "happens after a reinstall, or when someone is in the middle of the connection. If you know the "
            f"device was reinstalled, remove the old key with `ssh-keygen -R '{where}' -f {conn.known_hosts}`, "
            "then run again with --accept-new-host-key")
    if "Host key verification failed" in stderr or "No ED25519 host key is known" in stderr:
        return HostKeyError(
            f"the host key of {conn.host} is not known to edgekit ({conn.known_hosts}): refused. Check the key's "
            "fingerprint on the device (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`), then run again "
            "with --accept-new-host-key to pin it")
    if "Permission denied" in stderr:
        return RemoteError(f"{conn.host} refused the login: edgekit uses keys only (no passwords). Pass "
                           "--identity FILE with a key that the device's ~/.ssh/authorized_keys holds, or load it "
                           "into ssh-agent")
    last = ([ln for ln in stderr.splitlines() if ln.strip()] or ["no message"])[-1]
    if step == "connecting" or "Connection refused" in stderr or "Could not resolve" in stderr:
        return RemoteError(f"cannot connect to {conn.host}: {last}")
    return ConnectionLost(f"the connection to {conn.host} was lost while {step} ({last}). Nothing was written "
                          "locally; run the same command again")


# --- checking the device -----------------------------------------------------------------------------------

def rpython(python: str) -> str:
    """The device's Python as a shell word; a leading ~/ means the remote user's home."""
    if python.startswith("~/"):
        return '"$HOME"/' + shlex.quote(python[2:])
    return shlex.quote(python)


def probe(conn: Connection, python: str) -> dict:
    try:
        out = conn.ssh(f"{rpython(python)} -c {shlex.quote(PROBE)}", "connecting")
    except CommandFailed as exc:
        raise RemoteError(f"'{python}' on {conn.host} is not a working Python ({exc.detail}); {PYTHON_HINT}") from None
    try:
        info = json.loads(out.decode(errors="replace").strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        info = None
    if not isinstance(info, dict) or "machine" not in info:
        raise RemoteError(f"'{python}' on {conn.host} did not answer the probe (is it a Python 3?); {PYTHON_HINT}")
    return info


def requirements(runtime: str, version: str) -> list[str]:
    """What the device needs for one runtime: the pinned package, and numpy (below 2 for tflite-runtime)."""
    return formats.runtime(runtime).requirements(version)


def needed(manifest: dict, names: list[str]) -> dict[str, str]:
    specs = {a["name"]: a for a in manifest["artifacts"]}
    return {specs[n]["runtime"]: specs[n]["runtime_version"] for n in names}


def mismatches(info: dict, manifest: dict, names: list[str]) -> list[str]:
    """What differs between the device and the bundle's target; empty when the bundle can run there."""
    target, problems = manifest["target"], []
    arch = ARCH_ALIASES.get(info["machine"], info["machine"])
    if arch != target["arch"]:
        problems.append(f"the device is {arch}, the bundle is for {target['arch']}: build for the device's target")
    if not info["python"].startswith(str(target["python"]) + "."):
        problems.append(f"Python {info['python']} (the target pins {target['python']})")
    if info["modules"].get("numpy") is None:
        problems.append("numpy is not installed")
    for runtime, version in needed(manifest, names).items():
        gpu = formats.runtime(runtime).gpu  # onnxruntime-gpu imports as onnxruntime; CUDA must be there
        have = info["modules"].get("onnxruntime" if gpu else runtime)
        if have != version:
            problems.append(f"{formats.runtime(runtime).package} {have or 'is missing'}"
                            + (f" (the target pins {version})" if have else f" ({version} needed)"))
        if gpu and have and "CUDAExecutionProvider" not in info["onnx_providers"]:
            problems.append("onnxruntime has no CUDAExecutionProvider: install onnxruntime-gpu (JetPack wheel)")
    return problems


def install_hint(manifest: dict, names: list[str], python: str) -> str:
    reqs = sorted({r for rt, v in needed(manifest, names).items() for r in requirements(rt, v)})
    return (f"on the device: `{python} -m pip install {' '.join(shlex.quote(r) for r in reqs)}`; or run again with "
            f"--setup (a venv on the device with those), or --python PATH to a Python {manifest['target']['python']} "
            "that has them")


def setup_venv(conn: Connection, manifest: dict, names: list[str], python: str, log=print, *,
               venv: str | None = None, pip_options: list[str] | None = None) -> str:
    """A venv on the device (default ~/.cache/edgekit/venv-<target>) with numpy and the pinned runtime from the
    package registry (pip_options: e.g. a mirror's --index-url); returns its python."""
    where = shlex.quote(venv) if venv else f'"$HOME"/.cache/edgekit/venv-{shlex.quote(manifest["target"]["name"])}'
    reqs = [r for rt, v in needed(manifest, names).items() for r in requirements(rt, v)]
    log(f"  [setup] {conn.host}: a venv with {' '.join(reqs)} ...")
    pip = " ".join(shlex.quote(a) for a in ["-m", "pip", "install", "-q", "--disable-pip-version-check",
                                            *(pip_options or []), *reqs])
    conn.ssh(f"{rpython(python)} -m venv {where} && {where}/bin/python {pip}", "setting up the venv (--setup)")
    return conn.ssh(f"cd {where} && pwd", "setting up the venv").decode().strip() + "/bin/python"


# --- running -----------------------------------------------------------------------------------------------

def pack(bundle: Path, manifest: dict, dest: Path) -> tuple[Path, str]:
    """The manifest's files (and the manifest, the results schema) as NAME.tar.gz, with its sha256: regular files
    inside the bundle only, whatever the manifest names."""
    archive = dest / f"{bundle.name}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for rel, path in bundle_files(bundle, manifest).items():
            tar.add(path, arcname=f"{bundle.name}/{rel}", recursive=False)
    return archive, hashlib.sha256(archive.read_bytes()).hexdigest()


def upload(conn: Connection, archive: Path, digest: str, rdir: str, python: str) -> None:
    remote = f"{rdir}/{archive.name}"
    with archive.open("rb") as f:
        conn.ssh(f"cat > {shlex.quote(remote)}", "copying the bundle", stdin=f)
    got = conn.ssh(f"{rpython(python)} -c {shlex.quote(CHECK_ARCHIVE)} {shlex.quote(remote)}",
                   "checking the copy").decode().strip()
    if got != digest:
        raise RemoteError(f"the bundle arrived damaged on {conn.host} (sha256 {got[:12]}... != {digest[:12]}...); "
                          "run again")
    conn.ssh(f"cd {shlex.quote(rdir)} && tar xzf {shlex.quote(archive.name)}", "unpacking the bundle")


def run_one(conn: Connection, rdir: str, bundle_name: str, python: str, name: str, args: list[str]) -> dict:
    rbundle, rout = f"{rdir}/{bundle_name}", f"{rdir}/results-{name}.json"
    cmd = " ".join([rpython(python), *(shlex.quote(a) for a in [f"{rbundle}/runner.py", rbundle, "--artifact",
                                                                 name, "--out", rout, *args])])
    conn.ssh(cmd, f"running artifact {name}")
    text = conn.ssh(f"cat {shlex.quote(rout)}", f"fetching the results of {name}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConnectionLost(f"the results of {name} came back incomplete from {conn.host}; run again") from exc


def cleanup(conn: Connection, rdir: str, log=print) -> None:
    try:
        conn.ssh(f"rm -rf {shlex.quote(rdir)}", "removing the remote folder", timeout=30)
    except RemoteError as exc:
        log(f"  warning: could not remove {rdir} on {conn.host}: {exc}")


def results_path(bundle: Path, conn: Connection) -> Path:
    return bundle / f"results-{re.sub(r'[^A-Za-z0-9._-]', '_', conn.hostname)}.json"


def prepare(conn: Connection, manifest: dict, names: list[str], python: str, setup: bool | dict,
            log=print) -> dict:
    """Probe the device (after --setup when asked; a dict holds setup_venv's options) and refuse, with what to
    install, when it cannot run these artifacts."""
    info = probe(conn, python)
    if setup:
        python = setup_venv(conn, manifest, names, python, log, **(setup if isinstance(setup, dict) else {}))
        info = probe(conn, python)
    problems = mismatches(info, manifest, names)
    if problems:
        raise RemoteError(f"{conn.host} cannot run this {manifest['target']['name']} bundle: {'; '.join(problems)}. "
                          + install_hint(manifest, names, python))
    return info | {"python_path": python}


def run_remote(bundle: Path, conn: Connection, *, python: str = "python3", setup: bool | dict = False,
               artifacts: list[str] | None = None, threads: int | None = None, mode: str | None = None,
               overrides: dict | None = None, out: Path | None = None, keep: bool = False,
               log=print) -> tuple[dict, Path]:
    """Measure the bundle's artifacts on the device; returns (results, local results file)."""
    manifest = measure.read_manifest(bundle)
    names = measure.choose(manifest, artifacts, str(bundle))
    args = measure.runner_args(threads, mode, overrides)
    info = prepare(conn, manifest, names, python, setup, log)
    python = info["python_path"]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="edgekit-remote-") as tmp:
        archive, digest = pack(bundle, manifest, Path(tmp))
        rdir = conn.ssh("mktemp -d \"${TMPDIR:-/tmp}/edgekit-XXXXXX\"", "making the remote folder").decode().strip()
        try:
            log(f"  copying {archive.name} ({archive.stat().st_size / 1024:.0f} KB) to {conn.host}:{rdir} ...")
            upload(conn, archive, digest, rdir, python)
            for name in names:
                log(f"  measuring {manifest['target']['name']}/{name} on {conn.host} ...")
                results[name] = run_one(conn, rdir, bundle.name, python, name, args)
                measure.validate(results[name], bundle, f"the result of {name} from {conn.host}")
        finally:
            if not keep:
                cleanup(conn, rdir, log)
    where = {"host": conn.host, "port": conn.port, "python": python, "device_python": info["python"],
             "remote_dir": rdir, "kept": keep, "archive_sha256": digest}
    data = measure.summary(manifest, {n: r | {"remote": where} for n, r in results.items()}) | {"remote": where}
    path = out or results_path(bundle, conn)
    measure.write_results(path, data)
    return data, path
