"""Where an int8 artifact loses fidelity: compare every intermediate tensor with its float twin.

TFLite: the int8 model and the float TFLite made from the same SavedModel share activation tensor names;
both run with every intermediate tensor kept, and each int8 tensor is dequantized and compared.
ONNX (QDQ): the float twin is the same graph with its activation QuantizeLinear/DequantizeLinear pairs
bypassed, so names match by construction.

Errors accumulate along the graph, so a layer is ranked by how much SQNR it *loses* against its
inputs (`drop_db`), not by its SQNR alone: the worst layer is where the damage happens. SQNR is taken per
channel and the worst channel counts: one outlier channel dominates a whole-tensor SQNR and would hide
that every other channel of the same tensor was quantized to a few levels.
"""

from __future__ import annotations

import numpy as np

from edgekit.metrics import sqnr_db

MAX_SAMPLES = 64  # enough to rank layers; keeps the debug run short
IDEAL_8BIT_DB = 49.9  # SQNR of an ideal 8-bit quantizer (6.02 * 8 + 1.76): what a layer fed by the input starts from


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
    """x: samples already in the artifacts' layout (float)."""
    x = x[:MAX_SAMPLES]
    q_acts, q_ops = _tflite_activations(_tflite_interpreter(int8_path), x)
    f_acts, _ = _tflite_activations(_tflite_interpreter(fp32_path), x)
    layers = []
    for op_name, tensor, inputs in q_ops:
        if tensor not in f_acts[0] or op_name in ("QUANTIZE", "DEQUANTIZE"):
            continue
        ref = np.concatenate([s[tensor] for s in f_acts])
        got = np.concatenate([s[tensor] for s in q_acts])
        layers.append(_layer(f"{op_name} {tensor.split(';')[0]}", tensor, ref, got, -1, inputs))  # NHWC
    return _rank(layers)


# --- ONNX QDQ ----------------------------------------------------------------------------------------------

def _bypass_qdq(model):
    """The same graph with every activation QuantizeLinear -> DequantizeLinear pair removed."""
    import onnx

    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    nodes = list(twin.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    initializers = {i.name for i in twin.graph.initializer}
    rename = {}
    for dq in nodes:
        q = producer.get(dq.input[0]) if dq.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear" and q.input[0] not in initializers:
            rename[dq.output[0]] = q.input[0]
    for n in nodes:
        for i, name in enumerate(n.input):
            n.input[i] = rename.get(name, name)
    for out in twin.graph.output:
        out.name = rename.get(out.name, out.name)
    return twin


def _with_all_outputs(model, names: list[str]):
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    known = {o.name for o in m.graph.output}
    for name in names:
        if name not in known:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return m


def _onnx_run(model, x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    sess = ort.InferenceSession(_with_all_outputs(model, names).SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    outs = sess.run(names, {sess.get_inputs()[0].name: x})
    return dict(zip(names, outs, strict=True))


def onnx_layers(int8_path: str, x: np.ndarray) -> list[dict]:
    import onnx

    model = onnx.load(int8_path)
    compute = [n for n in model.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear", "Constant")]
    twin = _bypass_qdq(model)
    names = [n.output[0] for n in compute]
    x = x[:MAX_SAMPLES].astype(np.float32)
    got, ref = _onnx_run(model, x, names), _onnx_run(twin, x, names)
    producer = {o: n for n in model.graph.node for o in n.output}

    def compute_inputs(node) -> list[str]:
        found = []
        for name in node.input:  # look through Q/DQ to the compute node that fed this one
            while name in producer and producer[name].op_type in ("QuantizeLinear", "DequantizeLinear"):
                name = producer[name].input[0]
            found.append(name)
        return found

    return _rank([_layer(f"{n.op_type} {n.name}", n.output[0], ref[n.output[0]], got[n.output[0]], 1,
                         compute_inputs(n)) for n in compute])  # NCHW


def table(layers: list[dict], top: int = 5) -> str:
    lines = [f"{'layer':<48} {'SQNR dB':>8} {'drop dB':>8} {'float range':>22}   (SQNR of the worst channel)"]
    for lay in layers[:top]:
        lo, hi = lay["ref_range"]
        lines.append(f"{lay['layer'][:48]:<48} {lay['sqnr_db']:>8.1f} {lay['drop_db']:>8.1f} "
                     f"{f'[{lo:.3g}, {hi:.3g}]':>22}")
    return "\n".join(lines)
