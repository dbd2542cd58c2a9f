"""Pruning methods and targets, distillation losses, calibration choices and the harder task: real effects."""


import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgekit import config, data, metrics, models, pipeline, prunable, targets
from edgekit.errors import ConfigError
from edgekit.stages import distill, prune, quantize
from edgekit.stages.base import Context
from tests.conftest import tiny

SHAPE = (1, 8, 8)


def _model(name: str = "small_cnn", width: int = 16) -> torch.nn.Module:
    torch.manual_seed(0)
    model = models.build_model(config.from_dict({"model": {"name": name, "width": width}}), SHAPE, 10)
    for m in model.modules():  # distinct BN scales, as after training, so that slimming has something to rank
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = torch.rand_like(m.weight) + 0.05
    return model


def _exports(model: torch.nn.Module, tmp_path) -> bool:
    x = np.random.default_rng(0).random((4, *SHAPE), dtype=np.float32)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model.eval(), (torch.from_numpy(x[:1]),), str(path), dynamo=False, input_names=["input"],
                      dynamic_axes={"input": {0: "batch"}})
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    return bool(np.allclose(out, metrics.logits(model, x), atol=1e-4))


@pytest.mark.parametrize("method", ["l1", "slimming", "taylor", "random"])
@pytest.mark.parametrize("scope", ["local", "global"])
def test_methods_meet_macs_target_and_export(method, scope, tmp_path):
    model = _model("resnet8")
    macs0, _ = metrics.macs_and_params(model, SHAPE)
    calib = (np.random.default_rng(0).random((32, *SHAPE), dtype=np.float32), np.arange(32) % 10)
    info = prune.prune_model(model, SHAPE, 10, prune.Plan(method=method, scope=scope, target_macs=0.5),
                             calib=calib)
    macs1, _ = metrics.macs_and_params(model, SHAPE)
    assert macs1 <= 0.5 * macs0 and info["reached"] == pytest.approx(macs1 / macs0)
    assert model.stem[0].out_channels == 8 * 2  # the stem (and its residual group) is protected
    assert _exports(model, tmp_path)


def test_target_params_round_to_and_ignore():
    model = _model()
    _, p0 = metrics.macs_and_params(model, SHAPE)
    prune.prune_model(model, SHAPE, 10, prune.Plan(target_params=0.6, round_to=4, ignore=("2.0",),
                                                   protect_stem=False))
    _, p1 = metrics.macs_and_params(model, SHAPE)
    assert p1 <= 0.6 * p0
    assert model[0][0].out_channels % 4 == 0 and model[0][0].out_channels < 16
    assert model[2][0].out_channels == 32  # ignored layer keeps its outputs


