"""`edgekit search --ray-address` against a real Ray cluster: `ray start --head` on 127.0.0.1 (2 CPUs, its own
temp folder, stopped at the end), a 2-trial search of tiny data joined to it, and a wrong address refused at once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import free_port
from test_search import _onnx_target, _raw

pytestmark = pytest.mark.e2e  # a cluster's daemons and two full builds: slow


def _env(tmp: Path) -> dict:
    """This test's own Ray temp folder (not the shared machine's /tmp/ray), and a user's environment: no auth
    mode left over from an embedded search in this process."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    return {**env, "RAY_TMPDIR": str(tmp), "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def cluster():
    # short: Ray's unix sockets live under it and a socket path is limited to 107 bytes
    tmp = Path(tempfile.mkdtemp(prefix="ekray-"))
    port, env = free_port(), _env(tmp)
    ray = [sys.executable, "-m", "ray.scripts.scripts"]
    start = subprocess.run([*ray, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                            "--node-ip-address=127.0.0.1", f"--temp-dir={tmp}", "--disable-usage-stats"],
                           capture_output=True, text=True, env=env, timeout=180)
    try:
        assert start.returncode == 0, start.stdout[-2000:] + start.stderr[-2000:]
        yield f"127.0.0.1:{port}", env
    finally:
        # `ray stop` stops every Ray on this machine that this user started: only this cluster's processes instead
        # (those whose command line names its temp folder or port)
        _stop(tmp, port)
        shutil.rmtree(tmp, ignore_errors=True)


def _stop(tmp: Path, port: int) -> None:
    import psutil

    mine = []
    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if str(tmp) in line or f"--gcs-address=127.0.0.1:{port}" in line or f"--port={port}" in line:
            mine.append(proc)
    for proc in mine:
        proc.terminate()
    _, alive = psutil.wait_procs(mine, timeout=15)
    for proc in alive:
        proc.kill()


def _config(tmp: Path) -> Path:
    raw = _raw()  # test_search's tiny config, with a space whose recipes all build
    raw["distill"]["feature_layers"] = []
    raw["search"]["space"] = {"prune.ratio": [0.25, 0.5]}
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(raw))
    return tmp / "cfg.yaml"


def _search(tmp: Path, env: dict, address: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "edgekit", "search", str(_config(tmp)), "--target", _onnx_target(tmp),
           "--out", str(tmp / "s"), "--ray-address", address, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**env, "EDGEKIT_STAGE_CACHE": str(tmp / "cache")})


def test_search_on_a_ray_cluster(cluster, tmp_path):
    address, env = cluster
    proc = _search(tmp_path, env, address, "--trials", "2", "--workers", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved = json.loads((tmp_path / "s" / "trials.json").read_text())
    assert saved["ray_address"] == address and saved["trials_run_now"] == 2
    trials = saved["trials"]
    assert len(trials) == 2 and all(t["status"] == "ok" for t in trials), [t.get("reason") for t in trials]
    assert {t["overrides"]["prune.ratio"] for t in trials} == {0.25, 0.5}
    assert all(t["latency_source"] == "measured here" and t["latency_p90_ms"] > 0 for t in trials)
    for name in ("trials.csv", "pareto.png", "best.yaml"):
        assert (tmp_path / "s" / name).stat().st_size > 0
    # the trials ran in the cluster's worker processes: Ray names each worker's log after its pid, in the
    # cluster's session folder (an embedded Ray would have its own session, elsewhere)
    logs = " ".join(p.name for p in Path(env["RAY_TMPDIR"]).glob("session_*/logs/*"))
    assert all(f"_{t['pid']}." in logs for t in trials), (logs[:2000], [t["pid"] for t in trials])


@pytest.mark.parametrize("address, says", [
    ("127.0.0.1:{free}", "nothing answers there"),
    ("no-port-here", "is not HOST:PORT, ray://HOST:PORT or auto"),
])
def test_a_wrong_ray_address_fails_at_once_in_one_line(address, says, tmp_path):
    address = address.format(free=free_port())
    t0 = time.monotonic()
    proc = _search(tmp_path, _env(tmp_path), address, "--trials", "2")
    seconds = time.monotonic() - t0
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and says in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "s").exists(), "nothing is written before the address is checked"
    print(f"refused in {seconds:.1f} s")  # not asserted (speed is not a test's business): the log shows it


def test_embedded_ray_starts_on_a_fresh_machine_when_the_program_imported_ray_first():
    """A program (or a test run) that imports Ray before edgekit starts its embedded Ray, on a machine where Ray has
    never made an auth token: edgekit asks for token auth, and Ray must see it, make the token and start. Without
    the refresh in edgekit.quiet.ray, Ray's GCS died looking for a token and ray.init failed after 30 s."""
    home, tmp = Path(tempfile.mkdtemp(prefix="ekhome-")), Path(tempfile.mkdtemp(prefix="ekray-"))
    code = ("import ray\nfrom edgekit.search import run\nwith run.ray_session(1, None):\n"
            "    print('started', ray.is_initialized())\n")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              env={**_env(tmp), "HOME": str(home)})
        assert done.returncode == 0 and "started True" in done.stdout, done.stderr[-2000:]
        assert (home / ".ray" / "auth_token").is_file()
    finally:
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
