"""What ONNX int8 keeps of QAT: weights raw or on NNCF's grid, activation ranges recalibrated or carried from NNCF.

For each QAT quantize stage (the Fashion-MNIST compression study's QAT rows, and any `--build DIR`), the x86-64
target's ONNX int8 is made four ways with edgekit's own quantizer (edgekit.onnx_int8.quantize) and scored on the
whole test split beside NNCF's own QDQ model:
- weights raw (what edgekit saved before 2026-12-02) or as NNCF quantized them (what it saves now; taken from
  the initializers of NNCF's QDQ export, which holds the same values);
- activation ranges from onnxruntime's calibration, or NNCF's ranges written over them (TensorQuantOverrides),
  paired by value as edgekit.formats.tflite_ranges pairs them for TFLite.

    python -m benchmarks.compression_fashion        # makes the study's QAT rows (once)
    python -m benchmarks.qat_carry [--build DIR ...]

Writes benchmarks/results/qat_carry.json|md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import compression_fashion as study
from edgekit import config, onnx_int8, pipeline, targets
from edgekit.formats import onnx, tflite_ranges
from edgekit.stages.base import Context
from edgekit.stages.export import fold_linear_bn
from edgekit.stages.quantize import ONNX_FILE

RESULTS = Path(__file__).parent / "results"
STUDY_WORK = Path(tempfile.gettempdir()) / "edgekit-compression-fashion"
RANGE_SAMPLES = 64  # samples the pairing compares tensors on (the TFLite export uses as many)
TARGET = "x86-64"


def accuracy(payload: bytes, x: np.ndarray, y: np.ndarray) -> float:
    sess = onnx.session(payload, "a model under study")
    logits = np.concatenate([sess.run(None, {"input": x[i:i + 500]})[0] for i in range(0, len(x), 500)])
    return round(100 * float((logits.argmax(1) == y).mean()), 2)


def grid_weights(model, qdq) -> tuple[int, float]:
    """Load the weights NNCF's QDQ export holds (its quantized values) into `model`; how many tensors were
    replaced, and the % of raw weight values beyond their channel's largest quantized one (clipped by QAT's range)."""
    import torch
    from onnx import numpy_helper

    init = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    state = model.state_dict()
    found = [k for k, v in state.items() if f"model.{k}" in init and k.endswith("weight") and v.ndim > 1]
    clipped = total = 0
    for k in found:
        raw, grid = state[k].numpy().reshape(len(state[k]), -1), init[f"model.{k}"].reshape(len(state[k]), -1)
        top = np.abs(grid).max(1, keepdims=True)
        clipped += int((np.abs(raw) > top * (1 + 1e-6)).sum())
        total += raw.size
    model.load_state_dict({**state, **{k: torch.from_numpy(init[f"model.{k}"].copy()) for k in found}})
    return len(found), round(100 * clipped / max(1, total), 3)


def nncf_ranges(qdq_path: Path, twin: bytes, x: np.ndarray) -> tuple[dict, int, int]:
    """Float-twin tensor -> NNCF's (min, max), for every activation quantizer paired by value; paired, total."""
    import onnx as onnx_lib

    ranges = tflite_ranges.activation_ranges(onnx_lib.load(str(qdq_path)).graph)
    nncf = tflite_ranges._without_qdq(onnx_lib.load(str(qdq_path)), list(ranges))
    want = dict(zip(ranges, onnx.session(nncf.SerializeToString(), "NNCF's graph without its quantizers").run(
        list(ranges), {"input": x}), strict=True))
    model = onnx_lib.load_from_string(twin)
    names = ["input", *[o for n in model.graph.node for o in n.output]]
    sess = onnx.session(tflite_ranges._without_qdq(model, names[1:]).SerializeToString(), "the float twin")
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x}), strict=True))
    got["input"] = x
    by_index = dict(enumerate(got))
    carried, paired = {}, 0
    for name, values in want.items():
        hits = tflite_ranges.pairs(values, {i: got[n] for i, n in by_index.items()})
        paired += bool(hits)
        carried.update({by_index[i]: ranges[name] for i in hits})
    return carried, paired, len(ranges)


