"""Where a build's time goes: wall and CPU time of the whole `edgekit build`, each stage's own seconds (from
stages/*/metrics.json), and every step outside the stages, each on its own (start-up and imports, validation,
measuring the bundles, the pinned-runtime check, the qemu emulation, the reports, the rest), for the default
build and for the same model on 1x and 10x the data.

    python benchmarks/pipeline_time.py                      # all cases; writes benchmarks/results/pipeline_time.*
    python benchmarks/pipeline_time.py --cases default --repeat 3 --against /work/main/.venv/bin/python

`--against PYTHON` runs the same builds with another checkout's interpreter (its own edgekit), alternating
with this one build by build, so that the load of a shared machine hits both alike: before / after side by side.
`--cold-checks` also runs this checkout's default build with the check-result cache emptied first (every
pinned-runtime and emulated check runs again; the venvs and the sysroot stay).

Each build runs in a fresh process (benchmarks/timed_build.py) with the caches warm (one build first fills them)
and an empty stage cache of its own, so every stage runs (`--rebuild` adds one whose stage cache holds every
stage; `--cold` one with every edgekit cache empty); the CPU and the load average are named.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
DRIVER = Path(__file__).with_name("timed_build.py")
CASES = {  # name -> config (YAML text)
    "default (digits, x86-64 + rpi5)": "",
    "fashion-mnist 1 000, x86-64": "data: {source: fashion-mnist, limit: 1000}\nbuild: {targets: [x86-64]}\n",
    "fashion-mnist 10 000, x86-64": "data: {source: fashion-mnist, limit: 10000}\nbuild: {targets: [x86-64]}\n",
}
ORDER = ["train", "prune", "distill", "quantize", "export", "verify", "bundle"]
OUTSIDE = ["start-up", "validate", "measure bundles", "pinned-runtime check", "qemu emulation", "report",
           "report html", "other"]


def _cpu() -> str:
    text = Path("/proc/cpuinfo").read_text()
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    flags = sorted({f for f in text.split() if f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni")})
    return f"{model}, {len(text.split('processor')) - 1} cores, flags {' '.join(flags)}"


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def check_cache() -> Path:
    """Where edgekit caches check results (edgekit.files.cache_dir() / "checks"), without importing edgekit."""
    if os.environ.get("EDGEKIT_CACHE"):
        return Path(os.environ["EDGEKIT_CACHE"]) / "checks"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgekit" / "checks"


def _outside(steps: dict, marks: dict, wall: float, in_stages: float) -> dict:
    """Every step outside the stages, wall and CPU; `other` is what is left (the build's own bookkeeping, exit)."""
    get = {k: steps.get(k, {"wall_s": 0.0, "cpu_s": 0.0}) for k in OUTSIDE}
    start = marks.get("stages_start", 0.0)
    get["start-up"] = {"wall_s": start - get["validate"]["wall_s"],
                       "cpu_s": marks.get("cpu_at_stages_start", 0.0) - get["validate"]["cpu_s"]}
    named = sum(v["wall_s"] for k, v in get.items() if k != "other")
    get["other"] = {"wall_s": wall - in_stages - named, "cpu_s": None}
    return {k: {"wall_s": round(v["wall_s"], 2), "cpu_s": None if v["cpu_s"] is None else round(v["cpu_s"], 2)}
            for k, v in get.items()}


def build(config: str, work: Path, python: str = sys.executable, env_extra: dict | None = None) -> dict:
    """One timed build. Its stage cache is its own, empty one (every stage runs) unless env_extra names another."""
    work.mkdir(parents=True, exist_ok=True)
    cfg, steps_file = work / "c.yaml", work / "steps.json"
    cfg.write_text(config)
    load = _load()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    env = os.environ | {"EDGEKIT_BENCH_T0": repr(time.time()), "EDGEKIT_BENCH_OUT": str(steps_file),
                        "EDGEKIT_STAGE_CACHE": str(work / "stage-cache")} | (env_extra or {})
    done = subprocess.run([python, str(DRIVER), str(cfg), "--out", str(work / "b")], capture_output=True, text=True,
                          env=env, cwd=work)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"build failed: {done.stderr.strip().splitlines()[-3:]}")
    timed = json.loads(steps_file.read_text())
    records = {p.parent.name: json.loads(p.read_text()) for p in (work / "b" / "stages").glob("*/metrics.json")}
    # a stage reused from the stage cache keeps the seconds of the build that made it: it took none here
    stages = {name: 0.0 if r.get("cached_from") else r.get("seconds", 0.0) for name, r in records.items()}
    in_stages = sum(v for k, v in stages.items() if k in ORDER)  # a build whose measure/check/report are stages
    marks = timed["marks"]                                         # still counts them outside, as issue #16 does
    return {"wall_s": round(wall, 1),
            "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
            "load_before": load, "stages_s": stages, "in_stages_s": round(in_stages, 1),
            "in_stages_cpu_s": round(marks.get("cpu_at_stages_end", 0) - marks.get("cpu_at_stages_start", 0), 1),
            "outside_stages_s": round(wall - in_stages, 1),
            "outside_pct_of_stages": round(100 * (wall - in_stages) / in_stages, 1) if in_stages else None,
            "outside": _outside(timed["steps"], marks, wall, in_stages),
            "recommend_timing_in_bundle_stage": timed["steps"].get("recommend timing (in bundle stage)"),
            "calls": {k: v["calls"] for k, v in timed["steps"].items()},
            "log_tail": done.stdout.strip().splitlines()[-40:]}


