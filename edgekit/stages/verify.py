"""Run every exported artifact with its runtime on the test split and compare it with its torch model."""

from __future__ import annotations

from edgekit import metrics, quiet
from edgekit.errors import EdgekitError
from edgekit.runner.runner import Artifact
from edgekit.stages.base import Context

name = "verify"
HOST_RUNTIME = {"onnx": "onnxruntime", "tflite": "litert"}  # what runs each format on this build machine
MIN_AGREEMENT = 0.95  # below this the artifact is not the model that was validated


def check(ctx: Context, spec: dict) -> dict:
    path = ctx.stage_dir("export") / spec["file"]
    with quiet.silenced():  # LiteRT announces its XNNPACK delegate on stderr
        artifact = Artifact(path, spec | {"runtime": HOST_RUNTIME[spec["format"]]}, threads=None)
    out = artifact.predict(ctx.data.test.x)
    fid = metrics.fidelity(ctx.reference_logits(spec["source_stage"]), out)
    return {**spec, "accuracy": metrics.accuracy(out, ctx.data.test.y), **fid,
            "verified_with": artifact.runtime}


def run(ctx: Context) -> dict:
    checked = [check(ctx, spec) for spec in ctx.metrics("export")["artifacts"]]
    for a in checked:
        print(f"  {a['name']:<20} accuracy {a['accuracy']:.4f}  agreement {a['top1_agreement']:.4f}  "
              f"SQNR {a['sqnr_db']:.1f} dB")
    bad = [a for a in checked if a["top1_agreement"] < MIN_AGREEMENT]
    if bad:
        a = bad[0]
        raise EdgekitError(f"artifact {a['name']} agrees with its torch model ({a['source_stage']}) on only "
                           f"{a['top1_agreement']:.1%} of test samples (SQNR {a['sqnr_db']:.1f} dB); "
                           "inspect stages/verify and the export settings")
    return {"name": name, "accuracy": None, "params": None, "macs": None, "size_bytes": None,
            "artifacts": checked}
