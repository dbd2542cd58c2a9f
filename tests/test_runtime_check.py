"""Each artifact checked with the runtime version its target pins, in an isolated (cached) environment."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgekit.device import runtime_check as rc
from edgekit.files import cache_dir
from edgekit.runner import runner

pytestmark = pytest.mark.system  # sshd, dockerd, qemu or pinned-runtime venvs: `pytest -m "not system"` skips

OLD_RUNTIME_MESSAGE = ("ValueError: Didn't find op for builtin opcode 'FULLY_CONNECTED' version '12'. An older "
                       "version of this builtin might be supported. Are you using an old TFLite binary with a "
                       "newer model?\nRegistration failed.\n")


def test_cache_dir_follows_edgekit_cache_then_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("EDGEKIT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "edgekit"
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_requirements_pin_the_runtime_and_an_abi_compatible_numpy():
    assert rc.requirements("tflite-runtime", "2.14.0") == ["tflite-runtime==2.14.0", "numpy<2"]
    assert rc.requirements("ai-edge-litert", "2.1.0") == ["ai-edge-litert==2.1.0", "numpy"]


def test_an_old_runtime_message_becomes_op_version_and_what_to_change():
    error = rc.error_line("INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n" + OLD_RUNTIME_MESSAGE, 1)
    assert error == "Didn't find op for builtin opcode 'FULLY_CONNECTED' version '12'"
    advice = rc.advice(error, "tflite-runtime", "2.14.0")
    assert (advice["op"], advice["op_version"]) == ("FULLY_CONNECTED", 12)
    assert "representative_dataset" in advice["hint"] and "runtimes:" in advice["hint"]
    crashed = rc.error_line("Segmentation fault", -11)
    assert crashed.startswith("the runtime crashed on the file (signal 11); the artifact is probably damaged")


def _dynamic_range_tflite(path: Path) -> None:
    """TF 2.19's converter, Optimize.DEFAULT and no representative dataset: a hybrid FULLY_CONNECTED (v12)."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.Input((64,)), tf.keras.layers.Dense(64, activation="relu"),
                                 tf.keras.layers.Dense(4)])  # 64x64 weights: big enough to be quantized
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    path.write_bytes(conv.convert())


def _bundle(dest: Path, runtime: str, version: str) -> Path:
    """A minimal bundle, as bundle.py writes it, holding one dynamic-range TFLite model."""
    dest.mkdir()
    _dynamic_range_tflite(dest / "hybrid.tflite")
    rng = np.random.default_rng(0)
    np.savez_compressed(dest / "eval.npz", x=rng.normal(size=(8, 64)).astype(np.float32), y=np.arange(8) % 4)
    shutil.copy2(runner.__file__, dest / "runner.py")
    files = {p.name: runner.sha256(p) for p in sorted(dest.iterdir())}
    spec = {"name": "tflite_hybrid", "file": "hybrid.tflite", "format": "tflite", "precision": "int8",
            "io": "float32", "input": {"shape": [1, 64], "dtype": "float32"}, "runtime": runtime,
            "runtime_version": version, "reference": {"accuracy": 0.25}, "sha256": files["hybrid.tflite"]}
    manifest = {"edgekit_version": "test", "bundle_version": 1, "bundle_id": "test", "primary": spec["name"],
                "target": {"name": "rpi4-legacy", "description": "test", "arch": "aarch64", "python": "3.11",
                           "threads": 4, "accuracy_tolerance_pp": 1.0},
                "artifacts": [spec], "files": files,
                "run": {"warmup_runs": 1, "min_runs": 2, "min_seconds": 0.0, "max_seconds": 1.0}}
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def test_pinned_old_runtime_cannot_load_a_hybrid_model_and_says_what_to_change(tmp_path):
    bundle = _bundle(tmp_path / "legacy", "tflite-runtime", "2.14.0")
    check = rc.check_bundle(bundle, log=lambda m: None)["tflite_hybrid"]
    assert check.get("skipped") is None, f"tflite-runtime 2.14.0 could not be installed: {check.get('skipped')}"
    assert check["ok"] is False
    assert (check["runtime"], check["version"], check["arch"], check["emulated"]) == (
        "tflite-runtime", "2.14.0", "x86_64", False)
    assert (check["op"], check["op_version"]) == ("FULLY_CONNECTED", 12)
    assert "FULLY_CONNECTED version 12" in check["hint"] and "representative_dataset" in check["hint"]
    report = {"artifacts": [{"target": "rpi4-legacy", "name": "tflite_hybrid", "runtime_check": check}]}
    with pytest.raises(rc.EdgekitError, match="rpi4-legacy/tflite_hybrid: tflite-runtime 2.14.0 cannot run "
                                              "FULLY_CONNECTED version 12"):
        rc.raise_on_failures(report)


def test_the_same_hybrid_model_runs_on_the_newer_pinned_runtime(tmp_path):
    """The failure above is the version's: LiteRT 2.1.0 (what rpi4/rpi5 pin) runs the very same file."""
    bundle = _bundle(tmp_path / "current", "litert", "2.1.0")
    check = rc.check_bundle(bundle, log=lambda m: None)["tflite_hybrid"]
    assert check["ok"] is True, check
    assert check["version"] == "2.1.0" and 0.0 <= check["accuracy"] <= 1.0


def test_tf219_full_int8_bundle_runs_on_tflite_runtime_214(e2e_build, tmp_path):
    """What the rpi4-legacy profile relies on: TF 2.19's full-int8 and fp32 files load on tflite-runtime 2.14."""
    out, _ = e2e_build
    bundle = tmp_path / "rpi4-legacy"
    shutil.copytree(out / "bundles" / "rpi5", bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    for spec in manifest["artifacts"]:
        spec.update(runtime="tflite-runtime", runtime_version="2.14.0")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    checks = rc.check_bundle(bundle, log=lambda m: None)
    for spec in manifest["artifacts"]:
        check = checks[spec["name"]]
        assert check["ok"] is True, check
        assert check["accuracy"] == pytest.approx(spec["reference"]["accuracy"], abs=0.01)


def test_report_artifacts_carry_runtime_check(e2e_build):
    _, report = e2e_build
    for artifact in report["artifacts"]:
        check = artifact["runtime_check"]
        assert {"runtime", "version", "arch", "emulated", "ok"} <= check.keys(), artifact["name"]
        assert (check["runtime"], check["version"]) == (artifact["runtime"], artifact["runtime_version"])
        assert check["ok"] is True, (artifact["target"], artifact["name"], check)


def test_a_cuda_runtime_is_skipped_with_the_reason_not_installed(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache"))
    check = rc.check_artifact(tmp_path, {"name": "onnx_int8", "runtime": "onnxruntime-gpu",
                                         "runtime_version": "1.23.0"}, log=lambda m: None)
    assert check["ok"] is None and "CUDA" in check["skipped"]
    assert not (tmp_path / "cache").exists()
