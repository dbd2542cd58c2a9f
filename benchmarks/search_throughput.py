"""Trials per hour of `edgekit search`: 1 and 2 trials at a time (Ray workers), the stage cache on and off, the
sampler minimising the measured p90 (rounds of WORKERS trials, each timed before the next is sampled) or MACs.

    python benchmarks/search_throughput.py                       # 6 trials per search on the digits demo
    python benchmarks/search_throughput.py --trials 16 --config fm.yaml --runs 2:on 2:off 1:on
    python benchmarks/search_throughput.py --runs 2:on:latency 2:on:macs   # what the rounds cost

Each search runs in a fresh process with its own empty stage cache, so what it reuses is what its trials share (a
trained model reused by every trial with the same train settings, a pruned one by those with the same prune
settings too); `off` is `edgekit search --no-stage-cache`, every trial building every stage. "Stage seconds the
cache saved" are the seconds that the reused stages took in the trial that made them (a reused stage's record
keeps them). Wall time covers building and the serialized timing phase. Results:
benchmarks/results/search_throughput.md|json, with the CPU named.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from pipeline_time import _cpu, _load  # noqa: E402 - the same CPU and load description

RESULTS = Path(__file__).parent / "results"
EDGEKIT = Path(sys.executable).with_name("edgekit")


def saved_seconds(search_dir: Path) -> float:
    """Seconds of the stages that trials reused from the cache: what those stages took where they were made."""
    total = 0.0
    for path in search_dir.glob("trials/*/build/stages/*/metrics.json"):
        record = json.loads(path.read_text())
        total += record.get("seconds", 0.0) if record.get("cached_from") else 0.0
    return total


def search(base: dict, trials: int, workers: int, cache: bool, work: Path, objective: str | None = None) -> dict:
    cfg = {**base, "search": {**base.get("search", {}), "trials": trials, **({"objective": objective} if objective
                                                                              else {})}}
    work.mkdir(parents=True)
    (work / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = os.environ | {"EDGEKIT_STAGE_CACHE": str(work / "stage-cache")}
    load, t0 = _load(), time.perf_counter()
    done = subprocess.run([str(EDGEKIT), "search", str(work / "c.yaml"), "--target", "x86-64", "--workers",
                           str(workers), "--out", str(work / "s"), *([] if cache else ["--no-stage-cache"])],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    saved = json.loads((work / "s" / "trials.json").read_text()) if (work / "s" / "trials.json").is_file() else {}
    records = saved.get("trials", [])
    finished = [r for r in records if r.get("status") == "ok"]
    reused = sum(1 for r in records if r.get("cached_stages"))
    return {"trials": trials, "workers": workers, "stage_cache": cache,
            "objective": saved.get("sampler_objectives", [None, objective])[1], "wall_s": round(wall, 1),
            "saved_by_cache_s": round(saved_seconds(work / "s"), 1),
            "trials_per_hour": round(3600 * trials / wall, 1), "exit_code": done.returncode,
            "ok_trials": len(finished), "trials_reusing_a_stage": reused, "load_before": load,
            "tail": done.stdout.strip().splitlines()[-6:] + done.stderr.strip().splitlines()[-3:]}


def markdown(res: dict) -> str:
    lines = [f"`{res['command']}`, {res['date']}, {res['cpu']}; {res['trials']} trials per search, target x86-64, "
             f"config: {res['config']}", "",
             "| trials at a time | stage cache | sampler objective | wall s | trials / hour | trials that reused a "
             "stage | stage seconds the cache saved | exit | load before |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        cache = "on" if r.get("stage_cache", True) else "off"
        lines.append(f"| {r['workers']} | {cache} | {r.get('objective') or 'macs'} | {r['wall_s']} | "
                     f"{r['trials_per_hour']} | "
                     f"{r['trials_reusing_a_stage']} | {r['saved_by_cache_s']} | {r['exit_code']} | "
                     f"{r['load_before'][0]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--config", type=Path, help="base config (default: the built-in digits demo)")
    ap.add_argument("--runs", nargs="*", default=["2:on", "1:on", "2:off"],
                    help="searches to run, each WORKERS:on|off (the stage cache)[:latency|macs] (search.objective; "
                         "default: the config's)")
    ap.add_argument("--out", type=Path, default=RESULTS / "search_throughput")
    args = ap.parse_args()
    base = yaml.safe_load(args.config.read_text()) if args.config else {}
    res = {"command": "python benchmarks/search_throughput.py " + " ".join(sys.argv[1:]), "cpu": _cpu(),
           "date": time.strftime("%Y-%m-%d"), "trials": args.trials, "config": str(args.config or "built-in demo"),
           "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.runs:
            workers, cache, objective = (run.split(":") + [None, None])[:3]
            r = search(base, args.trials, int(workers), cache != "off", Path(tmp) / run.replace(":", "-"), objective)
            res["runs"].append(r)
            print({k: v for k, v in r.items() if k != "tail"}, flush=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
