"""Device bundles: per target, the artifacts, the evaluation set, the runner and a manifest with hashes."""

from __future__ import annotations

import hashlib
import shutil
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from edgekit import __version__
from edgekit.runner import runner
from edgekit.stages.base import Context, write_json
from edgekit.targets import Target

name = "bundle"
RUNNER_SRC = Path(runner.__file__)
EVAL_FILE = "eval.npz"


def _artifact_entries(ctx: Context, target: Target) -> list[dict]:
    verified = {a["name"]: a for a in ctx.metrics("verify")["artifacts"]}
    entries = []
    for spec in target.artifacts:
        v = verified[spec.key]
        reference = {k: v[k] for k in ("accuracy", "top1_agreement", "max_abs_diff", "sqnr_db")}
        entries.append({k: v[k] for k in ("name", "file", "format", "precision", "io", "source_stage", "size_bytes",
                                          "input", "output", "graph")}
                       | {"runtime": spec.runtime, "runtime_version": spec.runtime_version, "reference": reference})
    return entries


def _manifest(ctx: Context, target: Target, entries: list[dict], files: dict[str, str]) -> dict:
    run = ctx.cfg.run
    return {
        "edgekit_version": __version__,
        "bundle_version": 1,
        "bundle_id": hashlib.sha256("".join(sorted(files.values())).encode()).hexdigest()[:16],
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "target": {"name": target.name, "description": target.description, "arch": target.arch,
                   "python": target.python, "threads": target.threads,
                   "budgets": {"memory_mb": target.memory_mb, "latency_ms": target.latency_ms},
                   "accuracy_tolerance_pp": target.accuracy_tolerance_pp},
        "primary": entries[0]["name"],
        "artifacts": entries,
        "input": {"shape": [1, *ctx.data.sample_shape], "dtype": "float32",
                  "layout": {3: "NCHW", 2: "NCL", 1: "NF"}.get(len(ctx.data.sample_shape), "N..."),
                  "note": "eval.npz holds preprocessed samples in this shape; each artifact's input.transpose "
                          "maps it to the artifact's own layout"},
        "preprocessing": ctx.data.preprocessing,
        "labels": ctx.data.labels,
        "eval": {"file": EVAL_FILE, "samples": int(len(ctx.data.test.y))},
        "run": {"warmup_runs": run.warmup_runs, "min_runs": run.min_runs, "min_seconds": run.min_seconds,
                "max_seconds": run.max_seconds},
        "files": files,
    }


def build_bundle(ctx: Context, target: Target, dest: Path) -> Path:
    """Write the bundle into a temporary folder, then move it into place and pack it."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    entries = _artifact_entries(ctx, target)
    for e in entries:
        shutil.copy2(ctx.stage_dir("export") / e["file"], tmp / e["file"])
    np.savez_compressed(tmp / EVAL_FILE, x=ctx.data.test.x, y=ctx.data.test.y)
    shutil.copy2(RUNNER_SRC, tmp / "runner.py")
    files = {p.name: runner.sha256(p) for p in sorted(tmp.iterdir())}
    for e in entries:
        e["sha256"] = files[e["file"]]
    write_json(tmp / "manifest.json", _manifest(ctx, target, entries, files))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return pack(dest)


def pack(bundle_dir: Path) -> Path:
    archive = bundle_dir.with_name(bundle_dir.name + ".tar.gz")
    tmp = archive.with_name(f".{archive.name}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(bundle_dir, arcname=bundle_dir.name)
    tmp.replace(archive)
    return archive


def run(ctx: Context) -> dict:
    out = []
    for target in ctx.targets:
        dest = ctx.out / "bundles" / target.name
        archive = build_bundle(ctx, target, dest)
        size = sum(p.stat().st_size for p in dest.iterdir())
        out.append({"target": target.name, "path": str(dest), "archive": str(archive), "size_bytes": size})
        print(f"  {target.name:<18} {dest}  ({size / 1024:.0f} KB)")
    return {"name": name, "accuracy": None, "params": None, "macs": None, "size_bytes": None, "bundles": out}
