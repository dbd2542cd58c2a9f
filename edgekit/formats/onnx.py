"""ONNX: fp32, fp16 (GPU), int8 and int4 artifacts, run by onnxruntime (CPU) or onnxruntime-gpu (Jetson, TensorRT).

fp32 is the torch export checked against torch (every other format starts from it); fp16 keeps float32
inputs and outputs; int8 is quantized from fp32 by edgekit.onnx_int8 with each target's `int8:` settings (BN
folded, int8 weights, Q/DQ that onnxruntime fuses), repaired by edgekit.repair when it misses its targets'
fidelity gate. int4 is weight-only (edgekit.onnx_int4: INT4 weights behind DequantizeLinear, opset 21, float
compute, the input conv int8): onnxruntime (CPU) from 1.19.0 only, which target profiles enforce; TensorRT's
int4 is untried here.
"""

from __future__ import annotations

import io
import time
import warnings
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np

from edgekit import formats, quiet
from edgekit.errors import EdgekitError, ModelError, first_line
from edgekit.files import write_bytes
from edgekit.onnx_int4 import MIN_ONNXRUNTIME

FORMAT = formats.register(formats.Format(
    name="onnx", suffix="onnx", precisions=("fp32", "fp16", "int8", "int4"), order=0, host_runtime="onnxruntime",
    exporter="edgekit.formats.onnx:export", min_versions={"int4": {"onnxruntime": MIN_ONNXRUNTIME}},
    runtimes=(formats.Runtime("onnxruntime", "onnxruntime", "onnxruntime"),
              formats.Runtime("onnxruntime-gpu", "onnxruntime-gpu", "onnxruntime", gpu=True))))


def export(job: formats.ExportJob, specs: list) -> list[tuple[dict, bytes]]:
    built = []
    check = None
    for spec in specs:
        if spec.precision == "fp32":
            built.append(artifact(spec, job.fp32_onnx.read_bytes(), job.source))
        elif spec.precision == "fp16":
            built.append(artifact(spec, _to_fp16(job.fp32_onnx), job.source))
        elif spec.precision == "int4":
            built.append(_int4_artifact(job, spec))
        else:
            if check is None:  # the float model on the validation split: what a repair must stay close to
                from edgekit import metrics

                val = job.ctx.data.val
                check = (val.x, val.y, metrics.logits(job.model, val.x))
            built.append(_int8_artifact(job, spec, check))
    return built


def torch_to_onnx(model, example: np.ndarray, path: Path | io.BytesIO, opset: int, *,
                  dynamic_batch: bool) -> Path | io.BytesIO:
    import torch

    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (torch.from_numpy(np.ascontiguousarray(example)),),
                          path if isinstance(path, io.BytesIO) else str(path), dynamo=False,
                          opset_version=opset, input_names=["input"], output_names=["logits"], dynamic_axes=axes)
    return path


def check_exportable(model, samples: np.ndarray, opset: int, what: str) -> bytes:
    """Export the (untrained) model once, into memory, as the export stage will, and run it on a few samples
    against torch: an op torch.onnx cannot export, or a forward the trace does not follow, stops the build before
    it trains, in one line, rather than at quantize or export. Returns the ONNX, for the checks that follow."""
    example, buffer = samples[:1], io.BytesIO()
    try:
        with quiet.silenced():  # torch.onnx prints the whole graph when it fails
            torch_to_onnx(model, example, buffer, opset, dynamic_batch=True)
    except Exception as exc:  # torch.onnx raises its own types (SymbolicValueError, UnsupportedOperatorError...)
        fix = _pool_misfit(model, example) or ("rewrite that part of the model with ops torch.onnx exports "
                                               "(or try another export.opset)")
        raise ModelError(f"{what} cannot be exported to ONNX (torch.onnx, opset {opset}), which every artifact "
                         f"starts from: {first_line(exc)}; {fix}") from exc
    try:
        check_against_torch(buffer.getvalue(), model, samples)
    except EdgekitError as exc:
        raise ModelError(f"{what}: {exc}") from exc
    return buffer.getvalue()


