"""Run each bundle this machine can run with its on-device runner: latency, peak memory, accuracy.

A bundle for another CPU architecture is measured on its device with `edgekit run` (over SSH with --host).
The results are also written into each bundle as results.json.
"""

from __future__ import annotations

from edgekit.config import Config
from edgekit.device import measure
from edgekit.stages.base import Context

name = "measure"
reads = ("run", "targets")
needs = ("bundle",)


def enabled(cfg: Config) -> bool:
    return cfg.build.run_local


def run(ctx: Context) -> dict:
    runs = {}
    for target in ctx.targets:
        if target.runs_here:
            runs[target.name] = measure.run_bundle(ctx.out / "bundles" / target.name)
        else:
            print(f"  {target.name}: {target.arch} bundle, not runnable on this machine; measure it on the device "
                  "with `edgekit run`")
    return {"name": name, "runs": runs}
