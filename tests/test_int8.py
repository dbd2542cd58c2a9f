"""ONNX int8 worth shipping: folded BN, int8 weights, fused by onnxruntime, per-target settings, recommendation."""

import json
import warnings

import numpy as np
import onnx
import pytest
import torch

from edgekit import config, data, models, onnx_int8, recommend, targets
from edgekit.errors import EdgekitError, TargetError
from edgekit.report import summary_table
from tests.conftest import tiny


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny small_cnn on digits, exported twice: BN folded (eval) and BN kept as nodes (training mode)."""
    cfg = config.from_dict(tiny(model={"width": 8}))
    ds = data.load_dataset(cfg)
    torch.manual_seed(0)
    model = models.build_model(cfg, ds.sample_shape, ds.num_classes).eval()
    tmp = tmp_path_factory.mktemp("int8")
    paths = {}
    for name, mode in (("folded", torch.onnx.TrainingMode.EVAL), ("with_bn", torch.onnx.TrainingMode.PRESERVE)):
        paths[name] = tmp / f"{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.from_numpy(ds.calib.x[:1]),), str(paths[name]), dynamo=False,
                              opset_version=17, input_names=["input"], output_names=["logits"], training=mode,
                              do_constant_folding=mode == torch.onnx.TrainingMode.EVAL,
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return ds, model, paths, tmp


def _ops(payload: bytes) -> list[str]:
    return [n.op_type for n in onnx.load_from_string(payload).graph.node]


def _activation_zero_points(payload: bytes) -> list[np.ndarray]:
    """Zero-points of the QuantizeLinear nodes (activations; weights are stored already quantized)."""
    model = onnx.load_from_string(payload)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    return [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]


def test_bn_is_folded_and_weights_are_int8(setup):
    ds, _, paths, _ = setup
    assert "BatchNormalization" in [n.op_type for n in onnx.load(paths["with_bn"]).graph.node]
    payload, info = onnx_int8.quantize(paths["with_bn"], ds.calib.x[:32], targets.Int8Settings())
    assert "BatchNormalization" not in _ops(payload)
    model = onnx.load_from_string(payload)
    inits = {i.name: i.data_type for i in model.graph.initializer}
    conv_weights = [n.input[1] for n in model.graph.node if n.op_type == "Conv"]
    quantized = [w for w in conv_weights if w not in inits]  # fed by a DequantizeLinear of an int8 initializer
    dq_sources = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    assert len(quantized) == len(conv_weights) - len(info["kept_float"]) >= 2
    assert all(inits[dq_sources[w]] == onnx.TensorProto.INT8 for w in quantized)


def test_onnxruntime_fuses_every_conv(setup):
    ds, _, paths, _ = setup
    full = targets.Int8Settings(float_first_conv=False)
    payload, info = onnx_int8.quantize(paths["folded"], ds.calib.x[:32], full)
    fusion = onnx_int8.fusion(payload, len(info["kept_float"]))
    assert info["kept_float"] == []
    assert "Conv" not in fusion["float"] and "FusedConv" not in fusion["float"]
    assert fusion["fused"]["QLinearConv"] == 3 and fusion["unfused_count"] == 0


def test_first_conv_kept_float_by_design_and_counted(setup):
    ds, _, paths, _ = setup
    payload, info = onnx_int8.quantize(paths["folded"], ds.calib.x[:32], targets.Int8Settings())
    fusion = onnx_int8.fusion(payload, len(info["kept_float"]))
    assert len(info["kept_float"]) == 1 and fusion["fused"]["QLinearConv"] == 2
    assert fusion["unfused_count"] == 0  # the one float conv is the one kept on purpose


def test_int8_matches_the_float_model(setup):
    ds, model, paths, _ = setup
    import onnxruntime as ort

    payload, _ = onnx_int8.quantize(paths["folded"], ds.calib.x, targets.Int8Settings())
    out = ort.InferenceSession(payload, providers=["CPUExecutionProvider"]).run(None, {"input": ds.test.x})[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(ds.test.x)).numpy()
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.95


def test_target_settings_reach_the_artifact(setup):
    ds, _, paths, _ = setup
    x86, jetson = targets.get(["x86-64", "jetson-orin-nano"])
    assert x86.int8.activation_type == "uint8" and x86.int8.reduce_range
    u8, _ = onnx_int8.quantize(paths["folded"], ds.calib.x[:32], x86.int8)
    assert {z.dtype for z in _activation_zero_points(u8)} == {np.dtype("uint8")}
    s8, _ = onnx_int8.quantize(paths["folded"], ds.calib.x[:32], jetson.int8)
    zps = _activation_zero_points(s8)
    assert {z.dtype for z in zps} == {np.dtype("int8")} and all((z == 0).all() for z in zps)  # symmetric
    assert "Conv" not in onnx_int8.fusion(s8)["float"]  # TensorRT preset: every conv int8


def test_config_overrides_target_settings():
    x86, jetson = targets.get(["x86-64", "jetson-orin-nano"])
    assert onnx_int8.effective(x86, {"activation_type": "int8"}).activation_type == "int8"
    per_target = {"x86-64": {"reduce_range": False}}
    assert not onnx_int8.effective(x86, per_target).reduce_range
    assert onnx_int8.effective(jetson, per_target) == jetson.int8
    keys = onnx_int8.settings_by_key([x86, jetson], {})
    assert set(keys) == {"onnx_int8", "onnx_int8_s8s8pcsymfull"}
    with pytest.raises(TargetError, match="valid: preset, activation_type"):
        onnx_int8.effective(x86, {"activation": "int8"})


def test_int8_section_is_validated():
    raw = {"name": "t", "description": "d", "arch": "x86_64", "python": "3.11", "threads": 1, "budgets": {},
           "accuracy_tolerance_pp": 1.0, "docker_base": "debian", "runtimes": {"onnxruntime": "1.23.0"},
           "artifacts": [{"format": "onnx", "precision": "int8", "runtime": "onnxruntime"}]}
    assert targets.parse(raw, "t.yaml").artifacts[0].key == "onnx_int8"  # no int8 section: x86-avx2 defaults
    vnni = targets.parse(raw | {"int8": {"preset": "x86-vnni"}}, "t.yaml")
    assert not vnni.int8.reduce_range and vnni.artifacts[0].key == "onnx_int8_u8s8pc"
    with pytest.raises(TargetError, match="valid: x86-avx2, x86-vnni, arm-neon-dot, tensorrt"):
        targets.parse(raw | {"int8": {"preset": "avx"}}, "t.yaml")
    with pytest.raises(TargetError, match="int8.activation_type is 'fp8'"):
        targets.parse(raw | {"int8": {"activation_type": "fp8"}}, "t.yaml")


def test_recommendation_names_a_measured_artifact(setup):
    ds, _, paths, tmp = setup
    (x86,) = targets.get(["x86-64"])
    payload, _ = onnx_int8.quantize(paths["folded"], ds.calib.x[:32], x86.int8)
    (tmp / "onnx_int8.onnx").write_bytes(payload)
    entries = [{"name": n, "file": f, "format": "onnx", "precision": p, "runtime": "onnxruntime",
                "size_bytes": (tmp / f).stat().st_size, "reference": {"accuracy": 0.9}, "input": {}}
               for n, p, f in (("onnx_int8", "int8", "onnx_int8.onnx"), ("onnx_fp32", "fp32", "folded.onnx"))]
    run_cfg = config.from_dict(tiny()).run
    rec = recommend.recommend(tmp, entries, x86, ds.test.x, run_cfg)
    assert rec["measured"] and rec["artifact"] in {"onnx_int8", "onnx_fp32"} and rec["reason"]
    by_name = {c["artifact"]: c for c in rec["candidates"]}
    assert by_name["onnx_int8"]["runs"] == by_name["onnx_fp32"]["runs"] >= run_cfg.min_runs  # alternated
    assert by_name["onnx_int8"]["vs_fp32"] > 0 and by_name["onnx_int8"]["fp32_artifact"] == "onnx_fp32"
    lo, hi = by_name["onnx_int8"]["vs_fp32_ci"]["p50"]
    assert 0 < lo <= hi and rec["rule"] == recommend.RULE
    assert rec["reason"].startswith(("faster beyond noise", "tie within noise", "no clear winner"))
    (rpi,) = targets.get(["rpi5"])
    assert recommend.recommend(tmp, entries, rpi, ds.test.x, run_cfg)["artifact"] is None
    # build.run_local: false (a search's trials, timed in their own phase) times nothing, even for this machine
    off = recommend.recommend(tmp, entries, x86, ds.test.x, run_cfg, time_here=False)
    assert off["artifact"] is None and not off["measured"] and "build.run_local is false" in off["reason"]


def test_build_ships_fused_int8_and_a_measured_recommendation(e2e_build):
    out, report = e2e_build
    manifest = json.loads((out / "bundles" / "x86-64" / "manifest.json").read_text())
    rec = manifest["recommended"]
    assert rec["measured"] and rec["artifact"] in {a["name"] for a in manifest["artifacts"]}
    assert {c["artifact"] for c in rec["candidates"]} == {a["name"] for a in manifest["artifacts"]}
    int8 = next(a for a in manifest["artifacts"] if a["name"] == "onnx_int8")
    assert int8["int8"]["settings"]["activation_type"] == "uint8" and int8["int8"]["unfused_count"] == 0
    assert int8["source_stage"] == "quantize"  # made from the QAT-tuned weights, checked against the QAT model
    payload = (out / "bundles" / "x86-64" / "onnx_int8.onnx").read_bytes()
    assert "BatchNormalization" not in _ops(payload)
    rows = {(r["target"], r["name"]): r for r in report["artifacts"]}
    assert rows[("x86-64", "onnx_int8")]["side_by_side"]["vs_fp32"] > 0
    table = {c[1].rstrip("*+"): c for c in (line.split() for line in summary_table(report).splitlines())
             if c and c[0] == "x86-64"}
    for name in ("onnx_int8", "tflite_int8"):  # the ratio column is the ratio of the p50 column beside it
        p50, base = float(table[name][7]), float(table[rows[("x86-64", name)]["side_by_side"]["fp32_artifact"]][7])
        assert (p50 - 5e-5) / (base + 5e-5) - 0.005 <= float(table[name][9]) <= (p50 + 5e-5) / (base - 5e-5) + 0.005
    assert json.loads((out / "bundles" / "rpi5" / "manifest.json").read_text())["recommended"]["artifact"] is None


def test_shared_key_with_conflicting_overrides_is_an_error():
    (x86,) = targets.get(["x86-64"])
    other = targets.parse({**_raw_like(x86), "name": "x86-b"}, "b.yaml")
    with pytest.raises(EdgekitError, match="different int8 settings"):
        onnx_int8.settings_by_key([x86, other], {"x86-b": {"per_channel": False}})


def _raw_like(target) -> dict:
    import yaml

    return yaml.safe_load(open(target.source).read())