def _folder(name: str) -> str:
    """Letters, digits, - and _ only: TensorFlow reads a SavedModel's path as a glob ('[after]' matches nothing)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _median(runs: list[dict]) -> dict:
    """The run with the median wall time (one real run, so its parts add up)."""
    return sorted(runs, key=lambda r: r["wall_s"])[(len(runs) - 1) // 2]


def _rows(name: str, runs: list[dict]) -> list[str]:
    med = _median(runs)
    walls = ", ".join(str(r["wall_s"]) for r in runs)
    cells = [str(med["stages_s"].get(s, "-")) for s in ORDER]
    outside = [f"{med['outside'][k]['wall_s']}" + (f" / {med['outside'][k]['cpu_s']}"
                                                   if med["outside"][k]["cpu_s"] is not None else "")
               for k in OUTSIDE]
    return [f"| {name} | {med['wall_s']} ({walls}) | {med['cpu_s']} | " + " | ".join(cells)
            + f" | {med['in_stages_s']} | {med['outside_stages_s']} ({med['outside_pct_of_stages']} %) | "
            + " | ".join(outside) + f" | {med['load_before'][0]} |"]


def markdown(results: dict) -> str:
    lines = [f"`{results['command']}`, {results['date']}, {results['cpu']}, caches warm (one build first fills "
             f"them); {results['note']}", "",
             "Wall seconds of the build with the median wall time (of an even count the faster middle one; all "
             "builds' walls in brackets); stage columns are "
             "each stage's own seconds; outside steps are wall / CPU seconds (CPU includes child processes); "
             "load = 1-min load average before the build.", "",
             "| build | wall s | CPU s | " + " | ".join(ORDER) + " | in stages | outside stages (% of stages) | "
             + " | ".join(OUTSIDE) + " | load |",
             "|---|---|---|" + "---|" * len(ORDER) + "---|---|" + "---|" * len(OUTSIDE) + "---|"]
    for name, runs in results["cases"].items():
        lines += _rows(name, runs)
    return "\n".join(lines) + "\n"


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="*", help="case names or prefixes (default: all)")
    p.add_argument("--repeat", type=int, default=1, help="builds per case (and per checkout)")
    p.add_argument("--against", help="another checkout's python: its builds alternate with this one's")
    p.add_argument("--labels", nargs=2, default=["after", "before"], help="labels of this checkout and --against")
    p.add_argument("--no-warm-up", action="store_true", help="the caches are warm already: no first build")
    p.add_argument("--cold-checks", action="store_true", help="also a default build with the check cache emptied")
    p.add_argument("--cold", action="store_true", help="also a default build with every edgekit cache empty (checks, "
                                                       "pinned-runtime venvs, qemu sysroot, data; EDGEKIT_CACHE)")
    p.add_argument("--rebuild", action="store_true", help="also a default build whose stage cache holds every stage "
                                                          "(the same config built again)")
    p.add_argument("--out", type=Path, default=RESULTS / "pipeline_time", help="results file stem")
    return p.parse_args()


def main() -> None:
    args = _args()
    chosen = {n: c for n, c in CASES.items() if not args.cases or any(n.startswith(p) for p in args.cases)}
    pythons = {args.labels[0]: sys.executable} | ({args.labels[1]: args.against} if args.against else {})
    results = {"cpu": _cpu(), "date": time.strftime("%Y-%m-%d"), "load_at_start": _load(),
               "command": "python benchmarks/pipeline_time.py " + " ".join(sys.argv[1:]),
               "note": "", "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_warm_up:  # fills the pinned-runtime venvs, the sysroot, the data and check caches (shared)
            build("", Path(tmp) / "warm-up", sys.executable)
        for i in range(args.repeat):
            for name, config in chosen.items():
                for label, python in pythons.items():
                    key = f"{name} [{label}]" if args.against else name
                    r = build(config, Path(tmp) / _folder(f"{key}-{i}"), python)
                    results["cases"].setdefault(key, []).append(r)
                    print(key, {k: r[k] for k in ("wall_s", "cpu_s", "in_stages_s", "outside_stages_s")},
                          {k: v["wall_s"] for k, v in r["outside"].items()}, flush=True)
                if not name.startswith("default"):
                    continue
                extra = []
                if args.cold_checks:
                    shutil.rmtree(check_cache(), ignore_errors=True)
                    extra.append(("check cache empty", {}))
                if args.cold:
                    extra.append(("every cache empty", {"EDGEKIT_CACHE": str(Path(tmp) / f"cold-cache-{i}")}))
                if args.rebuild:  # the stage cache of this round's first build above, which holds every stage
                    first = Path(tmp) / _folder(f"{name} [{args.labels[0]}]-{i}" if args.against else f"{name}-{i}")
                    extra.append(("stage cache warm", {"EDGEKIT_STAGE_CACHE": str(first / "stage-cache")}))
                for what, env in extra:
                    r = build(config, Path(tmp) / _folder(f"{what}-{i}"), sys.executable, env)
                    results["cases"].setdefault(f"{name} [{args.labels[0]}, {what}]", []).append(r)
                    print(what, r["wall_s"], {k: v["wall_s"] for k, v in r["outside"].items()}, flush=True)
    results["load_at_end"] = _load()
    results["note"] = f"1-min load average {results['load_at_start'][0]} at start, {results['load_at_end'][0]} at end"
    args.out.parent.mkdir(exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
