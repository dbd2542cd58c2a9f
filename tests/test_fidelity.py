"""Fidelity: a model built to break int8 is caught, and the error names the layer that breaks it."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from edgekit import config, fidelity, pipeline
from edgekit.stages import export, train, verify
from edgekit.stages.base import METRICS_FILE, finish_torch_stage, write_json
from tests.conftest import tiny


def _outlier_build(tmp_path, allow: bool):
    """Train, then give one channel of the first block a huge activation that the next conv ignores.

    The float model's logits do not change; its int8 twin must spend its 256 levels on that one channel.
    """
    cfg = config.from_dict(tiny(prune={"enabled": False}, quantize={"enabled": False},
                                build={"targets": ["rpi5"], "run_local": False, "allow_fidelity_miss": allow}))
    ctx = pipeline.make_context(cfg, tmp_path / "b", None)
    write_json(ctx.stage_dir("train") / METRICS_FILE, train.run(ctx))
    model = ctx.load_model("train")
    with torch.no_grad():
        model[1][0].weight[:, 0] = 0.0  # nothing downstream reads channel 0 of block 0 ...
        before = model(torch.from_numpy(ctx.data.test.x))
        model[0][1].bias[0] = 1000.0  # ... which a BN shift puts near 1000 after ReLU
        torch.testing.assert_close(model(torch.from_numpy(ctx.data.test.x)), before, atol=1e-2, rtol=0)
    write_json(ctx.stage_dir("train") / METRICS_FILE, finish_torch_stage(ctx, "train", model))
    write_json(ctx.stage_dir("export") / METRICS_FILE, export.run(ctx))
    return ctx


def test_outlier_layer_is_caught_and_named(tmp_path):
    ctx = _outlier_build(tmp_path, allow=False)
    with pytest.raises(verify.FidelityError) as err:
        verify.run(ctx)
    message = str(err.value)
    assert "artifact tflite_int8_int8io misses fidelity" in message and "\n" not in message
    assert "worst layer CONV_2D " in message
    record = json.loads((ctx.out / "fidelity" / "tflite_int8_int8io.json").read_text())
    worst = record["layers"][0]
    # the first block's conv (fused BN + ReLU): the only conv whose float output holds the ~1000 outlier
    assert worst["layer"].startswith("CONV_2D") and worst["ref_range"][1] > 900
    assert worst["layer"] in message
    assert record["metrics"]["top1_agreement"] < 0.99


def test_allow_fidelity_miss_keeps_going_and_records_it(tmp_path):
    ctx = _outlier_build(tmp_path, allow=True)
    result = verify.run(ctx)
    by_name = {a["name"]: a for a in result["artifacts"]}
    assert by_name["tflite_int8_int8io"]["fidelity_miss"] is True
    assert by_name["tflite_fp32"]["fidelity_miss"] is False


def test_onnx_layers_rank_the_quantizer_that_hurts(tmp_path):
    """A QDQ graph whose second activation quantizer has a far too coarse scale: that layer ranks first."""
    import onnx
    from onnx import TensorProto, helper

    def qdq(name, scale):
        return [helper.make_node("QuantizeLinear", [name, f"s_{name}", "zp"], [f"{name}_q"]),
                helper.make_node("DequantizeLinear", [f"{name}_q", f"s_{name}", "zp"], [f"{name}_dq"])]

    nodes = [*qdq("x", 0.01), helper.make_node("Relu", ["x_dq"], ["a"]), *qdq("a", 0.01),
             helper.make_node("Mul", ["a_dq", "two"], ["b"]), *qdq("b", 0.5),
             helper.make_node("Neg", ["b_dq"], ["y"])]
    scales = (("x", 0.01), ("a", 0.01), ("b", 0.5))
    inits = [helper.make_tensor(f"s_{n}", TensorProto.FLOAT, [], [s]) for n, s in scales]
    inits += [helper.make_tensor("zp", TensorProto.INT8, [], [0]),
              helper.make_tensor("two", TensorProto.FLOAT, [], [2])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])], inits)
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    x = np.random.default_rng(0).uniform(0, 1, (32, 4)).astype(np.float32)
    layers = fidelity.onnx_layers(str(path), x)
    assert layers[0]["tensor"] == "y"  # Neg reads the coarse "b" quantizer's output: the damage shows there
    assert layers[0]["drop_db"] > 10


def test_float_op_in_full_int8_tflite_is_an_error():
    ops = [{"op_name": "QUANTIZE", "index": 0, "operand_types": [np.float32], "result_types": [np.int8]},
           {"op_name": "CONV_2D", "index": 1, "operand_types": [np.int8, np.int8, np.int32], "result_types": [np.int8]},
           {"op_name": "SIN", "index": 2, "operand_types": [np.float32], "result_types": [np.float32]}]
    with pytest.raises(Exception, match="SIN \\(op 2\\) still computes in float"):
        export._assert_full_int8(ops, "tflite_int8")


def test_target_fidelity_thresholds_validated(tmp_path):
    from edgekit import targets
    from edgekit.errors import TargetError

    raw = dataclasses.asdict(targets.get(["rpi5"])[0])
    assert raw["min_agreement"] == 0.99
    text = (targets.TARGETS_DIR / "rpi5.yaml").read_text().replace("min_sqnr_db: 15", "min_sqnr: 15")
    (tmp_path / "t.yaml").write_text(text)
    with pytest.raises(TargetError, match="unknown fidelity key 'min_sqnr'; valid: min_agreement, min_sqnr_db"):
        targets.load_file(tmp_path / "t.yaml")
