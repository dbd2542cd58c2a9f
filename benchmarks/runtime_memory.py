"""Runtime memory baseline: the peak RSS of the on-device runner with a tiny model, per host runtime.

What `edgekit search`'s rule-based peak-memory estimate (edgekit/search/memory.py, BASELINE_MB) starts from: a
fresh process that loads the bundle's runner.py as a device does (standard library, numpy, one runtime), opens a
one-op model (one Relu on 1x1x8x8) with the runner's `Artifact` and runs it once, then reads the
runner's own peak_rss_mb. R fresh processes per runtime; the table gives their median and max.

    python benchmarks/runtime_memory.py [--rounds 5]

Writes benchmarks/results/runtime_memory.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
RUNNER = Path(__file__).resolve().parent.parent / "edgekit" / "runner" / "runner.py"
SHAPE = [1, 1, 8, 8]
CHILD = """
import importlib.util, json, sys
import numpy as np
spec = importlib.util.spec_from_file_location("runner", sys.argv[1])
runner = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runner)
artifact = runner.Artifact(sys.argv[2], json.loads(sys.argv[3]), threads=1)
artifact.predict(np.zeros({shape}, dtype=np.float32))
print(json.dumps({{"peak_rss_mb": runner.peak_rss_mb(), "runtime": artifact.runtime}}))
"""


def tiny_onnx(folder: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, SHAPE)
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, SHAPE)
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["logits"])], "tiny", [x], [y])
    path = folder / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def tiny_tflite(folder: Path) -> Path:
    import tensorflow as tf

    fn = tf.function(tf.nn.relu, input_signature=[tf.TensorSpec(SHAPE, tf.float32)])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
    path = folder / "tiny.tflite"
    path.write_bytes(converter.convert())
    return path


def peak(model: Path, spec: dict) -> dict:
    code = CHILD.format(shape=SHAPE)
    out = subprocess.run([sys.executable, "-c", code, str(RUNNER), str(model), json.dumps(spec)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cpu() -> dict:
    info = Path("/proc/cpuinfo").read_text().splitlines()
    name = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), "unknown")
    flags = set(next((ln.split(":", 1)[1].split() for ln in info if ln.startswith("flags")), []))
    return {"name": name, "flags": sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx_vnni"})}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="fresh processes per runtime")
    p.add_argument("--out", type=Path, default=RESULTS / "runtime_memory.json")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {"onnxruntime": (tiny_onnx(Path(tmp)), "onnx", "onnxruntime"),
                  "litert": (tiny_tflite(Path(tmp)), "tflite", "tflite")}
        for runtime, (model, fmt, engine) in models.items():
            spec = {"format": fmt, "runtime": runtime, "engine": engine, "input": {"shape": SHAPE}}
            runs = [peak(model, spec) for _ in range(args.rounds)]
            mbs = [r["peak_rss_mb"] for r in runs]
            rows.append({"runtime": runtime, "version": runs[0]["runtime"]["version"], "model_bytes":
                         model.stat().st_size, "peak_rss_mb": mbs, "median_mb": round(statistics.median(mbs), 1),
                         "max_mb": round(max(mbs), 1)})
    record = {"command": " ".join(["python benchmarks/runtime_memory.py", *sys.argv[1:]]),
              "machine": platform.machine(), "python": platform.python_version(), "cpu": cpu(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"`{record['command']}` on {record['cpu']['name']} ({', '.join(record['cpu']['flags'])}), "
             f"{record['machine']}, Python {record['python']}", "",
             "| runtime | version | tiny model bytes | peak RSS median (MB) | max (MB) |", "|---|---|---|---|---|"]
    lines += [f"| {r['runtime']} | {r['version']} | {r['model_bytes']} | {r['median_mb']} | {r['max_mb']} |"
              for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
