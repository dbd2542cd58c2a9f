"""Shared fixtures: tiny configs, a network guard, and one real end-to-end build shared by the e2e tests."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile

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


@pytest.fixture()
def bundle(e2e_build, tmp_path):
    """A private copy of the e2e build's x86-64 bundle, without its results."""
    out, _ = e2e_build
    dest = tmp_path / "x86-64"
    shutil.copytree(out / "bundles" / "x86-64", dest)
    (dest / "results.json").unlink(missing_ok=True)
    return dest
