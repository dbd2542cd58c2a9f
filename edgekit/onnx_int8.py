"""ONNX int8 that onnxruntime fuses: fp32 ONNX -> BatchNorm folded -> quantize_static (QDQ) per target settings.

NNCF's stripped QDQ ONNX keeps fp32 weights and BatchNormalization beside its Q/DQ pairs: larger than the fp32
file and slower, since nothing fuses. Here the fp32 export (BN already folded into the convs by the exporter;
onnxruntime's basic optimizer in `quant_pre_process` folds whatever is left) goes through onnxruntime's
`quantize_static` in QDQ format with int8 weight initializers and the target's activation type, range and
symmetry, so that the optimized graph is QLinearConv / QLinearAdd / QGemm end to end. `fusion()` proves it
from the graph onnxruntime actually runs.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError, ModelError
from edgekit.targets import Int8Settings

INT8_OPS = ("QLinearConv", "QLinearAdd", "QLinearMul", "QLinearMatMul", "QGemm", "QLinearGlobalAveragePool",
            "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax",
            "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul")
FLOAT_COMPUTE_OPS = ("Conv", "Gemm", "MatMul", "Add", "Mul", "Sub", "Div", "FusedConv", "FusedGemm",
                     "FusedMatMul", "BatchNormalization", "AveragePool", "GlobalAveragePool", "MaxPool",
                     "Relu", "Clip", "Sigmoid", "HardSigmoid", "Concat")
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
CALIBRATION = {"minmax": "MinMax", "percentile": "Percentile"}


def _qtype(name: str):
    from onnxruntime.quantization import QuantType

    return {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[name]


class _Reader:
    """onnxruntime's CalibrationDataReader protocol: one sample per call, then None."""

    def __init__(self, x: np.ndarray, input_name: str) -> None:
        self.samples = iter([{input_name: np.ascontiguousarray(s[None], dtype=np.float32)} for s in x])

    def get_next(self) -> dict | None:
        return next(self.samples, None)

    def rewind(self) -> None:  # the calibrator may ask; one pass is all it needs here
        pass


def first_conv(model) -> str | None:
    """The conv fed by the graph input (few input channels: int8 im2col is slow there)."""
    inputs = {i.name for i in model.graph.input}
    return next((n.name for n in model.graph.node if n.op_type == "Conv" and n.input[0] in inputs), None)


def module_of(node_name: str) -> str:
    """The torch module path behind a node of torch's ONNX export: '/stack1/conv1/conv1.0/Conv' -> 'stack1.conv1.0'.

    Each scope segment is '<parent>.<child>' or '<child>'; the child's own name is its last dotted part."""
    return ".".join(seg.rsplit(".", 1)[-1] for seg in node_name.split("/")[1:-1])


def nodes_of_modules(model, modules: list[str]) -> list[str]:
    """The weighted ONNX nodes (Conv / Gemm / MatMul) that the named torch modules became."""
    by_module = {module_of(n.name): n.name for n in model.graph.node if n.op_type in WEIGHTED_OPS}
    missing = [m for m in modules if m not in by_module]
    if missing:
        raise EdgekitError(f"layer '{missing[0]}' kept float by quantize is not a conv/linear node of the ONNX "
                           f"export; valid: {', '.join(by_module)}")
    return [by_module[m] for m in modules]


def float_twin(fp32: Path | bytes) -> bytes:
    """The float model exactly as the quantizer reads it (shapes inferred, Conv+BN folded): same graph and
    tensor names as the int8 model, so it is the int8 model's layer-by-layer reference."""
    from onnxruntime.quantization import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="edgekit-int8-") as tmp:
        src, pre = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx"
        src.write_bytes(fp32 if isinstance(fp32, bytes) else Path(fp32).read_bytes())
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)  # shapes + basic fusions (Conv+BN)
        return pre.read_bytes()


