"""A user-style 1-D conv net on (1, 64) signals: the layer-wise debug tells the truth, and an ONNX int8 miss is
repaired by keeping the layers where the error starts float."""

import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from edgekit import fidelity, onnx_int8, repair, targets


def _signals(n=600):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, n)
    t = np.arange(64)
    x = np.sin(2 * np.pi * (y[:, None] + 1) * t / 64 + rng.uniform(0, 6.3, (n, 1))) + 0.5 * rng.normal(size=(n, 64))
    return x.astype(np.float32)[:, None], y


def _net():
    def block(i, o):
        return [nn.Conv1d(i, o, 5, padding=2), nn.BatchNorm1d(o), nn.ReLU()]

    return nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 32), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                         nn.Linear(32, 4))


def _export(model, x, path):
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.from_numpy(x[:1]),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


@pytest.fixture(scope="module")
def signal_net(tmp_path_factory):
    torch.manual_seed(0)
    x, y = _signals()
    model = _net()
    opt = torch.optim.Adam(model.parameters(), 0.01)
    for _ in range(60):
        model.train()
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.from_numpy(x[:400])), torch.from_numpy(y[:400]).long()).backward()
        opt.step()
    return model.eval(), x, y, tmp_path_factory.mktemp("signal")


def test_healthy_1d_int8_shows_no_layer_below_threshold(signal_net):
    """The old debug's twin bypassed Q/DQ pairs of a graph whose quantizer had folded the ReLUs into the convs'
    output quantizers: it ran without ReLUs, and GlobalAveragePool looked lost (negative SQNR) on a healthy model."""
    model, x, _, tmp = signal_net
    fp32 = _export(model, x, tmp / "healthy.onnx")
    (x86,) = targets.get(["x86-64"])
    payload, _ = onnx_int8.quantize(fp32, x[:64], x86.int8)
    ops = [n.op_type for n in onnx.load_from_string(payload).graph.node]
    assert ops.count("Relu") < 3  # the quantizer removed ReLUs: a Q/DQ-bypassed graph is not the float model
    layers = fidelity.onnx_layers(payload, onnx_int8.float_twin(fp32), x[400:], fidelity.KERNELS)
    assert {lay["layer"].split()[0] for lay in layers} >= {"Conv", "GlobalAveragePool", "Gemm"}
    assert min(lay["sqnr_db"] for lay in layers) >= x86.min_sqnr_db


def test_debug_names_a_broken_global_average_pool(signal_net):
    model, x, _, tmp = signal_net
    fp32 = _export(model, x, tmp / "gap.onnx")
    payload, _ = onnx_int8.quantize(fp32, x[:64], targets.get(["x86-64"])[0].int8)
    broken = onnx.load_from_string(payload)
    gap = next(n for n in broken.graph.node if n.op_type == "GlobalAveragePool")
    q = next(n for n in broken.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == gap.output[0])
    scale = next(i for i in broken.graph.initializer if i.name == q.input[1])
    coarse = (numpy_helper.to_array(scale) * 40).astype(np.float32)  # 40x too coarse
    scale.CopyFrom(numpy_helper.from_array(coarse, scale.name))
    layers = fidelity.onnx_layers(broken.SerializeToString(), onnx_int8.float_twin(fp32), x[400:], fidelity.KERNELS)
    assert layers[0]["layer"] == f"GlobalAveragePool {gap.name}" and layers[0]["drop_db"] > 10


def test_int8_miss_is_repaired_by_keeping_the_culprit_float(signal_net):
    """One channel of the first block near 1000 and ignored downstream: the float logits do not change, the
    activation quantizer after it spends its levels on that channel. Repair keeps the layers it hits float."""
    model, x, y, tmp = signal_net
    model = _net().eval()
    model.load_state_dict(signal_net[0].state_dict())
    with torch.no_grad():
        model[3].weight[:, 0] = 0.0
        model[1].bias[0] = 1000.0
        reference = model(torch.from_numpy(x[400:])).numpy()
    fp32 = _export(model, x, tmp / "outlier.onnx")
    targets_ = targets.get(["x86-64"])
    limits = fidelity.thresholds(targets_, "onnx_int8")
    hows = fidelity.numerics_of(targets_, "onnx_int8", {"activation_type": "uint8", "reduce_range": True})
    plain, _ = onnx_int8.quantize(fp32, x[:64], targets_[0].int8)
    payload, info = repair.quantize(fp32, x[:64], targets_[0].int8, [], check=(x[400:], y[400:], reference),
                                    hows=hows, limits=limits)
    fix = info["repair"]
    assert fix["met"] and fix["before"]["top1_agreement"] < 0.9 and fix["after"]["top1_agreement"] >= 0.99
    assert fix["kept_float"] and set(fix["kept_float"]) <= set(info["kept_float"])
    assert fix["after"]["size_bytes"] == len(payload) > len(plain) == fix["before"]["size_bytes"]
    assert fix["before"]["host_p50_ms"] > 0 and fix["after"]["host_p50_ms"] > 0  # what it costs in time, here


def test_repair_blames_a_drop_at_a_node_without_weights_on_the_weighted_node_before_it(signal_net):
    """Pooling, activations and reshapes are requantized whether or not they are kept float: a drop seen at one
    makes the repair try the conv that feeds it, not the pooling (which changed nothing, a user's build showed)."""
    model, x, _, tmp = signal_net
    fp32 = _export(model, x, tmp / "blame.onnx")
    payload, _ = onnx_int8.quantize(fp32, x[:64], targets.get(["x86-64"])[0].int8)
    graph = onnx.load_from_string(payload).graph
    convs = [n.name for n in graph.node if n.op_type == "Conv"]
    gap = next(n.name for n in graph.node if n.op_type == "GlobalAveragePool")
    layers = [{"node": gap, "drop_db": 20.0}, {"node": convs[0], "drop_db": 3.0}]
    assert repair._next_layer(layers, [], payload) == convs[-1]
    assert repair._next_layer(layers, [convs[-1]], payload) == convs[0]
    assert repair._next_layer([{"node": gap, "drop_db": 0.0}], [], payload) is None  # no drop: nothing to blame
