"""Export stage: the fp32 torch model to ONNX (fp32, int8) and TFLite (fp32, full-int8).

Only the artifacts the chosen targets list are made. ONNX int8 is quantized from the fp32 export by
edgekit.onnx_int8 with each target's `int8:` settings (BN folded, int8 weights, Q/DQ that onnxruntime
fuses); targets with different settings get different keys (`onnx_int8_<variant>`). TFLite goes through
onnx2tf (ONNX -> float SavedModel) and then TensorFlow's own converter, with a representative dataset for
int8. onnx2tf turns channels-first inputs channels-last; the permutation from the dataset's layout to the
artifact's input is recorded as `input.transpose` and checked by running the float model against onnxruntime.

Nothing here touches the network: onnx2tf's download of a sample image is replaced by local data and every
socket connect is refused while it runs.
"""

from __future__ import annotations

import contextlib
import importlib
import shutil
import socket
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from edgekit import fidelity, metrics, onnx_int8, quiet, repair
from edgekit.errors import EdgekitError
from edgekit.files import temp_root, write_bytes, write_json
from edgekit.stages import quantize
from edgekit.stages.base import Context, always

name = "export"
reads = ("export", "targets")
needs = ("train", "prune", "distill", "quantize")
enabled = always

ARTIFACT_FILE = "artifacts.json"
LOG_FILE = "convert.log"  # what onnx2tf and the TFLite converter printed, for when they fail
KEY_ORDER = ("onnx_fp32", "onnx_fp16", "onnx_int8", "tflite_fp32", "tflite_int8", "tflite_int8_int8io")
LAYOUTS = {1: ("NF", "NF"), 2: ("NCL", "NLC"), 3: ("NCHW", "NHWC"), 4: ("NCDHW", "NDHWC")}
WEIGHTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "CONV_3D")
BOUNDARY_OPS = ("QUANTIZE", "DEQUANTIZE")  # float <-> int8 at the edges of a float-I/O int8 model
CHECK_SAMPLES = 16  # calibration samples used to check an export against its source


# --- entry point --------------------------------------------------------------------------------------------

def run(ctx: Context) -> dict:
    """Make every artifact the targets need and check it; only then write them and artifacts.json.

    fp32 artifacts come from the last float stage; int8 artifacts from the quantize stage's QAT-tuned
    weights when it ran (the weights learned under int8 fake quantization), else from the same float model.
    """
    keys = needed_keys(ctx)
    int8_settings = onnx_int8.settings_by_key(ctx.targets, ctx.cfg.export.int8)
    fp32_source = ctx.latest_model_stage(before="quantize")
    int8_source = "quantize" if ctx.has_model("quantize") else fp32_source
    passes = {fp32_source: ([k for k in keys if "_int8" not in k], {})}
    int8_keys = [k for k in keys if "_int8" in k]
    if int8_source == fp32_source:
        passes[fp32_source][0].extend(int8_keys)
        passes[fp32_source] = (passes[fp32_source][0], int8_settings)
    else:
        passes[int8_source] = (int8_keys, int8_settings)
    built: list[tuple[dict, bytes]] = []
    for stale in ctx.stage_dir(name).glob(".tmp-*"):  # left by a killed export
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=ctx.stage_dir(name)) as tmp, temp_root(Path(tmp)):
        for source, (wanted, settings) in passes.items():
            if wanted:
                (Path(tmp) / source).mkdir()
                built += _export_from(ctx, source, wanted, settings, Path(tmp) / source)
    built.sort(key=lambda item: keys.index(item[0]["name"]) if item[0]["name"] in keys else len(keys))
    out = ctx.stage_dir(name)
    for record, payload in built:
        write_bytes(out / record["file"], payload)
    records = [record for record, _ in built]
    write_json(out / ARTIFACT_FILE, records)
    return {"name": name, "artifacts": records, "size_bytes": sum(r["size_bytes"] for r in records),
            "targets": [t.name for t in ctx.targets]}


