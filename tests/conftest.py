"""Shared fixtures: tiny configs, a network guard, one real end-to-end build shared by the e2e tests, and a
loopback sshd as the device of `--host` tests."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# every run starts with no compiled torch extensions, as a new user's machine does: a warm cache cannot hide a
# compile on first use (NNCF's, which timed out and left a lock that hung later builds)
os.environ["TORCH_EXTENSIONS_DIR"] = tempfile.mkdtemp(prefix="edgekit-torch-ext-")
# and with an empty stage cache: a stage reused from an earlier run of the suite would not be tested
os.environ["EDGEKIT_STAGE_CACHE"] = tempfile.mkdtemp(prefix="edgekit-stage-cache-")
# nor a pinned-runtime or qemu check passed by an earlier run (tests/test_check_speed.py tests that cache)
os.environ["EDGEKIT_NO_CHECK_CACHE"] = "1"

TINY = {
    "data": {"limit": 500, "calib_samples": 64},
    "model": {"width": 16},
    "train": {"epochs": 10, "lr": 0.01, "batch_size": 32},
    # the accuracy guard cannot judge 45-75 validation samples of 8x8 digits (one sample is 1.3-2.2 pp) and would
    # keep these builds unpruned; a limit that cannot fail keeps them exercising a pruned model end to end
    # (tests/test_prune_guard.py tests the guard itself)
    "prune": {"finetune_epochs": 5, "lr": 0.005, "max_loss_pp": 100.0},
    "distill": {"epochs": 3, "lr": 0.005},
    # QAT always, so the builds exercise the int8 artifacts made from QAT-tuned weights; PTQ first (the default
    # `auto`) is tested in tests/test_quantize_auto.py
    "quantize": {"method": "qat", "qat_epochs": 1, "subset_size": 64},
    "run": {"warmup_runs": 2, "min_runs": 5, "min_seconds": 0.05, "max_seconds": 2.0},
    "build": {"stage_cache": False},  # each test trains what it tests; tests/test_stage_keys.py tests the cache
}


def tiny(**sections: dict) -> dict:
    """The tiny test config with some sections overridden."""
    merged = {k: dict(v) for k, v in TINY.items()}
    for key, value in sections.items():
        merged.setdefault(key, {}).update(value)
    return merged


class NetworkUsed(AssertionError):
    pass


@pytest.fixture(scope="session")
def no_network():
    """Any attempt to open an internet connection fails the test that made it."""
    attempts: list[object] = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise NetworkUsed(f"network use at run time: connect to {address}")
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):
        attempts.append(host)
        raise NetworkUsed(f"network use at run time: DNS lookup of {host}")

    socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo
    yield attempts
    socket.socket.connect, socket.getaddrinfo = real_connect, real_getaddrinfo


@pytest.fixture(scope="session")
def e2e_build(tmp_path_factory, no_network):
    """The default pipeline (every stage, default targets) on a small subset, with the network blocked.

    Built once per run: under pytest-xdist (`make test` runs two workers) the first worker that needs it builds it
    in the folder the workers share, and the others wait for it and read it."""
    from filelock import FileLock

    from edgekit import config, pipeline

    shared = os.environ.get("PYTEST_XDIST_WORKER") is not None
    root = tmp_path_factory.getbasetemp().parent if shared else tmp_path_factory.mktemp("e2e")
    out, saved = root / "e2e-build", root / "e2e-report.json"
    with FileLock(str(root / "e2e-build.lock")):
        if not saved.is_file():
            report = pipeline.build(config.from_dict(tiny()), out)
            assert no_network == [], f"the build tried to reach the network: {no_network}"
            saved.write_text(json.dumps(report))
    return out, json.loads(saved.read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny trained model (digits, 300 samples, 4 epochs) that a module's stage runs start from; a test
    copies its `stages/train` into its own build folder."""
    from edgekit import config, data
    from edgekit.stages import train
    from edgekit.stages.base import Context

    cfg = config.from_dict(tiny(data={"limit": 300}, train={"epochs": 4}))
    out = tmp_path_factory.mktemp("trained")
    ctx = Context(cfg, data.load_dataset(cfg), out, [])
    (ctx.stage_dir("train") / "metrics.json").write_text(json.dumps(train.run(ctx)))
    return ctx


@pytest.fixture()
def bundle(e2e_build, tmp_path):
    """A private copy of the e2e build's x86-64 bundle, without its results."""
    out, _ = e2e_build
    dest = tmp_path / "x86-64"
    shutil.copytree(out / "bundles" / "x86-64", dest)
    (dest / "results.json").unlink(missing_ok=True)
    return dest


# --- a real OpenSSH server on 127.0.0.1: the device of `--host` tests (tests/test_remote.py, test_search.py) ---

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


class Sshd:
    """sshd -D on 127.0.0.1:port with its own host key; only `user_key` may log in, as the current user."""

    def __init__(self, root: Path) -> None:
        self.root, self.port, self.user = root, free_port(), getpass.getuser()
        self.host_key, self.user_key = root / "host_key", root / "user_key"
        for key in (self.host_key, self.user_key):
            keygen(key)
        (root / "authorized_keys").write_text((root / "user_key.pub").read_text())
        (root / "sshd_config").write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.host_key}", f"PidFile {root}/sshd.pid",
            f"AuthorizedKeysFile {root}/authorized_keys", "PubkeyAuthentication yes", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password", "UsePAM no", "StrictModes no",
            f"AllowUsers {self.user}", "AcceptEnv TMPDIR", "LogLevel INFO", ""]))
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
        self.log = (root / "sshd.log").open("w")
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(root / "sshd_config")], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while "Server listening" not in (root / "sshd.log").read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("sshd did not start: " + (root / "sshd.log").read_text()[-500:])
            time.sleep(0.05)

    def connection(self, known_hosts: Path, accept_new: bool = False):
        from edgekit.device import remote

        return remote.Connection(f"{self.user}@127.0.0.1", port=self.port, identity=str(self.user_key),
                                 accept_new_host_key=accept_new, known_hosts=known_hosts)

    def session_processes(self) -> list[psutil.Process]:
        """Every process of every open connection: the per-connection sshd children and what they run."""
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def running(self, script: str) -> bool:
        """A Python process of one of the connections runs `script` (not merely a shell that will)."""
        for p in self.session_processes():
            try:
                argv = p.cmdline()
            except psutil.Error:  # ended meanwhile
                continue
            if len(argv) > 1 and "python" in Path(argv[0]).name and argv[1].endswith(script):
                return True
        return False

    def drop_connections(self) -> None:
        """Kill the per-connection sshd processes and any Python they run; shells end on their own (SIGHUP),
        so that no shell start-up file is cut in the middle of something (pyenv's rehash leaves a lock)."""
        for p in self.session_processes():
            try:
                if p.name() == "sshd" or "python" in p.name():
                    p.kill()
            except psutil.Error:
                continue

    def stop(self) -> None:
        self.drop_connections()
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture()
def pinned(sshd, tmp_path):
    """A known-hosts file that already trusts the fixture's host key (as after --accept-new-host-key)."""
    known = tmp_path / "known_hosts"
    key = (sshd.root / "host_key.pub").read_text().split()
    known.write_text(f"[127.0.0.1]:{sshd.port} {key[0]} {key[1]}\n")
    return known