class _Shuffled(torch.nn.Module):
    """conv a -> a channel-mixing op -> conv b -> conv c: the unit of a ShuffleNet, as users write it."""

    def __init__(self, mix: str):
        super().__init__()
        self.mix = mix
        self.a, self.b = torch.nn.Conv2d(3, 16, 1), torch.nn.Conv2d(16, 16, 1)
        self.c, self.fc = torch.nn.Conv2d(16 // 4 if mix == "pixel" else 16, 16, 1), torch.nn.Linear(16, 2)
        self.pixel, self.channel = torch.nn.PixelShuffle(2), torch.nn.ChannelShuffle(4)

    def forward(self, x):
        x -= 0.5  # in place on the input, as some users normalise
        x = self.a(x)
        n, c, h, w = x.shape
        if self.mix == "view":
            x = x.view(n, 4, c // 4, h, w).transpose(1, 2).reshape(n, c, h, w)
        elif self.mix == "last":  # the same shuffle, channels last
            x = x.permute(0, 2, 3, 1).reshape(n, h, w, 4, c // 4).transpose(3, 4).reshape(n, h, w, c)
            x = x.permute(0, 3, 1, 2)
        elif self.mix == "strided":  # ShuffleNetV2's split
            x = torch.cat([x[:, 0::2], x[:, 1::2]], 1)
        elif self.mix == "channel":
            x = self.channel(x)
        x = torch.relu(self.b(x))
        x = self.c(self.pixel(x)) if self.mix == "pixel" else self.c(x)
        return self.fc(torch.flatten(x.mean((2, 3)), 1))


@pytest.mark.parametrize("mix", ["view", "last", "strided", "channel", "pixel"])
def test_the_layer_before_a_channel_shuffle_is_kept_whole(mix):
    """torch-pruning takes a shuffle for an element-wise op and cuts channel k on both sides of it, which after
    the shuffle is another channel: the model would silently compute something else. The producer is kept."""
    torch.manual_seed(0)
    model = _Shuffled(mix)
    shuffled = ["b"] if mix == "pixel" else ["a"]
    assert prunable.shuffled_layers(model, (3, 4, 4)) == shuffled
    prune.prune_model(model, (3, 4, 4), 2, prune.Plan(method="l1", ratio=0.5, protect_stem=False))
    widths = {n: getattr(model, n).out_channels for n in "abc"}
    assert all(widths[n] == 16 for n in shuffled) and any(widths[n] < 16 for n in "abc" if n not in shuffled)
    model(torch.zeros(2, 3, 4, 4))


def test_without_a_shuffle_nothing_is_kept_whole():
    torch.manual_seed(0)
    model = _Shuffled("none")
    assert prunable.shuffled_layers(model, (3, 4, 4)) == []
    assert prunable.shuffled_layers(_model("resnet8"), SHAPE) == []
    prune.prune_model(model, (3, 4, 4), 2, prune.Plan(method="l1", ratio=0.5, protect_stem=False))
    assert model.a.out_channels == 8


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("round_to", [None, 8, 16])
def test_round_to_counts_the_whole_grouped_layer(groups, round_to):
    """torch-pruning 1.6 rounded one group's cut as the layer's: 4 groups, round_to 8 kept 32 of 64, 16 kept 64."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d
    model = torch.nn.Sequential(conv(3, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
                                conv(64, 64, 3, padding=1, groups=groups), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 4))
    prune.prune_model(model, (3, 8, 8), 4, prune.Plan(method="l1", ratio=0.25, round_to=round_to, protect_stem=False))
    assert model[3].out_channels == 48 and model[0].out_channels == 48
    model(torch.zeros(2, 3, 8, 8))


def test_unreachable_target_is_a_clear_error():
    model = _model()
    with pytest.raises(ConfigError, match=r"prune.target_params 0.01 is out of reach: pruning stops at 0\.\d\d"):
        prune.prune_model(model, SHAPE, 10, prune.Plan(target_params=0.01))


def test_global_ranking_differs_from_uniform():
    local, glob = _model(), _model()
    with torch.no_grad():
        glob[1][0].weight *= 10  # one layer of much larger scale: global ranking keeps more of it
        local[1][0].weight *= 10
    prune.prune_model(local, SHAPE, 10, prune.Plan(method="l1", scope="local", ratio=0.5, protect_stem=False))
    prune.prune_model(glob, SHAPE, 10, prune.Plan(method="l1", scope="global", ratio=0.5, protect_stem=False))
    chans = lambda m: [m[i][0].out_channels for i in range(3)]  # noqa: E731
    assert chans(local) == [8, 16, 16] and chans(local) != chans(glob)


def test_bn_scales_shrink_under_sparsity_training():
    cfg = config.from_dict(tiny(data={"limit": 300}))
    ds = data.load_dataset(cfg)
    norms = []
    for strength in (0.0, 0.05):
        model = models.build_model(cfg, ds.sample_shape, ds.num_classes)
        prune.sparsity_train(model, ds.train, ds.val, strength=strength, epochs=3, lr=0.01, batch_size=32, seed=0)
        norms.append(float(prune.bn_l1(model).detach()))
    assert norms[1] < 0.9 * norms[0]


def test_iterative_prune_stage_records_rounds(tmp_path):
    cfg = config.from_dict(tiny(data={"limit": 300}, train={"epochs": 1},
                                prune={"method": "taylor", "target_macs": 0.5, "steps": 2, "finetune_epochs": 2}))
    ctx = Context(cfg, data.load_dataset(cfg), tmp_path, [])
    before = pipeline.run_stage(ctx, "train")
    result = pipeline.run_stage(ctx, "prune")
    assert [r["target"] for r in result["rounds"]] == [0.75, 0.5]
    assert all(0 <= r["val_accuracy_before_finetune"] <= 1 for r in result["rounds"])
    assert 0.4 * before["macs"] < result["macs"] <= 0.5 * before["macs"] and result["method"] == "taylor"
    assert all(r["target"] - 0.1 < r["reached"] <= r["target"] for r in result["rounds"])  # of the unpruned model
    assert result["settings"]["steps"] == 2 and result["library"] == "torch-pruning"


def test_random_baseline_repeats_under_its_seed(tmp_path):
    """The random pruner draws from train.seed, whatever ran before: same seed, same channels."""
    import shutil

    def cfg(seed: int) -> config.Config:
        return config.from_dict(tiny(data={"limit": 300}, train={"epochs": 1, "seed": seed},
                                     prune={"method": "random", "ratio": 0.5, "finetune_epochs": 0}))

    base = Context(cfg(0), data.load_dataset(cfg(0)), tmp_path / "base", [])
    pipeline.run_stage(base, "train")
    kept = []
    for run, seed in enumerate((0, 0, 1)):
        shutil.copytree(base.stage_dir("train"), tmp_path / str(run) / "stages" / "train")
        ctx = Context(cfg(seed), base.data, tmp_path / str(run), [])
        torch.rand(run + 1)  # other work moved the global generator on
        pipeline.run_stage(ctx, "prune")
        kept.append(ctx.load_model("prune").state_dict())
    assert all(torch.equal(kept[0][k], kept[1][k]) for k in kept[0])
    assert not all(torch.equal(kept[0][k], kept[2][k]) for k in kept[0])


# --- distillation -------------------------------------------------------------------------------------------

def test_each_kd_loss_is_zero_for_identical_outputs_and_positive_otherwise():
    torch.manual_seed(0)
    a, b = torch.randn(16, 10), torch.randn(16, 10)
    fa, fb = torch.randn(16, 8, 4, 4), torch.randn(16, 8, 4, 4)
    assert distill.soft_kl(a, a, 4.0).abs() < 1e-6 and distill.soft_kl(a, b, 4.0) > 0.01
    assert distill.hint_loss(fa, fa, None) == 0 and distill.hint_loss(fa, fb, None) > 0.1
    assert distill.relation_loss(a, a).abs() < 1e-6 and distill.relation_loss(a, b) > 0.01
    assert distill.relation_loss(a, 3 * a).abs() < 1e-5  # RKD compares relations, not scale


def test_combined_objective_trains_adapter_for_a_narrower_student():
    teacher, student = _model(width=16), _model(width=8)
    objective = distill.Objective(student, [teacher, _model(width=16)], ["soft", "feature", "relation"],
                                  pairs=[("1.0", "1.0")])
    x, y = torch.rand(8, *SHAPE), torch.arange(8)
    distill.prime_adapters(objective, x)
    assert len(objective.adapters) == 1 and objective.adapters[0].in_channels == 16
    parts = objective.parts(student.train()(x), y, x)
    assert set(parts) == {"soft", "feature", "relation"} and all(v > 0 for v in parts.values())
    objective(student(x), y, x).backward()
    assert objective.adapters[0].weight.grad is not None
    objective.close()


# --- calibration --------------------------------------------------------------------------------------------

def test_entropy_and_percentile_differ_from_minmax_on_skewed_data():
    model = _model()
    rng = np.random.default_rng(0)
    x = rng.exponential(0.1, size=(64, *SHAPE)).astype(np.float32)
    x[::16] *= 40  # rare large outliers
    scales = {}
    for method in ("minmax", "percentile", "entropy"):
        q = quantize.calibrate(_model(), x, 64, quantize.Calibration(method=method, percentile=99.0))
        found = quantize.quantizers(q).items()
        scales[method] = {k: float(m.scale.detach().max()) for k, m in found if "post_hooks" in k}
    for method in ("percentile", "entropy"):
        assert scales[method].keys() == scales["minmax"].keys()
        first = next(iter(scales["minmax"]))  # the input quantizer sees the skewed data directly
        assert scales[method][first] < 0.8 * scales["minmax"][first], (method, scales)
    assert model is not None


def test_a_model_with_group_and_layer_norm_quantizes_with_per_channel_conv_weights():
    """Per-channel weights (the default) on a model with GroupNorm and LayerNorm: NNCF quantizes their affine
    weights per tensor, every conv and linear weight per output channel."""
    from torch import nn

    class Normed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.gn, self.proj = nn.Conv2d(1, 16, 3), nn.GroupNorm(4, 16), nn.Conv2d(16, 8, 1)
            self.ln, self.fc = nn.LayerNorm(8), nn.Linear(8, 10)

        def forward(self, x):
            return self.fc(self.ln(self.proj(torch.relu(self.gn(self.conv(x)))).mean((2, 3))))

    x = np.random.default_rng(0).random((16, *SHAPE), dtype=np.float32)
    shapes = {k: tuple(m.scale.shape) for k, m in quantize.quantizers(quantize.calibrate(Normed(), x, 16)).items()}
    weights = {k.split("pre_hooks.")[1]: v for k, v in shapes.items() if "pre_hooks" in k}
    assert weights["model/conv/conv2d/0__1.0"] == (16, 1, 1, 1) and weights["model/proj/conv2d/0__1.0"] == (8, 1, 1, 1)
    assert weights["model/fc/linear/0__1.0"] == (10, 1)
    # its int8 ships as ONNX; onnx2tf cannot convert GroupNorm, so a target shipping TFLite refuses it up front
    from edgekit.errors import ModelError
    from edgekit.formats import tflite

    tflite.check_convertible(Normed(), targets.get(["jetson-orin-nano"]), "m")
    with pytest.raises(ModelError, match="m has layer 'gn' \\(GroupNorm\\), which the TFLite export"):
        tflite.check_convertible(Normed(), targets.get(["x86-64"]), "m")


def test_keep_float_leaves_named_layers_unquantized(tmp_path):
    import onnx

    x = np.random.default_rng(0).random((32, *SHAPE), dtype=np.float32)
    full = quantize.calibrate(_model(), x, 32)
    mixed = quantize.calibrate(_model(), x, 32, quantize.Calibration(keep_float=("model/1/0/conv2d/0",)))
    counts = []
    for q in (full, mixed):
        path = tmp_path / "q.onnx"
        quantize.export_qdq(q, torch.from_numpy(x[:1]), path, 17)
        counts.append([n.op_type for n in onnx.load(path).graph.node].count("QuantizeLinear"))
    assert counts[1] < counts[0]
    with pytest.raises(ConfigError, match=r"^quantize.keep_float: 1.0 is not among the operations NNCF quantizes "
                                          r"in this model; name them as NNCF does: .*model/1/0/conv2d/0, "):
        quantize.calibrate(_model(), x, 32, quantize.Calibration(keep_float=("1.0",)))  # a torch module name


def test_layers_kept_float_stay_float_in_the_shipped_onnx_int8(tmp_path):
    """quantize.keep_float (and mixed precision, which sets it) reaches edgekit's ONNX int8 artifact."""
    import onnx

    from edgekit import onnx_int8

    cfg = config.from_dict(tiny(data={"limit": 300}, train={"epochs": 1}, prune={"enabled": False},
                                quantize={"method": "ptq", "keep_float": ["model/1/0/conv2d/0"]}))
    ctx = Context(cfg, data.load_dataset(cfg), tmp_path, targets.get(["x86-64"]))
    for name in ("train", "quantize", "export"):
        result = pipeline.run_stage(ctx, name)
    record = next(a for a in result["artifacts"] if a["name"] == "onnx_int8")
    graph = onnx.load(ctx.stage_dir("export") / record["file"]).graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    convs = {onnx_int8.module_of(n.name): n for n in graph.node if n.op_type == "Conv"}
    assert convs["1.0"].input[1] not in dequantized and convs["1.0"].name in record["int8"]["kept_float"]
    assert convs["2.0"].input[1] in dequantized  # the others are int8


# --- the harder task ----------------------------------------------------------------------------------------

def test_digits32_is_deterministic_and_keeps_copies_in_one_split():
    cfg = config.from_dict({"data": {"source": "digits32", "copies": 2, "limit": 400}})
    a, b = data.load_dataset(cfg), data.load_dataset(cfg)
    assert a.sample_shape == (1, 32, 32) and np.array_equal(a.test.x, b.test.x)
    x, y, _, _, groups = data._digits32(2, 0)
    assert len(x) == 2 * len(np.unique(groups)) and not np.array_equal(x[0], x[1])
    test_rows = {r.tobytes() for r in a.test.x}
    # the copy of a test image never sits in train: no train sample equals a test sample's sibling group
    assert not any(r.tobytes() in test_rows for r in a.train.x)


def test_mixed_precision_keeps_most_sensitive_layers_float():
    cfg = config.from_dict(tiny(data={"limit": 200}))
    ds = data.load_dataset(cfg)
    model = _model(width=8)
    calib, record = quantize.mixed_precision(model, ds.calib.x[:32], ds.val, 32, quantize.Calibration(),
                                             tolerance=-1.0)  # unreachable: every layer ends up float
    assert set(calib.keep_float) == set(record["sensitivity"]) and len(calib.keep_float) == 4
    assert record["kept_float"][0] == max(record["sensitivity"], key=record["sensitivity"].get)


def test_distill_stage_with_a_zoo_student_reloads_its_architecture(tmp_path):
    cfg = config.from_dict(tiny(data={"limit": 200}, train={"epochs": 1},
                                distill={"student": "resnet8", "student_width_mult": 0.25, "epochs": 1,
                                         "losses": ["soft", "relation"]}))
    ctx = Context(cfg, data.load_dataset(cfg), tmp_path, [])
    pipeline.run_stage(ctx, "train")
    result = pipeline.run_stage(ctx, "distill")
    assert result["settings"]["student_spec"]["name"] == "resnet8" and result["method"] == "soft+relation"
    again = ctx.load_model("distill")
    assert hasattr(again, "stack1") and result["params"] < ctx.metrics("train")["params"]


def test_magnitude_sparsity_zeroes_weights_and_survives_distill_and_qat(tmp_path):
    """NNCF unstructured magnitude sparsity: the ratio of weights is zero after prune and still after KD + QAT."""
    from edgekit import pipeline

    cfg = config.from_dict(tiny(prune={"method": "magnitude", "ratio": 0.6},
                                build={"targets": ["x86-64"], "run_local": False}))
    report = pipeline.build(cfg, tmp_path / "b", log=lambda *_: None)
    stages = {s["name"]: s for s in report["stages"]}
    assert stages["prune"]["sparsity"] >= 0.59 and stages["prune"]["macs"] == stages["train"]["macs"]
    manifest = tmp_path / "b" / "bundles" / "x86-64" / "manifest.json"  # run_local: false times nothing here
    rec = json.loads(manifest.read_text())["recommended"]
    assert not rec["measured"] and "build.run_local is false" in rec["reason"]
    ctx = pipeline.make_context(cfg, tmp_path / "b", None)
    for name in ("prune", "distill", "quantize"):
        assert prune.weight_sparsity(ctx.load_model(name)) >= 0.59, name
