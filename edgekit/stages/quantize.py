"""int8 with NNCF: calibrate initial ranges (PTQ), optionally fine-tune with fake quantization (QAT), export QDQ ONNX.

Calibration (`quantize.calibration`), each from the library that has it:
- minmax:     NNCF range estimator MINMAX (min of the per-sample minima, max of the maxima)
- percentile: NNCF range estimator with QUANTILE statistics at `quantize.percentile`, averaged over samples
- entropy:    NNCF has no KL calibration: activation ranges are replaced by the threshold that minimises the
              KL divergence between the float and the int8 histogram (TensorRT's method), computed by
              onnxruntime's HistogramCollector with 2048 bins (onnxruntime's own `quantize_static` leaves
              num_bins unset, which makes its search a single candidate)
Mixed precision (`quantize.keep_float`): NNCF's ignored scope keeps the named layers in float.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgekit import metrics, models, quiet, tolerance, training
from edgekit.config import Config, QuantizeConfig
from edgekit.errors import ConfigError, ModelError
from edgekit.files import stage_files
from edgekit.stages.base import LOGITS_FILE, MODEL_FILE, Context

name = "quantize"
reads = ("quantize", "train", "export", "targets")  # targets: quantize.method auto's default limit
needs = ("train", "prune", "distill")


def enabled(cfg: Config) -> bool:
    return cfg.quantize.enabled

ONNX_FILE = "model_int8.onnx"
LOG_FILE = "quantize.log"  # what NNCF printed
ENTROPY_BINS = 2048  # histogram bins of the KL search
QUANTIZED_BINS = 128  # int8 levels on one side of zero


def load_nncf():
    import nncf

    logging.getLogger("nncf").setLevel(logging.ERROR)  # NNCF logs every step at INFO
    _use_torch_fake_quantize()
    return nncf


def _use_torch_fake_quantize() -> None:
    """Fake-quantize on the CPU with NNCF's own pure-torch reference functions (eager, not torch.compile'd).

    Left alone, NNCF compiles a C++ extension on its first CPU fake-quantize call, gives up after 60 s (the
    compile alone took 58 s on 2 idle cores) and leaves a lock file that hangs every later build.
    """
    from types import SimpleNamespace

    from nncf.torch.quantization import extensions, reference

    kernels = reference.torch_executor  # the functions NNCF itself falls back to when the compile fails
    extensions.QuantizedFunctionsCPU._loaded_namespace = SimpleNamespace(
        Quantize_forward=kernels.forward, Quantize_backward=kernels.backward)


class NncfRoot(torch.nn.Module):
    """NNCF adds a hook-storage child to the model it quantizes; a bare nn.Sequential would call it."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def copy_plain_weights(wrapped: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
    """Load the weights of an NNCF model made from NncfRoot(model-like) into `model`; NNCF's hooks and
    quantizer parameters are left out."""
    prefix = "model."  # NncfRoot's child
    model.load_state_dict({k[len(prefix):]: v for k, v in wrapped.state_dict().items() if k.startswith(prefix)})
    return model.eval()


@dataclass(frozen=True)
class Calibration:
    method: str = "minmax"  # minmax | percentile | entropy
    percentile: float = 99.99
    activations: str = "symmetric"
    per_channel: bool = True
    bias_correction: bool = True
    keep_float: tuple[str, ...] = ()  # NNCF node names left unquantized

    @classmethod
    def from_config(cls, q: QuantizeConfig, keep_float: tuple[str, ...] = ()) -> Calibration:
        return cls(q.calibration, q.percentile, q.activations, q.per_channel, q.bias_correction, keep_float)

    def describe(self) -> dict:
        library = {"minmax": "nncf MINMAX range estimator",
                   "percentile": f"nncf QUANTILE range estimator ({self.percentile} %)",
                   "entropy": f"onnxruntime HistogramCollector KL search ({ENTROPY_BINS} bins) on NNCF quantizers"}
        return {"calibration": self.method, "calibration_library": library[self.method],
                "activations": self.activations, "per_channel_weights": self.per_channel,
                "bias_correction": "nncf fast bias correction" if self.bias_correction else "off",
                "keep_float": list(self.keep_float)}