def measure(ctx: Context) -> dict:
    import onnx as onnx_lib

    data, qdq_path = ctx.data, ctx.stage_dir("quantize") / ONNX_FILE
    settings = next(t for t in ctx.targets if t.name == TARGET).int8
    x, y = data.test.x, data.test.y
    row = {"test_samples": len(y), "nncf_qdq": accuracy(qdq_path.read_bytes(), x, y)}
    with tempfile.TemporaryDirectory(prefix="edgekit-qat-carry-") as tmp:
        for weights in ("raw", "grid"):
            model = ctx.load_model("quantize").eval()
            if weights == "grid":
                row["weights_on_grid"], row["clipped_pct"] = grid_weights(model, onnx_lib.load(str(qdq_path)))
            fp32 = onnx.torch_to_onnx(fold_linear_bn(model), data.calib.x[:1], Path(tmp) / f"{weights}.onnx",
                                      ctx.cfg.export.opset, dynamic_batch=True)
            twin = onnx_int8.float_twin(fp32)
            ranges, paired, total = nncf_ranges(qdq_path, twin, data.calib.x[:RANGE_SAMPLES])
            row["paired"] = f"{paired}/{total}"
            for how, carried in (("recalibrated", None), ("carried", ranges)):
                payload, _ = onnx_int8.quantize(fp32, data.calib.x, settings, ranges=carried)
                row[f"{weights}_{how}"] = accuracy(payload, x, y)
    return row


def study_rows() -> dict[str, Context]:
    ds = study.load_data()
    found = {}
    for name, width in study.MODELS:
        for row in ("unpruned", "50", "70"):
            folder = STUDY_WORK / name / f"qat_{row}"
            if (folder / "stages" / "quantize" / "model.pt").is_file():
                found[f"{name} qat {row}"] = Context(study.make_cfg(name, width), ds, folder, targets.get([TARGET]))
    return found


def build_row(folder: Path) -> Context:
    cfg = config.load(folder / "config.yaml")
    return pipeline.make_context(cfg, folder, [TARGET])


def report(rows: dict, command: str) -> str:
    def gain(a: str, b: str) -> str:
        d = [r[a] - r[b] for r in rows.values()]
        return f"{statistics.mean(d):+.2f} pp (min {min(d):+.2f}, max {max(d):+.2f}, n={len(d)})"

    lines = [f"# What ONNX int8 keeps of QAT — {time.strftime('%Y-%m-%d')}, {study.cpu()}", "",
             f"`{command}`; target {TARGET} (its int8 settings); accuracy % on each row's whole test split. "
             "'raw': the weights as QAT left them; 'grid': as NNCF quantized them (clamped to the range QAT "
             "learned, rounded). A build whose model.pt the current edgekit saved holds grid weights already "
             "(raw = grid, 0 % clipped).", "",
             "| row | test n | NNCF QDQ | raw, recalibrated | raw, carried | grid, recalibrated | grid, carried "
             "| ranges paired | raw weights clipped % |", "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for key, r in rows.items():
        lines.append(f"| {key} | {r['test_samples']} | {r['nncf_qdq']:.2f} | {r['raw_recalibrated']:.2f} | "
                     f"{r['raw_carried']:.2f} | {r['grid_recalibrated']:.2f} | {r['grid_carried']:.2f} | "
                     f"{r['paired']} | {r['clipped_pct']} |")
    lines += ["", f"- grid weights vs raw (recalibrated): {gain('grid_recalibrated', 'raw_recalibrated')}",
              f"- NNCF's ranges carried vs recalibrated (grid weights): "
              f"{gain('grid_carried', 'grid_recalibrated')}",
              f"- |grid, recalibrated − NNCF QDQ| mean "
              f"{statistics.mean(abs(r['grid_recalibrated'] - r['nncf_qdq']) for r in rows.values()):.2f} pp; "
              f"|raw, recalibrated − NNCF QDQ| mean "
              f"{statistics.mean(abs(r['raw_recalibrated'] - r['nncf_qdq']) for r in rows.values()):.2f} pp"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, action="append", default=[],
                        help="an edgekit build folder whose quantize stage ran QAT (repeatable)")
    args = parser.parse_args(argv)
    contexts = {**study_rows(), **{f"build {b}": build_row(b) for b in args.build}}
    if not contexts:
        raise SystemExit(f"no QAT rows: run python -m benchmarks.compression_fashion (work: {STUDY_WORK}) or "
                         "give --build DIR")
    rows = {}
    for key, ctx in contexts.items():
        rows[key] = measure(ctx)
        print(key, rows[key], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "qat_carry.json").write_text(json.dumps(rows, indent=2))
    command = "python -m benchmarks.qat_carry" + "".join(f" --build {b}" for b in args.build)
    (RESULTS / "qat_carry.md").write_text(report(rows, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
