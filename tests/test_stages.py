"""Each torch stage asserts its effect on a tiny model."""

import numpy as np
import onnx
import onnxruntime as ort
import torch

from edgekit import config, data, metrics, models
from edgekit.stages import distill, prune, quantize
from tests.conftest import tiny


def _setup():
    cfg = config.from_dict(tiny())
    ds = data.load_dataset(cfg)
    return cfg, ds, models.build_model(cfg, ds.sample_shape, ds.num_classes)


def test_l1_prune_removes_channels_and_keeps_working():
    cfg, ds, model = _setup()
    macs0, params0 = metrics.macs_and_params(model, ds.sample_shape)
    first = model[0][0].weight.detach().clone()
    keep = first.abs().sum(dim=(1, 2, 3)).argsort(descending=True)[:8].sort().values
    prune.prune_l1(model, ds.sample_shape, ds.num_classes, ratio=0.5, round_to=None, ignore=[])
    macs1, params1 = metrics.macs_and_params(model, ds.sample_shape)
    assert model[0][0].out_channels == 8 and model[-1].out_features == 10
    assert macs1 < 0.5 * macs0 and params1 < 0.5 * params0
    torch.testing.assert_close(model[0][0].weight, first[keep])  # the largest-L1 filters survive
    assert model(torch.from_numpy(ds.test.x[:3])).shape == (3, 10)


def test_pruned_model_saves_and_reloads(tmp_path):
    cfg, ds, model = _setup()
    prune.prune_l1(model, ds.sample_shape, ds.num_classes, ratio=0.5, round_to=None, ignore=[])
    models.save_model(model, tmp_path / "m.pt")
    again = models.load_model(cfg, ds.sample_shape, ds.num_classes, tmp_path / "m.pt")
    np.testing.assert_allclose(metrics.logits(again, ds.test.x), metrics.logits(model, ds.test.x))


def test_soft_target_loss():
    logits = torch.randn(8, 10)
    labels = logits.argmax(1)
    same = distill.soft_target_loss(logits, logits, labels, temperature=4.0, alpha=1.0)
    other = distill.soft_target_loss(logits, torch.randn(8, 10), labels, temperature=4.0, alpha=1.0)
    assert abs(same.item()) < 1e-6 and other.item() > 0.01
    mixed = distill.soft_target_loss(logits, logits, labels, temperature=4.0, alpha=0.0)
    torch.testing.assert_close(mixed, torch.nn.functional.cross_entropy(logits, labels))


def test_nncf_quantize_exports_qdq_onnx_that_onnxruntime_runs(tmp_path):
    cfg, ds, model = _setup()
    qmodel = quantize.calibrate(model, ds.calib.x, 32)
    path = tmp_path / "q.onnx"
    quantize.export_qdq(qmodel, torch.from_numpy(ds.train.x[:1]), path, 17)
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops.count("QuantizeLinear") >= 3 and ops.count("DequantizeLinear") >= 3
    assert not any(n.domain == "org.openvinotoolkit" for n in onnx.load(path).graph.node)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": ds.test.x[:16]})[0]
    ref = metrics.logits(qmodel, ds.test.x[:16])
    assert metrics.fidelity(ref, out)["top1_agreement"] >= 0.9


def test_train_with_no_epochs_and_no_checkpoint_says_the_weights_are_the_factorys(tmp_path, capsys):
    from edgekit import config, data
    from edgekit.stages import train
    from edgekit.stages.base import Context
    from tests.conftest import tiny

    cfg = config.from_dict(tiny(data={"limit": 120}, train={"epochs": 0}))
    train.run(Context(cfg, data.load_dataset(cfg), tmp_path, []))
    assert "train.epochs is 0 and model.checkpoint is not set" in capsys.readouterr().out
