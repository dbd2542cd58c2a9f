"""ONNX int4 weight-only: the weights of Conv / Gemm / MatMul stored as INT4 initializers behind DequantizeLinear.

ONNX opset 21 gives DequantizeLinear INT4 inputs, per-channel (`axis`) or blockwise (`block_size` along the
input dimension); onnxruntime's CPU provider runs both from 1.19.0 (1.18.1 refuses the file: "MLDataType for:
tensor(int4) is not currently registered"). Activations stay float, and so does the arithmetic: onnxruntime
keeps each DequantizeLinear in its optimized graph and runs float Conv / Gemm on the weights it dequantizes, so
int4 here saves file size (about 7x against fp32, 2x against int8), not compute. onnxruntime computes in 4 bits
only in its contrib op MatMulNBits (MatMul / Gather weights, `onnxruntime.quantization.matmul_nbits_quantizer`),
which has no Conv counterpart: for the CNNs edgekit builds it would cover the classifier at most.

Weights are quantized symmetrically (zero point 0, levels -7..7); each channel's (or block's) scale is the one
of a small grid of clipping ratios with the least squared error, which matters at 4 bits: one large weight
would otherwise leave the rest of its channel a few levels. A plan can give some layers 8 bits or keep them
float (mixed precision, benchmarks/lowbit.py).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError

OPSET = 21  # DequantizeLinear with INT4 inputs and block_size
MIN_ONNXRUNTIME = "1.19.0"  # the first onnxruntime whose CPU provider loads INT4 DequantizeLinear
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
LEVELS = {4: 7, 8: 127}  # symmetric: the largest level of each bit width
CLIP_RATIOS = np.linspace(0.5, 1.0, 11)  # of a channel's max |w|: the grid searched for its scale


def weight_axes(node, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(output-channel axis, input axis that blocks run along) of a node's weight; None when not supported."""
    if node.op_type == "Conv":
        return 0, 1  # [O, I/groups, kh, kw]
    if len(shape) != 2:
        return None
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return (0, 1) if trans_b else (1, 0)
    return 1, 0  # MatMul: [K, N]


def weighted_nodes(model) -> list[tuple[object, str]]:
    """(node, weight initializer) of each Conv / Gemm / MatMul whose weight is a constant it alone uses."""
    inits = {i.name for i in model.graph.initializer}
    uses = Counter(name for n in model.graph.node for name in n.input)
    return [(n, n.input[1]) for n in model.graph.node
            if n.op_type in WEIGHTED_OPS and len(n.input) > 1 and n.input[1] in inits and uses[n.input[1]] == 1]


