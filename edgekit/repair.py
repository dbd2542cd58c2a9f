"""When an ONNX int8 artifact misses its targets' fidelity gate, keep its worst layers float and check again.

ONNX QDQ lets any node stay float, so a miss is repaired before it fails the build: the layer where the
error starts (edgekit.fidelity, with the numerics of the targets' runtime) is excluded from quantization,
the model is quantized again and judged again, up to MAX_KEPT_FLOAT layers. Decisions are made on the
validation split, so the verify stage's verdict on the test split stays an independent check. TFLite int8
is never repaired this way: its targets run integer-only kernels.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from edgekit import fidelity, onnx_int8
from edgekit.targets import Int8Settings

ORT = {"runtime": "onnxruntime", "engine": "onnxruntime"}  # ONNX int8 is repaired with onnxruntime's numerics
MAX_KEPT_FLOAT = 3  # beyond a few layers float, the artifact is no longer the int8 model the user asked for
# What keeping float changes: a node with weights computes in float. Pooling, activations and reshapes between
# two quantized nodes are requantized either way, so a drop seen there is blamed on the weighted node before them.
WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def _verdict(payload: bytes, x: np.ndarray, y: np.ndarray, reference: np.ndarray, hows: list[str],
             limits: dict) -> tuple[str, dict, list[str]]:
    """The first numerics under which the model misses (or the last one), its numbers and misses."""
    spec = {"format": "onnx", "input": {}, "host": ORT}
    with tempfile.TemporaryDirectory(prefix="edgekit-repair-") as tmp:
        path = Path(tmp) / "m.onnx"
        path.write_bytes(payload)
        for how in hows:
            out, _ = fidelity.predict(path, spec, x, how)
            result = fidelity.judge(reference, out, y, limits)
            found = fidelity.misses(result, limits)
            if found:
                break
    return how, result, found


def _summary(result: dict, payload: bytes) -> dict:
    keys = ("accuracy", "top1_agreement", "confident_agreement", "sqnr_db")
    return {"size_bytes": len(payload), **{k: round(result[k], 4) for k in keys}}


def _host_p50_ms(payloads: list[bytes], x: np.ndarray, runs: int = 200) -> list[float]:
    """p50 of each model on one sample here (onnxruntime, 1 thread, runs interleaved so that load drifts hit
    both alike): what keeping layers float costs, indicatively; the device's own numbers come from `edgekit run`."""
    import time

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sessions = [ort.InferenceSession(p, opts, providers=["CPUExecutionProvider"]) for p in payloads]
    feed = np.ascontiguousarray(x[:1], dtype=np.float32)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for sess, found in zip(sessions, times, strict=True):
            t0 = time.perf_counter()
            sess.run(None, {sess.get_inputs()[0].name: feed})
            found.append(time.perf_counter() - t0)
    return [round(float(np.median(t)) * 1e3, 4) for t in times]


def _next_layer(layers: list[dict], kept: list[str], payload: bytes) -> str | None:
    """The weighted node where the error starts (edgekit.fidelity's worst drop, or the nearest weighted node
    upstream of it) that quantization can still leave float."""
    import onnx

    graph = onnx.load_from_string(payload).graph
    nodes = {n.name: n for n in graph.node}
    producer = {o: n for n in graph.node for o in n.output}
    for lay in layers:
        node = nodes.get(lay["node"]) if lay["node"] and lay["drop_db"] > 0 else None
        while node is not None and node.op_type not in WEIGHTED_OPS:  # up its first input, through Q/DQ too
            node = producer.get(node.input[0]) if node.input else None
        if node is not None and node.name not in kept:
            return node.name
    return None


def quantize(fp32: Path, calib: np.ndarray, settings: Int8Settings, float_modules: list[str], *,
             check: tuple[np.ndarray, np.ndarray, np.ndarray], hows: list[str], limits: dict) -> tuple[bytes, dict]:
    """onnx_int8.quantize, then keep layers float until the gate passes on `check` = (x, y, reference logits).

    Returns the artifact and its int8 record, with `repair`: what was kept float, what it cost, or what was
    tried when nothing met the gate (then the unrepaired artifact is returned, for the verify stage to fail)."""
    x, y, reference = check
    payload, info = onnx_int8.quantize(fp32, calib, settings, float_modules)
    how, result, found = _verdict(payload, x, y, reference, hows, limits)
    if not found:
        return payload, {**info, "repair": None}
    twin, kept, first = onnx_int8.float_twin(fp32), [], (payload, info, _summary(result, payload))
    while found and len(kept) < MAX_KEPT_FLOAT:
        node = _next_layer(fidelity.onnx_layers(payload, twin, x, how), kept, payload)
        if node is None:
            break
        kept.append(node)
        payload, info = onnx_int8.quantize(fp32, calib, settings, float_modules, kept)
        how, result, found = _verdict(payload, x, y, reference, hows, limits)
    repair = {"met": not found, "before": first[2], "after": _summary(result, payload), "split": "val"}
    repair["before"]["host_p50_ms"], repair["after"]["host_p50_ms"] = _host_p50_ms([first[0], payload], x)
    if found:  # nothing allowed met the gate: ship the plain int8 model and let verify say what was tried
        return first[0], {**first[1], "repair": repair | {"tried": kept, "kept_float": []}}
    return payload, {**info, "repair": repair | {"kept_float": kept}}
