"""Fidelity of an artifact: with which numerics to run it, the gate it must pass, and where int8 loses it.

Layer-wise, every intermediate tensor of the int8 model is compared with its float twin run on the float
input. TFLite: the float TFLite made from the same SavedModel, ops paired by position, every tensor kept.
ONNX (QDQ): the float model exactly as the quantizer read it (same tensor names); the int8 graph with its
Q/DQ pairs bypassed is not it, since the quantizer folds ReLUs into the preceding convs' output ranges.

Errors accumulate along the graph, so a layer is ranked by how much SQNR it *loses* against its
inputs (`drop_db`), not by its SQNR alone: the worst layer is where the damage happens. SQNR is taken per
channel and the worst channel counts: one outlier channel dominates a whole-tensor SQNR and would hide
that every other channel of the same tensor was quantized to a few levels.
"""

from __future__ import annotations

import numpy as np

from edgekit import metrics
from edgekit.metrics import sqnr_db

MAX_SAMPLES = 64  # enough to rank layers; keeps the debug run short
IDEAL_8BIT_DB = 49.9  # SQNR of an ideal 8-bit quantizer (6.02 * 8 + 1.76): what a layer fed by the input starts from
# A sample is "confident" when its top-1 - top-2 logit margin exceeds this many sigmas of the difference of two
# logits carrying the noise the SQNR threshold allows (sigma = RMS(logits) * 10^(-min_sqnr_db / 20)): any artifact
# that passes the SQNR gate flips it only by a 3-sigma accident. Scale-free, unlike a softmax probability
# (distilled / QAT models have soft logits: 8 % of the digits QAT model's test samples reach p = 0.9).
CONFIDENT_SIGMAS = 3.0


# --- numerics: verify an artifact with the arithmetic of the runtime that will run it --------------------

REFERENCE, KERNELS = "reference", "kernels"
NUMERICS = {
    REFERENCE: "onnxruntime with graph optimizations off: Q/DQ evaluated as written, exact int8 arithmetic "
               "(what TensorRT and exact integer kernels, ARM dot product or x86 VNNI, compute)",
    KERNELS: "the runtime's own optimized kernels on this host",
}


def avx2_exact(settings: dict) -> bool:
    """uint8 activations x 7-bit weights: onnxruntime's AVX2 u8 x s8 pair sums cannot saturate, so CPUs with
    and without VNNI compute the same integers and the host's kernels give every x86 CPU's verdict."""
    return settings.get("activation_type") == "uint8" and bool(settings.get("reduce_range"))


def numerics(runtime: str, arch: str, fmt: str, precision: str, settings: dict | None) -> str:
    """REFERENCE for ONNX int8 that a GPU (TensorRT), an ARM CPU or an x86 CPU with VNNI (settings that would
    saturate on AVX2: they are for VNNI CPUs) will run; else KERNELS. Never the host's instruction set."""
    if (fmt, precision) != ("onnx", "int8"):
        return KERNELS
    if runtime == "onnxruntime" and arch == "x86_64" and avx2_exact(settings or {}):
        return KERNELS
    return REFERENCE


def numerics_of(targets: list, key: str, settings: dict | None) -> list[str]:
    """The numerics of every target that ships artifact `key` (each verdict must pass)."""
    found = [numerics(a.runtime, t.arch, a.format, a.precision, settings)
             for t in targets for a in t.artifacts if a.key == key]
    return sorted(set(found))


def predict(path, spec: dict, x: np.ndarray, how: str) -> tuple[np.ndarray, dict]:
    """The artifact's outputs on x (dataset layout) with the given numerics, and the runtime that ran: the
    format's runtime on this build machine (`host` of the export record, edgekit.formats.record)."""
    from edgekit.runner.runner import Artifact

    artifact = Artifact(path, spec | spec["host"], threads=None,
                        optimize=how == KERNELS)
    return artifact.predict(x), artifact.runtime | {"numerics": how}


# --- the gate: what makes an artifact the model that was validated ------------------------------------------

def thresholds(targets: list, key: str) -> dict:
    """The strictest thresholds among the targets that ship this artifact; an int4 artifact gets the targets'
    int4 agreement and SQNR thresholds (looser: 4-bit weights) and the same accuracy tolerance."""
    users = [t for t in targets if any(a.key == key for a in t.artifacts)]
    int4 = any(a.key == key and a.precision == "int4" for t in users for a in t.artifacts)
    return {"min_agreement": max(t.int4_min_agreement if int4 else t.min_agreement for t in users),
            "min_sqnr_db": max(t.int4_min_sqnr_db if int4 else t.min_sqnr_db for t in users),
            "accuracy_tolerance_pp": min(t.accuracy_tolerance_pp for t in users),
            "confident_sigmas": CONFIDENT_SIGMAS, "targets": [t.name for t in users]}


