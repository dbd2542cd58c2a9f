"""Check every bundle before it ships: each artifact loaded and run by the bundle's runner with the runtime
version its target pins (an isolated venv here), and an aarch64 bundle also under qemu (edgekit.device.bundle_check).
The verdicts go into the report; a runtime that cannot run an artifact fails the build there."""

from __future__ import annotations

from pathlib import Path

from edgekit.device import bundle_check
from edgekit.files import cache_dir
from edgekit.stages.base import Context, always

name = "check"
reads = ("targets",)
needs = ("bundle",)
enabled = always


def run(ctx: Context) -> dict:
    print(f"  each artifact with the runtime version its target pins (isolated, cached under {cache_dir()})")
    checked = {b["target"]: bundle_check.verify_bundle(Path(b["path"]), None) for b in ctx.metrics("bundle")["bundles"]}
    return {"name": name, "bundles": checked}
