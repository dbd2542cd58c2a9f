"""Run every exported artifact with its runtime on the test split and compare it with its torch model.

Each artifact must meet the fidelity thresholds of every target that ships it. An int8 artifact that
misses is taken apart layer by layer (edgekit.fidelity) and the worst layers are named in the error.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from edgekit import fidelity, metrics, quiet
from edgekit.errors import FidelityError
from edgekit.runner.runner import Artifact
from edgekit.stages.base import Context, write_json

name = "verify"
HOST_RUNTIME = {"onnx": "onnxruntime", "tflite": "litert"}  # what runs each format on this build machine


def check(ctx: Context, spec: dict) -> dict:
    path = ctx.stage_dir("export") / spec["file"]
    with quiet.silenced():  # LiteRT announces its XNNPACK delegate on stderr
        artifact = Artifact(path, spec | {"runtime": HOST_RUNTIME[spec["format"]]}, threads=None)
    out = artifact.predict(ctx.data.test.x)
    fid = metrics.fidelity(ctx.reference_logits(spec["source_stage"]), out)
    return {**spec, "accuracy": metrics.accuracy(out, ctx.data.test.y), **fid,
            "verified_with": artifact.runtime}


def thresholds(ctx: Context, key: str) -> dict:
    """The strictest thresholds among the targets that ship this artifact."""
    users = [t for t in ctx.targets if any(a.key == key for a in t.artifacts)]
    return {"min_agreement": max(t.min_agreement for t in users), "min_sqnr_db": max(t.min_sqnr_db for t in users),
            "targets": [t.name for t in users]}


def misses(result: dict, limits: dict) -> list[str]:
    found = []
    if result["top1_agreement"] < limits["min_agreement"]:
        found.append(f"top-1 agreement {result['top1_agreement']:.1%} < {limits['min_agreement']:.1%}")
    if result["sqnr_db"] < limits["min_sqnr_db"]:
        found.append(f"SQNR {result['sqnr_db']:.1f} dB < {limits['min_sqnr_db']:.1f} dB")
    return found


def _float_twin_tflite(ctx: Context, work: Path) -> Path:
    """The float TFLite made the same way as the int8 one: the export's own, or made again for the debug."""
    from edgekit.stages import export

    made = ctx.stage_dir("export") / "tflite_fp32.tflite"
    if made.is_file():
        return made
    model = ctx.load_model(ctx.latest_model_stage(before="quantize")).eval()
    static = export._torch_to_onnx(model, ctx, work / "static.onnx", dynamic_batch=False)
    log = work / "convert.log"
    saved = export._onnx_to_saved_model(static, work, ctx.data.calib.x, log)
    path = work / "fp32.tflite"
    path.write_bytes(export._tflite_convert(saved, None, int8_io=False, log=log))
    return path


def localise(ctx: Context, spec: dict) -> list[dict]:
    """Layer-wise comparison of an int8 artifact with its float twin, worst layer first."""
    path = ctx.stage_dir("export") / spec["file"]
    perm = spec["input"].get("transpose")
    x = ctx.data.test.x.transpose(perm) if perm else ctx.data.test.x
    if spec["format"] == "onnx":
        return fidelity.onnx_layers(str(path), x)
    with tempfile.TemporaryDirectory(prefix="edgekit-debug-") as tmp:
        return fidelity.tflite_layers(str(path), str(_float_twin_tflite(ctx, Path(tmp))), x)


def report_miss(ctx: Context, result: dict, limits: dict, found: list[str]) -> str:
    """Write fidelity/<artifact>.json and return the one-line message."""
    layers = localise(ctx, result) if result["precision"] == "int8" else []
    write_json(ctx.out / "fidelity" / f"{result['name']}.json",
               {"artifact": result["name"], "misses": found, "thresholds": limits,
                "metrics": {k: result[k] for k in ("accuracy", "top1_agreement", "max_abs_diff", "sqnr_db")},
                "layers": layers})
    worst = (f"; worst layer {layers[0]['layer']} (SQNR {layers[0]['sqnr_db']:.1f} dB, "
             f"drop {layers[0]['drop_db']:.1f} dB, float range {layers[0]['ref_range']})") if layers else ""
    return (f"artifact {result['name']} misses fidelity against its torch model ({result['source_stage']}): "
            f"{', '.join(found)}{worst}; details: edgekit debug {ctx.out} --artifact {result['name']} "
            "(--allow-fidelity-miss keeps going)")


def run(ctx: Context) -> dict:
    checked = []
    for spec in ctx.metrics("export")["artifacts"]:
        result = check(ctx, spec)
        limits = thresholds(ctx, spec["name"])
        result["fidelity_thresholds"] = limits
        print(f"  {result['name']:<20} accuracy {result['accuracy']:.4f}  agreement {result['top1_agreement']:.4f}  "
              f"SQNR {result['sqnr_db']:.1f} dB")
        found = misses(result, limits)
        result["fidelity_miss"] = bool(found)
        if found:
            message = report_miss(ctx, result, limits, found)
            if not ctx.cfg.build.allow_fidelity_miss:
                raise FidelityError(message)
            print(f"  warning: {message}")
        checked.append(result)
    return {"name": name, "accuracy": None, "params": None, "macs": None, "size_bytes": None,
            "artifacts": checked}
