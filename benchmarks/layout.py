"""Layout cost of the ONNX -> onnx2tf -> TFLite path against a Keras-native twin with the same weights.

onnx2tf turns an NCHW graph into NHWC; where it cannot, it leaves TRANSPOSE ops in the graph. This builds,
for each model, (a) edgekit's TFLite int8 (the export stage's own functions) and (b) the same network
written natively in Keras (NHWC from the start) with the same weights, converts both with the same
settings, checks they compute the same thing, counts TRANSPOSE ops, and times both side by side
(alternating rounds, 1 thread, LiteRT).

    .venv/bin/python benchmarks/layout.py        # writes benchmarks/results/layout.{json,md}
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgekit import quiet  # noqa: E402

quiet.setup()
warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch's TorchScript-exporter notice

from edgekit.formats import tflite  # noqa: E402
from edgekit.models.zoo import plain_cnn  # noqa: E402
from edgekit.runner.runner import latency_stats  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
def mobilenet_v1_style(shape: tuple[int, ...], num_classes: int, width: int) -> nn.Sequential:
    """Depthwise-separable blocks (MobileNetV1), written as one Sequential so the twin can mirror it."""
    def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), nn.BatchNorm2d(c_in), nn.ReLU(),
                nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    layers = [nn.Conv2d(shape[0], width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    for c_in, c_out, stride in ((width, 2 * width, 1), (2 * width, 4 * width, 2), (4 * width, 4 * width, 1),
                                (4 * width, 8 * width, 2)):
        layers += block(c_in, c_out, stride)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8 * width, num_classes))


MODELS = {  # name -> (builder, sample shape, width)
    "small_cnn 1x8x8 w32": (plain_cnn, (1, 8, 8), 32),
    "small_cnn 3x32x32 w32": (plain_cnn, (3, 32, 32), 32),
    "small_cnn 3x64x64 w64": (plain_cnn, (3, 64, 64), 64),
    "mobilenet_v1-style 3x96x96 w16": (mobilenet_v1_style, (3, 96, 96), 16),
}
ROUNDS, RUNS_PER_ROUND = 20, 50


def _leaves(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if not list(m.children())]


def _keras_layer(m: nn.Module, tf):
    """One Keras layer (or a pair) for one torch leaf, weights copied."""
    k = tf.keras.layers
    if isinstance(m, nn.Conv2d) and m.groups > 1:
        if m.groups != m.in_channels or m.out_channels != m.in_channels:
            raise NotImplementedError("only depthwise grouped convs have a Keras twin here")
        conv = k.DepthwiseConv2D(m.kernel_size, strides=m.stride, padding="valid", use_bias=m.bias is not None)
        weights = [m.weight.detach().permute(2, 3, 0, 1).numpy()]  # (C,1,kh,kw) -> (kh,kw,C,1)
        weights += [m.bias.detach().numpy()] if m.bias is not None else []
        pad = [k.ZeroPadding2D(m.padding)] if any(m.padding) else []
        return [*pad, conv], weights
    if isinstance(m, nn.Conv2d):
        conv = k.Conv2D(m.out_channels, m.kernel_size, strides=m.stride, padding="valid", use_bias=m.bias is not None)
        weights = [m.weight.detach().permute(2, 3, 1, 0).numpy()]
        weights += [m.bias.detach().numpy()] if m.bias is not None else []
        pad = [k.ZeroPadding2D(m.padding)] if any(m.padding) else []
        return [*pad, conv], weights
    if isinstance(m, nn.BatchNorm2d):
        bn = k.BatchNormalization(epsilon=m.eps)
        return [bn], [t.detach().numpy() for t in (m.weight, m.bias, m.running_mean, m.running_var)]
    if isinstance(m, nn.ReLU):
        return [k.ReLU()], None
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return [k.GlobalAveragePooling2D()], None
    if isinstance(m, nn.Flatten):
        return [], None  # global pooling already gives (N, C)
    if isinstance(m, nn.Linear):
        return [k.Dense(m.out_features)], [m.weight.detach().numpy().T, m.bias.detach().numpy()]
    raise NotImplementedError(f"no Keras twin for {type(m).__name__}")


def keras_twin(model: nn.Module, shape: tuple[int, ...]):
    import tensorflow as tf

    c, h, w = shape
    inputs = tf.keras.Input((h, w, c), batch_size=1)
    x, pending = inputs, []
    for leaf in _leaves(model):
        layers, weights = _keras_layer(leaf, tf)
        for layer in layers:
            x = layer(x)
        if weights is not None:
            pending.append((layers[-1], weights))
    twin = tf.keras.Model(inputs, x)
    for layer, weights in pending:
        layer.set_weights(weights)
    return twin


def _edgekit_tflite(model: nn.Module, shape, calib: np.ndarray, work: Path) -> bytes:
    onnx_path = work / "model.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (torch.from_numpy(calib[:1]),), str(onnx_path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"])
    saved = tflite.onnx_to_saved_model(onnx_path, work, calib, work / "convert.log")
    return tflite.convert(saved, calib.transpose(0, 2, 3, 1), int8_io=False, log=work / "convert.log")


def _native_tflite(model: nn.Module, shape, calib: np.ndarray, work: Path) -> bytes:
    with quiet.silenced(work / "keras.log"):
        twin = keras_twin(model, shape)
        twin.export(str(work / "keras_saved"))
    return tflite.convert(work / "keras_saved", calib.transpose(0, 2, 3, 1), int8_io=False,
                                  log=work / "convert.log")


def _interp(payload: bytes, threads: int = 1):
    from ai_edge_litert.interpreter import Interpreter

    with quiet.silenced():
        interp = Interpreter(model_content=payload, num_threads=threads)
    interp.allocate_tensors()
    return interp


def _ops(payload: bytes) -> dict[str, int]:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interp = Interpreter(model_content=payload,
                         experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    counts: dict[str, int] = {}
    for op in interp._get_ops_details():
        counts[op["op_name"]] = counts.get(op["op_name"], 0) + 1
    return counts


def _predict(interp, x: np.ndarray) -> np.ndarray:
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    rows = []
    for s in x:
        interp.set_tensor(inp["index"], s[None].astype(np.float32))
        interp.invoke()
        rows.append(interp.get_tensor(out["index"])[0].copy())
    return np.stack(rows)


def _time_alternating(interps: dict, x: np.ndarray) -> dict[str, list[float]]:
    """Rounds of RUNS_PER_ROUND invokes, alternating artifacts, so noise hits all alike."""
    samples: dict[str, list[float]] = {k: [] for k in interps}
    for interp in interps.values():  # warm-up
        _predict(interp, x[:1].repeat(20, 0))
    for _ in range(ROUNDS):
        for name, interp in interps.items():
            inp = interp.get_input_details()[0]
            interp.set_tensor(inp["index"], x[:1].astype(np.float32))
            for _ in range(RUNS_PER_ROUND):
                t0 = time.perf_counter()
                interp.invoke()
                samples[name].append((time.perf_counter() - t0) * 1000)
    return samples


def bench(label: str, builder, shape: tuple[int, ...], width: int) -> dict:
    torch.manual_seed(0)
    model = builder(shape, 10, width).eval()
    for m in model.modules():  # non-trivial BN statistics so folding is exercised
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    rng = np.random.default_rng(0)
    calib = rng.uniform(0, 1, (64, *shape)).astype(np.float32)
    test = rng.uniform(0, 1, (64, *shape)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "a").mkdir()
        (work / "b").mkdir()
        ours, native = _edgekit_tflite(model, shape, calib, work / "a"), _native_tflite(model, shape, calib, work / "b")
    x = test.transpose(0, 2, 3, 1)
    a, b = _interp(ours), _interp(native)
    pa, pb = _predict(a, x), _predict(b, x)
    lat = _time_alternating({"edgekit": a, "native": b}, x)
    sa, sb = latency_stats(lat["edgekit"]), latency_stats(lat["native"])
    return {"model": label, "transpose_ops": {"edgekit": _ops(ours).get("TRANSPOSE", 0),
                                              "native": _ops(native).get("TRANSPOSE", 0)},
            "ops": {"edgekit": _ops(ours), "native": _ops(native)},
            "size_bytes": {"edgekit": len(ours), "native": len(native)},
            "top1_agreement": float((pa.argmax(1) == pb.argmax(1)).mean()),
            "max_abs_diff": float(np.abs(pa - pb).max()), "output_range": float(np.abs(pb).max()),
            "p50_ms": {"edgekit": sa["p50"], "native": sb["p50"]},
            "p90_ms": {"edgekit": sa["p90"], "native": sb["p90"]},
            "ratio_p50": sa["p50"] / sb["p50"]}


def markdown(rows: list[dict]) -> str:
    lines = ["| model | TRANSPOSE (edgekit / native) | top-1 agreement | max abs diff | p50 ms edgekit | "
             "p50 ms native | edgekit/native p50 |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['transpose_ops']['edgekit']} / {r['transpose_ops']['native']} | "
                     f"{r['top1_agreement']:.3f} | {r['max_abs_diff']:.4f} | {r['p50_ms']['edgekit']:.4f} | "
                     f"{r['p50_ms']['native']:.4f} | {r['ratio_p50']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    rows = []
    for label, (builder, shape, width) in MODELS.items():
        print(f"layout: {label} ...", file=sys.stderr)
        rows.append(bench(label, builder, shape, width))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "layout.json").write_text(json.dumps(rows, indent=2) + "\n")
    (RESULTS / "layout.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
