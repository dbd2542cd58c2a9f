"""TFLite: fp32 and full-integer int8 artifacts, run by LiteRT or tflite-runtime.

onnx2tf turns the checked fp32 ONNX (static batch 1) into a float SavedModel once; TensorFlow's own converter
makes each artifact from it, with a representative dataset from the calibration split for int8.

Activation ranges of a quantized build: the converter would recalibrate every activation from the calibration
split and so throw away what QAT learned (onnx2tf cannot take NNCF's QDQ ONNX instead: it drops each
QuantizeLinear -> DequantizeLinear pair). So int8 from the quantize stage is made in two steps: the converter
calibrates (min/max per tensor, in the float flatbuffer), the ranges of the tensors NNCF quantized are replaced
by NNCF's (scale, zero point of its QDQ export), and the converter's quantizer makes the int8 model from those.
Tensors are paired by value (edgekit.formats.tflite_ranges): NNCF's graph without its quantizers and the
calibrated float TFLite model run on the same samples, and an NNCF activation quantizer's input pairs with the
TFLite tensor clearly closest to it (layout aside). Weights are quantized by the converter (per channel, max |w|
of the QAT-tuned weights). `activation_ranges` in the artifact record says how many ranges were carried.

onnx2tf turns channels-first inputs channels-last; the permutation from the dataset's layout to the artifact's
input is recorded as `input.transpose` and proven by running the float model against onnxruntime.

Nothing here touches the network: onnx2tf's download of a sample image is replaced by local data and every
socket connect is refused while it runs.
"""

from __future__ import annotations

import contextlib
import importlib
import re
import socket
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import numpy as np

from edgekit import formats, quiet
from edgekit.errors import EdgekitError
from edgekit.files import write_bytes
from edgekit.formats import onnx
from edgekit.formats.tflite_ranges import CarriedRanges, carried_ranges

FORMAT = formats.register(formats.Format(
    name="tflite", suffix="tflite", precisions=("fp32", "int8"), order=10, host_runtime="litert", int8_io=True,
    exporter="edgekit.formats.tflite:export",
    runtimes=(formats.Runtime("litert", "ai-edge-litert", "tflite"),
              # tflite-runtime wheels are built against numpy 1.x
              formats.Runtime("tflite-runtime", "tflite-runtime", "tflite", numpy="numpy<2"))))
STAGE = "export"  # the stage whose folder holds the converter log and the float twin
LOG_FILE = "convert.log"  # what onnx2tf and the TFLite converter printed, for when they fail
# layers onnx2tf cannot convert from torch's ONNX: GroupNorm exports as Reshape, InstanceNormalization, Reshape,
# and onnx2tf 1.29 fails on it with 1, 4 and all-channel groups alike (InstanceNorm2d alone converts)
UNCONVERTIBLE = ("GroupNorm",)


def check_convertible(model, chosen: list, what: str) -> None:
    """Before the build starts: a model with a layer the TFLite path cannot convert, for targets that ship
    TFLite, is a one-line error now rather than a failed export after the training."""
    shipping = [t.name for t in chosen if any(a.format == FORMAT.name for a in t.artifacts)]
    bad = [f"layer '{name}' ({type(m).__name__})" for name, m in model.named_modules()
           if type(m).__name__ in UNCONVERTIBLE]
    if shipping and bad:
        from edgekit.errors import ModelError

        raise ModelError(f"{what} has {', '.join(bad)}, which the TFLite export (onnx2tf) cannot convert for the "
                         f"TFLite artifacts of {', '.join(shipping)}: use BatchNorm2d there, or build for a target "
                         "whose profile ships ONNX only (jetson-orin-nano, or a copy of a target's YAML without its "
                         "tflite artifacts)")
WEIGHTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "CONV_3D")
BOUNDARY_OPS = ("QUANTIZE", "DEQUANTIZE")  # float <-> int8 at the edges of a float-I/O int8 model
RANGE_SAMPLES = 8  # calibration samples that pair NNCF's quantizers with TFLite tensors


TRIAL_SECTION = "tflite-converts"  # cache_dir()/<this>/: graphs the float TFLite conversion was seen to take