def _range_estimator(calib: Calibration):
    from nncf.quantization.range_estimator import (
        AggregatorType,
        RangeEstimatorParameters,
        RangeEstimatorParametersSet,
        StatisticsCollectorParameters,
        StatisticsType,
    )

    if calib.method != "percentile":
        return RangeEstimatorParametersSet.MINMAX
    outlier = 1 - calib.percentile / 100
    return RangeEstimatorParameters(
        min=StatisticsCollectorParameters(StatisticsType.QUANTILE, AggregatorType.MEAN, quantile_outlier_prob=outlier),
        max=StatisticsCollectorParameters(StatisticsType.QUANTILE, AggregatorType.MEAN, quantile_outlier_prob=outlier),
    )


def _advanced(calib: Calibration):
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters

    return AdvancedQuantizationParameters(
        activations_range_estimator_params=_range_estimator(calib),
        # per-channel: NNCF's own choice (None), per-channel for every conv and linear weight; forcing True also
        # forces it on a norm layer's affine weight (GroupNorm, LayerNorm), whose range NNCF 3 collects per tensor,
        # and quantize fails ("shape '[16]' is invalid for input of size 1")
        weights_quantization_params=QuantizationParameters(per_channel=None if calib.per_channel else False),
        disable_bias_correction=not calib.bias_correction,
    )


def calibrate(model: torch.nn.Module, calib_x: np.ndarray, subset_size: int,
              calibration: Calibration | None = None) -> torch.nn.Module:
    """NNCF post-training quantization: int8 weights (per-channel by default), calibrated activations."""
    nncf = load_nncf()
    calibration = calibration or Calibration()
    model = NncfRoot(model).eval()
    loader = torch.utils.data.DataLoader(torch.from_numpy(calib_x), batch_size=1)
    dataset = nncf.Dataset(loader)
    preset = nncf.QuantizationPreset.PERFORMANCE if calibration.activations == "symmetric" \
        else nncf.QuantizationPreset.MIXED
    ignored = nncf.IgnoredScope(names=list(calibration.keep_float)) if calibration.keep_float else None
    try:
        qmodel = nncf.quantize(model, dataset, subset_size=min(subset_size, len(calib_x)), preset=preset,
                               ignored_scope=ignored, advanced_parameters=_advanced(calibration))
    except nncf.ValidationError as exc:
        if not ignored or "were not found" not in str(exc):
            raise
        plain = calibrate(model.model, calib_x[:1], 1, dataclasses.replace(calibration, keep_float=()))
        raise ConfigError(f"quantize.keep_float: {', '.join(calibration.keep_float)} is not among the operations "
                          f"NNCF quantizes in this model; name them as NNCF does: {', '.join(node_names(plain))}") \
            from None
    if calibration.method == "entropy":
        entropy_ranges(qmodel, calib_x[:subset_size])
    return qmodel


def node_names(qmodel: torch.nn.Module) -> list[str]:
    """The operations NNCF quantized in `qmodel` (their inputs or outputs), by the names quantize.keep_float takes:
    the module path joined by / , the op and its call count (model/block/conv1/conv2d/0)."""
    names = {k.split("_hooks.")[-1].rsplit("__", 1)[0] for k in quantizers(qmodel)}
    return sorted(n for n in names if n.startswith("model/"))


# --- KL (entropy) calibration of the activation quantizers -------------------------------------------------

