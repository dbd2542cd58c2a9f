"""Does the build's side-by-side timing agree with the runner's? Repeat both on one built bundle.

Each repetition times every artifact of the bundle three ways, the order of the ways rotating:
- `runner`: the bundle's runner in its own process, one artifact at a time (what `edgekit run` reports, and
  what a deployed model sees);
- `single`: one process, one inference of each artifact per round (the build's way before blocks);
- `blocks`: one process, a block of consecutive inferences per artifact per round after SETTLE_S of quiet
  (`recommend.measure`, the build's way at more than one thread).
It prints and writes every artifact's p50 / p90 per way (the median over repetitions), each way's p90 over the
runner's, and the pick `recommend.choose` makes from the single and block samples.

    python -m benchmarks.side_by_side DIR/bundles/x86-64 [--runs 5] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from edgekit import config, quiet, recommend, targets
from edgekit.device import measure as device
from edgekit.runner.runner import Artifact, environment, latency_stats

RESULTS = Path(__file__).parent / "results"


def _in_process(folder: Path, entries: list[dict], x: np.ndarray, threads: int, blocks: bool) -> dict:
    run = config.Config().run
    with quiet.silenced():
        arts = {e["name"]: Artifact(folder / e["file"], e, threads) for e in entries}
    return recommend.alternate(arts, x, warmup=run.warmup_runs, min_rounds=run.min_runs, min_s=run.min_seconds,
                               max_s=run.max_seconds, blocks=blocks)


def _pick(samples: dict, entries: list[dict], tolerance_pp: float) -> str:
    timing = {n: latency_stats(s) for n, s in samples.items()}
    rows = recommend.candidates(entries, timing, recommend.bootstrap(samples))
    pick, reason = recommend.choose(rows, samples, tolerance_pp)
    return f"{pick['artifact']} ({reason})"


def repeat(folder: Path, runs: int, threads: int) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    (target,) = targets.get([manifest["target"]["name"]])
    entries, x = manifest["artifacts"], np.load(folder / "eval.npz")["x"]
    ways = ["runner", "single", "blocks"]
    got: dict[str, dict[str, list]] = {w: {e["name"]: [] for e in entries} for w in ways}
    picks: dict[str, list[str]] = {"single": [], "blocks": []}
    load_before = [round(v, 2) for v in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(runs):
            for way in ways[i % 3:] + ways[:i % 3]:
                t0 = time.perf_counter()
                if way == "runner":
                    for e in entries:
                        r = device.run_bundle(folder, Path(tmp) / "r.json", [e["name"]], threads, log=lambda _: None)
                        lat = r["artifacts"][e["name"]]["latency_ms"]
                        got[way][e["name"]].append((lat["p50"], lat["p90"]))
                else:
                    samples = _in_process(folder, entries, x, threads, blocks=way == "blocks")
                    for name, s in samples.items():
                        st = latency_stats(s)
                        got[way][name].append((st["p50"], st["p90"]))
                    picks[way].append(_pick(samples, entries, target.accuracy_tolerance_pp))
                print(f"run {i + 1}/{runs} {way} ({time.perf_counter() - t0:.1f} s): "
                      + ", ".join(f"{n} {v[-1][0]:.4f}/{v[-1][1]:.4f}" for n, v in got[way].items()), flush=True)
    med = {w: {n: [statistics.median(v[0] for v in vals), statistics.median(v[1] for v in vals)]
               for n, vals in by.items()} for w, by in got.items()}
    return {"bundle": str(folder), "target": target.name, "threads": threads, "runs": runs,
            "load_before_after": [load_before, [round(v, 2) for v in os.getloadavg()]], "environment": environment(),
            "median_p50_p90_ms": med, "every_run": got, "picks": picks}


def report(result: dict, command: str) -> str:
    env, med = result["environment"], result["median_p50_p90_ms"]
    lines = [f"# Side-by-side timing against the runner — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{env['cpu']}, {env['cores']} cores, load (1/5/15 min) {result['load_before_after'][0]} before and "
             f"{result['load_before_after'][1]} after", "",
             f"`{command}`; target {result['target']} at {result['threads']} threads, {result['runs']} repetitions "
             "(the ways' order rotating); medians over the repetitions. runner = the bundle's runner, one artifact "
             "per process (what `edgekit run` reports); single = one inference per artifact per round in one "
             "process; blocks = consecutive inferences per artifact per round after a settle (the build's way at "
             "more than one thread).", "",
             "| artifact | runner p50 / p90 ms | single p50 / p90 ms | blocks p50 / p90 ms | single p90 / runner p90 "
             "| blocks p90 / runner p90 |", "|---|---:|---:|---:|---:|---:|"]
    for name, (rp50, rp90) in med["runner"].items():
        s, b = med["single"][name], med["blocks"][name]
        lines.append(f"| {name} | {rp50:.4f} / {rp90:.4f} | {s[0]:.4f} / {s[1]:.4f} | {b[0]:.4f} / {b[1]:.4f} | "
                     f"{s[1] / rp90:.2f} | {b[1] / rp90:.2f} |")
    lines += ["", "Picks (`recommend.choose`) per repetition:", ""]
    for way, picks in result["picks"].items():
        lines += [f"- {way}: " + "; ".join(picks)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, help="default: the target's")
    parser.add_argument("--out", type=Path, default=RESULTS / "side_by_side")
    args = parser.parse_args(argv)
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    threads = args.threads or targets.get([manifest["target"]["name"]])[0].threads
    result = repeat(args.bundle, args.runs, threads)
    command = "python -m benchmarks.side_by_side BUNDLE" + (f" --runs {args.runs}" if args.runs != 5 else "") + (
        f" --threads {args.threads}" if args.threads else "")
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(report(result, command))
    print(report(result, command))


if __name__ == "__main__":
    main()
