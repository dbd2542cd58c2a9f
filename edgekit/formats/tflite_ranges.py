"""The quantize stage's activation ranges (NNCF's QDQ ONNX) written into the TFLite converter's calibration.

The TFLite converter quantizes from per-tensor min/max that its calibrator stores in a float flatbuffer; the
min/max of each tensor NNCF quantized is replaced by NNCF's range before the converter's quantizer runs, so the
int8 model keeps what QAT learned (or the quantize stage's PTQ calibration) instead of a fresh min/max.

Pairing is by value, not by name (onnx2tf renames and fuses): NNCF's graph with every QuantizeLinear ->
DequantizeLinear pair removed is the float model of the same weights; each activation quantizer's input, run on
a few samples, is paired with the calibrated TFLite model's closest tensor (NCHW or NHWC) when that one is
clearly closer than any other (see `pairs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgekit.formats import onnx

QDQ_FILE = "model_int8.onnx"  # the quantize stage's QDQ export (edgekit.stages.quantize.ONNX_FILE)
PAIR_TOLERANCE = 0.2  # max |difference| / max |value| of a paired tensor
SEPARATION = 4.0  # how much further off any other tensor must be
INT_RANGES = {np.dtype("int8"): (-128, 127), np.dtype("uint8"): (0, 255)}


@dataclass
class CarriedRanges:
    ranges: dict[str, tuple[float, float]]  # NNCF activation quantizer's input tensor -> (min, max) in float
    reference: dict[str, np.ndarray]  # that tensor on the samples, dataset layout
    per_channel: list[str] = field(default_factory=list)  # per-channel activation quantizers: TFLite has no such
    carried: set[str] = field(default_factory=set)  # the quantizers paired with a TFLite tensor

    def describe(self) -> dict:
        return {"from": "quantize stage (NNCF QDQ ONNX)", "carried": len(self.carried),
                "quantizers": len(self.ranges), "not_paired": sorted(set(self.ranges) - self.carried),
                "per_channel_left_to_converter": self.per_channel}

    def impose(self, calibrated: bytes, x: np.ndarray) -> bytes:
        """The calibrated float flatbuffer with NNCF's min/max on every TFLite tensor paired with a quantizer;
        `x`: the samples the reference was computed on, in the TFLite input's layout."""
        from tensorflow.lite.python import schema_py_generated as schema
        from tensorflow.lite.tools import flatbuffer_utils

        values = _tensor_values(calibrated, x)
        model = flatbuffer_utils.convert_bytearray_to_object(calibrated)
        tensors = model.subgraphs[0].tensors
        for name, want in self.reference.items():
            for index in pairs(want, values):
                lo, hi = self.ranges[name]
                q = tensors[index].quantization or schema.QuantizationParametersT()
                q.min, q.max = [lo], [hi]
                tensors[index].quantization = q
                self.carried.add(name)
        return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def carried_ranges(ctx, source: str, x: np.ndarray) -> CarriedRanges | None:
    """NNCF's activation ranges when the int8 model comes from the quantize stage, else None; `x`: a few
    calibration samples in the dataset's layout."""
    path = Path(ctx.stage_dir("quantize")) / QDQ_FILE
    if source != "quantize" or not path.is_file():
        return None
    import onnx as onnx_lib

    graph = onnx_lib.load(str(path)).graph
    ranges = activation_ranges(graph)
    if not ranges:
        return None
    float_model = _without_qdq(onnx_lib.load(str(path)), list(ranges))
    outs = onnx.session(float_model.SerializeToString(), "NNCF's QDQ ONNX without its quantizers").run(
        list(ranges), {"input": x})
    per_channel = [n.input[0] for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in ranges
                   and n.input[0] not in {i.name for i in graph.initializer}]
    return CarriedRanges(ranges, dict(zip(ranges, outs, strict=True)), per_channel)