def quantize(fp32: Path | bytes, calib_x: np.ndarray, settings: Int8Settings,
             float_modules: list[str] = (), float_nodes: list[str] = (),
             ranges: dict | None = None) -> tuple[bytes, dict]:
    """Quantize an fp32 ONNX; returns the int8 model and what was kept in float and why: the target's first
    conv (by design), `float_modules` (torch module paths the quantize stage kept float: mixed precision) and
    `float_nodes` (nodes of the float twin kept float by the fidelity repair). `ranges` (float-twin tensor ->
    (min, max)) replaces the calibrated ranges of those tensors (benchmarks/qat_carry.py)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    with tempfile.TemporaryDirectory(prefix="edgekit-int8-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        pre.write_bytes(float_twin(fp32))
        model = onnx.load(str(pre))
        keep = [first_conv(model)] if settings.float_first_conv and first_conv(model) else []
        keep += [n for n in [*nodes_of_modules(model, list(float_modules)), *float_nodes] if n not in keep]
        out = Path(tmp) / "int8.onnx"
        quantize_static(
            str(pre), str(out), _Reader(calib_x, model.graph.input[0].name), quant_format=QuantFormat.QDQ,
            activation_type=_qtype(settings.activation_type), weight_type=_qtype(settings.weight_type),
            per_channel=settings.per_channel, reduce_range=settings.reduce_range, nodes_to_exclude=keep,
            calibrate_method=getattr(CalibrationMethod, CALIBRATION[settings.calibration]),
            extra_options={"ActivationSymmetric": settings.symmetric_activations, "WeightSymmetric": True,
                           "TensorQuantOverrides": {name: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}]
                                                    for name, (lo, hi) in (ranges or {}).items()}})
        payload = out.read_bytes()
    check_int8(payload)
    return payload, {"settings": asdict(settings), "kept_float": keep}


def check_folds(fp32: bytes, chosen: list, what: str) -> None:
    """Before training: a BatchNorm the fp32 export kept apart (after a pooling or a flatten, where no conv or
    linear layer takes it into its weights) stops the ONNX int8 artifact after all the training; say so now."""
    import onnx

    shipping = [t.name for t in chosen if any(a.format == "onnx" and a.precision == "int8" for a in t.artifacts)]
    graph = onnx.load_from_string(fp32).graph
    made_by = {out: node.op_type for node in graph.node for out in node.output}
    stray = [n.name for n in graph.node
             if n.op_type == "BatchNormalization" and made_by.get(n.input[0]) not in ("Conv", "Gemm", "MatMul")]
    if shipping and stray:
        raise ModelError(f"{what} has a BatchNorm ({module_of(stray[0]) or stray[0]}) that follows no conv or linear "
                         f"layer (after a pooling or a flatten), so it cannot fold into int8 weights for the ONNX "
                         f"int8 artifacts of {', '.join(shipping)}: move it after a Linear or conv, or remove it")


def check_int8(payload: bytes) -> None:
    """No BatchNormalization left and every weight that a QDQ pair guards is an int8 initializer."""
    import onnx

    model = onnx.load_from_string(payload)
    ops = Counter(n.op_type for n in model.graph.node)
    if ops["BatchNormalization"]:
        raise EdgekitError(f"the int8 ONNX still holds {ops['BatchNormalization']} BatchNormalization nodes; "
                           "put each BatchNorm right after its conv so that it folds")
    int8 = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    weights = {i.name: i.data_type for i in model.graph.initializer}
    dq_inputs = [n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"]
    if not any(weights.get(name) in int8 for name in dq_inputs):
        raise EdgekitError("the int8 ONNX has no int8 weight initializers; onnxruntime's quantizer left it float")


def optimized_ops(payload: bytes, threads: int = 1) -> Counter:
    """The op types of the graph onnxruntime runs (all optimizations on, as the runner has them)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="edgekit-opt-") as tmp:
        path = Path(tmp) / "optimized.onnx"
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # the NCHWc serialisation warning
        opts.intra_op_num_threads = threads
        opts.optimized_model_filepath = str(path)
        ort.InferenceSession(payload, opts, providers=["CPUExecutionProvider"])
        return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def fusion(payload: bytes, kept_float: int = 0) -> dict:
    """Fused int8 ops and float compute ops left in onnxruntime's optimized graph; unfused excludes the
    convs kept in float on purpose (`kept_float`)."""
    ops = optimized_ops(payload)
    fused = {k: v for k, v in sorted(ops.items()) if k in INT8_OPS}
    floats = {k: v for k, v in sorted(ops.items()) if k in FLOAT_COMPUTE_OPS}
    unfused = sum(floats.values()) - kept_float
    return {"fused": fused, "float": floats, "fused_count": sum(fused.values()), "unfused_count": unfused,
            "kept_float": kept_float, "optimized_ops": dict(sorted(ops.items()))}


def effective(target, overrides: dict) -> Int8Settings:
    """The target's settings with the config's `export.int8` on top: plain keys apply to every target, a
    mapping under a target's name to that target only."""
    from edgekit.targets import int8_settings

    common = {k: v for k, v in overrides.items() if not isinstance(v, dict)}
    own = overrides.get(target.name) if isinstance(overrides.get(target.name), dict) else {}
    where = f"config export.int8 (target {target.name})"
    return int8_settings({**common, **own}, where, base=target.int8)


def settings_by_key(targets: list, overrides: dict) -> dict[str, Int8Settings]:
    """ONNX int8 artifact key -> its settings; targets that share a key must agree on them."""
    found: dict[str, Int8Settings] = {}
    for target in targets:
        for spec in target.artifacts:
            if (spec.format, spec.precision) != ("onnx", "int8"):
                continue
            settings = effective(target, overrides)
            if found.setdefault(spec.key, settings) != settings:
                raise EdgekitError(f"targets sharing artifact {spec.key} get different int8 settings from "
                                   "export.int8; override them alike or build those targets separately")
    return found
