"""What the default pruning costs on Fashion-MNIST: one-shot to the ratio (the old default) against pruning in
rounds, with and without the accuracy guard that stops where validation accuracy falls past the tolerance.

Trains the default model once (the train stage, default config) on a Fashion-MNIST subset, then runs the prune
stage from that same trained model with each variant and records validation / test accuracy, MACs kept and
which round the guard kept. Only the prune stage differs between rows.

    .venv/bin/python benchmarks/prune_guard.py [--limit 8000]   # writes benchmarks/results/prune_guard.{json,md}
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgekit import config, targets  # noqa: E402
from edgekit.data import load_dataset  # noqa: E402
from edgekit.stages import prune, train  # noqa: E402
from edgekit.stages.base import Context  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
OUT_NAME = ["prune_guard"]
NEW = "4 rounds + guard, 6 fine-tuning epochs per round (new default: finetune_epochs 24, round_to 8)"
VARIANTS = {  # prune section over the defaults; round_to 1: no rounding (the old default had none)
    NEW: {},
    "4 rounds + guard, finetune_epochs 6 (2+2+1+1)": {"finetune_epochs": 6},
    "one shot, no guard, no rounding, finetune_epochs 6 (old default)": {"steps": 1, "accuracy_guard": False,
                                                                          "round_to": 1, "finetune_epochs": 6},
    "4 rounds, no guard (round_to 8)": {"accuracy_guard": False},
}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def save(result: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    name = result.get("out_name", "prune_guard")
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"{name}.md").write_text(markdown(result))


def run(limit: int, target: str, trained_dir: Path | None, only: list[str], earlier: Path | None) -> dict:
    chosen = targets.get([target])
    base_cfg = config.from_dict({"data": {"source": "fashion-mnist", "limit": limit}})
    data = load_dataset(base_cfg)
    work = Path(tempfile.mkdtemp(prefix="edgekit-prune-guard-"))
    ctx = Context(base_cfg, data, work / "base", chosen)
    t0 = time.perf_counter()
    if trained_dir:  # a train stage folder of an earlier run with the same data and config
        shutil.copytree(trained_dir, ctx.stage_dir("train"), dirs_exist_ok=True)
        trained = json.loads((trained_dir / "metrics.json").read_text())
    else:
        trained = train.run(ctx)
        (ctx.stage_dir("train") / "metrics.json").write_text(json.dumps(trained))
    rows = [{"variant": "unpruned fp32 (train stage)", "test_accuracy": trained["accuracy"],
             "val_accuracy": trained["val_accuracy"], "macs_kept": 1.0, "seconds": time.perf_counter() - t0}]
    result = {"limit": limit, "target": target, "tolerance_pp": chosen[0].accuracy_tolerance_pp,
              "samples": {"train": len(data.train.y), "val": len(data.val.y), "test": len(data.test.y)},
              "cpu": cpu_name(), "date": time.strftime("%Y-%m-%d"), "rows": rows, "out_name": OUT_NAME[0],
              "command": " ".join([".venv/bin/python benchmarks/prune_guard.py", *sys.argv[1:]])}
    if earlier:  # rows of an earlier run from the same trained model (--trained): kept, not run again
        rows += [r for r in json.loads(earlier.read_text())["rows"][1:] if r["variant"] not in only]
    for label, over in VARIANTS.items():
        if only and label not in only:
            continue
        cfg = config.from_dict({"data": {"source": "fashion-mnist", "limit": limit}, "prune": over})
        out = work / str(len(rows))
        shutil.copytree(ctx.stage_dir("train"), out / "stages" / "train")
        t0 = time.perf_counter()
        m = prune.run(Context(cfg, data, out, chosen))
        rows.append({"variant": label, "prune": over, "test_accuracy": m["accuracy"], "val_accuracy": m["val_accuracy"],
                     "macs_kept": m["macs_kept"], "kept": m["kept"], "rounds": m["rounds"],
                     "seconds": time.perf_counter() - t0})
        save(result)  # after every row: a long run that is stopped keeps what it measured
        print(f"{label}: test {m['accuracy']:.4f} val {m['val_accuracy']:.4f} MACs kept {m['macs_kept']:.3f}",
              flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return result


def markdown(result: dict) -> str:
    base = result["rows"][0]
    lines = [f"`{result.get('command', 'benchmarks/prune_guard.py')}`, {result['date']}, "
             f"{result['cpu']}; Fashion-MNIST {result['samples']}, default config (small_cnn, ratio 0.5), "
             f"target {result['target']} (accuracy_tolerance_pp {result['tolerance_pp']:g}); only the prune stage "
             "differs, every row starts from the same trained model.", "",
             "| variant | MACs kept | val acc | test acc | test vs unpruned (pp) | kept round | prune s |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        kept = f"{r['kept']['round']} of {r['kept']['of']}" if r.get("kept") else "-"
        lines.append(f"| {r['variant']} | {r['macs_kept']:.3f} | {r['val_accuracy']:.4f} | {r['test_accuracy']:.4f} | "
                     f"{100 * (r['test_accuracy'] - base['test_accuracy']):+.2f} | "
                     f"{kept} | {r['seconds']:.0f} |")
    lines.append("")
    for r in result["rows"][1:]:
        lines.append(f"- {r['variant']}: {r['kept']['reason']}; rounds (val loss pp): "
                     + ", ".join(f"{x.get('val_loss_pp', 100 * (base['val_accuracy'] - x['val_accuracy'])):+.2f}"
                                 for x in r["rounds"]))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=8000)
    ap.add_argument("--target", default="x86-64")
    ap.add_argument("--trained", type=Path, help="reuse this train stage folder (same --limit and defaults)")
    ap.add_argument("--only", nargs="*", default=[], help="run only these variants (labels)")
    ap.add_argument("--earlier", type=Path, help="keep the other rows of this earlier result json")
    ap.add_argument("--out-name", default="prune_guard", help="results file name (without suffix)")
    args = ap.parse_args()
    OUT_NAME[0] = args.out_name
    result = run(args.limit, args.target, args.trained, args.only, args.earlier)
    save(result)
    print(markdown(result))


if __name__ == "__main__":
    main()
