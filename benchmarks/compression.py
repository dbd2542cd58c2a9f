"""Compression side by side: pruning methods at 50 % MACs, KD losses, PTQ calibrations, QAT, exported artifacts.

Runs edgekit's own stages (train, prune, distill, quantize, export, verify) in per-variant build folders, on
both built-in tasks and several zoo models, and writes a markdown table and the raw rows:

    .venv/bin/python -m benchmarks.compression --out benchmarks/results

Every variant starts from the same trained model (copied stage folder), so the rows differ only in the step
named. The KD study (student with vs without KD, same epochs, three seeds) runs on the first combination of
each task.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from edgekit import config, data, metrics, quiet, targets, training
from edgekit.stages import distill, export, prune, quantize, train, verify
from edgekit.stages.base import METRICS_FILE, Context, write_json

COMBOS = [  # task, model section, epochs (train, finetune/kd)
    ("digits", {"name": "small_cnn", "width": 16}, (12, 6)),
    ("digits32", {"name": "small_cnn", "width": 8}, (8, 4)),
    ("digits", {"name": "resnet8", "width_mult": 0.5}, (12, 6)),
    ("digits32", {"name": "resnet8", "width_mult": 0.5}, (8, 4)),
]
PRUNE = [("l1", "local"), ("l1", "global"), ("slimming", "global"), ("taylor", "local"), ("random", "local")]
KD = [["soft"], ["feature"], ["relation"], ["soft", "feature", "relation"]]
CALIBRATIONS = ["minmax", "percentile", "entropy"]
SEEDS = [0, 1, 2]
MIXED_TOLERANCE = 0.005  # keep layers float until PTQ val accuracy is within 0.5 pp of the float model


def make_cfg(task: str, model: dict, epochs: tuple[int, int], **sections: dict) -> config.Config:
    e_train, e_tune = epochs
    raw = {"data": {"source": task, "copies": 2}, "model": model,
           "train": {"epochs": e_train, "lr": 3e-3},
           "prune": {"target_macs": 0.5, "finetune_epochs": e_tune, "sparsity_epochs": 3, "sparsity_strength": 1e-3},
           "distill": {"epochs": e_tune}, "quantize": {"qat_epochs": 2, "subset_size": 128}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return config.from_dict(raw)


def stage(ctx: Context, module) -> dict:
    with quiet.silenced(None):
        result = module.run(ctx)
    write_json(ctx.stage_dir(module.name) / METRICS_FILE, result)
    return result


def fork(src: Path, dst: Path, stages: list[str]) -> Path:
    for s in stages:
        shutil.copytree(src / "stages" / s, dst / "stages" / s)
    return dst


def onnx_int8_accuracy(ctx: Context) -> tuple[float, int]:
    import onnxruntime as ort

    path = ctx.stage_dir("quantize") / quantize.ONNX_FILE
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = np.concatenate([sess.run(None, {"input": ctx.data.test.x[i:i + 256]})[0]
                          for i in range(0, len(ctx.data.test.x), 256)])
    return metrics.accuracy(out, ctx.data.test.y), path.stat().st_size


def artifacts(ctx: Context) -> dict:
    """Export and check each artifact of the context's targets: size and accuracy on the test split.

    An export that fails is reported (empty cells, the error in the JSON rows), not fatal for the run.
    """
    try:
        stage(ctx, export)
    except Exception as exc:  # noqa: BLE001 - a converter failure is a result of the benchmark
        return {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    found = {}
    for spec in json.loads((ctx.stage_dir("export") / export.ARTIFACT_FILE).read_text()):
        with quiet.silenced(None):
            checked = verify.check(ctx, spec)
        found[spec["name"]] = (checked["accuracy"], spec["size_bytes"])
    return found


def row(task: str, model: dict, variant: str, m: dict, **extra) -> dict:
    return {"task": task, "model": model["name"], "variant": variant, "accuracy": m.get("accuracy"),
            "params": m.get("params"), "macs": m.get("macs"), **extra}


def run_combo(task: str, model: dict, epochs: tuple[int, int], ds: data.Dataset, work: Path, seeds: bool,
              log) -> list[dict]:
    rows: list[dict] = []
    cfg = make_cfg(task, model, epochs)
    base = Context(cfg, ds, work / "base", targets.get(["rpi5"]))
    t0 = time.perf_counter()
    fp32 = stage(base, train)
    arts = artifacts(base)
    none = (None, None)
    rows.append(row(task, model, "fp32 baseline", fp32, tflite_bytes=arts.get("tflite_fp32", none)[1],
                    tflite_acc=arts.get("tflite_fp32", none)[0], export_error=arts.get("error")))
    rows.append(row(task, model, "fp32 + TFLite int8 PTQ (TF converter)", fp32,
                    tflite_bytes=arts.get("tflite_int8_int8io", none)[1],
                    tflite_acc=arts.get("tflite_int8_int8io", none)[0]))
    log(f"{task}/{model['name']}: baseline {fp32['accuracy']:.4f} ({time.perf_counter() - t0:.0f} s)")
    for method, scope in PRUNE:
        c = make_cfg(task, model, epochs, prune={"method": method, "scope": scope})
        ctx = Context(c, ds, fork(base.out, work / f"prune_{method}_{scope}", ["train"]), [])
        m = stage(ctx, prune)
        rows.append(row(task, model, f"prune {method} ({scope}) 50% MACs + FT", m, macs_kept=m["macs_kept"]))
    log(f"{task}/{model['name']}: pruning done ({time.perf_counter() - t0:.0f} s)")
    pruned = work / "prune_l1_local"
    best = None
    for losses in KD:
        c = make_cfg(task, model, epochs, distill={"losses": losses})
        ctx = Context(c, ds, fork(pruned, work / f"kd_{'_'.join(losses)}", ["train", "prune"]), [])
        m = stage(ctx, distill)
        rows.append(row(task, model, f"l1 + KD {'+'.join(losses)}", m))
        if best is None or m["val_accuracy"] > best[1]["val_accuracy"]:
            best = (ctx.out, m, losses)
    log(f"{task}/{model['name']}: KD done ({time.perf_counter() - t0:.0f} s)")
    kd_dir, _, kd_losses = best
    for calib in CALIBRATIONS:
        c = make_cfg(task, model, epochs, distill={"losses": kd_losses},
                     quantize={"method": "ptq", "calibration": calib})
        ctx = Context(c, ds, fork(kd_dir, work / f"ptq_{calib}", ["train", "prune", "distill"]), [])
        m = stage(ctx, quantize)
        acc, size = onnx_int8_accuracy(ctx)
        rows.append(row(task, model, f"l1 + KD {'+'.join(kd_losses)} + PTQ {calib}", m, onnx_bytes=size,
                        onnx_acc=acc))
    c = make_cfg(task, model, epochs, distill={"losses": kd_losses},
                 quantize={"method": "ptq", "mixed_precision_tolerance": MIXED_TOLERANCE})
    ctx = Context(c, ds, fork(kd_dir, work / "ptq_mixed", ["train", "prune", "distill"]), [])
    m = stage(ctx, quantize)
    acc, size = onnx_int8_accuracy(ctx)
    kept = m["mixed_precision"]["kept_float"]
    rows.append(row(task, model, f"l1 + KD + PTQ minmax, mixed precision ({len(kept)} layers float)", m,
                    onnx_bytes=size, onnx_acc=acc, kept_float=kept))
    c = make_cfg(task, model, epochs, distill={"losses": kd_losses}, quantize={"method": "qat"})
    ctx = Context(c, ds, fork(kd_dir, work / "qat", ["train", "prune", "distill"]), targets.get(["x86-64"]))
    m = stage(ctx, quantize)
    arts = artifacts(ctx)
    none = (None, None)
    rows.append(row(task, model, f"l1 + KD {'+'.join(kd_losses)} + QAT (final)", m,
                    onnx_bytes=arts.get("onnx_int8", none)[1], onnx_acc=arts.get("onnx_int8", none)[0],
                    tflite_bytes=arts.get("tflite_int8", none)[1], tflite_acc=arts.get("tflite_int8", none)[0],
                    export_error=arts.get("error")))
    log(f"{task}/{model['name']}: quantization done ({time.perf_counter() - t0:.0f} s)")
    if seeds:
        rows.append(kd_seed_study(task, model, epochs, ds, pruned, work))
    return rows


def kd_seed_study(task: str, model: dict, epochs: tuple[int, int], ds: data.Dataset, pruned: Path,
                  work: Path) -> dict:
    """The l1-pruned student trained the same epochs with and without soft-target KD, three seeds."""
    cfg = make_cfg(task, model, epochs)
    ctx = Context(cfg, ds, pruned, [])
    teacher = ctx.load_model("train")
    accs: dict[str, list[float]] = {"ce": [], "kd": []}
    for seed in SEEDS:
        for kind in accs:
            student = ctx.load_model("prune")
            loss = training.cross_entropy
            if kind == "kd":
                loss = distill.Objective(student, [teacher], ["soft"])
            with quiet.silenced(None):
                training.fit(student, ds.train, ds.val, epochs=epochs[1], lr=1e-3, batch_size=64, seed=seed,
                             loss_fn=loss)
            accs[kind].append(metrics.accuracy(metrics.logits(student, ds.test.x), ds.test.y))
    stats = {k: (statistics.mean(v), statistics.stdev(v)) for k, v in accs.items()}
    return {"task": task, "model": model["name"], "variant": "KD seed study (pruned student, same epochs)",
            "kd_mean": stats["kd"][0], "kd_std": stats["kd"][1], "ce_mean": stats["ce"][0],
            "ce_std": stats["ce"][1], "seeds": SEEDS, "raw": accs}


def _fmt(v, kind: str) -> str:
    if v is None:
        return ""
    return {"acc": f"{100 * v:.2f}", "int": f"{v:,}", "kb": f"{v / 1024:.1f}"}[kind]


def table(rows: list[dict]) -> str:
    lines = ["| task | model | variant | acc % | params | MACs | ONNX KB | ONNX acc % | TFLite KB | TFLite acc % |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "kd_mean" in r:
            continue
        lines.append(f"| {r['task']} | {r['model']} | {r['variant']} | {_fmt(r['accuracy'], 'acc')} | "
                     f"{_fmt(r['params'], 'int')} | {_fmt(r['macs'], 'int')} | {_fmt(r.get('onnx_bytes'), 'kb')} | "
                     f"{_fmt(r.get('onnx_acc'), 'acc')} | {_fmt(r.get('tflite_bytes'), 'kb')} | "
                     f"{_fmt(r.get('tflite_acc'), 'acc')} |")
    lines += ["", "| task | model | pruned student, CE only (mean ± std) | same + KD soft (mean ± std) |",
              "| --- | --- | ---: | ---: |"]
    for r in rows:
        if "kd_mean" in r:
            lines.append(f"| {r['task']} | {r['model']} | {100 * r['ce_mean']:.2f} ± {100 * r['ce_std']:.2f} | "
                         f"{100 * r['kd_mean']:.2f} ± {100 * r['kd_std']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--combos", type=int, nargs="*", help="indices into COMBOS (default: all)")
    ap.add_argument("--append", action="store_true", help="add to the rows already in OUT/compression.json")
    ap.add_argument("--no-seeds", action="store_true", help="skip the three-seed KD study")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = [COMBOS[i] for i in args.combos] if args.combos else COMBOS
    saved = out / "compression.json"
    rows: list[dict] = json.loads(saved.read_text()) if args.append and saved.is_file() else []
    datasets: dict[str, data.Dataset] = {}
    t0 = time.perf_counter()
    seen_tasks: set[str] = {t for t, _, _ in COMBOS} if args.no_seeds else set()
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-") as tmp:
        for i, (task, model, epochs) in enumerate(chosen):
            if task not in datasets:
                datasets[task] = data.load_dataset(make_cfg(task, model, epochs))
            rows += run_combo(task, model, epochs, datasets[task], Path(tmp) / str(i), task not in seen_tasks,
                              log=lambda s: print(f"[{time.perf_counter() - t0:6.0f} s] {s}", flush=True))
            seen_tasks.add(task)
            (out / "compression.json").write_text(json.dumps(rows, indent=2, default=float))
            (out / "compression.md").write_text(table(rows))
    print(table(rows))
    print(f"total {time.perf_counter() - t0:.0f} s; rows in {out / 'compression.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