def quantizers(qmodel: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """NNCF's quantizer modules by their hook key."""
    return {k: m for k, m in qmodel.named_modules()
            if type(m).__name__ in ("SymmetricQuantizer", "AsymmetricQuantizer")}


@torch.no_grad()
def _collect(qmodel: torch.nn.Module, quantizers: dict[str, torch.nn.Module], x: np.ndarray) -> dict[str, list]:
    """The float values that reach each activation quantizer (weights, fed by a Parameter, are skipped)."""
    seen: dict[str, list[np.ndarray]] = {k: [] for k in quantizers}

    def hook(key: str):
        def keep(_module, args):
            if not isinstance(args[0], torch.nn.Parameter):
                seen[key].append(args[0].detach().float().numpy())
        return keep

    handles = [mod.register_forward_pre_hook(hook(key)) for key, mod in quantizers.items()]
    enabled = {k: m.enabled.clone() for k, m in quantizers.items()}
    for m in quantizers.values():
        m.enabled.zero_()  # float values reach every quantizer, as in the float model
    try:
        metrics.logits(qmodel, x, batch=64)
    finally:
        for k, v in enabled.items():
            quantizers[k].enabled.copy_(v)
        for h in handles:
            h.remove()
    return {k: [np.concatenate([a.ravel() for a in v])] for k, v in seen.items() if v}


def entropy_ranges(qmodel: torch.nn.Module, x: np.ndarray) -> dict[str, float]:
    """Set each activation quantizer's range to the KL-optimal threshold; returns the thresholds."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    found = quantizers(qmodel)
    values = _collect(qmodel, found, x)
    collector = HistogramCollector(method="entropy", symmetric=True, num_bins=ENTROPY_BINS,
                                   num_quantized_bins=QUANTIZED_BINS, percentile=99.999, scenario="same")
    with quiet.silenced(None):
        collector.collect(values)
        result = collector.compute_collection_result()
    thresholds = {}
    with torch.no_grad():
        for key, r in result.items():
            t = float(max(abs(float(r[0])), abs(float(r[1]))))
            if t > 0:
                _set_range(found[key], t)
                thresholds[key] = t
    return thresholds


def _set_range(q: torch.nn.Module, threshold: float) -> None:
    if type(q).__name__ == "SymmetricQuantizer":
        log = getattr(q, "_is_using_log_scale_storage", False)
        q._scale_param_storage.data.fill_(float(np.log(threshold)) if log else threshold)
    else:  # asymmetric: keep the low end when it is 0 (after ReLU), else [-t, t]
        low = q.input_low.data.clamp(min=-threshold)
        q.input_low.data.copy_(low)
        q.input_range.data.copy_(torch.full_like(q.input_range.data, threshold) - low)


# --- mixed precision: keep the most int8-sensitive layers in float ----------------------------------------

def weighted_nodes(qmodel: torch.nn.Module) -> list[str]:
    """NNCF node names of the layers whose weights are quantized (conv / linear)."""
    nodes = []
    for key in quantizers(qmodel):
        node = key.split(".", 2)[-1].rsplit("__", 1)[0]
        if "pre_hooks" in key and key.endswith("__1.0") and node not in nodes:
            nodes.append(node)
    return nodes


def module_of_nncf_node(node: str) -> str:
    """The torch module path of an NNCF node name: 'model/stack1/conv1/0/conv2d/0' -> 'stack1.conv1.0'."""
    return ".".join(node.split("/")[1:-2])


def _val_accuracy(qmodel: torch.nn.Module, val) -> float:
    return metrics.accuracy(metrics.logits(qmodel, val.x), val.y)


def mixed_precision(model: torch.nn.Module, calib_x: np.ndarray, val, subset_size: int, calibration: Calibration,
                    tolerance: float) -> tuple[Calibration, dict]:
    """Greedy: rank layers by the accuracy gained when each alone stays float; keep float until within tolerance.

    Returns the calibration with `keep_float` set and a record of what it cost.
    """
    import copy

    float_acc = metrics.accuracy(metrics.logits(model, val.x), val.y)
    full = calibrate(copy.deepcopy(model), calib_x, subset_size, calibration)
    record = {"float_val_accuracy": float_acc, "int8_val_accuracy": _val_accuracy(full, val),
              "tolerance": tolerance, "sensitivity": {}, "kept_float": []}
    if record["int8_val_accuracy"] >= float_acc - tolerance:
        return calibration, record
    for node in weighted_nodes(full):
        trial = dataclasses.replace(calibration, keep_float=(node,))
        gain = _val_accuracy(calibrate(copy.deepcopy(model), calib_x, subset_size, trial), val)
        record["sensitivity"][node] = gain - record["int8_val_accuracy"]
    kept: list[str] = []
    acc = record["int8_val_accuracy"]
    for node in sorted(record["sensitivity"], key=record["sensitivity"].get, reverse=True):
        kept.append(node)
        trial = dataclasses.replace(calibration, keep_float=tuple(kept))
        acc = _val_accuracy(calibrate(copy.deepcopy(model), calib_x, subset_size, trial), val)
        if acc >= float_acc - tolerance:
            break
    record.update(kept_float=kept, mixed_val_accuracy=acc)
    return dataclasses.replace(calibration, keep_float=tuple(kept)), record


def export_qdq(qmodel: torch.nn.Module, example: torch.Tensor, path, opset: int) -> torch.nn.Module:
    """Strip NNCF's wrappers to native torch fake-quant ops (onnxruntime cannot load NNCF's FakeQuantize), export
    that, and return it. Stripping also replaces each weight by its quantized value: NNCF clamps int8 weights
    (narrow range) to the range its quantizer holds, which QAT learns, and rounds them to that grid."""
    nncf = load_nncf()
    native = nncf.strip(qmodel, do_copy=True, strip_format=nncf.StripFormat.NATIVE, example_input=example)
    native.eval()
    tmp = path.with_name(f".{path.name}.tmp")
    torch.onnx.export(native, (example,), str(tmp), dynamo=False, opset_version=opset, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    fake_quantize_as_qdq(tmp)
    tmp.replace(path)
    return native


def fake_quantize_as_qdq(path: Path) -> None:
    """Rewrite each NNCF FakeQuantize the strip left (a quantizer shared across a concat with the model's input
    was seen to stay) as the QuantizeLinear -> DequantizeLinear pair it equals: 256 levels over [low, high]
    with zero exactly on the grid, as NNCF's ranges keep it."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"}
    consts |= {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    nodes, changed = [], False
    for node in graph.node:
        if node.op_type != "FakeQuantize":
            nodes.append(node)
            continue
        scale, zero = _qdq_params(node, consts)
        names = [f"{node.name}/{n}" for n in ("scale", "zero_point", "quantized")]
        graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), names[0]),
                                  numpy_helper.from_array(np.array(zero, np.uint8), names[1])])
        nodes += [helper.make_node("QuantizeLinear", [node.input[0], *names[:2]], [names[2]], f"{node.name}/q"),
                  helper.make_node("DequantizeLinear", [names[2], *names[:2]], list(node.output), f"{node.name}/dq")]
        changed = True
    if changed:
        used = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
        del graph.node[:]
        graph.node.extend(n for n in nodes if n.op_type != "Constant" or n.output[0] in used)
        onnx.save(model, str(path))