def rule(limits: dict) -> str:
    return (f"pass = logit SQNR >= {limits['min_sqnr_db']:g} dB, accuracy within "
            f"{limits['accuracy_tolerance_pp']:g} pp (or one sample) of the torch model, and top-1 agreement >= "
            f"{limits['min_agreement']:.1%} on the confident samples (top-1 logit margin > "
            f"{limits['confident_sigmas']:g} sigma of the logit noise that SQNR allows)")


def judge(reference: np.ndarray, out: np.ndarray, y: np.ndarray, limits: dict) -> dict:
    """Fidelity of `out` against the reference logits, with plain and confident-sample agreement."""
    sure = confident(reference, limits)
    same = reference.argmax(1) == out.argmax(1)
    return {**metrics.fidelity(reference, out), "accuracy": metrics.accuracy(out, y),
            "reference_accuracy": metrics.accuracy(reference, y), "samples": len(y),
            "confident_samples": int(sure.sum()),
            "confident_agreement": float(same[sure].mean()) if sure.any() else 1.0}


def confident(reference: np.ndarray, limits: dict) -> np.ndarray:
    """Samples whose top-1 margin noise at the SQNR threshold would overturn only by a CONFIDENT_SIGMAS event."""
    sigma = np.sqrt(np.mean(reference.astype(np.float64) ** 2)) * 10 ** (-limits["min_sqnr_db"] / 20)
    top2 = np.sort(reference, 1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) > limits["confident_sigmas"] * np.sqrt(2) * sigma


def misses(result: dict, limits: dict) -> list[str]:
    """What fails the gate; plain agreement is recorded, not gated: near-ties flip without costing accuracy."""
    found = []
    if result["sqnr_db"] < limits["min_sqnr_db"]:
        found.append(f"SQNR {result['sqnr_db']:.1f} dB < {limits['min_sqnr_db']:g} dB")
    drop_pp = 100 * (result["reference_accuracy"] - result["accuracy"])
    tolerance = max(limits["accuracy_tolerance_pp"], 100 / result["samples"])  # finer than one sample: unjudgeable
    if drop_pp > tolerance + 1e-9:
        found.append(f"accuracy {result['accuracy']:.2%} is {drop_pp:.2f} pp below the torch model's "
                     f"{result['reference_accuracy']:.2%} (tolerance {tolerance:.3g} pp)")
    if result["confident_agreement"] < limits["min_agreement"]:
        found.append(f"top-1 agreement {result['confident_agreement']:.1%} < {limits['min_agreement']:.1%} on the "
                     f"{result['confident_samples']} confident samples (all samples: {result['top1_agreement']:.1%})")
    return found


def channel_sqnr_db(reference: np.ndarray, value: np.ndarray, axis: int) -> float:
    """The worst per-channel SQNR (channels along `axis`); channels that are all zero are skipped."""
    if reference.ndim < 2:
        return sqnr_db(reference, value)
    ref = np.moveaxis(reference, axis, 0).reshape(reference.shape[axis], -1)
    val = np.moveaxis(value, axis, 0).reshape(reference.shape[axis], -1)
    scores = [sqnr_db(r, v) for r, v in zip(ref, val, strict=True) if np.any(r)]
    return min(scores) if scores else float("inf")


def _layer(label: str, tensor: str, ref: np.ndarray, got: np.ndarray, axis: int, inputs: list[str]) -> dict:
    return {"layer": label, "tensor": tensor, "sqnr_db": channel_sqnr_db(ref, got, axis),
            "tensor_sqnr_db": sqnr_db(ref, got), "max_abs_diff": float(np.abs(ref - got).max()),
            "ref_range": [float(ref.min()), float(ref.max())], "inputs": inputs}


def _rank(layers: list[dict]) -> list[dict]:
    """Add each layer's SQNR drop against the best of its inputs; worst first."""
    seen: dict[str, float] = {}
    for layer in layers:
        before = [seen[i] for i in layer.pop("inputs") if i in seen]
        upstream = min([*before, IDEAL_8BIT_DB])  # an exact (float) input counts as an ideal 8-bit one
        layer["drop_db"] = upstream - layer["sqnr_db"] if np.isfinite(layer["sqnr_db"]) else 0.0
        seen[layer["tensor"]] = layer["sqnr_db"]
    return sorted(layers, key=lambda lay: lay["drop_db"], reverse=True)