def _pool_misfit(model, example: np.ndarray) -> str | None:
    """The adaptive pooling layer whose output size does not divide its input size, what torch.onnx cannot
    export, with the sizes; None when no layer module is one (a functional call, or another op)."""
    import torch

    found: list[str] = []

    def hook(name: str):
        def check(module, args, out) -> None:
            size_in, size_out = tuple(args[0].shape[2:]), tuple(out.shape[2:])
            if not found and any(i % o for i, o in zip(size_in, size_out, strict=False)):
                dims = ["x".join(map(str, s)) for s in (size_in, size_out)]
                found.append(f"layer '{name}' ({type(module).__name__}) pools {dims[0]} to {dims[1]}: use an "
                             f"output size that divides {dims[0]}, or nn.{type(module).__name__}(1)")
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if type(m).__name__.startswith("Adaptive") and "Pool" in type(m).__name__]
    training = model.training
    try:  # eval: a one-sample batch through BatchNorm1d, and no update of the running statistics
        with torch.no_grad():
            model.eval()(torch.from_numpy(np.ascontiguousarray(example)))
    except Exception:  # only a hint for the export error the caller is raising: never a second failure
        pass
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def _to_fp16(fp32: Path) -> bytes:
    """fp16 weights and compute for GPUs (TensorRT), float32 inputs and outputs kept so callers need no cast."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns about values clamped to the fp16 range
        return convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True).SerializeToString()


def _int4_artifact(job: formats.ExportJob, spec) -> tuple[dict, bytes]:
    """Weight-only int4 of the fp32 export, per output channel, the input conv's weights int8 (edgekit.onnx_int4),
    with what onnxruntime computes it in. The input conv has the fewest weights and was the most sensitive layer
    measured (benchmarks/results/lowbit.md: 2.2 pp alone at int4; at int8 the model kept fp32's accuracy for
    0.5 % more weight bytes), as int8 keeps it float."""
    import onnx

    from edgekit import onnx_int4, onnx_int8

    first = onnx_int8.first_conv(onnx.load(str(job.fp32_onnx)))
    payload, info = onnx_int4.quantize(job.fp32_onnx, plan={first: 8} if first else {})
    rec, payload = artifact(spec, payload, job.source)
    rec["int4"] = {**info, **onnx_int4.check_int4(payload),
                   "size_vs_fp32": round(len(payload) / job.fp32_onnx.stat().st_size, 3)}
    return rec, payload


def _int8_artifact(job: formats.ExportJob, spec, check: tuple) -> tuple[dict, bytes]:
    """onnxruntime-fusable int8 from the fp32 export (edgekit.onnx_int8), repaired when it misses its targets'
    fidelity gate (edgekit.repair), with its fused/unfused op counts and its float twin (for edgekit debug)."""
    from edgekit import fidelity, onnx_int8, repair

    ctx, settings = job.ctx, job.int8_settings[spec.key]
    hows = fidelity.numerics_of(ctx.targets, spec.key, asdict(settings))
    payload, info = repair.quantize(job.fp32_onnx, ctx.data.calib.x, settings, job.float_modules, check=check,
                                    hows=hows, limits=fidelity.thresholds(ctx.targets, spec.key))
    rec, payload = artifact(spec, payload, job.source)
    twin = f"{spec.key}.float-twin.onnx"
    write_bytes(ctx.stage_dir("export") / twin, onnx_int8.float_twin(job.fp32_onnx))
    rec["int8"] = {**info, "fusion": onnx_int8.fusion(payload, len(info["kept_float"])), "float_twin": twin,
                   "size_vs_fp32": round(len(payload) / job.fp32_onnx.stat().st_size, 3)}
    return rec, payload


def session(model: Path | bytes, what: str):
    import onnxruntime as ort

    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4  # failures come back as exceptions; do not also print them
        source = model if isinstance(model, bytes) else str(model)
        return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own (non-exported) exception types
        raise EdgekitError(f"onnxruntime cannot load {what}: {str(exc).strip().splitlines()[0]}") from exc


def check_against_torch(source: Path | bytes, model, x: np.ndarray) -> None:
    """The fp32 ONNX loads in onnxruntime, reads its input, takes a whole batch and matches torch."""
    import torch

    sess = session(source, "the fp32 ONNX export")
    if not sess.get_inputs():
        raise EdgekitError("the ONNX export does not read its input: forward turns the input into numpy or Python "
                           "values (x.numpy(), .item(), .tolist()), which the exporter records as constants; keep "
                           "forward in torch ops")
    try:
        got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    except Exception as exc:  # onnxruntime's own exception types
        raise EdgekitError(f"the fp32 ONNX export cannot run a batch of {len(x)} "
                           f"({first_line(exc)}); the model must not fix the batch size "
                           "(write x.flatten(1), not x.view(1, -1))") from exc
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    if got.shape != want.shape or not close(got, want):
        diff = f"max abs diff {np.abs(got - want).max():.3g}" if got.shape == want.shape else \
            f"shape {got.shape} against {want.shape}"
        raise EdgekitError(f"the ONNX export computes other outputs than the torch model on the same samples "
                           f"({diff}): forward may branch on the data in Python (the trace keeps one branch of an "
                           "`if` on a tensor: use torch.where) or compute with numpy or Python values; else an op "
                           "the exporter mistranslates")


def close(got: np.ndarray, want: np.ndarray, rel: float = 1e-3) -> bool:
    return bool(np.abs(got - want).max() <= rel * max(1.0, float(np.abs(want).max())))


def artifact(spec, payload: bytes, source: str) -> tuple[dict, bytes]:
    """The record of an ONNX artifact: onnxruntime loads exactly these bytes; inputs, outputs and op counts."""
    import onnx

    t0 = time.perf_counter()
    sess = session(payload, spec.key)
    rec = formats.record(spec, source, len(payload))
    rec["input"] = {**_tensor(sess.get_inputs()[0], spec.key), "transpose": None,
                    "layout": formats.layout(len(sess.get_inputs()[0].shape) - 1, channels_last=False)}
    rec["output"] = _tensor(sess.get_outputs()[0], spec.key)
    ops = Counter(n.op_type for n in onnx.load_from_string(payload).graph.node)
    rec["graph"] = {"ops": dict(sorted(ops.items()))}
    formats.progress(spec.key, t0, len(payload))
    return rec, payload


def _tensor(arg, key: str) -> dict:
    if arg.type != "tensor(float)":
        raise EdgekitError(f"{key}: {arg.name} is {arg.type}; edgekit's ONNX artifacts take and give float32")
    shape = [1, *(d if isinstance(d, int) else -1 for d in arg.shape[1:])]
    return {"name": arg.name, "shape": shape, "dtype": "float32", "scale": None, "zero_point": None}
