"""Each torch stage asserts its effect on a tiny model."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgekit import config, data, metrics, models
from edgekit.stages import distill, prune, quantize
from edgekit.stages.base import Context
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


class _SkipToInput(torch.nn.Module):
    """A user's tabular net: a residual, then the features concatenated with the raw input. NNCF's strip left the
    quantizer it shares across that concat as its own FakeQuantize, which onnxruntime cannot load."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(features, 32), torch.nn.Linear(32, 32)
        self.out = torch.nn.Linear(32 + features, classes)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h = torch.relu(h + torch.relu(self.fc2(h)))
        return self.out(torch.cat([h, x], dim=1))


def test_a_quantizer_shared_with_the_input_exports_as_qdq_that_onnxruntime_runs(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 12)).astype(np.float32)
    qmodel = quantize.calibrate(_SkipToInput(12, 3).eval(), x, 32)
    path = tmp_path / "q.onnx"
    quantize.export_qdq(qmodel, torch.from_numpy(x[:1]), path, 17)
    graph = onnx.load(path).graph
    assert not any(n.domain == "org.openvinotoolkit" for n in graph.node)
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert metrics.sqnr_db(metrics.logits(qmodel, x), out) > 30  # the same fake quantization as NNCF's


def test_train_with_no_epochs_and_no_checkpoint_says_the_weights_are_the_factorys(tmp_path, capsys):
    from edgekit import config, data
    from edgekit.stages import train
    from edgekit.stages.base import Context
    from tests.conftest import tiny

    cfg = config.from_dict(tiny(data={"limit": 120}, train={"epochs": 0}))
    train.run(Context(cfg, data.load_dataset(cfg), tmp_path, []))
    assert "train.epochs is 0 and model.checkpoint is not set" in capsys.readouterr().out


def test_a_model_near_chance_is_warned_about_in_the_console_metrics_and_report(tmp_path, monkeypatch):
    """An untrained model (train.epochs 0, ~0.1 on 10 digit classes) is near chance: one warning line, in the
    stage's metrics and report.json/summary/page; a resumed or cached train stage says it again."""
    import json

    from edgekit import pipeline, report, report_html
    from edgekit.stages import train

    monkeypatch.setattr(pipeline, "STAGES", [train])  # the train stage alone, through the pipeline
    monkeypatch.setenv("EDGEKIT_STAGE_CACHE", str(tmp_path / "cache"))
    cfg = config.from_dict(tiny(train={"epochs": 0}, build={"stage_cache": True}))  # 75 val samples: 0.053
    ds = data.load_dataset(cfg)
    logs: list[str] = []
    (record,) = pipeline.run_stages(Context(cfg, ds, tmp_path / "a", []), logs.append)
    val = record["val_accuracy"]
    assert val < 0.15
    line = (f"validation accuracy {val:.3f} is near chance (0.100 for 10 classes; 0.169 is within two standard errors "
            "of it on 75 validation samples): the later stages compress a model that has not learned; train longer "
            "(train.epochs), raise train.lr, or check the labels")
    assert record["warnings"] == [line]
    assert json.loads((tmp_path / "a" / "stages" / "train" / "metrics.json").read_text())["warnings"] == [line]
    for out in ("a", "b"):  # resumed, then reused from the stage cache in another build
        logs.clear()
        pipeline.run_stages(Context(cfg, ds, tmp_path / out, []), logs.append)
        assert f"[train] warning: {line}" in logs, logs
    rep = report.build_report(cfg, [record, {"name": "verify", "artifacts": []}, {"name": "bundle", "bundles": []}],
                              [], {}, ("train",))
    assert rep["warnings"] == [f"train: {line}"]
    assert f"warning: train: {line}" in report.summary_table(rep) and "WARNING" not in report.summary_table(rep)
    (tmp_path / "a" / "report.json").write_text(json.dumps(rep))
    assert f"WARNING train: {line}" in report_html.render([tmp_path / "a"])


def test_the_near_chance_rule_spares_a_model_that_learned():
    from edgekit.stages.train import near_chance

    n = 10_000  # validation samples: the fixed bars decide
    assert near_chance(0.133, 10, n) and near_chance(0.55, 2, n) and near_chance(0.0014, 1000, n)
    assert not near_chance(0.16, 10, n) and not near_chance(0.61, 2, n) and not near_chance(0.45, 3, n)
    assert "two standard errors" not in near_chance(0.133, 10, n)


