"""Data-parallel training throughput: `train.workers` 1 against 2 (edgekit/ddp.py), samples/s per wall second and
per CPU second.

Data: Fashion-MNIST (`data.source: fashion-mnist`, a slice; its training split memory-mapped, read batch by
batch). Model: the default small_cnn. Each run is `training.fit` for one epoch from the same initial weights
(Adam, batch 64, with fit's validation pass), in three variants:

- 1 process, torch on every core (train.workers: 1, today's default);
- 1 process, 1 thread (what each data-parallel worker runs: the per-CPU reference);
- 2 workers, 1 thread each (train.workers: 2; forked, gloo all-reduce).

CPU seconds count this process and its finished children (the workers; getrusage RUSAGE_CHILDREN). Variants
alternate, the order rotating, and the median over rounds is reported. A 0-epoch 2-worker fit runs first: the
first data-parallel fit in a process imports torch._dynamo (seconds, once), which no round should carry.

    .venv/bin/python benchmarks/ddp_throughput.py [--limit 6000] [--rounds 3]
    # writes benchmarks/results/ddp_throughput.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgekit import config, models, training  # noqa: E402
from edgekit.data import load_dataset  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BATCH, LR = 64, 3e-3
CORES = len(os.sched_getaffinity(0))
VARIANTS = {  # name -> (train.workers, torch threads of this process)
    f"1 process, {CORES} threads (train.workers: 1)": (1, CORES),
    "1 process, 1 thread": (1, 1),
    "2 workers, 1 thread each (train.workers: 2)": (2, 1),
}


def cpu() -> dict:
    info = Path("/proc/cpuinfo").read_text().splitlines()
    name = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), "unknown")
    flags = set(next((ln.split(":", 1)[1].split() for ln in info if ln.startswith("flags")), []))
    return {"name": name, "cores": CORES, "flags": sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx_vnni"})}


def cpu_seconds() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def measure(limit: int, rounds: int) -> dict:
    cfg = config.from_dict({"data": {"source": "fashion-mnist", "limit": limit}})
    ds = load_dataset(cfg)
    torch.manual_seed(0)
    initial = models.build_model(cfg, ds.sample_shape, ds.num_classes)
    training.fit(copy.deepcopy(initial), ds.train, ds.val, epochs=0, lr=LR, batch_size=BATCH, workers=2)  # warm
    n = len(ds.train.y)
    names = list(VARIANTS)
    wall: dict[str, list[float]] = {v: [] for v in names}
    cpu_s: dict[str, list[float]] = {v: [] for v in names}
    val: dict[str, list[float]] = {v: [] for v in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            workers, threads = VARIANTS[name]
            torch.set_num_threads(threads)
            model = copy.deepcopy(initial)
            t0, c0 = time.perf_counter(), cpu_seconds()
            acc = training.fit(model, ds.train, ds.val, epochs=1, lr=LR, batch_size=BATCH, workers=workers)
            wall[name].append(time.perf_counter() - t0)
            cpu_s[name].append(cpu_seconds() - c0)
            val[name].append(acc)
            print(f"round {r + 1}: {name}: {n / wall[name][-1]:.0f} samples/s, val {acc:.3f}", flush=True)
    rows = [{"variant": v, "workers": VARIANTS[v][0], "threads_per_process": VARIANTS[v][1],
             "wall_seconds": wall[v], "cpu_seconds": cpu_s[v], "val_accuracy": val[v],
             "samples_per_s": n / float(np.median(wall[v])), "samples_per_cpu_s": n / float(np.median(cpu_s[v]))}
            for v in names]
    return {"limit": limit, "train_samples": n, "val_samples": len(ds.val.y), "rounds": rounds, "batch": BATCH,
            "torch": torch.__version__, "cpu": cpu(), "load_average_before": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d"), "rows": rows}


def markdown(result: dict, command: str) -> str:
    c = result["cpu"]
    lines = [f"`{command}`, {result['date']}, {c['name']} ({', '.join(c['flags'])}), {c['cores']} cores shared "
             f"with other jobs (load average {result['load_average_before'][0]:.1f} before), torch "
             f"{result['torch']}; Fashion-MNIST, {result['train_samples']} training samples, small_cnn, batch "
             f"{result['batch']}, 1 epoch per run (with fit's validation pass), median of {result['rounds']} "
             "alternating rounds.", "",
             "| variant | samples/s (wall) | samples per CPU-s | wall s per run | CPU s per run | val accuracy |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {r['samples_per_s']:.0f} | {r['samples_per_cpu_s']:.0f} | "
                     + ", ".join(f"{s:.1f}" for s in r["wall_seconds"]) + " | "
                     + ", ".join(f"{s:.1f}" for s in r["cpu_seconds"]) + " | "
                     + ", ".join(f"{a:.3f}" for a in r["val_accuracy"]) + " |")
    rate = {r["workers"] * 10 + r["threads_per_process"]: r["samples_per_s"] for r in result["rows"]}
    all_cores = rate[10 + result["cpu"]["cores"]]
    lines += ["", f"2 workers against 1 process on all cores: {rate[21] / all_cores:.2f}x the samples/s; against 1 "
              f"process on 1 thread: {rate[21] / rate[11]:.2f}x. A second worker pays only with a core free for it: "
              "on a machine whose load is above its core count (as here, when the load average is above "
              f"{result['cpu']['cores']}) it does not, and the gloo all-reduce, the forks and the workers' "
              "idle wait while worker 0 validates cost CPU time. Validation accuracies after one epoch are not a "
              "quality comparison: early training is sensitive (1 against all threads alone moves it), and each "
              "worker's BatchNorm normalises with half the batch (tests/test_ddp.py states the tolerance).", "",
              "CPU s: this process plus its finished children (the workers). Each worker computes on one "
              "thread (edgekit/ddp.py: OpenMP cannot be used in a forked child once the parent has used it)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=6000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    result = measure(args.limit, args.rounds)
    command = " ".join([".venv/bin/python benchmarks/ddp_throughput.py", *sys.argv[1:]])
    result["command"] = command
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ddp_throughput.json").write_text(json.dumps(result, indent=1))
    (RESULTS / "ddp_throughput.md").write_text(markdown(result, command))
    print(markdown(result, command))


if __name__ == "__main__":
    main()
