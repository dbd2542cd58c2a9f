"""Runner overhead: the runner's timed p50 against a bare invoke() loop on the same artifact, side by side.

For every artifact of a bundle, one process loads it once with the runner's `Artifact` and then alternates
R rounds of (a) a bare loop that times the runtime's own call (`interpreter.invoke()` with the input set once,
as LiteRT's benchmark_model does; `session.run(None, feed)` for onnxruntime, as onnxruntime_perf_test does)
and (b) the runner's timing loop (`time_runs` over `Artifact.model.run`, with its between-run memory sampling),
each for S seconds, so drift and frequency changes hit both alike. Reported: each side's median of per-round
p50s and the overhead (runner / bare - 1); the goal is within 3 %.

    python benchmarks/runner_overhead.py [--bundle DIR] [--rounds 6] [--seconds 1.0]

Without --bundle it builds the default pipeline into a temporary folder first (about a minute here).
Writes benchmarks/results/runner_overhead.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgekit.runner import runner

RESULTS = Path(__file__).resolve().parent / "results"
GOAL = 0.03


def bare_loop(artifact: runner.Artifact, feed, seconds: float) -> list[float]:
    """The runtime's own call and nothing else inside the timed region."""
    model = artifact.model
    if isinstance(model, runner.TfliteModel):
        model.interp.set_tensor(model.inp["index"], feed)
        call = model.interp.invoke
        args: tuple = ()
    else:
        call = model.session.run
        args = (None, feed)
    clock, samples = time.perf_counter, []
    end = clock() + seconds
    while True:
        t0 = clock()
        call(*args)
        t1 = clock()
        samples.append((t1 - t0) * 1000.0)
        if t1 >= end:
            return samples


def runner_loop(artifact: runner.Artifact, feed, seconds: float) -> list[float]:
    """Exactly what the runner's timing mode runs."""
    return runner.time_runs(artifact.model.run, feed, 0, 1, seconds, seconds * 2,
                            between=runner.MemorySampler())


def measure(bundle: Path, spec: dict, rounds: int, seconds: float, threads: int) -> dict:
    artifact = runner.Artifact(bundle / spec["file"], spec, threads)
    with np.load(bundle / "eval.npz") as f:
        feed = artifact.encode(f["x"][:1])[0]
    runner_loop(artifact, feed, 0.5)  # warm-up of both paths
    bare_loop(artifact, feed, 0.5)
    bare, ours = [], []
    for _ in range(rounds):
        bare.append(float(np.percentile(bare_loop(artifact, feed, seconds), 50)))
        ours.append(float(np.percentile(runner_loop(artifact, feed, seconds), 50)))
    b, r = statistics.median(bare), statistics.median(ours)
    return {"artifact": spec["name"], "runtime": artifact.runtime, "threads": threads,
            "bare_p50_ms": b, "runner_p50_ms": r, "overhead": r / b - 1.0,
            "bare_round_p50s_ms": bare, "runner_round_p50s_ms": ours, "within_goal": r / b - 1.0 <= GOAL}


def build_default(tmp: Path) -> Path:
    subprocess.run([sys.executable, "-m", "edgekit", "build", "--target", "x86-64", "--out", str(tmp / "b")],
                   check=True, stdout=subprocess.DEVNULL)
    return tmp / "b" / "bundles" / "x86-64"


def table(rows: list[dict]) -> str:
    lines = ["| artifact | runtime | bare invoke p50 (ms) | runner p50 (ms) | overhead |", "|---|---|---|---|---|"]
    for r in rows:
        rt = f"{r['runtime']['name']} {r['runtime']['version']}"
        lines.append(f"| {r['artifact']} | {rt} | {r['bare_p50_ms']:.5f} | {r['runner_p50_ms']:.5f} | "
                     f"{r['overhead']:+.1%} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, help="a bundle folder this machine can run (default: build one)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seconds", type=float, default=1.0, help="seconds per loop per round")
    p.add_argument("--out", type=Path, default=RESULTS / "runner_overhead.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or build_default(Path(tmp))
        manifest = json.loads((bundle / "manifest.json").read_text())
        threads = manifest["target"]["threads"]
        rows = [measure(bundle, spec, args.rounds, args.seconds, threads) for spec in manifest["artifacts"]]
    record = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "machine": platform.machine(),
              "cpu": runner.environment()["cpu"], "cores": runner.environment()["cores"], "rounds": args.rounds,
              "seconds_per_loop": args.seconds, "goal": GOAL, "artifacts": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(runner.dumps(record) + "\n")
    args.out.with_suffix(".md").write_text(table(rows) + "\n")
    print(table(rows))
    return 0 if all(r["within_goal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
