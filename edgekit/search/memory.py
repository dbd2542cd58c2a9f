"""Peak memory (peak RSS) of a trial that is not measured (no --host, a target this machine cannot run): estimated,
like its p90 latency (edgekit.search.latency).

With `--device-results`, from the results of the trial's runtime among them (read by `latency.load`: the runner's
peak_rss_mb, and from the bundle's manifest each artifact's runtime and file size): least squares
peak = a + b * file MB when there are at least `latency.MIN_LINE_POINTS` results with different file sizes, else an
offset: peak = a + file MB, a the mean of (peak - file MB) (the runtime holds the file once).

Without results of that runtime, a rule: the runtime's baseline (`BASELINE_MB`: the runner with a one-op model)
plus the file's MB plus the largest activation tensor (its shape carries the batch the runner feeds: the
manifest's input shape), from the artifact's own tensor shapes (ONNX shape inference, the TFLite flatbuffer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgekit.search.latency import MIN_LINE_POINTS, Point

MB = 2**20  # the runner's peak_rss_mb is KiB / 1024
# (peak RSS MB, where it comes from): the runner's peak RSS with a one-op model, python + numpy + the runtime
BASELINE_MB = {
    "onnxruntime": (56.8, "benchmarks/runtime_memory.py here (x86_64, onnxruntime 1.23.0)"),
    "litert": (46.9, "benchmarks/runtime_memory.py here (x86_64, LiteRT 2.1.0)"),
    "tflite-runtime": (46.9, "LiteRT's (the same interpreter; tflite-runtime is not installed here)"),
    # not measurable here (no GPU): a CUDA context and its libraries alone; onnxruntime issues #4184 (Jetson Nano,
    # CUDAExecutionProvider, a 1 MB model: about 1 GB) and #5801 (Ubuntu x86, MobileNet 9 MB: 330 MB of RAM)
    "onnxruntime-gpu": (1000.0, "onnxruntime issues #4184 and #5801 (CUDA EP on Jetson: about 1 GB)"),
}
UNKNOWN_RUNTIME_MB = (BASELINE_MB["onnxruntime"][0], "onnxruntime's (a runtime with no baseline of its own)")


@dataclass(frozen=True)
class Estimate:
    peak_rss_mb: float
    source: str  # what trials.json/csv, the plot and the console show
    how: str  # the model, in words


def fit(points: list[Point], runtime: str) -> tuple[float, float, int, str] | None:
    """(a, b, points used, in words) of peak MB = a + b * file MB over this runtime's results; None without any."""
    import numpy as np

    use = [p for p in points if p.runtime == runtime and p.peak_rss_mb is not None and p.size_bytes is not None]
    if not use:
        return None
    x = np.array([p.size_bytes / MB for p in use])
    y = np.array([p.peak_rss_mb for p in use])
    what = f"{len(use)} {runtime} results"
    if len(use) >= MIN_LINE_POINTS and len(set(x)) >= 2:
        b, a = np.polyfit(x, y, 1)
        if b >= 0 and a >= 0:  # a peak that falls with the file size, or below 0 MB, is noise: the offset is safer
            return float(a), float(b), len(use), f"peak = {a:.4g} MB + {b:.4g} x file MB, least squares over {what}"
    a = float((y - x).mean())
    return a, 1.0, len(use), f"peak = {a:.4g} MB + file MB, the mean offset over {what}"


def estimate(artifact: Path, runtime: str, points: list[Point] | None) -> Estimate:
    """The peak RSS of running `artifact` (a file in its trial's bundle) with `runtime` on the target."""
    file_mb = artifact.stat().st_size / MB
    fitted = fit(points or [], runtime)
    if fitted is not None:
        a, b, n, how = fitted
        return Estimate(round(a + b * file_mb, 1), f"estimated (fitted to {n} device results)", how)
    base, where = BASELINE_MB.get(runtime, UNKNOWN_RUNTIME_MB)
    arena = largest_activation_bytes(artifact) / MB
    why = f"no {runtime} device results: " if points else ""
    how = (f"{why}{runtime} baseline {base:g} MB ({where}) + file {file_mb:.2f} MB + largest activation "
           f"{arena:.2f} MB (pass --device-results or --host to replace this rule)")
    return Estimate(round(base + file_mb + arena, 1), "estimated (rule)", how)


def largest_activation_bytes(path: Path) -> int:
    """Bytes of the model's largest tensor that is not a constant (inputs, outputs, intermediates)."""
    return max(_onnx_activations(path) if path.suffix == ".onnx" else _tflite_activations(path), default=0)


def _onnx_activations(path: Path) -> list[int]:
    import numpy as np
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    graph = model.graph
    constants = {t.name for t in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    sizes = []
    for value in [*graph.input, *graph.value_info, *graph.output]:
        tensor = value.type.tensor_type
        if value.name in constants or not tensor.elem_type:
            continue
        count = int(np.prod([d.dim_value or 1 for d in tensor.shape.dim]))  # a symbolic dim (dim_param): 1
        sizes.append(count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).itemsize)
    return sizes


# the TFLite schema's TensorType -> bytes per element
TFLITE_BYTES = {0: 4, 1: 2, 2: 4, 3: 1, 4: 8, 6: 1, 7: 2, 8: 8, 9: 1, 10: 8, 11: 16, 12: 8, 15: 4, 16: 2}


def _tflite_activations(path: Path) -> list[int]:
    """Tensors whose buffer holds no data (the interpreter's arena plans them)."""
    import numpy as np

    from edgekit.quiet import silenced

    with silenced():  # TensorFlow's import banner
        from tensorflow.lite.tools import flatbuffer_utils

        model = flatbuffer_utils.read_model(str(path))
    sizes = []
    for graph in model.subgraphs:
        for t in graph.tensors:
            data = model.buffers[t.buffer].data if t.buffer < len(model.buffers) else None
            if data is None or len(data) == 0:
                shape = [] if t.shape is None else [max(int(d), 1) for d in t.shape]  # -1 (dynamic): 1
                sizes.append(int(np.prod(shape)) * TFLITE_BYTES.get(t.type, 4))
    return sizes
