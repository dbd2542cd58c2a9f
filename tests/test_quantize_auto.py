"""PTQ first, QAT as the repair (`quantize.method: auto`): QAT runs only when the calibrated model loses more
validation accuracy against the float model than the limit, and the export then uses the QAT-tuned weights."""

import json
import shutil

import pytest

from edgekit import config, targets
from edgekit.errors import ConfigError
from edgekit.stages import export, quantize
from edgekit.stages.base import Context
from tests.conftest import tiny


def _quantize(trained, tmp_path, chosen: list, **section) -> tuple[dict, Context]:
    cfg = config.from_dict(tiny(data={"limit": 300}, train={"epochs": 4}, quantize={"method": "auto", **section}))
    shutil.copytree(trained.stage_dir("train"), tmp_path / "stages" / "train")
    ctx = Context(cfg, trained.data, tmp_path, chosen)
    result = quantize.run(ctx)
    (ctx.stage_dir("quantize") / "metrics.json").write_text(json.dumps(result))
    return result, ctx


def test_auto_skips_qat_when_ptq_is_within_the_limit(trained, tmp_path, capsys):
    result, ctx = _quantize(trained, tmp_path, targets.get(["x86-64"]), max_loss_pp=100.0)
    qat = result["qat"]
    assert not qat["ran"] and qat["limit_pp"] == 100.0
    assert qat["float_val_accuracy"] - qat["ptq_val_accuracy"] <= 1.0
    assert "QAT skipped" in qat["why"] and "quantize.max_loss_pp" in qat["why"]
    assert "QAT skipped" in capsys.readouterr().out
    assert result["method"] == "nncf-ptq" and result["settings"]["qat_epochs"] == 0
    assert not ctx.has_model("quantize") and result["size_file"] == quantize.ONNX_FILE
    assert (ctx.stage_dir("quantize") / quantize.ONNX_FILE).is_file()
    assert export.sources(ctx) == ("train", "train")  # the int8 artifacts from the float model
    assert export.kept_float_modules(ctx) == []  # the quantize stage ran: its keep_float (none) is read


def test_auto_runs_qat_when_ptq_loses_more_than_the_limit(trained, tmp_path):
    """Activation ranges clipped at the 51st percentile lose far more than one validation sample."""
    result, ctx = _quantize(trained, tmp_path, targets.get(["x86-64"]), calibration="percentile", percentile=51,
                            max_loss_pp=0.0)
    qat = result["qat"]
    assert qat["ran"] and qat["float_val_accuracy"] - qat["ptq_val_accuracy"] > 100 / len(ctx.data.val.y) / 100
    assert "QAT repairs it" in qat["why"]
    assert result["method"] == "nncf-qat" and result["settings"]["qat_epochs"] == 1
    assert ctx.has_model("quantize") and result["val_accuracy"] is not None
    assert export.sources(ctx) == ("train", "quantize")  # the int8 artifacts from the QAT-tuned weights


def test_the_default_limit_is_the_strictest_targets_tolerance(trained, tmp_path):
    strict, = targets.get(["x86-64"])
    result, _ = _quantize(trained, tmp_path, [strict])
    assert "accuracy_tolerance_pp of target x86-64" in result["qat"]["why"]
    assert result["qat"]["limit_pp"] == max(strict.accuracy_tolerance_pp, 100 / len(trained.data.val.y))


def test_ptq_never_runs_qat(trained, tmp_path):
    result, ctx = _quantize(trained, tmp_path, targets.get(["x86-64"]), method="ptq", max_loss_pp=0.0)
    assert not result["qat"]["ran"] and not ctx.has_model("quantize")
    assert result["qat"]["why"] == "quantize.method ptq, qat_epochs 1: PTQ only"


def test_auto_without_a_target_runs_qat(trained, tmp_path):
    result, _ = _quantize(trained, tmp_path, [])
    assert result["qat"]["ran"] and "no target tolerance" in result["qat"]["why"]


@pytest.mark.parametrize(("section", "message"), [
    ({"max_loss_pp": -1}, "'quantize.max_loss_pp' is out of range"),
    ({"method": "sometimes"}, "'quantize.method' is 'sometimes'"),
])
def test_bad_quantize_settings_are_one_line_errors(section, message):
    with pytest.raises(ConfigError, match=message):
        config.from_dict({"quantize": section})


def test_after_qat_the_export_gets_the_weights_as_nncf_quantized_them(trained, tmp_path):
    """model.pt holds each weight on NNCF's int8 grid (clamped to the range QAT learned, then rounded), not the raw
    weights: the exporters' quantizers take each channel's range from the weights, so they keep NNCF's grid."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    _, ctx = _quantize(trained, tmp_path, targets.get(["x86-64"]), method="qat")
    graph = onnx.load(str(ctx.stage_dir("quantize") / quantize.ONNX_FILE)).graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in consts:
            consts[node.output[0]] = consts[node.input[0]]
    state = {f"model.{k}": v.numpy() for k, v in ctx.load_model("quantize").state_dict().items()}
    weighted = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in state]
    assert len(weighted) == sum(1 for k, v in state.items() if k.endswith(".weight") and v.ndim > 1)
    for node in weighted:
        saved, scale = state[node.input[0]], consts[node.input[1]]
        assert np.array_equal(saved, consts[node.input[0]]), node.input[0]
        steps = saved / scale.reshape(-1, *[1] * (saved.ndim - 1))
        assert np.abs(steps - np.round(steps)).max() < 1e-3, f"{node.input[0]} is off NNCF's grid"


def test_a_ptq_model_better_than_its_float_model_is_said_to_gain(trained, tmp_path):
    """A negative loss reads 'PTQ gained 0.56 pp', never 'PTQ lost -0.56 pp': here the float model (an untrained
    one in the distill stage's folder) is far below the model judged as its PTQ result (the trained one)."""
    from edgekit import models

    cfg = config.from_dict(tiny(data={"limit": 300}, quantize={"method": "auto", "max_loss_pp": 1.0}))
    shutil.copytree(trained.stage_dir("train"), tmp_path / "stages" / "train")
    ctx = Context(cfg, trained.data, tmp_path, [])
    untrained = models.build_model(cfg, ctx.data.sample_shape, ctx.data.num_classes)
    models.save_model(untrained, ctx.stage_dir("distill") / "model.pt")
    qat = quantize.qat_decision(ctx, "distill", ctx.load_model("train"))
    gained = 100 * (qat["ptq_val_accuracy"] - qat["float_val_accuracy"])
    assert gained > 0 and qat["why"].startswith(f"PTQ gained {gained:.2f} pp of validation accuracy"), qat["why"]
    assert "QAT skipped" in qat["why"]
