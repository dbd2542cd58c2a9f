"""Every zoo model builds for its input kind, prunes (channels removed), quantizes with NNCF and exports."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgekit import config, metrics, models
from edgekit.errors import ModelError
from edgekit.models import zoo
from edgekit.stages import prune, quantize

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
    shape, mult = CASES[name]
    cfg = config.from_dict({"model": {"name": name, "width": 8, "width_mult": mult}})
    model = models.build_model(cfg, shape, 5)
    x = np.random.default_rng(0).normal(size=(16, *shape)).astype(np.float32)
    macs0, _ = metrics.macs_and_params(model, shape)
    channels0 = _channels(model)
    info = prune.prune_model(model, shape, 5, prune.Plan(method="l1", target_macs=0.6, protect_stem=name != "mlp"))
    macs1, _ = metrics.macs_and_params(model, shape)
    assert macs1 <= 0.6 * macs0 and _channels(model) < channels0, info
    assert model(torch.from_numpy(x)).shape == (16, 5)
    path = tmp_path / "fp32.onnx"
    torch.onnx.export(model.eval(), (torch.from_numpy(x[:1]),), str(path), dynamo=False, input_names=["input"],
                      dynamic_axes={"input": {0: "batch"}})
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(out, metrics.logits(model, x), atol=1e-4, rtol=1e-3)
    qmodel = quantize.calibrate(model, x, 16)
    qpath = tmp_path / "int8.onnx"
    quantize.export_qdq(qmodel, torch.from_numpy(x[:1]), qpath, 17)
    qout = ort.InferenceSession(str(qpath), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert metrics.fidelity(metrics.logits(qmodel, x), qout)["top1_agreement"] >= 0.8


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