def _export_from(ctx: Context, source: str, keys: list[str], int8_settings: dict,
                 work: Path) -> list[tuple[dict, bytes]]:
    """The artifacts `keys` of one stage's torch model."""
    model = fold_linear_bn(ctx.load_model(source).eval())
    built = []
    fp32 = _torch_to_onnx(model, ctx, work / "fp32.onnx", dynamic_batch=True)
    _check_onnx(fp32, model, ctx.data.calib.x[:CHECK_SAMPLES])
    if "onnx_fp32" in keys:
        built.append(_onnx_artifact("onnx_fp32", fp32.read_bytes(), source))
    if "onnx_fp16" in keys:
        built.append(_onnx_artifact("onnx_fp16", _to_fp16(fp32), source))
    float_modules = kept_float_modules(ctx)
    if int8_settings:
        check = (ctx.data.val.x, ctx.data.val.y, metrics.logits(model, ctx.data.val.x))
    for key, settings in int8_settings.items():
        built.append(_onnx_int8_artifact(ctx, key, fp32, settings, source, float_modules, check))
    tflite_keys = [k for k in keys if k.startswith("tflite_")]
    if tflite_keys:
        built += _tflite_artifacts(ctx, model, work, tflite_keys, source)
    return built


def kept_float_modules(ctx: Context) -> list[str]:
    """Torch module paths of the layers the quantize stage kept float (quantize.keep_float, mixed precision).

    They stay float in the ONNX int8 artifacts. TFLite int8 stays full int8: every TFLite target here runs
    integer-only kernels (checked after conversion), so a float layer is not an option there."""
    if not ctx.has_model("quantize"):
        return []
    nodes = ctx.metrics("quantize")["settings"].get("keep_float", [])
    return [quantize.module_of_nncf_node(n) for n in nodes]


@torch.no_grad()
def fold_linear_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Fold each BatchNorm1d that directly follows a Linear in a Sequential into that Linear (eval mode).

    onnxruntime's pre-processing folds BN into Conv but not into Gemm, and an int8 graph must hold no BN.
    """
    for seq in [m for m in model.modules() if isinstance(m, torch.nn.Sequential)]:
        for i in range(len(seq) - 1):
            lin, bn = seq[i], seq[i + 1]
            if isinstance(lin, torch.nn.Linear) and isinstance(bn, torch.nn.BatchNorm1d) and bn.affine:
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                bias = lin.bias if lin.bias is not None else torch.zeros_like(bn.running_mean)
                folded = torch.nn.Linear(lin.in_features, lin.out_features)
                folded.weight.copy_(lin.weight * scale[:, None])
                folded.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
                seq[i], seq[i + 1] = folded, torch.nn.Identity()
    return model


def needed_keys(ctx: Context) -> list[str]:
    """The artifact keys the targets list, in a fixed order (ONNX first, then TFLite)."""
    wanted = {a.key for t in ctx.targets for a in t.artifacts}
    variants = sorted(k for k in wanted if k.startswith("onnx_int8_"))  # per-target int8 settings
    unknown = wanted - set(KEY_ORDER) - set(variants)
    if unknown:
        raise EdgekitError(f"no exporter for artifact '{sorted(unknown)[0]}'; valid: {', '.join(KEY_ORDER)}")
    return [k for k in KEY_ORDER if k in wanted] + variants


def _progress(key: str, t0: float, size: int) -> None:
    print(f"export: {key:<20} {size / 1024:8.1f} KB  {time.perf_counter() - t0:5.1f} s", file=sys.stderr)


def _record(key: str, fmt: str, source: str, size: int) -> dict:
    precision = "int8" if "_int8" in key else "fp16" if "_fp16" in key else "fp32"
    io = "int8" if key.endswith("_int8io") else "float32"
    return {"name": key, "file": f"{key}.{fmt}", "format": fmt, "precision": precision, "io": io,
            "source_stage": source, "size_bytes": size}


def _layout(rank: int, *, channels_last: bool) -> str | None:
    return LAYOUTS[rank][int(channels_last)] if rank in LAYOUTS else None


# --- ONNX ---------------------------------------------------------------------------------------------------

def _torch_to_onnx(model: torch.nn.Module, ctx: Context, path: Path, *, dynamic_batch: bool) -> Path:
    example = torch.from_numpy(np.ascontiguousarray(ctx.data.calib.x[:1]))
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=ctx.cfg.export.opset,
                          input_names=["input"], output_names=["logits"], dynamic_axes=axes)
    return path


def _to_fp16(fp32: Path) -> bytes:
    """fp16 weights and compute for GPUs (TensorRT), float32 inputs and outputs kept so callers need no cast."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns about values clamped to the fp16 range
        return convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True).SerializeToString()


