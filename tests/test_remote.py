"""`edgekit run --host`: against a real OpenSSH server on 127.0.0.1 (own host key, own user key, free port)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import Sshd, keygen

from edgekit import cli
from edgekit.device import measure, remote

pytestmark = pytest.mark.system  # sshd, dockerd, qemu or pinned-runtime venvs: `pytest -m "not system"` skips

FAST = {"warmup_runs": 2, "warmup_seconds": 0.0, "min_runs": 20, "min_seconds": 0.0, "max_seconds": 5.0}


@pytest.fixture()
def device_tmp(tmp_path, monkeypatch):
    """The device's $TMPDIR, where edgekit makes its remote folder: private to the test, so that the cleanup is
    checked without seeing the folders of other runs (a search test in another worker times trials over ssh too)."""
    folder = tmp_path / "device-tmp"
    folder.mkdir()
    options = remote.Connection.options
    monkeypatch.setattr(remote.Connection, "options", lambda self: [*options(self), "-o", f"SetEnv=TMPDIR={folder}"])
    return folder


def test_run_over_ssh_brings_back_schema_valid_results_and_cleans_up(sshd, pinned, bundle, device_tmp, capsys):
    conn = sshd.connection(pinned)
    data, path = remote.run_remote(bundle, conn, python=sys.executable, artifacts=["onnx_int8", "tflite_int8"],
                                   overrides=FAST, log=lambda *_: None)
    assert path == bundle / "results-127.0.0.1.json"
    on_disk = json.loads(path.read_text())
    measure.validate(on_disk)
    assert on_disk["remote"]["host"] == conn.host and on_disk["remote"]["kept"] is False
    assert set(on_disk["artifacts"]) == {"onnx_int8", "tflite_int8"}
    manifest = json.loads((bundle / "manifest.json").read_text())
    for name, r in on_disk["artifacts"].items():
        spec = next(a for a in manifest["artifacts"] if a["name"] == name)
        assert r["artifact_sha256"] == spec["sha256"] and r["latency_ms"]["runs"] >= 20
        assert r["accuracy"] == pytest.approx(spec["reference"]["accuracy"], abs=1e-9)
    assert Path(on_disk["remote"]["remote_dir"]).parent == device_tmp
    assert list(device_tmp.iterdir()) == []  # the remote folder this run made is gone
    local = measure.run_bundle(bundle, artifacts=["onnx_int8"], overrides=FAST, log=lambda *_: None)
    assert local["accuracy"] == on_disk["accuracy"]
    csv_path = bundle.parent / "cmp.csv"
    assert cli.main(["compare", str(bundle / "results.json"), str(path), "--csv", str(csv_path)]) == 0
    assert "x86-64@" in capsys.readouterr().out and len(csv_path.read_text().splitlines()) == 4


def test_cli_run_host_keep(sshd, pinned, bundle, capsys):
    out = bundle.parent / "r.json"
    argv = ["run", str(bundle), "--host", f"{sshd.user}@127.0.0.1", "--port", str(sshd.port), "--identity",
            str(sshd.user_key), "--python", sys.executable, "--artifact", "onnx_fp32", "--keep", "--out", str(out),
            "--min-runs", "10", "--min-seconds", "0", "--warmup-runs", "1"]
    os.environ["EDGEKIT_KNOWN_HOSTS"] = str(pinned)
    try:
        assert cli.main(argv) == 0
    finally:
        del os.environ["EDGEKIT_KNOWN_HOSTS"]
    printed = capsys.readouterr().out
    assert "onnx_fp32" in printed and str(out) in printed
    kept = Path(json.loads(out.read_text())["remote"]["remote_dir"])
    assert (kept / "x86-64" / "runner.py").is_file()
    shutil.rmtree(kept)


def test_unknown_host_key_is_refused_then_pinned_when_accepted(sshd, bundle, tmp_path):
    known = tmp_path / "edgekit" / "known_hosts"
    with pytest.raises(remote.HostKeyError, match="not known to edgekit.*--accept-new-host-key"):
        remote.probe(sshd.connection(known), sys.executable)
    info = remote.probe(sshd.connection(known, accept_new=True), sys.executable)
    assert info["machine"] and info["modules"]["numpy"]
    assert (sshd.root / "host_key.pub").read_text().split()[1] in known.read_text()
    remote.probe(sshd.connection(known), sys.executable)  # pinned: accepted without the flag now


def test_changed_host_key_is_always_refused(sshd, tmp_path):
    other = tmp_path / "other_key"
    keygen(other)
    known = tmp_path / "known_hosts"
    key = (tmp_path / "other_key.pub").read_text().split()
    known.write_text(f"[127.0.0.1]:{sshd.port} {key[0]} {key[1]}\n")
    for accept in (False, True):
        with pytest.raises(remote.HostKeyError, match="CHANGED.*ssh-keygen -R"):
            remote.probe(sshd.connection(known, accept_new=accept), sys.executable)
    assert known.read_text().split()[2] == key[1]  # the pinned key is left as it was


def test_wrong_user_key_says_keys_only(sshd, pinned, tmp_path):
    stranger = tmp_path / "stranger"
    keygen(stranger)
    conn = sshd.connection(pinned)
    conn.identity = str(stranger)
    with pytest.raises(remote.RemoteError, match="keys only"):
        remote.probe(conn, sys.executable)


def test_device_that_lacks_the_runtime_is_told_what_to_install(sshd, pinned, bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    info = remote.probe(sshd.connection(pinned), sys.executable)
    assert remote.mismatches(info, manifest, ["onnx_int8", "tflite_int8"]) == []
    bare = info | {"python": "3.9.2", "modules": {**info["modules"], "ai_edge_litert": None, "litert": None}}
    problems = remote.mismatches(bare, manifest, ["tflite_int8"])
    assert "Python 3.9.2 (the target pins 3.11)" in problems
    assert "ai-edge-litert is missing (2.1.0 needed)" in problems
    assert remote.mismatches(info | {"machine": "aarch64"}, manifest, ["onnx_int8"])[0].startswith("the device is")
    with pytest.raises(remote.RemoteError, match=r"pip install ai-edge-litert==2\.1\.0 numpy.*--setup"):
        remote.prepare(sshd.connection(pinned), manifest | {"target": {**manifest["target"], "python": "3.9"}},
                       ["tflite_int8"], sys.executable, False)


def test_dropped_connection_is_a_clear_error_and_a_second_run_works(sshd, pinned, bundle, device_tmp):
    out = bundle / "results-127.0.0.1.json"
    slow = FAST | {"min_seconds": 60.0, "max_seconds": 120.0}
    caught: list[BaseException] = []

    def run() -> None:
        try:
            remote.run_remote(bundle, sshd.connection(pinned), python=sys.executable, artifacts=["onnx_int8"],
                              overrides=slow, log=lambda *_: None)
        except BaseException as exc:  # noqa: BLE001 (handed to the test thread)
            caught.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 60
    while not sshd.running("runner.py"):
        assert time.monotonic() < deadline, "the runner never started on the device"
        time.sleep(0.1)
    sshd.drop_connections()  # drop the link: end that connection's sshd processes and the runner
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert len(caught) == 1 and isinstance(caught[0], remote.ConnectionLost), caught
    assert "lost while running artifact onnx_int8" in str(caught[0]) and "Nothing was written locally" in str(caught[0])
    assert not out.exists() and not list(bundle.glob(".results*"))
    assert list(device_tmp.iterdir()) == []  # the remote folder is gone
    data, path = remote.run_remote(bundle, sshd.connection(pinned), python=sys.executable, artifacts=["onnx_int8"],
                                   overrides=FAST, log=lambda *_: None)
    assert path == out and data["artifacts"]["onnx_int8"]["valid"] is True


def test_device_python_under_home_is_expanded_there_not_here():
    assert remote.rpython("~/venv/bin/python") == '"$HOME"/venv/bin/python'
    assert remote.rpython("/usr/bin/python3 x") == "'/usr/bin/python3 x'"
    assert remote.requirements("tflite-runtime", "2.14.0") == ["tflite-runtime==2.14.0", "numpy<2"]


def test_setup_makes_a_venv_on_the_device_with_the_pinned_runtime(sshd, pinned, bundle, tmp_path):
    from edgekit import targets
    from edgekit.device import images

    wheels = images._wheel_dir(targets.get(["x86-64"])[0])
    if not any(wheels.glob("onnxruntime-*.whl")):
        pytest.fail("no cached x86-64 wheels: run `python -m edgekit.device.images fetch x86-64` once "
                    "(`make test` does)")
    venv = tmp_path / "device venv"  # a space: quoting is checked too
    setup = {"venv": str(venv), "pip_options": ["--no-index", "--find-links", str(wheels)]}  # offline: the cache
    data, _ = remote.run_remote(bundle, sshd.connection(pinned), python=sys.executable, setup=setup,
                                artifacts=["onnx_int8"], overrides=FAST, log=lambda *_: None)
    assert data["remote"]["python"] == f"{venv}/bin/python"
    assert data["runtime"]["version"] == "1.23.0" and data["valid"] is True
    assert (venv / "bin" / "python").exists()


# --- faults on the device side: each one line, nothing written locally, the remote folder removed -------------

def _receiving(sshd: Sshd) -> bool:
    """The device side of the upload (`cat > archive`) is running."""
    for p in sshd.session_processes():
        with contextlib.suppress(psutil.Error):
            if p.name() == "cat":
                return True
    return False


def _feed_then_drop(payload: bytes, fifo: Path, sshd: Sshd) -> None:
    """Half the archive goes up, then the link drops (the device's sshd processes are killed)."""
    with contextlib.suppress(BrokenPipeError), open(fifo, "wb") as f:
        f.write(payload[: len(payload) // 2])
        f.flush()
        deadline = time.monotonic() + 60
        while not _receiving(sshd) and time.monotonic() < deadline:
            time.sleep(0.05)
        sshd.drop_connections()
        f.write(payload[len(payload) // 2:])


def test_dropped_connection_mid_upload(sshd, pinned, bundle, device_tmp, tmp_path, monkeypatch):
    pack, fifo = remote.pack, tmp_path / "slow" / f"{bundle.name}.tar.gz"

    def slow_pack(*args):  # the archive reaches ssh through a pipe that the test controls
        archive, digest = pack(*args)
        fifo.parent.mkdir()
        os.mkfifo(fifo)
        threading.Thread(target=_feed_then_drop, args=(archive.read_bytes(), fifo, sshd), daemon=True).start()
        return fifo, digest

    monkeypatch.setattr(remote, "pack", slow_pack)
    with pytest.raises(remote.ConnectionLost, match="lost while copying the bundle") as caught:
        remote.run_remote(bundle, sshd.connection(pinned), python=sys.executable, artifacts=["onnx_int8"],
                          overrides=FAST, log=lambda *_: None)
    assert "\n" not in str(caught.value)
    assert list(device_tmp.iterdir()) == [] and not (bundle / "results-127.0.0.1.json").exists()


@pytest.mark.parametrize("python", ["/no/such/python3", "/bin/echo"])
def test_wrong_python_on_the_device(sshd, pinned, bundle, device_tmp, python):
    with pytest.raises(remote.RemoteError, match="--python") as caught:
        remote.run_remote(bundle, sshd.connection(pinned), python=python, log=lambda *_: None)
    assert "\n" not in str(caught.value) and python in str(caught.value)
    assert list(device_tmp.iterdir()) == [] and not (bundle / "results-127.0.0.1.json").exists()


@pytest.fixture()
def full_device_disk(device_tmp):
    """The device's $TMPDIR on a 64 KB tmpfs: the bundle does not fit."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tiny tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(device_tmp)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield device_tmp
    subprocess.run(["umount", str(device_tmp)], check=True)


def test_full_disk_on_the_device(sshd, pinned, bundle, full_device_disk):
    with pytest.raises(remote.RemoteError, match="out of disk space") as caught:
        remote.run_remote(bundle, sshd.connection(pinned), python=sys.executable, artifacts=["onnx_int8"],
                          overrides=FAST, log=lambda *_: None)
    assert "\n" not in str(caught.value)
    assert list(full_device_disk.iterdir()) == [] and not (bundle / "results-127.0.0.1.json").exists()


def test_device_that_is_not_aarch64_is_refused_before_anything_is_copied(sshd, pinned, e2e_build, device_tmp):
    rpi5 = e2e_build[0] / "bundles" / "rpi5"
    before = sorted(os.listdir(rpi5))
    with pytest.raises(remote.RemoteError, match="the device is x86_64, the bundle is for aarch64") as caught:
        remote.run_remote(rpi5, sshd.connection(pinned), python=sys.executable, log=lambda *_: None)
    assert "\n" not in str(caught.value)
    assert list(device_tmp.iterdir()) == [] and sorted(os.listdir(rpi5)) == before


@pytest.mark.skipif(platform.machine() != "x86_64", reason="an aarch64 bundle on an x86 host")
def test_local_run_of_an_aarch64_bundle_on_x86_is_refused(e2e_build, capsys):
    rpi5 = e2e_build[0] / "bundles" / "rpi5"
    before = sorted(os.listdir(rpi5))
    assert cli.main(["run", str(rpi5)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgekit: error: ") and "--host" in err[0] and "--emulate" in err[0]
    assert sorted(os.listdir(rpi5)) == before
