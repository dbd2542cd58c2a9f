"""Where a build's time goes: wall and CPU time of the whole `edgekit build`, each stage's own seconds (from
stages/*/metrics.json), and the rest (start-up, validation, local runs, the pinned-runtime and emulated checks,
reports), for the default build and for the same model on 1x and 10x the data.

    python benchmarks/pipeline_time.py        # writes benchmarks/results/pipeline_time.json|md

Each build runs in a fresh process with the caches warm (one build first fills them); the CPU is named.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CASES = {  # name -> config (YAML text)
    "default (digits, x86-64 + rpi5)": "",
    "fashion-mnist 1 000, x86-64": "data: {source: fashion-mnist, limit: 1000}\nbuild: {targets: [x86-64]}\n",
    "fashion-mnist 10 000, x86-64": "data: {source: fashion-mnist, limit: 10000}\nbuild: {targets: [x86-64]}\n",
}


def _cpu() -> str:
    text = Path("/proc/cpuinfo").read_text()
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    flags = sorted({f for f in text.split() if f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni")})
    return f"{model}, {len(text.split('processor')) - 1} cores, flags {' '.join(flags)}"


def build(config: str, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / "c.yaml"
    cfg.write_text(config)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "edgekit", "build", str(cfg), "--out", str(work / "b")],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"build failed: {done.stderr.strip().splitlines()[-1:]}")
    stages = {p.parent.name: json.loads(p.read_text()).get("seconds", 0.0)
              for p in (work / "b" / "stages").glob("*/metrics.json")}
    in_stages = sum(stages.values())
    return {"wall_s": round(wall, 1), "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime
                                                      - before.ru_stime, 1),
            "stages_s": stages, "in_stages_s": round(in_stages, 1), "outside_stages_s": round(wall - in_stages, 1)}


def main() -> None:
    results = {"cpu": _cpu(), "date": time.strftime("%Y-%m-%d"), "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        build("", Path(tmp) / "warm-up")  # fills the pinned-runtime venvs, the sysroot, the IDX cache
        for name, config in CASES.items():
            results["cases"][name] = build(config, Path(tmp) / name)
            print(name, results["cases"][name], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pipeline_time.json").write_text(json.dumps(results, indent=2) + "\n")
    order = ["train", "prune", "distill", "quantize", "export", "verify", "bundle"]
    lines = [f"`python benchmarks/pipeline_time.py`, {results['date']}, {results['cpu']}, caches warm", "",
             "| build | wall s | CPU s | " + " | ".join(order) + " | in stages | outside stages |",
             "|---|---|---|" + "---|" * len(order) + "---|---|"]
    for name, r in results["cases"].items():
        cells = [str(r["stages_s"].get(s, "-")) for s in order]
        lines.append(f"| {name} | {r['wall_s']} | {r['cpu_s']} | " + " | ".join(cells)
                     + f" | {r['in_stages_s']} | {r['outside_stages_s']} |")
    (RESULTS / "pipeline_time.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