def _onnx_int8_artifact(ctx: Context, key: str, fp32: Path, settings, source: str, float_modules: list[str],
                        check: tuple) -> tuple[dict, bytes]:
    """onnxruntime-fusable int8 from the fp32 export (edgekit.onnx_int8), repaired when it misses its targets'
    fidelity gate (edgekit.repair), with its fused/unfused op counts and its float twin (for edgekit debug)."""
    hows = fidelity.numerics_of(ctx.targets, key, asdict(settings))
    payload, info = repair.quantize(fp32, ctx.data.calib.x, settings, float_modules, check=check, hows=hows,
                                    limits=fidelity.thresholds(ctx.targets, key))
    record, payload = _onnx_artifact(key, payload, source)
    twin = f"{key}.float-twin.onnx"
    write_bytes(ctx.stage_dir(name) / twin, onnx_int8.float_twin(fp32))
    record["int8"] = {**info, "fusion": onnx_int8.fusion(payload, len(info["kept_float"])), "float_twin": twin,
                      "size_vs_fp32": round(len(payload) / fp32.stat().st_size, 3)}
    return record, payload


def _ort_session(model: Path | bytes, what: str):
    import onnxruntime as ort

    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4  # failures come back as exceptions; do not also print them
        source = model if isinstance(model, bytes) else str(model)
        return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own (non-exported) exception types
        raise EdgekitError(f"onnxruntime cannot load {what}: {str(exc).strip().splitlines()[0]}") from exc


def _check_onnx(path: Path, model: torch.nn.Module, x: np.ndarray) -> None:
    """The fp32 ONNX loads in onnxruntime, takes a whole batch and matches torch."""
    try:
        got = _ort_session(path, "the fp32 ONNX export").run(None, {"input": x})[0]
    except Exception as exc:  # onnxruntime's own exception types
        raise EdgekitError(f"the fp32 ONNX export cannot run a batch of {len(x)} "
                           f"({str(exc).strip().splitlines()[0][:200]}); the model must not fix the batch size "
                           "(write x.flatten(1), not x.view(1, -1))") from exc
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    if got.shape != want.shape or not _close(got, want):
        raise EdgekitError(f"the ONNX export differs from the torch model (max abs diff "
                           f"{np.abs(got - want).max():.3g}); the model has an op the exporter mistranslates")


def _close(got: np.ndarray, want: np.ndarray, rel: float = 1e-3) -> bool:
    return bool(np.abs(got - want).max() <= rel * max(1.0, float(np.abs(want).max())))


def _onnx_artifact(key: str, payload: bytes, source: str) -> tuple[dict, bytes]:
    import onnx

    t0 = time.perf_counter()
    sess = _ort_session(payload, key)  # proves onnxruntime loads exactly these bytes
    record = _record(key, "onnx", source, len(payload))
    record["input"] = {**_onnx_tensor(sess.get_inputs()[0], key), "transpose": None,
                       "layout": _layout(len(sess.get_inputs()[0].shape) - 1, channels_last=False)}
    record["output"] = _onnx_tensor(sess.get_outputs()[0], key)
    ops = Counter(n.op_type for n in onnx.load_from_string(payload).graph.node)
    record["graph"] = {"ops": dict(sorted(ops.items()))}
    _progress(key, t0, len(payload))
    return record, payload


def _onnx_tensor(arg, key: str) -> dict:
    if arg.type != "tensor(float)":
        raise EdgekitError(f"{key}: {arg.name} is {arg.type}; edgekit's ONNX artifacts take and give float32")
    shape = [1, *(d if isinstance(d, int) else -1 for d in arg.shape[1:])]
    return {"name": arg.name, "shape": shape, "dtype": "float32", "scale": None, "zero_point": None}


# --- TFLite -------------------------------------------------------------------------------------------------