def _qdq_params(node, consts: dict) -> tuple[float, int]:
    """(scale, uint8 zero point) of a per-tensor 256-level FakeQuantize whose output range is its input range."""
    levels = next((a.i for a in node.attribute if a.name == "levels"), None)
    low, high, out_low, out_high = (consts.get(i) for i in node.input[1:5])
    if levels == 256 and all(v is not None and v.size == 1 for v in (low, high, out_low, out_high)) and \
            np.array_equal(low, out_low) and np.array_equal(high, out_high):
        scale = float((high - low).reshape(())) / (levels - 1)
        zero = round(-float(low.reshape(())) / scale)
        if scale > 0 and 0 <= zero <= 255 and abs(zero * scale + float(low.reshape(()))) <= 1e-3 * scale:
            return scale, zero
    raise ModelError(f"NNCF left a quantizer ({node.name}, {levels} levels) that edgekit cannot write as "
                     "QuantizeLinear/DequantizeLinear; keep the layer before it float (quantize.keep_float)")


def save_tuned_weights(ctx: Context, source: str, native: torch.nn.Module, out_dir: Path) -> None:
    """The weights QAT tuned, as NNCF quantized them (`native`: export_qdq's stripped model), in a plain copy of
    the source model (hooks and quantizer parameters left out): the export stage makes the int8 artifacts from
    these. The quantized values, not the raw ones: the exporters' int8 quantizers take each channel's range from
    its weights, so raw weights that QAT's learned range clips would give them a coarser grid than NNCF's
    (Fashion-MNIST, 3 000 images: ONNX int8 from raw weights 78.67 %, from these 80.33 %, NNCF's own 80.17 %)."""
    models.save_model(copy_plain_weights(native, ctx.load_model(source)), out_dir / MODEL_FILE)
    spec = ctx.out / "stages" / source / models.SPEC_FILE  # a zoo student's architecture
    if spec.is_file():
        shutil.copy2(spec, out_dir / models.SPEC_FILE)


