"""ONNX int4 weight-only: INT4 initializers behind DequantizeLinear that onnxruntime runs, verified like every
artifact with its own thresholds, smaller than int8, and only for targets whose pinned onnxruntime loads it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml

from edgekit import config, fidelity, onnx_int4, pipeline, targets
from edgekit.errors import TargetError
from edgekit.formats import onnx as onnx_format
from tests.conftest import tiny

EXAMPLE = Path(targets.TARGETS_DIR).resolve().parent / "targets" / "examples" / "x86-64-int4.yaml"


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """A tiny float model built for the example target that ships onnx int8, int4 and fp32."""
    out = tmp_path_factory.mktemp("int4") / "b"
    cfg = config.from_dict(tiny(data={"limit": 300}, prune={"enabled": False}, distill={"enabled": False},
                                quantize={"enabled": False}, build={"targets": [str(EXAMPLE)], "run_local": False}))
    report = pipeline.build(cfg, out, log=lambda *_: None)
    exported = {a["name"]: a for a in json.loads((out / "stages" / "export" / "artifacts.json").read_text())}
    return out, report, exported


def _weights(model, op: str) -> list:
    """The initializers behind each weight (through its DequantizeLinear) of the `op` nodes."""
    inits = {i.name: i for i in model.graph.initializer}
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    found = []
    for node in (n for n in model.graph.node if n.op_type == op):
        name = node.input[1]
        found.append(inits[dq[name].input[0]] if name in dq else inits[name])
    return found


def test_the_int4_artifact_holds_int4_weights_that_onnxruntime_runs(build):
    out, _, exported = build
    rec = exported["onnx_int4"]
    payload = (out / "stages" / "export" / rec["file"]).read_bytes()
    model = onnx.load_from_string(payload)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == onnx_int4.OPSET
    first, *weights = _weights(model, "Conv") + _weights(model, "Gemm")
    assert first.data_type == onnx.TensorProto.INT8  # the input conv: few weights, the most sensitive
    assert len(weights) >= 3 and all(w.data_type == onnx.TensorProto.INT4 for w in weights)
    assert rec["int4"]["int4_initializers"] == len(weights) and rec["int4"]["scheme"] == "per-channel"
    assert rec["int4"]["optimized_ops"]["DequantizeLinear"] == len(weights) + 1  # each run: float compute
    x = np.load(out / "bundles" / "x86-64-int4" / "eval.npz")["x"][:8]
    got = onnx_format.session(payload, "onnx_int4").run(None, {"input": x})[0]
    assert got.shape == (8, rec["output"]["shape"][1]) and np.isfinite(got).all()


def test_int4_is_verified_with_its_own_thresholds_and_recorded(build):
    out, report, _ = build
    verified = {a["name"]: a for a in json.loads((out / "stages" / "verify" / "metrics.json").read_text())["artifacts"]}
    int4, int8 = verified["onnx_int4"], verified["onnx_int8"]
    assert (int4["fidelity_thresholds"]["min_sqnr_db"], int4["fidelity_thresholds"]["min_agreement"]) == (10.0, 0.97)
    assert int8["fidelity_thresholds"]["min_sqnr_db"] == 15.0  # int8 keeps the target's own
    assert 0 < int4["accuracy"] <= 1 and 0 < int4["top1_agreement"] <= 1 and 10.0 <= int4["sqnr_db"] < 60
    assert int4["fidelity_miss"] is False and int4["numerics"]["name"] == fidelity.KERNELS
    row = next(a for a in report["artifacts"] if a["name"] == "onnx_int4")
    assert row["sqnr_db"] == int4["sqnr_db"] and row["fidelity_miss"] is False  # in the report too
    assert row["runtime_check"]["ok"] is True  # the pinned onnxruntime 1.23.0, in its own venv, ran it


def test_the_int4_file_is_smaller_than_the_int8_weights(build):
    out, _, exported = build
    int8 = onnx.load(out / "stages" / "export" / exported["onnx_int8"]["file"])
    int8_weight_bytes = sum(len(i.raw_data) for i in int8.graph.initializer if i.data_type == onnx.TensorProto.INT8)
    assert exported["onnx_int4"]["size_bytes"] < int8_weight_bytes < exported["onnx_int8"]["size_bytes"]
    assert exported["onnx_int4"]["int4"]["size_vs_fp32"] < 0.2


def test_blockwise_and_mixed_plans(build):
    out, _, exported = build
    fp32 = (out / "stages" / "export" / exported["onnx_fp32"]["file"]).read_bytes()
    blocked, info = onnx_int4.quantize(fp32, block_size=8)
    model = onnx.load_from_string(blocked)
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert info["scheme"] == "blockwise 8" and all(any(a.name == "block_size" and a.i == 8 for a in n.attribute)
                                                   for n in dq)
    names = [n.name for n, _ in onnx_int4.weighted_nodes(onnx.load_from_string(fp32))]
    mixed, info = onnx_int4.quantize(fp32, plan={names[0]: 32, names[1]: 8})
    bits = {lay["node"]: lay["bits"] for lay in info["layers"]}
    assert bits[names[0]] == 32 and bits[names[1]] == 8 and bits[names[2]] == 4
    kinds = {i.data_type for i in onnx.load_from_string(mixed).graph.initializer}
    assert {onnx.TensorProto.INT4, onnx.TensorProto.INT8} <= kinds
    x = np.random.default_rng(0).random((4, *exported["onnx_fp32"]["input"]["shape"][1:]), np.float32)
    ref = onnx_format.session(fp32, "fp32").run(None, {"input": x})[0]
    for payload in (blocked, mixed):
        got = onnx_format.session(payload, "int4").run(None, {"input": x})[0]
        assert fidelity.metrics.sqnr_db(ref, got) > 10  # the same model, a few levels of noise off


def _profile(tmp_path, **changes) -> Path:
    raw = yaml.safe_load(EXAMPLE.read_text()) | changes
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_target_pinning_an_onnxruntime_too_old_for_int4_is_refused(tmp_path):
    # onnxruntime 1.18.1 refuses the file ("MLDataType for: tensor(int4) is not currently registered"); 1.19.0 runs it
    with pytest.raises(TargetError, match=r"onnx/int4 needs onnxruntime >= 1\.19\.0, the target pins 1\.18\.1; "
                                          r"pin 1\.19\.0 or newer") as err:
        targets.load_file(_profile(tmp_path, runtimes={"onnxruntime": "1.18.1"}))
    assert "\n" not in str(err.value)
    assert targets.load_file(_profile(tmp_path, runtimes={"onnxruntime": "1.19.0"})).artifacts[1].precision == "int4"
    gpu = [{"format": "onnx", "precision": "int4", "runtime": "onnxruntime-gpu"}]
    with pytest.raises(TargetError, match="onnx/int4 runs on onnxruntime >= 1.19.0 only, not onnxruntime-gpu"):
        targets.load_file(_profile(tmp_path, runtimes={"onnxruntime-gpu": "1.23.0"}, artifacts=gpu))


def test_int4_fidelity_keys_are_checked(tmp_path):
    with pytest.raises(TargetError, match="unknown fidelity.int4 key 'min_sqnr'; valid: min_agreement, min_sqnr_db"):
        targets.load_file(_profile(tmp_path, fidelity={"int4": {"min_sqnr": 9}}))
    with pytest.raises(TargetError, match="fidelity.int4 must be a mapping"):
        targets.load_file(_profile(tmp_path, fidelity={"int4": 9}))
    plain = targets.load_file(_profile(tmp_path, fidelity={}))
    assert (plain.int4_min_sqnr_db, plain.min_sqnr_db) == (targets.INT4_FIDELITY_DEFAULTS["min_sqnr_db"], 15.0)