def _tflite_artifacts(ctx: Context, model: torch.nn.Module, work: Path, keys: list[str],
                      source: str) -> list[tuple[dict, bytes]]:
    """onnx2tf once to a float SavedModel, then one TFLite conversion per key."""
    t0 = time.perf_counter()
    static = _torch_to_onnx(model, ctx, work / "static.onnx", dynamic_batch=False)
    log = ctx.stage_dir(name) / LOG_FILE
    log.write_bytes(b"")  # this run's converter output only
    with quiet.phase(name, "onnx2tf: ONNX -> float SavedModel", "SavedModel written"):
        saved = _onnx_to_saved_model(static, work, ctx.data.calib.x, log)
    with quiet.phase(name, "TFLite converter: float model"):
        fp32 = _tflite_convert(saved, None, int8_io=False, log=log)
    reference = _ort_session(work / "fp32.onnx", "the fp32 ONNX export")
    perm = _find_transpose(fp32, reference, ctx.data.calib.x[:CHECK_SAMPLES])
    calib = ctx.data.calib.x.transpose(perm) if perm else ctx.data.calib.x
    built = []
    if any("_int8" in k for k in keys):  # the int8 models' layer-by-layer reference: same SavedModel, float
        write_bytes(ctx.stage_dir(name) / f"tflite.{source}.float-twin.tflite", fp32)
    for key in keys:
        int8_io = key.endswith("_int8io")
        payload = fp32 if key == "tflite_fp32" else _converted_int8(key, saved, calib, int8_io, log)
        built.append(_tflite_artifact(key, payload, source, perm))
        if "_int8" in key:
            built[-1][0]["float_twin"] = f"tflite.{source}.float-twin.tflite"
        _progress(key, t0, len(payload))
        t0 = time.perf_counter()
    return built


def _converted_int8(key: str, saved: Path, calib: np.ndarray, int8_io: bool, log: Path) -> bytes:
    with quiet.phase(name, f"TFLite converter: {key} (full integer, {len(calib)} calibration samples)"):
        return _tflite_convert(saved, calib, int8_io, log)


@contextlib.contextmanager
def _no_network() -> Iterator[None]:
    """Refuse every socket connect: onnx2tf must never fetch anything."""
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise OSError("edgekit export makes no network calls (a converter tried to connect)")

    with mock.patch.object(socket.socket, "connect", refuse), \
            mock.patch.object(socket.socket, "connect_ex", refuse), \
            mock.patch.object(socket, "create_connection", refuse):
        yield


def _local_sample_images(calib: np.ndarray):
    """Stands in for onnx2tf's download_test_image_data: our own calibration samples, NHWC."""
    def sample_images() -> np.ndarray:
        if calib.ndim != 4:
            raise EdgekitError("onnx2tf asked for sample images for a non-image input; report this as a bug")
        return np.ascontiguousarray(calib[:20].transpose(0, 2, 3, 1))

    return sample_images


def _onnx_to_saved_model(onnx_path: Path, work: Path, calib: np.ndarray, log: Path) -> Path:
    """onnx2tf: ONNX (static batch 1) -> float SavedModel with a serving_default signature."""
    # onnx2tf checks its translation (transposes, broadcasts) on this sample; it wants it in TensorFlow's layout
    # (channels-last) and with the static batch of 1, else the check is silently skipped or crashes (ResNet Add).
    sample = calib[:1] if calib.ndim < 3 else np.moveaxis(calib[:1], 1, -1)
    npy = work / "calib_input.npy"
    np.save(npy, np.ascontiguousarray(sample))
    saved = work / "saved_model"
    with quiet.silenced(log):
        import onnx2tf  # noqa: F401 - imports tensorflow, so only under silenced()

        module = importlib.import_module("onnx2tf.onnx2tf")
        local = mock.patch.object(module, "download_test_image_data", _local_sample_images(calib))
        with _no_network(), local:
            try:
                module.convert(input_onnx_file_path=str(onnx_path), output_folder_path=str(saved),
                               output_signaturedefs=True, non_verbose=True,
                               custom_input_op_name_np_data_path=[["input", str(npy)]])
            except SystemExit as exc:  # onnx2tf reports failures with sys.exit
                raise EdgekitError(f"onnx2tf could not convert the model (exit {exc.code}); "
                                   f"see {log}") from exc
    if not (saved / "saved_model.pb").is_file():
        raise EdgekitError(f"onnx2tf wrote no SavedModel; see {log}")
    return saved


def _tflite_convert(saved: Path, calib: np.ndarray | None, int8_io: bool, log: Path) -> bytes:
    """TensorFlow's converter: plain float, or full-int8 (builtin int8 ops only) when calib is given."""
    with quiet.silenced(log):
        import tensorflow as tf

        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
        if calib is not None:
            io_type = tf.int8 if int8_io else tf.float32
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = lambda: ([s[None].astype(np.float32)] for s in calib)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = io_type
            converter.inference_output_type = io_type
        try:
            return converter.convert()
        except Exception as exc:  # ConverterError and friends; the full text is in the log
            print(exc, file=sys.stderr)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EdgekitError(f"the TFLite converter failed: {first[:300]}; see {log}") from exc