def check_converts(model, samples: np.ndarray, chosen: list, what: str, structure: str, opset: int) -> None:
    """For targets that ship TFLite: convert the untrained model to a float TFLite before training (onnx2tf and
    TensorFlow's converter, in a child process so that TensorFlow's threads never live in the process that forks
    the training workers), so a layer they cannot convert (a GRU, an exact GELU's Erf) is one line now, not an
    error after the training. Passes are remembered per graph (`structure`, edgekit.stages.keys) and library
    versions: some seconds, once per model."""
    import hashlib
    import subprocess
    import tempfile

    from edgekit.errors import ModelError
    from edgekit.files import cache_dir, cached_record, store_record
    from edgekit.versions import library_versions

    shipping = [t.name for t in chosen if any(a.format == FORMAT.name for a in t.artifacts)]
    versions = {k: v for k, v in library_versions().items() if k in ("onnx2tf", "tensorflow", "torch", "onnx")}
    key = hashlib.sha256(f"{structure} {opset} {sorted(versions.items())}".encode()).hexdigest()[:32]
    if not shipping or cached_record(TRIAL_SECTION, key):
        return
    print(f"checking that {what} converts to TFLite (once per model graph) ...", flush=True)
    log = cache_dir() / TRIAL_SECTION / f"{key}.log"
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # an unwritable cache is no error (nothing is remembered then): the log goes to the temp folder
        log = Path(tempfile.gettempdir()) / f"edgekit-tflite-trial-{key}.log"
    with tempfile.TemporaryDirectory(prefix="edgekit-trial-") as tmp:
        onnx.torch_to_onnx(model, samples[:1], Path(tmp) / "static.onnx", opset, dynamic_batch=False)
        np.save(Path(tmp) / "samples.npy", samples)
        proc = subprocess.run([sys.executable, "-m", __name__, tmp, str(log)], capture_output=True, text=True)
        said = Path(tmp) / "error.txt"
        why = said.read_text() if said.is_file() else \
            (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    if proc.returncode != 0:
        ship = f"{', '.join(shipping)} ship{'' if len(shipping) > 1 else 's'}"
        raise ModelError(f"{what} cannot be converted to TFLite, which {ship}: {why}; build for a target whose "
                         "profile ships ONNX only (jetson-orin-nano, or a copy of a target's YAML without its tflite "
                         "artifacts), or replace that layer")
    store_record(TRIAL_SECTION, key, {"what": what, "versions": versions})


def _trial(folder: Path, log: Path) -> None:
    """The child of check_converts: the float conversion the export stage will make, on the untrained model."""
    from edgekit.errors import first_line

    samples = np.load(folder / "samples.npy")
    try:
        convert(onnx_to_saved_model(folder / "static.onnx", folder, samples, log), None, int8_io=False, log=log)
    except Exception as exc:  # onnx2tf raises what Keras or TensorFlow raised
        said = str(exc) if isinstance(exc, EdgekitError) else \
            f"onnx2tf failed: {type(exc).__name__}: {first_line(exc)}; see {log}"
        (folder / "error.txt").write_text(" ".join(said.split()))
        raise SystemExit(1) from None


def export(job: formats.ExportJob, specs: list) -> list[tuple[dict, bytes]]:
    """onnx2tf once to a float SavedModel, then one TFLite conversion per artifact."""
    ctx, source = job.ctx, job.source
    t0 = time.perf_counter()
    static = onnx.torch_to_onnx(job.model, ctx.data.calib.x[:1], job.work / "static.onnx", ctx.cfg.export.opset,
                                dynamic_batch=False)
    log = ctx.stage_dir(STAGE) / LOG_FILE
    log.write_bytes(b"")  # this run's converter output only
    with quiet.phase(STAGE, "onnx2tf: ONNX -> float SavedModel", "SavedModel written"):
        saved = onnx_to_saved_model(static, job.work, ctx.data.calib.x, log)
    with quiet.phase(STAGE, "TFLite converter: float model"):
        fp32 = convert(saved, None, int8_io=False, log=log)
    reference = onnx.session(job.fp32_onnx, "the fp32 ONNX export")
    perm = find_transpose(fp32, reference, ctx.data.calib.x[:formats.CHECK_SAMPLES])
    calib = ctx.data.calib.x.transpose(perm) if perm else ctx.data.calib.x
    built = []
    twin = f"tflite.{source}.float-twin.tflite"  # the int8 models' layer-by-layer reference: same SavedModel
    if any(s.precision == "int8" for s in specs):
        write_bytes(ctx.stage_dir(STAGE) / twin, fp32)
    ranges = carried_ranges(ctx, source, ctx.data.calib.x[:RANGE_SAMPLES]) if any(
        s.precision == "int8" for s in specs) else None
    for spec in specs:
        int8_io = spec.io == "int8"
        payload = fp32 if spec.precision == "fp32" else _converted_int8(spec.key, saved, calib, int8_io, log, ranges)
        built.append(artifact(spec, payload, source, perm))
        if spec.precision == "int8":
            built[-1][0]["float_twin"] = twin
            built[-1][0]["activation_ranges"] = ranges.describe() if ranges else "TFLite converter calibration"
        formats.progress(spec.key, t0, len(payload))
        t0 = time.perf_counter()
    return built


def _converted_int8(key: str, saved: Path, calib: np.ndarray, int8_io: bool, log: Path,
                    ranges: CarriedRanges | None) -> bytes:
    with quiet.phase(STAGE, f"TFLite converter: {key} (full integer, {len(calib)} calibration samples)"):
        return convert(saved, calib, int8_io, log, ranges)


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


def onnx_to_saved_model(onnx_path: Path, work: Path, calib: np.ndarray, log: Path) -> Path:
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


def convert(saved: Path, calib: np.ndarray | None, int8_io: bool, log: Path,
            ranges: CarriedRanges | None = None) -> bytes:
    """TensorFlow's converter: plain float, or full-int8 (builtin int8 ops only) when calib is given; with
    `ranges`, calibrate only, impose the carried activation ranges, then quantize."""
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
            # what TFLiteConverter.convert does in one go, split at the calibrated model (its own private switch)
            converter._experimental_calibrate_only = ranges is not None  # noqa: SLF001
        try:
            if ranges is None:
                return converter.convert()
            from tensorflow.lite.python.convert import mlir_quantize

            calibrated = ranges.impose(converter.convert(), calib[:RANGE_SAMPLES])
            return bytes(mlir_quantize(calibrated, input_data_type=io_type, output_data_type=io_type))
        except Exception as exc:  # ConverterError and friends; the full text is in the log
            print(exc, file=sys.stderr)
            raise EdgekitError(f"the TFLite converter failed: {_converter_reason(exc)}; see {log}") from exc


def _converter_reason(exc: Exception) -> str:
    """The converter's reason in a few words: the TensorFlow ops TFLite has no builtin for (its MLIR error buries
    them in call-site locations), else the first line of what it said."""
    text = str(exc).strip()
    missing = sorted(set(re.findall(r"'tf\.(\w+)' op is neither a custom op nor a flex op", text)))
    if missing:
        hint = " (nn.GELU() exports Erf: use nn.GELU(approximate='tanh'))" if "Erf" in missing else ""
        return f"TFLite has no builtin op for TensorFlow's {', '.join(missing)}{hint}"
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def interpreter(payload: bytes):
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


def find_transpose(fp32: bytes, reference, x: np.ndarray) -> list[int] | None:
    """The permutation from the dataset layout to the TFLite input, proven by matching onnxruntime."""
    interp = interpreter(fp32)
    shape = tuple(int(d) for d in interp.get_input_details()[0]["shape"])
    want = reference.run(None, {"input": x})[0]
    errors = {}
    for perm in _candidate_perms(x.ndim):
        xt = x.transpose(perm) if perm else x
        if xt.shape[1:] != shape[1:]:
            continue
        got = _run_tflite(interp, xt)
        if onnx.close(got, want):
            return perm
        errors[str(perm)] = float(np.abs(got - want).max())
    raise EdgekitError(f"the float TFLite model does not match the ONNX model for input {shape} (max abs "
                       f"diff by permutation: {errors or 'no permutation fits'}); onnx2tf mistranslated it")


def artifact(spec, payload: bytes, source: str, perm: list[int] | None) -> tuple[dict, bytes]:
    interp = interpreter(payload)
    ops = _tflite_ops(interp)
    inp, outp = interp.get_input_details()[0], interp.get_output_details()[0]
    if spec.precision == "int8":
        assert_full_int8(ops, spec.key)
    rec = formats.record(spec, source, len(payload))
    layout = formats.layout(len(inp["shape"]) - 1, channels_last=perm is not None)
    rec["input"] = {**_tensor(inp), "layout": layout, "transpose": perm}
    rec["output"] = _tensor(outp)
    if {rec["input"]["dtype"], rec["output"]["dtype"]} != {rec["io"]}:
        raise EdgekitError(f"{spec.key}: the converter gave {rec['input']['dtype']} input and "
                           f"{rec['output']['dtype']} output, not {rec['io']}")
    rec["graph"] = {"ops": dict(sorted(Counter(op["op_name"] for op in ops).items()))}
    return rec, payload


def _tensor(detail: dict) -> dict:
    dtype = np.dtype(detail["dtype"]).name
    scale, zero = detail["quantization"]
    quantized = dtype != "float32"
    return {"name": detail["name"], "shape": [int(d) for d in detail["shape"]], "dtype": dtype,
            "scale": float(scale) if quantized else None, "zero_point": int(zero) if quantized else None}


def _tflite_ops(interp) -> list[dict]:
    return interp._get_ops_details()  # noqa: SLF001 - the public API has no per-op tensor types


def assert_full_int8(ops: list[dict], key: str) -> None:
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


if __name__ == "__main__":  # check_converts' child: python -m edgekit.formats.tflite FOLDER LOG
    _trial(Path(sys.argv[1]), Path(sys.argv[2]))
