"""kill -9 in every stage, then --resume: the build ends with the same artifacts as an uninterrupted one."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgekit import config, pipeline

TINY_BUILD = {
    "data": {"limit": 200, "calib_samples": 32},
    "model": {"width": 8},
    "train": {"epochs": 2, "batch_size": 32},
    "prune": {"finetune_epochs": 1},
    "distill": {"epochs": 1},
    "quantize": {"method": "qat", "qat_epochs": 1, "subset_size": 32},
    "run": {"warmup_runs": 1, "min_runs": 2, "min_seconds": 0.01, "max_seconds": 0.5},
    "build": {"targets": ["x86-64"], "run_local": False, "stage_cache": False},
}
STAGE_NAMES = [s.name for s in pipeline.STAGES if s.enabled(config.from_dict(TINY_BUILD))]
ARTIFACTS = ("stages/export/onnx_fp32.onnx", "stages/export/onnx_int8.onnx", "stages/export/tflite_int8.tflite",
             "bundles/x86-64/eval.npz", "bundles/x86-64/onnx_int8.onnx", "bundles/x86-64/tflite_int8.tflite")


def _edgekit(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgekit", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def _kill_in(stage: str, args: list[str], env: dict, out: Path) -> str:
    """Run the build until `stage` starts, then SIGKILL it; return what it printed."""
    proc = _edgekit(args, env)
    seen = []
    for line in proc.stdout:  # type: ignore[union-attr]
        seen.append(line)
        if f"[{stage}] running" in line:
            _wait_inside(stage, out)
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    return "".join(seen)


def _wait_inside(stage: str, out: Path) -> None:
    """Export: until its temporary folder exists (the kill must leave one); train, quantize: a moment in."""
    if stage == "export":
        deadline = time.monotonic() + 120
        while not list((out / "stages" / "export").glob(".tmp-*/*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list((out / "stages" / "export").glob(".tmp-*/*")), "export made no temporary folder in DIR"
    elif stage in ("train", "quantize"):
        time.sleep(0.3)


def _digests(out: Path) -> dict[str, str]:
    return {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in ARTIFACTS}


@pytest.mark.e2e
def test_kill_9_in_every_stage_then_resume(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(TINY_BUILD))
    tmp = tmp_path / "tmp"  # the build's system temp dir: a killed export must leave nothing there
    tmp.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp)}
    ref = subprocess.run([sys.executable, "-m", "edgekit", "build", str(cfg), "--out", str(tmp_path / "ref")],
                         capture_output=True, text=True, env=env, timeout=900)
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-2000:]
    out = tmp_path / "b"
    _kill_in(STAGE_NAMES[0], ["build", str(cfg), "--out", str(out)], env, out)
    for stage in STAGE_NAMES[1:]:
        log = _kill_in(stage, ["build", "--resume", str(out)], env, out)
        assert f"[{STAGE_NAMES[0]}] finished earlier, kept (resume)" in log or stage == STAGE_NAMES[1]
    done = subprocess.run([sys.executable, "-m", "edgekit", "build", "--resume", str(out)], capture_output=True,
                          text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "[export] finished earlier, kept (resume)" in done.stdout
    assert _digests(out) == _digests(tmp_path / "ref")
    assert not list((out / "stages" / "export").glob(".tmp-*"))
    assert not list(tmp.glob("edgekit-export-*"))
