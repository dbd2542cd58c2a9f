"""Every zoo model builds for its input kind, prunes (channels removed), quantizes with NNCF and exports to both
int8 formats."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgekit import config, data, metrics, models, pipeline, targets
from edgekit.errors import ModelError
from edgekit.files import write_json
from edgekit.models import zoo
from edgekit.stages import prune, quantize, verify
from edgekit.stages.base import METRICS_FILE, Context, finish_torch_stage

CASES = {  # model -> (sample shape, width_mult)
    "small_cnn": ((1, 8, 8), 0.5),
    "resnet8": ((1, 8, 8), 0.5),
    "ds_cnn": ((1, 16, 10), 0.25),
    "mobilenet_v1": ((3, 16, 16), 0.25),
    "mobilenet_v2": ((1, 16, 16), 0.25),
    "conv1d": ((2, 32), 0.5),
    "mlp": ((12,), 0.5),
}


def test_config_lists_every_zoo_model():
    import typing

    hint = typing.get_type_hints(config.ModelConfig)["name"]
    assert set(typing.get_args(hint)) == set(zoo.REGISTRY) == set(CASES)


def _channels(model: torch.nn.Module) -> int:
    return sum(m.out_channels if hasattr(m, "out_channels") else m.out_features for m in model.modules()
               if isinstance(m, torch.nn.Linear | torch.nn.modules.conv._ConvNd))


@pytest.mark.parametrize("name", list(CASES))
def test_zoo_model_prunes_quantizes_and_exports(name, tmp_path):
    """Pruned (channels removed), NNCF int8 QDQ that onnxruntime runs, and the export stage's ONNX int8 and
    full-int8 TFLite artifacts, each agreeing with the pruned torch model."""
    shape, mult = CASES[name]
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.normal(size=(120, *shape)).astype(np.float32), y=np.arange(120) % 5)
    cfg = config.from_dict({"data": {"source": "npz", "path": str(tmp_path / "data.npz"), "calib_samples": 32},
                            "model": {"name": name, "width": 8, "width_mult": mult}})
    ctx = Context(cfg, data.load_dataset(cfg), tmp_path / "build", targets.get(["x86-64", "rpi5"]))
    model = models.build_model(cfg, shape, 5)
    x = ctx.data.calib.x
    macs0, _ = metrics.macs_and_params(model, shape)
    channels0 = _channels(model)
    info = prune.prune_model(model, shape, 5, prune.Plan(method="l1", target_macs=0.6, protect_stem=name != "mlp"))
    macs1, _ = metrics.macs_and_params(model, shape)
    assert macs1 <= 0.6 * macs0 and _channels(model) < channels0, info
    assert model(torch.from_numpy(x)).shape == (32, 5)
    qmodel = quantize.calibrate(model, x, 16)
    qpath = tmp_path / "int8.onnx"
    quantize.export_qdq(qmodel, torch.from_numpy(x[:1]), qpath, 17)
    qout = ort.InferenceSession(str(qpath), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert metrics.fidelity(metrics.logits(qmodel, x), qout)["top1_agreement"] >= 0.8
    write_json(ctx.stage_dir("train") / METRICS_FILE, finish_torch_stage(ctx, "train", model))
    specs = {a["name"]: a for a in pipeline.run_stage(ctx, "export")["artifacts"]}
    for key in ("onnx_int8", "tflite_int8"):
        assert verify.check(ctx, specs[key])["top1_agreement"] >= 0.8, key


def test_image_models_refuse_signals():
    with pytest.raises(ModelError, match="takes images"):
        zoo.get("resnet8")((2, 32), 4)
    with pytest.raises(ModelError, match="no built-in model .vgg16.; valid: resnet8"):
        zoo.get("vgg16")


def test_linear_batchnorm_folds_so_the_mlp_exports_int8():
    from edgekit.stages.export import fold_linear_bn

    model = zoo.mlp((12,), 4).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.bias.data.uniform_(-1, 1)
    x = torch.randn(16, 12)
    before = model(x)
    folded = fold_linear_bn(model)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in folded.modules())
    torch.testing.assert_close(folded(x), before, rtol=1e-4, atol=1e-5)