def _interpreter(payload: bytes):
    from ai_edge_litert import interpreter as litert

    interp = litert.Interpreter(
        model_content=payload, num_threads=1,
        experimental_op_resolver_type=litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interp.allocate_tensors()
    return interp


def _run_tflite(interp, x: np.ndarray) -> np.ndarray:
    inp, outp = interp.get_input_details()[0], interp.get_output_details()[0]
    rows = []
    for sample in x:
        interp.set_tensor(inp["index"], np.ascontiguousarray(sample[None], dtype=np.float32))
        interp.invoke()
        rows.append(interp.get_tensor(outp["index"])[0].copy())
    return np.stack(rows)


def _candidate_perms(rank: int) -> list[list[int] | None]:
    """Identity or channels-last: the two layouts onnx2tf gives an input of this rank (batch included)."""
    return [None] + ([[0, *range(2, rank), 1]] if rank >= 3 else [])


def _find_transpose(fp32: bytes, reference, x: np.ndarray) -> list[int] | None:
    """The permutation from the dataset layout to the TFLite input, proven by matching onnxruntime."""
    interp = _interpreter(fp32)
    shape = tuple(int(d) for d in interp.get_input_details()[0]["shape"])
    want = reference.run(None, {"input": x})[0]
    errors = {}
    for perm in _candidate_perms(x.ndim):
        xt = x.transpose(perm) if perm else x
        if xt.shape[1:] != shape[1:]:
            continue
        got = _run_tflite(interp, xt)
        if _close(got, want):
            return perm
        errors[str(perm)] = float(np.abs(got - want).max())
    raise EdgekitError(f"the float TFLite model does not match the ONNX model for input {shape} (max abs "
                       f"diff by permutation: {errors or 'no permutation fits'}); onnx2tf mistranslated it")


def _tflite_artifact(key: str, payload: bytes, source: str, perm: list[int] | None) -> tuple[dict, bytes]:
    interp = _interpreter(payload)
    ops = _tflite_ops(interp)
    inp, outp = interp.get_input_details()[0], interp.get_output_details()[0]
    if key != "tflite_fp32":
        _assert_full_int8(ops, key)
    record = _record(key, "tflite", source, len(payload))
    layout = _layout(len(inp["shape"]) - 1, channels_last=perm is not None)
    record["input"] = {**_tensor(inp), "layout": layout, "transpose": perm}
    record["output"] = _tensor(outp)
    if {record["input"]["dtype"], record["output"]["dtype"]} != {record["io"]}:
        raise EdgekitError(f"{key}: the converter gave {record['input']['dtype']} input and "
                           f"{record['output']['dtype']} output, not {record['io']}")
    record["graph"] = {"ops": dict(sorted(Counter(op["op_name"] for op in ops).items()))}
    return record, payload


def _tensor(detail: dict) -> dict:
    dtype = np.dtype(detail["dtype"]).name
    scale, zero = detail["quantization"]
    quantized = dtype != "float32"
    return {"name": detail["name"], "shape": [int(d) for d in detail["shape"]], "dtype": dtype,
            "scale": float(scale) if quantized else None, "zero_point": int(zero) if quantized else None}


def _tflite_ops(interp) -> list[dict]:
    return interp._get_ops_details()  # noqa: SLF001 - the public API has no per-op tensor types


def _assert_full_int8(ops: list[dict], key: str) -> None:
    """Every weighted op has int8 weights and no op but the I/O (de)quantizers computes in float."""
    for op in ops:
        types = [np.dtype(t).name for t in op["operand_types"]]
        if op["op_name"] in WEIGHTED_OPS and (len(types) < 2 or types[1] != "int8"):
            raise EdgekitError(f"{key}: {op['op_name']} (op {op['index']}) has weights {types[1:2]}, "
                               "not int8")
        floats = "float32" in types or "float32" in (np.dtype(t).name for t in op["result_types"])
        if floats and op["op_name"] not in BOUNDARY_OPS:
            raise EdgekitError(f"{key}: {op['op_name']} (op {op['index']}) still computes in float, so the "
                               "model is not full-int8; replace that op or pick targets without int8 TFLite")
