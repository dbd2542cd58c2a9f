"""Issue #16's levers on the pinned-runtime and emulated checks: a pass is cached by what decides it, a failure
never is, and one child process checks all of a runtime's artifacts. Children are counted, never timed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekit.device import bundle_check
from edgekit.device import emulate as emu
from edgekit.device import runtime_check as rc
from edgekit.runner import runner

ORT = onnxruntime.__version__


@pytest.fixture(autouse=True)
def check_cache(monkeypatch):
    """The suite runs every check for real (tests/conftest.py); these tests are about the cache itself."""
    monkeypatch.delenv(rc.NO_CACHE_ENV, raising=False)


def _model(seed: int) -> bytes:
    w = np.random.default_rng(seed).normal(size=(16, 4)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def _write_manifest(bundle: Path, manifest: dict) -> None:
    manifest["files"] = {p.name: runner.sha256(p) for p in sorted(bundle.iterdir()) if p.name != "manifest.json"}
    for spec in manifest["artifacts"]:
        spec["sha256"] = manifest["files"][spec["file"]]
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _bundle(dest: Path, versions: dict[str, str], arch: str = "x86_64") -> Path:
    """A bundle as bundle.py writes it, with one small ONNX model per name (name -> pinned onnxruntime version)."""
    dest.mkdir()
    rng = np.random.default_rng(0)
    np.savez_compressed(dest / "eval.npz", x=rng.normal(size=(8, 16)).astype(np.float32), y=np.arange(8) % 4)
    specs = []
    for i, (name, version) in enumerate(versions.items()):
        (dest / f"{name}.onnx").write_bytes(_model(i))
        specs.append({"name": name, "file": f"{name}.onnx", "format": "onnx", "precision": "fp32", "io": "float32",
                      "input": {"shape": [1, 16], "dtype": "float32"}, "runtime": "onnxruntime",
                      "runtime_version": version, "reference": {"accuracy": 0.25}})
    manifest = {"edgekit_version": "test", "bundle_version": 1, "bundle_id": "test", "primary": specs[0]["name"],
                "target": {"name": "t", "description": "Raspberry Pi 5 (Cortex-A76)", "arch": arch,
                           "python": "3.11", "threads": 1, "accuracy_tolerance_pp": 1.0},
                "artifacts": specs, "run": {"warmup_runs": 1, "min_runs": 2, "min_seconds": 0.0, "max_seconds": 1.0}}
    _write_manifest(dest, manifest)
    return dest


@pytest.fixture()
def children(monkeypatch, tmp_path):
    """The check's own cache in tmp_path; this interpreter (which has onnxruntime) as the pinned runtime's venv;
    every child process the check starts, counted."""
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(rc, "runtime_python", lambda *a, **k: Path(sys.executable))
    started: list[list[str]] = []
    real = subprocess.run

    def counting(cmd, *args, **kwargs):
        started.append([str(c) for c in cmd])
        return real(cmd, *args, **kwargs)

    monkeypatch.setattr(rc.subprocess, "run", counting)
    return started


def test_one_child_checks_all_artifacts_of_a_runtime(tmp_path, children):
    bundle = _bundle(tmp_path / "b", {"a": ORT, "b": ORT, "c": ORT})
    checks = rc.check_bundle(bundle, log=lambda m: None)
    assert len(children) == 1 and children[0][-3:] == ["a", "b", "c"]
    for name in "abc":
        assert checks[name]["ok"] is True and "cached" not in checks[name], checks[name]
        assert checks[name]["version"] == ORT and 0.0 <= checks[name]["accuracy"] <= 1.0


def test_one_child_per_runtime_version(tmp_path, children):
    bundle = _bundle(tmp_path / "b", {"a": ORT, "b": "0.0.1", "c": ORT})
    checks = rc.check_bundle(bundle, log=lambda m: None)
    assert len(children) == 2
    assert sorted(c[-2:] if c[-2:] == ["a", "c"] else c[-1:] for c in children) == [["a", "c"], ["b"]]
    assert checks["a"]["ok"] is True and checks["c"]["ok"] is True
    assert checks["b"]["ok"] is False and "not the pinned onnxruntime 0.0.1" in checks["b"]["error"]
    assert list(checks) == ["a", "b", "c"]  # the manifest's order, whatever ran first


def test_a_second_check_of_the_same_bytes_starts_no_child_and_says_cached(tmp_path, children):
    bundle = _bundle(tmp_path / "b", {"a": ORT, "b": ORT})
    first = rc.check_bundle(bundle, log=lambda m: None)
    assert len(children) == 1
    lines: list[str] = []
    second = rc.check_bundle(bundle, log=lines.append)
    assert len(children) == 1, "the cached passes were run again"
    for name in ("a", "b"):
        assert second[name]["ok"] is True and second[name]["cached"]["checked_utc"]
        assert {k: v for k, v in second[name].items() if k != "cached"} == first[name]
    assert all("cached: these bytes passed on" in ln for ln in lines)
    # a copy of the bundle elsewhere holds the same bytes: still cached
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in bundle.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    assert all(c["cached"] for c in rc.check_bundle(copy, log=lambda m: None).values())
    assert len(children) == 1


def test_a_changed_artifact_byte_is_checked_again(tmp_path, children):
    bundle = _bundle(tmp_path / "b", {"a": ORT, "b": ORT})
    rc.check_bundle(bundle, log=lambda m: None)
    # a rebuilt artifact (new bytes, manifest updated): checked again, the other one stays cached
    (bundle / "a.onnx").write_bytes(_model(7))
    _write_manifest(bundle, json.loads((bundle / "manifest.json").read_text()))
    checks = rc.check_bundle(bundle, log=lambda m: None)
    assert len(children) == 2 and children[1][-1:] == ["a"]
    assert checks["a"]["ok"] is True and "cached" not in checks["a"] and checks["b"]["cached"]
    # a damaged copy (bytes differ from the manifest's sha256): never served from the cache, the runner says why
    data = bytearray((bundle / "b.onnx").read_bytes())
    data[-1] ^= 1
    (bundle / "b.onnx").write_bytes(bytes(data))
    checks = rc.check_bundle(bundle, log=lambda m: None)
    assert len(children) == 3
    assert checks["b"]["ok"] is False and "does not match its sha256" in checks["b"]["error"]


def test_other_eval_data_or_another_runtime_version_is_another_key(tmp_path, children):
    bundle = _bundle(tmp_path / "b", {"a": ORT})
    manifest = json.loads((bundle / "manifest.json").read_text())
    spec = manifest["artifacts"][0]
    key = rc.cache_key(bundle, manifest, spec, "x86_64", "3.11")
    assert key != rc.cache_key(bundle, manifest, spec | {"runtime_version": "9.9.9"}, "x86_64", "3.11")
    assert key != rc.cache_key(bundle, manifest, spec, "x86_64", "3.12")
    assert key != rc.cache_key(bundle, manifest, spec, "aarch64-emulated", "3.11")
    np.savez_compressed(bundle / "eval.npz", x=np.zeros((8, 16), np.float32), y=np.arange(8) % 4)
    _write_manifest(bundle, manifest)
    assert key != rc.cache_key(bundle, json.loads((bundle / "manifest.json").read_text()), spec, "x86_64", "3.11")


def test_a_failed_check_is_never_cached(tmp_path, children):
    bundle = _bundle(tmp_path / "b", {"a": "0.0.1"})  # the runner reports another version: a failure
    for attempt in (1, 2):
        check = rc.check_bundle(bundle, log=lambda m: None)["a"]
        assert check["ok"] is False and "cached" not in check
        assert len(children) == attempt
    assert not (tmp_path / "cache" / rc.CACHE_SECTION).exists()


def test_a_crashing_artifact_is_named_and_the_others_still_checked(tmp_path, children, monkeypatch):
    """One child for all: when it dies on one artifact, the ones it did not finish run again one per child."""
    bundle = _bundle(tmp_path / "b", {"a": ORT, "b": ORT, "c": ORT})
    monkeypatch.setattr(rc, "CHECK_SCRIPT", rc.CHECK_SCRIPT.replace(
        "def one(name):\n", "def one(name):\n    if name == 'b':\n        import os; os.kill(os.getpid(), 11)\n"))
    checks = rc.check_bundle(bundle, log=lambda m: None)
    assert [c[-3:] if len(c) > 1 else c for c in children][0] == ["a", "b", "c"]
    assert [c[-1] for c in children[1:]] == ["b", "c"]
    assert checks["a"]["ok"] is True and checks["c"]["ok"] is True
    assert checks["b"]["ok"] is False and "signal 11" in checks["b"]["error"]
    assert rc.check_bundle(bundle, log=lambda m: None)["b"]["ok"] is False  # not cached: checked again
    assert len(children) == 4


def test_emulated_checks_run_once_per_runtime_and_cache_passes_only(tmp_path, monkeypatch):
    """Without qemu: verify_runtime stands in for the qemu and x86 children."""
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(emu, "qemu", lambda: "/usr/bin/qemu-aarch64-static")
    monkeypatch.setattr(emu, "make_emulator", lambda manifest, spec, log: SimpleNamespace(cpu="cortex-a76"))
    bundle = _bundle(tmp_path / "b", {"a": ORT, "b": ORT, "c": "0.0.1"}, arch="aarch64")
    calls: list[list[str]] = []

    def fake(emulator, bundle, specs, manifest, log):
        calls.append([s["name"] for s in specs])
        return {s["name"]: {"runtime": "onnxruntime", "version": s["runtime_version"], "arch": "aarch64",
                            "emulated": True, "ok": s["name"] != "b", "cpu": "cortex-a76", "accuracy": 0.25,
                            "manifest_accuracy": 0.25, "outputs_vs_x86": {"identical": True, "max_abs_diff": 0.0}}
                | ({} if s["name"] != "b" else {"error": "emulated outputs differ"}) for s in specs}

    monkeypatch.setattr(emu, "verify_runtime", fake)
    first = emu.verify_bundle(bundle, log=lambda m: None)
    assert sorted(calls) == [["a", "b"], ["c"]]
    second = emu.verify_bundle(bundle, log=lambda m: None)
    assert sorted(calls[2:]) == [["b"]], "only the failed one runs again"
    assert second["a"]["cached"] and second["c"]["cached"] and "cached" not in second["b"]
    assert {k: v for k, v in second["a"].items() if k != "cached"} == first["a"]
    # a native pass of the same bytes is no emulated pass
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert rc.cached_check(rc.cache_key(bundle, manifest, manifest["artifacts"][0], "x86_64", "3.11")) is None


def test_the_bundle_check_says_the_result_came_from_the_cache(tmp_path, children):
    bundle = _bundle(tmp_path / "x86-64", {"a": ORT})
    assert "cached" not in bundle_check.verify_bundle(bundle, False, log=lambda m: None)["artifacts"]["a"]
    lines: list[str] = []
    again = bundle_check.verify_bundle(bundle, False, log=lines.append)["artifacts"]["a"]
    assert again["ok"] is True and again["cached"]["key"] and "cached" in rc.describe(again)
    assert len(children) == 1 and any("[cached:" in ln for ln in lines)


def test_one_pass_gives_the_runner_accuracy_and_the_outputs(tmp_path, children):
    """The emulated child computes accuracy and writes outputs from one inference pass: the same accuracy as the
    runner's own, the same outputs as a separate pass, all in one child."""
    bundle = _bundle(tmp_path / "b", {"a": ORT, "b": ORT})
    both, dumped = tmp_path / "both", tmp_path / "dumped"
    both.mkdir()
    dumped.mkdir()
    plain = rc.run_batch(sys.executable, bundle, ["a", "b"], env=rc.clean_env())
    one_pass = rc.run_batch(sys.executable, bundle, ["a", "b"], env=rc.clean_env(), mode="both", dumps=both)
    rc.run_batch(sys.executable, bundle, ["a", "b"], env=rc.clean_env(), mode="dump", dumps=dumped)
    assert len(children) == 3
    for name in ("a", "b"):
        assert one_pass[name]["dumped"] is True
        assert one_pass[name]["results"]["accuracy"] == plain[name]["results"]["accuracy"]
        assert np.array_equal(np.load(both / f"{name}.npy"), np.load(dumped / f"{name}.npy"))
        x, y = np.load(bundle / "eval.npz")["x"], np.load(bundle / "eval.npz")["y"]
        assert np.load(both / f"{name}.npy").shape == (len(x), 4)
        assert plain[name]["results"]["accuracy"] == (np.load(both / f"{name}.npy").argmax(1) == y).mean()


def test_the_verify_table_says_which_checks_came_from_the_cache(tmp_path, children):
    bundle = _bundle(tmp_path / "b", {"a": ORT})
    first = bundle_check.verify_bundle(bundle, False, log=lambda m: None)
    assert "cached" not in rc.table(first)
    again = rc.table(bundle_check.verify_bundle(bundle, False, log=lambda m: None))
    assert "cached: these bytes passed on" in again and "not run again" in again


def test_no_check_cache_runs_every_check(tmp_path, children, monkeypatch):
    bundle = _bundle(tmp_path / "b", {"a": ORT})
    rc.check_bundle(bundle, log=lambda m: None)
    monkeypatch.setenv(rc.NO_CACHE_ENV, "1")
    assert "cached" not in rc.check_bundle(bundle, log=lambda m: None)["a"]
    assert len(children) == 2