def test_the_near_chance_bar_rises_on_few_validation_samples():
    """40 samples of 10 classes: a guessing model reaches 0.16 often (sd 0.047); 0.195 is two standard errors."""
    from edgekit.stages.train import near_chance

    assert near_chance(0.19, 10, 40).startswith("validation accuracy 0.190 is near chance (0.100 for 10 classes; "
                                                "0.195 is within two standard errors of it on 40 validation samples)")
    assert not near_chance(0.2, 10, 40) and not near_chance(0.19, 10, 4000)


def test_a_model_that_answers_the_most_common_class_is_near_chance_on_imbalanced_data():
    """5 classes, 46 % of the validation split one of them: a model answering that class for every input (0.463)
    clears the 1/K bars but has learned nothing; one clearly above the share has."""
    from edgekit.stages.train import majority_share, near_chance

    labels = [0] * 50 + [1] * 30 + [2] * 15 + [3] * 8 + [4] * 5
    share = majority_share(labels)
    assert abs(share - 50 / 108) < 1e-9 and not near_chance(0.463, 5, 108)
    assert near_chance(0.463, 5, 108, share).startswith(
        "validation accuracy 0.463 is no better than always answering the most common class (0.463 of the 108 "
        "validation samples")
    assert not near_chance(0.60, 5, 108, share) and not near_chance(0.95, 2, 1000, 0.9)
    assert near_chance(0.91, 2, 1000, 0.9)  # within two standard errors of 0.9 on 1000 samples (0.919)


def _fit_no_batchnorm(ds, loss, workers: int) -> tuple[float, list[dict]]:
    from torch import nn

    from edgekit import ddp, training

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    start = ddp.loops_run()
    best = training.fit(net, ds.train, ds.val, epochs=2, lr=0.01, batch_size=32, loss_fn=loss, desc="distill",
                        workers=workers)
    return best, ddp.loops_since(start)


def test_a_fit_where_no_epoch_beats_the_start_says_it_kept_the_starting_weights(tmp_path, capsys):
    """A loss without gradient leaves every epoch at the start's accuracy: one line, recorded in the loop's
    record (which the pipeline puts into the stage's metrics.json `training` and `warnings`)."""
    from edgekit import pipeline
    from edgekit.stages import train

    cfg = config.from_dict(tiny(data={"limit": 200}))
    ds = data.load_dataset(cfg)
    for workers in (1, 2):
        best, (loop,) = _fit_no_batchnorm(ds, lambda out, y, x: 0 * out.sum(), workers)
        line = f"no epoch beat the starting model's validation accuracy {best:.3f}; kept the starting weights"
        assert f"[distill] {line}" in capsys.readouterr().out
        assert loop["kept_start_weights"] and loop["start_val_accuracy"] == best and loop["warning"] == line
    best, (loop,) = _fit_no_batchnorm(ds, lambda out, y, x: torch.nn.functional.cross_entropy(out, y), 1)
    assert "kept_start_weights" not in loop and "no epoch beat" not in capsys.readouterr().out
    # through a stage: a model without BatchNorm (whose running statistics would move) that lr 1e-12 cannot change
    (tmp_path / "linear.py").write_text("import math\nfrom torch import nn\n\n\ndef build(num_classes, input_shape):\n"
                                        "    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), "
                                        "num_classes))\n")
    cfg = config.from_dict(tiny(data={"limit": 200}, model={"factory": f"{tmp_path / 'linear.py'}:build"},
                                train={"epochs": 1, "lr": 1e-12}))
    record = pipeline.run_stage(Context(cfg, ds, tmp_path, []), train.name)
    assert record["training"][0]["kept_start_weights"]
    assert f"no epoch beat the starting model's validation accuracy {record['val_accuracy']:.3f}; kept the " \
           "starting weights, so nothing was trained (raise train.epochs or train.lr)" in record["warnings"]


def test_a_diverging_fit_stops_at_the_first_non_finite_loss_and_the_stage_ends_unfinished(tmp_path, monkeypatch):
    """train.lr 1e30: the loss is NaN in the first epoch. One line naming the stage, the epoch and what to do; the
    train stage is not finished and not in the stage cache (before, the NaN model went on to every stage)."""
    from edgekit import pipeline
    from edgekit.errors import TrainingDiverged
    from edgekit.stages import train

    monkeypatch.setattr(pipeline, "STAGES", [train])
    monkeypatch.setenv("EDGEKIT_STAGE_CACHE", str(tmp_path / "cache"))
    cfg = config.from_dict(tiny(data={"limit": 200}, train={"epochs": 2, "lr": 1e30}, build={"stage_cache": True}))
    with pytest.raises(TrainingDiverged) as err:
        pipeline.run_stages(Context(cfg, data.load_dataset(cfg), tmp_path / "b", []), lambda line: None)
    assert str(err.value) == ("training diverged in stage train at epoch 1/2: the loss became nan; lower train.lr "
                              "(now 1e+30) or check the data for NaN or infinite values")
    assert not (tmp_path / "b" / "stages" / "train" / "metrics.json").exists()
    assert not list((tmp_path / "cache").rglob("*.pt")) and not list((tmp_path / "cache").rglob("metrics.json"))