def quantize_weight(w: np.ndarray, bits: int, channel_axis: int, block_axis: int,
                    block_size: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """Symmetric integer levels and scales of one weight: per output channel (block_size 0) or per block of
    `block_size` along `block_axis` (the scales then have the weight's rank: ONNX's blockwise layout)."""
    top = LEVELS[bits]
    if block_size:
        moved = np.moveaxis(w, block_axis, 0)  # blocks along the first axis
        n = moved.shape[0]
        blocks = -(-n // block_size)
        padded = np.concatenate([moved, np.zeros((blocks * block_size - n, *moved.shape[1:]), w.dtype)])
        groups = padded.reshape(blocks, block_size, -1).transpose(0, 2, 1).reshape(-1, block_size)
        scale = _best_scales(groups, top).reshape(blocks, *moved.shape[1:])
        full = np.repeat(scale, block_size, axis=0)[:n]
        q = np.clip(np.round(moved / full), -top, top)
        return (np.moveaxis(q, 0, block_axis), np.moveaxis(scale, 0, block_axis).astype(np.float32),
                {"axis": block_axis, "block_size": block_size})
    rows = np.moveaxis(w, channel_axis, 0).reshape(w.shape[channel_axis], -1)
    scale = _best_scales(rows, top)
    shape = [1] * w.ndim
    shape[channel_axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -top, top)
    return q, scale.astype(np.float32), {"axis": channel_axis}


def _best_scales(rows: np.ndarray, top: int) -> np.ndarray:
    """Per row, the scale (max |w| x a ratio of CLIP_RATIOS) whose rounding leaves the least squared error."""
    amax = np.abs(rows).max(axis=1)
    amax = np.where(amax > 0, amax, 1.0)
    best, best_err = amax / top, np.full(len(rows), np.inf)
    for ratio in CLIP_RATIOS:
        scale = (amax * ratio / top)[:, None]
        err = ((np.clip(np.round(rows / scale), -top, top) * scale - rows) ** 2).sum(axis=1)
        better = err < best_err
        best, best_err = np.where(better, scale[:, 0], best), np.where(better, err, best_err)
    return best


def quantize(fp32: Path | bytes, block_size: int = 0, plan: dict[str, int] | None = None) -> tuple[bytes, dict]:
    """The fp32 ONNX with weight-only int4: every Conv / Gemm / MatMul weight INT4 behind a DequantizeLinear,
    per output channel (block_size 0) or in blocks of block_size input channels. `plan` (node name -> 4, 8 or
    32) gives a layer 8 bits or keeps it float (32); a layer it does not name gets 4 bits."""
    import ml_dtypes  # onnx's own dependency: its numpy int4 type
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load_from_string(fp32 if isinstance(fp32, bytes) else Path(fp32).read_bytes())
    model = _to_opset(model)
    plan = plan or {}
    inits = {i.name: i for i in model.graph.initializer}
    dequantize, layers = [], []
    for node, name in weighted_nodes(model):
        w = numpy_helper.to_array(inits[name]).astype(np.float32)
        axes = weight_axes(node, w.shape)
        bits = plan.get(node.name, 4)
        if axes is None or bits == 32:
            layers.append({"node": node.name, "bits": 32, "weights": int(w.size)})
            continue
        q, scale, attrs = quantize_weight(w, bits, *axes, block_size=block_size if bits == 4 else 0)
        levels = q.astype(ml_dtypes.int4 if bits == 4 else np.int8)  # onnx packs int4 two to a byte
        model.graph.initializer.remove(inits[name])
        model.graph.initializer.extend([numpy_helper.from_array(levels, f"{name}_q{bits}"),
                                        numpy_helper.from_array(scale, f"{name}_scale")])
        dequantize.append(helper.make_node("DequantizeLinear", [f"{name}_q{bits}", f"{name}_scale"], [name],
                                           name=f"{name}_DequantizeLinear", **attrs))
        layers.append({"node": node.name, "bits": bits, "weights": int(w.size), "scales": int(scale.size)})
    if not any(lay["bits"] == 4 for lay in layers):
        raise EdgekitError("the model has no Conv / Gemm / MatMul with a constant weight of its own; int4 "
                           "weight-only has nothing to quantize")
    for node in reversed(dequantize):  # before every consumer: the graph stays topologically sorted
        model.graph.node.insert(0, node)
    onnx.checker.check_model(model, full_check=True)
    payload = model.SerializeToString()
    return payload, {"scheme": f"blockwise {block_size}" if block_size else "per-channel", "opset": OPSET,
                     "layers": layers, "weight_bytes": packed_weight_bytes(layers)}


def packed_weight_bytes(layers: list[dict]) -> int:
    """Bytes of the weights as stored: levels packed at their bit width, float32 scales, float layers 4 bytes."""
    return sum(-(-lay["weights"] * lay["bits"] // 8) + 4 * lay.get("scales", 0) for lay in layers)


def _to_opset(model):
    """The model at opset OPSET (torch exports an older one; INT4 DequantizeLinear needs 21)."""
    from onnx import version_converter

    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), OPSET)
    if current >= OPSET:
        return model
    try:
        return version_converter.convert_version(model, OPSET)
    except Exception as exc:  # the converter raises plain RuntimeErrors per op it cannot adapt
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EdgekitError(f"the fp32 ONNX (opset {current}) cannot be converted to opset {OPSET} for int4 "
                           f"weights: {first}; export at opset {OPSET} (export.opset: {OPSET})") from exc


def check_int4(payload: bytes) -> dict:
    """INT4 initializers behind DequantizeLinear: their count, and what onnxruntime's optimized graph computes in."""
    import onnx

    from edgekit.onnx_int8 import optimized_ops

    model = onnx.load_from_string(payload)
    int4 = [i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT4]
    dq_inputs = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    if not int4 or not set(int4) <= dq_inputs:
        raise EdgekitError("the int4 ONNX has no INT4 weight initializer behind a DequantizeLinear")
    ops = optimized_ops(payload)
    return {"int4_initializers": len(int4), "optimized_ops": dict(sorted(ops.items())),
            "computes_in": "float: onnxruntime dequantizes the int4 weights and runs float kernels"
                           if ops["DequantizeLinear"] else "float: onnxruntime folded the weights to float"}
