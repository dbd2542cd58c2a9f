"""Training throughput (samples/s): edgekit's training loop against a plain torch loop, same model and data.

Data: Fashion-MNIST (`data.source: fashion-mnist`, a subset), whose training split edgekit keeps memory-mapped
(data.Rows over the IDX file, read batch by batch). Model: the default small_cnn. Every variant trains the same
model from the same initial weights with Adam at the same batch size:

- plain torch: the split read into memory as one float32 tensor, `DataLoader(TensorDataset, shuffle=True)`,
  forward / backward / step, nothing else; and the same loop slicing whole batches from the tensors (no
  DataLoader, the leanest loop there is);
- edgekit: `training.fit` on the memory-mapped split, `data.workers` 0 and 2; and on the same split read into
  memory (what the in-memory sources get). Its epochs include what fit always does: the validation pass, keeping
  the best weights, the cosine schedule and the progress bar.

Variants alternate (one epoch-run each per round, the order rotating) so load on a shared machine hits all alike;
the median over rounds is reported, of wall time and of this process's CPU time. torch runs 1 thread.

    .venv/bin/python benchmarks/train_throughput.py [--limit 8000] [--rounds 3] [--epochs 1]
    # writes benchmarks/results/train_throughput.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgekit import config, models, training  # noqa: E402
from edgekit.data import Split, load_dataset  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BATCH, LR = 64, 3e-3


def plain_torch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=True)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    model.train()
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()


def plain_indexed(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    """The leanest plain loop: whole batches sliced from in-memory tensors, no DataLoader."""
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(BATCH):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


def variants(limit: int) -> tuple[dict, int]:
    cfgs = {w: config.from_dict({"data": {"source": "fashion-mnist", "limit": limit, "workers": w}}) for w in (0, 2)}
    streamed = {w: load_dataset(cfg) for w, cfg in cfgs.items()}
    ds = streamed[0]
    in_memory = Split(np.asarray(ds.train.x), ds.train.y)
    x, y = torch.from_numpy(in_memory.x), torch.from_numpy(in_memory.y)
    torch.manual_seed(0)
    initial = models.build_model(cfgs[0], ds.sample_shape, ds.num_classes)

    def fit(split: Split):
        return lambda model, epochs: training.fit(model, split, ds.val, epochs=epochs, lr=LR, batch_size=BATCH)

    runs = {
        "plain torch loop (in memory, DataLoader)": lambda model, epochs: plain_torch(model, x, y, epochs),
        "plain torch loop (in memory, batches sliced from tensors)": lambda model, e: plain_indexed(model, x, y, e),
        "edgekit fit, memory-mapped, workers 0": fit(streamed[0].train),
        "edgekit fit, memory-mapped, workers 2": fit(streamed[2].train),
        "edgekit fit, in memory": fit(in_memory),
    }
    return {name: (run, initial) for name, run in runs.items()}, len(ds.train.y)


def measure(limit: int, rounds: int, epochs: int) -> dict:
    torch.set_num_threads(1)  # every variant alike; fewer threads fighting over a shared 2-core machine
    runs, n_train = variants(limit)
    names = list(runs)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            run, initial = runs[name]
            model = copy.deepcopy(initial)
            t0, c0 = time.perf_counter(), time.process_time()
            run(model, epochs)
            seconds[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            print(f"round {r + 1}: {name}: {n_train * epochs / seconds[name][-1]:.0f} samples/s", flush=True)
    med = {n: float(np.median(s)) for n, s in seconds.items()}
    med_cpu = {n: float(np.median(s)) for n, s in cpu.items()}
    plain, plain_cpu = min(med[n] for n in names[:2]), min(med_cpu[n] for n in names[:2])  # the faster plain loop
    rows = [{"variant": n, "seconds": seconds[n], "cpu_seconds": cpu[n], "samples_per_s": n_train * epochs / med[n],
             "vs_plain": plain / med[n], "samples_per_cpu_s": n_train * epochs / med_cpu[n],
             "vs_plain_cpu": plain_cpu / med_cpu[n]} for n in names]
    return {"limit": limit, "train_samples": n_train, "epochs_per_run": epochs, "rounds": rounds, "batch": BATCH,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cpu": cpu_name(),
            "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "rows": rows}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def markdown(result: dict, command: str) -> str:
    lines = [f"`{command}`, {result['date']}, {result['cpu']}, {result['cores']} cores (shared with other jobs), "
             f"torch {result['torch']} ({result['torch_threads']} threads); Fashion-MNIST, {result['train_samples']} "
             f"training samples, small_cnn, batch {result['batch']}, {result['epochs_per_run']} epoch per run, median "
             f"of {result['rounds']} alternating rounds.", "",
             "| variant | samples/s (wall) | vs the faster plain loop | samples per CPU-s | vs the faster plain loop "
             "| wall s per run | CPU s per run |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {r['samples_per_s']:.0f} | {r['vs_plain']:.2f}x | "
                     f"{r['samples_per_cpu_s']:.0f} | {r['vs_plain_cpu']:.2f}x | "
                     + ", ".join(f"{s:.1f}" for s in r["seconds"]) + " | "
                     + ", ".join(f"{s:.1f}" for s in r["cpu_seconds"]) + " |")
    lines.append("")
    lines.append("CPU s: this process's CPU time (`time.process_time`); the workers-2 row's reads happen in worker "
                 "processes, which it does not count. On a machine shared with other jobs CPU time varies less than "
                 "wall time.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=8000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1)
    args = ap.parse_args()
    result = measure(args.limit, args.rounds, args.epochs)
    command = " ".join([".venv/bin/python benchmarks/train_throughput.py", *sys.argv[1:]])
    result["command"] = command
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_throughput.json").write_text(json.dumps(result, indent=1))
    (RESULTS / "train_throughput.md").write_text(markdown(result, command))
    print(markdown(result, command))


if __name__ == "__main__":
    main()
