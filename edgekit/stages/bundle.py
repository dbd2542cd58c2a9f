"""Device bundles: per target, the artifacts, the evaluation set, the runner and a manifest with hashes."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from edgekit import __version__, formats, recommend, targets
from edgekit.files import write_json
from edgekit.runner import runner
from edgekit.stages.base import Context, always
from edgekit.targets import Target

name = "bundle"
reads = ("run", "targets", "export", "build")  # export.primary: which artifact comes first; build.run_local: timed?
needs = ("export", "verify")
enabled = always
RUNNER_SRC = Path(runner.__file__)
EVAL_FILE = "eval.npz"


def _artifact_entries(ctx: Context, target: Target) -> list[dict]:
    verified = {a["name"]: a for a in ctx.metrics("verify")["artifacts"]}
    entries = []
    first = targets.primary(target, ctx.cfg.export.primary)
    for spec in [first, *(a for a in target.artifacts if a is not first)]:
        v = verified[spec.key]
        reference = {k: v[k] for k in ("accuracy", "top1_agreement", "max_abs_diff", "sqnr_db")}
        reference["numerics"] = v.get("numerics", {}).get("name")  # how verify computed these numbers
        entries.append({k: v[k] for k in ("name", "file", "format", "precision", "io", "source_stage", "size_bytes",
                                          "input", "output", "graph")}
                       | {"runtime": spec.runtime, "runtime_version": spec.runtime_version,
                          "engine": formats.runtime(spec.runtime).engine, "reference": reference,
                          # what `edgekit search --device-results` fits device latency against
                          "macs": ctx.metrics(v["source_stage"]).get("macs")}
                       | ({"int8": _int8_record(v["int8"])} if v.get("int8") else {}))
    return entries


def _int8_record(info: dict) -> dict:
    """How an ONNX int8 artifact was quantized and what onnxruntime fused of it."""
    fusion = info["fusion"]
    return {"settings": info["settings"], "kept_float": info["kept_float"], "fused": fusion["fused"],
            "unfused_count": fusion["unfused_count"], "size_vs_fp32": info["size_vs_fp32"],
            "repair": info.get("repair")}


def _manifest(ctx: Context, target: Target, entries: list[dict], files: dict[str, str], recommended: dict) -> dict:
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
        "recommended": recommended,
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
        **_tensorrt(entries),
    }


def _tensorrt(entries: list[dict]) -> dict:
    """How the device builds its TensorRT engines: engines are specific to GPU and TensorRT version, so a
    bundle carries ONNX plus the commands, never an engine."""
    onnx_gpu = [e for e in entries if e["runtime"] == "onnxruntime-gpu"]
    if not onnx_gpu:
        return {}
    flags = {"int8": "--int8 --fp16", "fp16": "--fp16", "fp32": ""}  # int8 QDQ: explicit quantization
    commands = {e["name"]: f"trtexec --onnx={e['file']} {flags[e['precision']]} --saveEngine={e['name']}.engine "
                           f"--shapes={e['input']['name']}:{'x'.join(str(d) for d in [1, *e['input']['shape'][1:]])}"
                for e in onnx_gpu}
    return {"tensorrt": {
        "note": "build the engine on the device (not portable across GPUs / TensorRT versions)",
        "trtexec": {name: " ".join(cmd.split()) for name, cmd in commands.items()},
        "onnxruntime_tensorrt_ep": {"providers": ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
                                    "options": {"trt_int8_enable": True, "trt_fp16_enable": True,
                                                "trt_engine_cache_enable": True,
                                                "trt_engine_cache_path": "trt_cache"}},
    }}


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
    shutil.copy2(RUNNER_SRC.with_name(runner.SCHEMA_FILE), tmp / runner.SCHEMA_FILE)
    files = {p.name: runner.sha256(p) for p in sorted(tmp.iterdir())}
    for e in entries:
        e["sha256"] = files[e["file"]]
    recommended = recommend.recommend(tmp, entries, target, ctx.data.test.x, ctx.cfg.run, ctx.cfg.build.run_local)
    write_json(tmp / "manifest.json", _manifest(ctx, target, entries, files, recommended))
    readable(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return pack(dest)


def readable(folder: Path) -> None:
    """Files 0644, the folder 0755, whatever the umask or the copied files' modes: the device's user (the image's
    USER 10001) is not the one who built the bundle."""
    for path in folder.iterdir():
        path.chmod(0o644)
    folder.chmod(0o755)


def pack(bundle_dir: Path) -> Path:
    archive = bundle_dir.with_name(bundle_dir.name + ".tar.gz")
    tmp = archive.with_name(f".{archive.name}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(bundle_dir, arcname=bundle_dir.name)
    tmp.chmod(0o644)
    tmp.replace(archive)
    return archive


def damaged(ctx: Context) -> list[str]:
    """What is wrong with the finished bundles (a file edited, truncated or deleted since): --resume makes them
    again."""
    found = []
    for target in ctx.targets:
        folder = ctx.out / "bundles" / target.name
        try:
            problem = runner.file_problem(folder, json.loads((folder / "manifest.json").read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            problem = "manifest.json is missing or unreadable"
        if problem:
            found.append(f"bundles/{target.name}: {problem.split(';')[0]}")
    return found


def run(ctx: Context) -> dict:
    out = []
    for target in ctx.targets:
        dest = ctx.out / "bundles" / target.name
        archive = build_bundle(ctx, target, dest)
        size = sum(p.stat().st_size for p in dest.iterdir())
        manifest = json.loads((dest / "manifest.json").read_text())
        rec = manifest["recommended"]
        out.append({"target": target.name, "path": str(dest), "archive": str(archive), "size_bytes": size,
                    "primary": manifest["primary"], "recommended": rec})
        print(f"  {target.name:<18} {dest}  ({size / 1024:.0f} KB)")
        print(f"  {'':<18} recommended: {rec['artifact'] or '-'} ({rec['reason']})")
    return {"name": name, "bundles": out}