# --- TFLite ------------------------------------------------------------------------------------------------

def _tflite_interpreter(path: str):
    from ai_edge_litert import interpreter as lite

    interp = lite.Interpreter(model_path=path, experimental_preserve_all_tensors=True,
                              experimental_op_resolver_type=lite.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interp.allocate_tensors()
    return interp


def _tflite_activations(interp, x: np.ndarray) -> tuple[list[dict[str, np.ndarray]], list[tuple]]:
    """Per sample, every op output as float (int8 tensors dequantized)."""
    inp = interp.get_input_details()[0]
    details = {d["index"]: d for d in interp.get_tensor_details()}
    outputs = [(op["op_name"], op["outputs"][0], op["inputs"]) for op in interp._get_ops_details()
               if op["op_name"] != "DELEGATE"]
    samples = []
    for sample in x:
        feed = sample[None]
        if inp["dtype"] != np.float32:
            scale, zero = inp["quantization"]
            feed = np.clip(np.round(feed / scale + zero), -128, 127)
        interp.set_tensor(inp["index"], feed.astype(inp["dtype"]))
        interp.invoke()
        acts = {}
        for _, index, _ in outputs:
            d = details[index]
            value = interp.get_tensor(index).astype(np.float32)
            if d["dtype"] != np.float32:
                scale, zero = d["quantization"]
                value = (value - zero) * scale
            acts[d["name"]] = value
        samples.append(acts)
    ops = [(name, details[i]["name"], [details[j]["name"] for j in ins if j >= 0]) for name, i, ins in outputs]
    return samples, ops


def tflite_layers(int8_path: str, fp32_path: str, x: np.ndarray) -> list[dict]:
    """x: samples already in the artifacts' layout (float). The two converter runs name their tensors apart
    ('model_3/...' vs 'model_1/...'), so compute ops are paired by position: both come from one SavedModel."""
    x = x[:MAX_SAMPLES]
    q_acts, q_ops = _tflite_activations(_tflite_interpreter(int8_path), x)
    f_acts, f_ops = _tflite_activations(_tflite_interpreter(fp32_path), x)
    q_ops = [op for op in q_ops if op[0] not in ("QUANTIZE", "DEQUANTIZE")]
    f_ops = [op for op in f_ops if op[0] not in ("QUANTIZE", "DEQUANTIZE")]
    if [op[0] for op in q_ops] != [op[0] for op in f_ops]:
        raise ValueError("the int8 and float TFLite models have different ops; they are not twins")
    layers = []
    for (op_name, tensor, inputs), (_, twin, _) in zip(q_ops, f_ops, strict=True):
        ref = np.concatenate([s[twin] for s in f_acts])
        got = np.concatenate([s[tensor] for s in q_acts])
        layers.append(_layer(f"{op_name} {tensor.split(';')[0]}", tensor, ref, got, -1, inputs))  # NHWC
    return _rank(layers)


# --- ONNX QDQ ----------------------------------------------------------------------------------------------
# Every quantized activation t (QuantizeLinear -> DequantizeLinear) of the int8 model is read as DQ(Q(t)) with
# the numerics of the verification and compared with t in the float model it was quantized from (the twin:
# same graph and tensor names, float weights), run on the float input. Reference numerics read all of them in
# one run; onnxruntime's fused kernels refuse to fuse a node whose output is a graph output, so there each
# DQ(Q(t)) is the output of the graph cut right after it, where the kernels that compute it are the same.

def _session(model, how: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if how == REFERENCE:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _run_with_outputs(model, x: np.ndarray, names: list[str], how: str) -> dict[str, np.ndarray]:
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    known = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in known)
    sess = _session(m, how)
    return dict(zip(names, sess.run(names, {sess.get_inputs()[0].name: x}), strict=True))


def _cut(model, name: str):
    """The graph that computes `name` and nothing after it, with `name` as its only output."""
    import onnx

    producer = {o: n for n in model.graph.node for o in n.output}
    needed, todo = set(), [name]
    while todo:
        node = producer.get(todo.pop())
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            todo.extend(node.input)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.ClearField("node")
    m.graph.node.extend(n for n in model.graph.node if id(n) in needed)
    m.graph.ClearField("output")
    m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return m


def _run_cut(model, x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """Each tensor as the only output of the graph cut after it, with onnxruntime's optimized kernels."""
    return {n: _run_with_outputs(_cut(model, n), x, [n], KERNELS)[n] for n in names}


def _activation_quantizers(model) -> dict[str, str]:
    """float tensor -> DequantizeLinear(QuantizeLinear(tensor)) output, for every quantized activation."""
    inits = {i.name for i in model.graph.initializer}
    dequantized = {n.input[0]: n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {n.input[0]: dequantized[n.output[0]] for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits and n.output[0] in dequantized}


def _observed_inputs(node, producer: dict, observed: set) -> list[str]:
    """The observed tensors that feed `node`, looking through Q/DQ and unobserved (float) nodes."""
    found, todo, seen = [], list(node.input), set()
    while todo:
        name = todo.pop()
        if name in seen or not name:
            continue
        seen.add(name)
        if name in observed:
            found.append(name)
        elif name in producer:
            todo.extend(producer[name].input)
    return found


def _twin_names(model, twin, tensors: list[str]) -> dict[str, str]:
    """int8 tensor -> the same tensor's name in the float twin (the quantizer renames a graph output's
    producer to '<output>_QuantizeLinear_Input'); the graph input maps to itself."""
    known = {t for n in twin.graph.node for t in n.output} | {i.name for i in twin.graph.input}
    found = {}
    for t in tensors:
        base = t.removesuffix("_QuantizeLinear_Input")
        if t in known or base in known:
            found[t] = t if t in known else base
    return found


def onnx_layers(int8: bytes, float_twin: bytes, x: np.ndarray, how: str = REFERENCE) -> list[dict]:
    """Per quantized activation (and the output): SQNR against the float twin and the drop it adds."""
    import onnx

    model, twin = onnx.load_from_string(int8), onnx.load_from_string(float_twin)
    outputs = [o.name for o in model.graph.output]
    inputs = {i.name for i in model.graph.input}
    dq_of = _activation_quantizers(model) | {o: o for o in outputs}
    names = _twin_names(model, twin, list(dq_of))
    x = x[:MAX_SAMPLES].astype(np.float32)
    wanted = [dq_of[t] for t in names]
    got = _run_with_outputs(model, x, wanted, how) if how == REFERENCE else _run_cut(model, x, wanted)
    ref = _run_with_outputs(twin, x, [names[t] for t in names if t not in inputs], REFERENCE)
    ref |= {t: x for t in inputs}
    producer = {o: n for n in model.graph.node for o in n.output}
    observed = set(names) - {o for o in outputs if producer[o].op_type == "DequantizeLinear"}  # seen quantized
    layers = []
    for tensor in [*inputs & observed, *(t for n in model.graph.node for t in n.output if t in observed)]:
        node = _compute_producer(producer, tensor)
        label = f"{node.op_type} {node.name}" if node is not None else f"input {tensor}"
        feeds = _observed_inputs(node, producer, observed) if node is not None else []
        layer = _layer(label, tensor, ref[names[tensor]], got[dq_of[tensor]], 1, feeds)  # NCHW
        layers.append(layer | {"node": node.name if node is not None else None})
    return _rank(layers)


def _compute_producer(producer: dict, tensor: str):
    """The node that computed `tensor` (through the Q/DQ pair of a float graph output); None for the input."""
    node = producer.get(tensor)
    while node is not None and node.op_type in ("QuantizeLinear", "DequantizeLinear"):
        node = producer.get(node.input[0])
    return node


def table(layers: list[dict], top: int = 5, min_sqnr_db: float | None = None) -> str:
    """Worst layers first; `<` marks a layer below the artifact's SQNR threshold."""
    lines = [f"{'layer':<48} {'SQNR dB*':>8} {'drop dB':>8} {'float range':>22}"]
    for lay in layers[:top]:
        lo, hi = lay["ref_range"]
        below = " <" if min_sqnr_db is not None and lay["sqnr_db"] < min_sqnr_db else ""
        lines.append(f"{lay['layer'][:48]:<48} {lay['sqnr_db']:>8.1f} {lay['drop_db']:>8.1f} "
                     f"{f'[{lo:.3g}, {hi:.3g}]':>22}{below}")
    lines.append("* of the layer's worst channel; drop: against its worst input" + (
        f"; < below the artifact's {min_sqnr_db:g} dB" if min_sqnr_db is not None else ""))
    return "\n".join(lines)