def test_a_fit_stops_on_outputs_that_overflowed_in_the_last_step_and_on_nan_data():
    """One step at lr 1e30 leaves a finite loss behind but NaN outputs (no loss saw them): stopped at validation,
    naming the loop's own lr setting. NaN in the data makes the very first loss NaN: the lr is not blamed."""
    from edgekit import training
    from edgekit.errors import TrainingDiverged

    cfg, ds, model = _setup()
    with pytest.raises(TrainingDiverged, match=r"^training diverged in stage prune \(finetune round 2/3\) at epoch "
                       r"1/1: the model's outputs on the validation split became nan; lower prune.lr \(now 1e\+30\)"):
        training.fit(model, ds.train, ds.val, epochs=1, lr=1e30, batch_size=len(ds.train.y), desc="finetune round 2/3")
    x = ds.train.x.copy()
    x[5] = np.nan
    with pytest.raises(TrainingDiverged, match=r"^training diverged in stage quantize \(qat\) at epoch 1/1: the loss "
                       "became nan; the model's outputs or the data hold NaN or infinite values before any step"):
        training.fit(model, data.Split(x, ds.train.y), ds.val, epochs=1, lr=1e-3, batch_size=len(x), desc="qat")


def _batchnorm1d_head() -> torch.nn.Module:
    """BatchNorm1d on (batch, features) cannot train on one sample ("Expected more than 1 value per channel")."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 2))


def test_a_last_batch_of_one_sample_joins_the_batch_before_it():
    """129 samples in batches of 64: the last one sample is trained with the 64 before it, none is dropped."""
    from edgekit import training

    torch.manual_seed(0)
    batches = [rows for rows, _ in training._Orders(129, 64)]
    assert [len(rows) for rows in batches] == [64, 65] and sorted(torch.cat(batches).tolist()) == list(range(129))
    assert len(training._Orders(129, 64)) == 2 and len(training._Orders(130, 64)) == 3
    rng = np.random.default_rng(0)
    y = np.arange(129) % 2
    split = data.Split((rng.normal(size=(129, 4)) + y[:, None]).astype(np.float32), y)
    assert training.fit(_batchnorm1d_head(), split, split, epochs=2, lr=0.01, batch_size=64) > 0.5


def test_near_chance_advice_does_not_raise_an_already_huge_lr():
    from edgekit.stages.train import near_chance

    assert "raise train.lr" in near_chance(0.1, 10, 1000, lr=0.003)
    huge = near_chance(0.1, 10, 1000, lr=1e30)
    assert "raise train.lr" not in huge and "lower train.lr (1e+30 is above Adam's usual 1e-4 to 1e-2)" in huge


def test_a_split_without_some_class_is_warned_about(tmp_path, capsys):
    """Every class is in the training split (else refused); one missing from validation or test is a warning."""
    import dataclasses

    from edgekit.stages import train

    cfg = config.from_dict(tiny(train={"epochs": 1}))
    ds = data.load_dataset(cfg)
    assert data.split_gaps(ds) == []
    keep = ds.val.y != 3
    ds = dataclasses.replace(ds, val=data.Split(ds.val.x[keep], ds.val.y[keep]))
    (line,) = data.split_gaps(ds)
    assert line == (f"the validation split ({keep.sum()} samples) has no sample of class 3: the accuracy that guards "
                    "pruning and repairs int8 does not see it; raise data.val_fraction or add samples")
    record = train.run(Context(cfg, ds, tmp_path, []))
    assert record["warnings"][-1] == line and f"[train] warning: {line}" in capsys.readouterr().out


def test_what_the_data_source_skipped_is_warned_about_before_training(tmp_path, capsys):
    """An ImageFolder's skipped files (data.Dataset.warnings): said when the train stage starts, and recorded with its
    other warnings (report.json, the summary, the page)."""
    import dataclasses

    from edgekit.stages import train

    cfg = config.from_dict(tiny(data={"limit": 120}, train={"epochs": 1}))
    skipped = "'imgs': 3 images not read (e.g. 'cat/more/0.png'): in a subfolder of a class folder, ..."
    ds = dataclasses.replace(data.load_dataset(cfg), warnings=(skipped,))
    record = train.run(Context(cfg, ds, tmp_path, []))
    assert record["warnings"][0] == skipped
    out = capsys.readouterr().out
    assert out.startswith(f"[train] warning: {skipped}\n"), out[:300]  # before the epochs' lines
