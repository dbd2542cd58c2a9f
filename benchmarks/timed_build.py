"""One `edgekit build` with every step outside the stages timed (wall and CPU, children included).

Run by `benchmarks/pipeline_time.py` in a fresh process, with any checkout's python (its own edgekit is imported):

    EDGEKIT_BENCH_T0=<time.time() at launch> EDGEKIT_BENCH_OUT=steps.json python timed_build.py CONFIG --out DIR

It wraps module functions that exist in every edgekit of this series (nothing in edgekit is changed) and writes
{step: {wall_s, cpu_s, calls}} plus the moments the stages started and ended. `startup` is the launch up to the
first stage (interpreter, imports, config, `validate`); `exit` is the interpreter's teardown, measured by the
caller as its wall time minus `end`.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

T0 = float(os.environ.get("EDGEKIT_BENCH_T0", time.time()))
STEPS: dict[str, dict] = {}
MARKS: dict[str, float] = {}
# step -> (module, function): the entry points of each part outside the stages (and the timing inside bundle)
WRAPPED = {
    "validate": ("edgekit.pipeline", "validate"),
    "recommend timing (in bundle stage)": ("edgekit.recommend", "recommend"),
    "measure bundles": ("edgekit.device.measure", "run_bundle"),
    "pinned-runtime check": ("edgekit.device.runtime_check", "check_bundle"),
    "qemu emulation": ("edgekit.device.emulate", "verify_bundle"),
    "report": ("edgekit.report", "build_report"),
    "report html": ("edgekit.report_html", "write"),
}


def cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(step: str, fn):
    def wrapper(*args, **kwargs):
        w0, c0 = time.time(), cpu()
        try:
            return fn(*args, **kwargs)
        finally:
            s = STEPS.setdefault(step, {"wall_s": 0.0, "cpu_s": 0.0, "calls": 0})
            s["wall_s"] += time.time() - w0
            s["cpu_s"] += cpu() - c0
            s["calls"] += 1
    return wrapper


def install() -> None:
    import importlib

    for step, (module, name) in WRAPPED.items():
        mod = importlib.import_module(module)
        if hasattr(mod, name):
            setattr(mod, name, timed(step, getattr(mod, name)))
    pipeline = importlib.import_module("edgekit.pipeline")
    run_stages = pipeline.run_stages

    def marked(*args, **kwargs):
        MARKS["stages_start"], MARKS["cpu_at_stages_start"] = time.time() - T0, cpu()
        try:
            return run_stages(*args, **kwargs)
        finally:
            MARKS["stages_end"], MARKS["cpu_at_stages_end"] = time.time() - T0, cpu()
    pipeline.run_stages = marked


def main() -> int:
    MARKS["python_started"] = time.time() - T0
    from edgekit import cli  # edgekit's own start-up: quiet.setup, the CLI's imports

    MARKS["cli_imported"] = time.time() - T0
    install()
    code = cli.main(["build", *sys.argv[1:]])
    MARKS["end"], MARKS["cpu_at_end"] = time.time() - T0, cpu()
    steps = {k: {"wall_s": round(v["wall_s"], 2), "cpu_s": round(v["cpu_s"], 2), "calls": v["calls"]}
             for k, v in STEPS.items()}
    with open(os.environ.get("EDGEKIT_BENCH_OUT", "steps.json"), "w") as f:
        json.dump({"steps": steps, "marks": {k: round(v, 2) for k, v in MARKS.items()}}, f, indent=2)
    return code


if __name__ == "__main__":
    sys.exit(main())