def qat_decision(ctx: Context, source: str, qmodel: torch.nn.Module) -> dict:
    """Whether QAT runs: always for `qat`, never for `ptq`; for `auto` only when the calibrated (PTQ) model loses
    more validation accuracy against the float model it quantizes than the limit (QAT as the repair)."""
    q, val = ctx.cfg.quantize, ctx.data.val
    if q.method != "auto" or q.qat_epochs == 0:
        ran = q.method != "ptq" and q.qat_epochs > 0
        return {"ran": ran, "why": f"quantize.method {q.method}, qat_epochs {q.qat_epochs}: "
                                   + ("QAT" if ran else "PTQ only")}
    float_val = metrics.accuracy(metrics.logits(ctx.load_model(source), val.x), val.y)
    ptq_val = _val_accuracy(qmodel, val)
    guard = tolerance.guard_for(q.max_loss_pp, "quantize.max_loss_pp", ctx.targets, float_val, len(val.y))
    record = {"float_val_accuracy": float_val, "ptq_val_accuracy": ptq_val,
              "limit_pp": guard.limit_pp if guard else None}
    if guard is None:
        return {**record, "ran": True, "why": "quantize.method auto: no target tolerance to judge PTQ against; QAT"}
    loss = f"PTQ {tolerance.lost(guard.loss_pp(ptq_val))} of validation accuracy against the float model"
    limit = f"{guard.limit_pp:.3g} pp ({guard.source})"
    if guard.within(ptq_val):
        return {**record, "ran": False, "why": f"{loss}, within {limit}: QAT skipped (quantize.method auto)"}
    return {**record, "ran": True, "why": f"{loss}, more than {limit}: QAT repairs it (quantize.method auto)"}


def run(ctx: Context) -> dict:
    q, data = ctx.cfg.quantize, ctx.data
    source = ctx.latest_model_stage(before=name)
    out_dir = ctx.stage_dir(name)
    calibration = Calibration.from_config(q, tuple(q.keep_float))
    mixed = None
    if q.mixed_precision_tolerance is not None:
        with quiet.phase(name, "mixed precision: calibrating once per weighted layer (NNCF)", "layers ranked"), \
                quiet.silenced(out_dir / LOG_FILE):  # NNCF, torchao and torch.onnx print a lot
            calibration, mixed = mixed_precision(ctx.load_model(source), data.calib.x, data.val, q.subset_size,
                                                 calibration, q.mixed_precision_tolerance)
    samples = min(q.subset_size, len(data.calib.x))
    with quiet.phase(name, f"calibrating (NNCF {calibration.method}, {samples} samples)", "calibrated"), \
            quiet.silenced(out_dir / LOG_FILE):
        qmodel = calibrate(ctx.load_model(source), data.calib.x, q.subset_size, calibration)
    ptq_acc = metrics.accuracy(metrics.logits(qmodel, data.test.x), data.test.y)
    qat = qat_decision(ctx, source, qmodel)
    print(f"[{name}] {qat['why']}")
    best_val = None
    if qat["ran"]:
        best_val = training.fit(qmodel, data.train, data.val, epochs=q.qat_epochs, lr=q.lr,
                                batch_size=ctx.cfg.train.batch_size, seed=ctx.cfg.train.seed, desc="qat",
                                keep_zeros=ctx.keep_zeros, workers=ctx.cfg.train.workers)
    test_logits = metrics.logits(qmodel, data.test.x)
    np.save(out_dir / LOGITS_FILE, test_logits)
    with quiet.silenced(out_dir / LOG_FILE):
        native = export_qdq(qmodel, ctx.example_input(), out_dir / ONNX_FILE, ctx.cfg.export.opset)
    if qat["ran"]:  # else the int8 artifacts come from the float model: each format calibrates it itself
        save_tuned_weights(ctx, source, native, out_dir)
    src = ctx.metrics(source)
    return {
        "name": name, "accuracy": metrics.accuracy(test_logits, data.test.y), "ptq_accuracy": ptq_acc,
        "val_accuracy": best_val, "params": src["params"], "macs": src["macs"],
        # model.pt: the QAT-tuned weights as NNCF quantized them, after QAT only; model_int8.onnx: NNCF QDQ
        **stage_files(out_dir, MODEL_FILE if qat["ran"] else ONNX_FILE),
        "method": "nncf-qat" if qat["ran"] else "nncf-ptq", "library": "nncf", "source_stage": source,
        "mixed_precision": mixed, "qat": qat,
        "settings": {"library": "nncf", "method": q.method, "subset_size": q.subset_size,
                     "qat_epochs": q.qat_epochs if qat["ran"] else 0, "lr": q.lr, **calibration.describe()},
    }