def activation_ranges(graph) -> dict[str, tuple[float, float]]:
    """Input tensor -> float (min, max) of each per-tensor QuantizeLinear on an activation (not on a weight)."""
    from onnx import numpy_helper

    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:  # in graph order: an Identity of a constant (shared initializers) is a constant
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in consts:
            consts[node.output[0]] = consts[node.input[0]]
    found = {}
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in consts or len(node.input) < 3:
            continue
        scale, zero = consts.get(node.input[1]), consts.get(node.input[2])
        if scale is None or zero is None or scale.size != 1 or zero.dtype not in INT_RANGES:
            continue  # per-channel activations (NNCF: before a depthwise conv): TFLite's are per tensor
        qmin, qmax = INT_RANGES[zero.dtype]
        s, z = float(scale.reshape(())), int(zero.reshape(()))
        found[node.input[0]] = ((qmin - z) * s, (qmax - z) * s)
    return found


def _without_qdq(model, outputs: list[str]):
    """The float model NNCF's QDQ graph stands for: each QuantizeLinear -> DequantizeLinear pair bypassed, and
    `outputs` added as graph outputs."""
    from onnx import TensorProto, helper

    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    bypass = {}
    for node in graph.node:
        q = producer.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear":
            bypass[node.output[0]] = q.input[0]
    drop = {id(producer[o]) for o in bypass} | {id(producer[producer[o].input[0]]) for o in bypass}
    kept = [n for n in graph.node if id(n) not in drop]
    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = bypass.get(name, name)
    for out in graph.output:  # a quantized graph output: an Identity from the float tensor keeps its name
        if out.name in bypass:
            kept.append(helper.make_node("Identity", [bypass[out.name]], [out.name]))
    del graph.node[:]
    graph.node.extend(kept)
    present = {o.name for o in graph.output}
    graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs
                        if n not in present)
    return model


def _tensor_values(payload: bytes, x: np.ndarray) -> dict[int, np.ndarray]:
    """Every float tensor of a float TFLite model on the samples `x`: index -> (N, *shape)."""
    from ai_edge_litert import interpreter as litert

    interp = litert.Interpreter(model_content=payload, experimental_preserve_all_tensors=True, num_threads=1)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]["index"]
    details = [d for d in interp.get_tensor_details() if np.dtype(d["dtype"]) == np.float32]
    rows: dict[int, list[np.ndarray]] = {d["index"]: [] for d in details}
    for sample in x:
        interp.set_tensor(inp, np.ascontiguousarray(sample[None], dtype=np.float32))
        interp.invoke()
        for d in details:
            try:
                rows[d["index"]].append(interp.get_tensor(d["index"]).copy())
            except ValueError:  # a tensor without data (freed or not allocated)
                rows[d["index"]] = []
    return {i: np.stack(v) for i, v in rows.items() if len(v) == len(x)}


def pairs(want: np.ndarray, values: dict[int, np.ndarray]) -> list[int]:
    """The TFLite tensors holding the ONNX tensor `want` (as is or channels-last): the closest one, when it is
    within PAIR_TOLERANCE of |want|'s max and every other tensor of that size is SEPARATION times further off,
    with the tensors that hold the very same values (a reshape's output; TFLite gives both one range).

    Measured (NNCF's graph without its quantizers against the float TFLite model of the saved QAT-tuned weights,
    Fashion-MNIST ResNet-8 with 70 % of its MACs pruned): the same tensor differs by ~2 % after the stem and up
    to ~8 % deep in the net, any other tensor of that size by 50-150 %."""
    top = float(np.abs(want).max())
    if not top > 0:
        return []
    layouts = [want] + ([np.moveaxis(want, 1, -1)] if want.ndim >= 3 else [])
    errors = {index: min(float(np.abs(got.reshape(-1) - w.reshape(-1)).max()) for w in layouts) / top
              for index, got in values.items() if got.size == want.size}
    if not errors:
        return []
    best = min(errors, key=errors.get)
    same = [i for i in errors if onnx.close(values[i].reshape(-1), values[best].reshape(-1))]
    others = [e for i, e in errors.items() if i not in same]
    if errors[best] > PAIR_TOLERANCE or any(e < SEPARATION * errors[best] for e in others):
        return []
    return sorted(same)
