"""Is the recommendation stable? Repeat the bundle stage's side-by-side timing on a built bundle.

Each repetition times every artifact of the bundle alternately (as `edgekit build` does, at the target's
threads unless --threads) and prints the pick by the old rule (lowest p50) and by `recommend.choose`.

    python benchmarks/recommend_repeat.py DIR/bundles/x86-64 [--runs 6] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from edgekit import config, recommend, targets
from edgekit.runner.runner import latency_stats


def repeat(folder: Path, runs: int, threads: int | None) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    (target,) = targets.get([manifest["target"]["name"]])
    x = np.load(folder / "eval.npz")["x"]
    for i in range(runs):
        samples = recommend.measure(folder, manifest["artifacts"], x, threads or target.threads, config.Config().run)
        timing = {n: latency_stats(s) for n, s in samples.items()}
        rows = recommend.candidates(manifest["artifacts"], timing, recommend.bootstrap(samples))
        pick, reason = recommend.choose(rows, samples, target.accuracy_tolerance_pp)
        ratios = " ".join(f"{r['artifact']}={r['vs_fp32']:.2f}" for r in rows if r["vs_fp32"])
        print(f"run {i + 1}: {len(next(iter(samples.values())))} rounds; p50/fp32 {ratios}; lowest p50: "
              f"{min(rows, key=lambda r: r['p50_ms'])['artifact']}; pick: {pick['artifact']} ({reason})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--threads", type=int, help="default: the target's")
    args = parser.parse_args()
    repeat(args.bundle, args.runs, args.threads)


if __name__ == "__main__":
    main()
