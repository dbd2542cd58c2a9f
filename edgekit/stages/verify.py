"""Run every exported artifact with its runtime on the test split and compare it with its torch model.

Each artifact is run with the numerics of the runtime that will run it on the device (edgekit.fidelity
`numerics`: reference Q/DQ arithmetic for TensorRT, ARM and VNNI targets, onnxruntime's own kernels for x86
CPU settings that every x86 CPU computes alike), so the host's instruction set never decides a verdict. Each
artifact must pass the gate of every target that ships it (`fidelity.rule`). An int8 artifact that misses is
taken apart layer by layer with the same numerics and the layer where the error starts is named.
"""

from __future__ import annotations

from edgekit import fidelity, quiet
from edgekit.errors import FidelityError
from edgekit.files import write_json
from edgekit.formats import ArtifactRecord
from edgekit.stages.base import METRICS_FILE, Context, always

name = "verify"
reads = ("targets",)  # build.allow_fidelity_miss is a gate: it changes no result
needs = ("export",)
enabled = always


def check(ctx: Context, spec: ArtifactRecord, how: str | None = None, limits: dict | None = None) -> dict:
    """The artifact on the test split with numerics `how` (default: its targets' first) against its torch model."""
    how = how or numerics_of(ctx, spec)[0]
    limits = limits or fidelity.thresholds(ctx.targets, spec["name"])
    path = ctx.stage_dir("export") / spec["file"]
    with quiet.silenced():  # LiteRT announces its XNNPACK delegate on stderr
        out, runtime = fidelity.predict(path, spec, ctx.data.test.x, how)
    reference = ctx.reference_logits(spec["source_stage"])
    return {**spec, **fidelity.judge(reference, out, ctx.data.test.y, limits), "verified_with": runtime,
            "numerics": {"name": how, "what": fidelity.NUMERICS[how]}}


def numerics_of(ctx: Context, spec: ArtifactRecord) -> list[str]:
    return fidelity.numerics_of(ctx.targets, spec["name"], (spec.get("int8") or {}).get("settings"))


def verdict(ctx: Context, spec: ArtifactRecord, limits: dict) -> tuple[dict, list[str]]:
    """The artifact checked with each numerics its targets need; the first one that misses decides."""
    result, found = {}, []
    for how in numerics_of(ctx, spec):
        result = check(ctx, spec, how, limits)
        found = fidelity.misses(result, limits)
        if found:
            break
    return result, found


def localise(ctx: Context, spec: ArtifactRecord, how: str | None = None) -> list[dict]:
    """Layer-wise comparison of an int8 artifact with its float twin, worst layer first, with the numerics
    `how` (default: the first its targets need)."""
    path = ctx.stage_dir("export") / spec["file"]
    perm = spec["input"].get("transpose")
    x = ctx.data.test.x.transpose(perm) if perm else ctx.data.test.x
    name = (spec.get("int8") or {}).get("float_twin") if spec["format"] == "onnx" else spec.get("float_twin")
    twin = ctx.stage_dir("export") / name if name else None
    if twin is None or not twin.is_file():
        raise FidelityError(f"{spec['name']} has no float twin in {ctx.stage_dir('export')} (made by an older "
                            "edgekit); build again to compare it layer by layer")
    if spec["format"] == "onnx":
        return fidelity.onnx_layers(path.read_bytes(), twin.read_bytes(), x, how or numerics_of(ctx, spec)[0])
    return fidelity.tflite_layers(str(path), str(twin), x)


def report_miss(ctx: Context, result: dict, limits: dict, found: list[str]) -> str:
    """Write fidelity/<artifact>.json and return the one-line message."""
    layers = localise(ctx, result, result["numerics"]["name"]) if result["precision"] == "int8" else []
    write_json(ctx.out / "fidelity" / f"{result['name']}.json", record(result, limits, found, layers))
    worst = (f"; the error starts at {layers[0]['layer']} (SQNR {layers[0]['sqnr_db']:.1f} dB, "
             f"drop {layers[0]['drop_db']:.1f} dB, float range {layers[0]['ref_range']})") if layers else ""
    return (f"artifact {result['name']} misses fidelity against its torch model ({result['source_stage']}) with "
            f"{result['numerics']['name']} numerics: {', '.join(found)} ({fidelity.rule(limits)}){worst}"
            f"{_repair_note(result)}{_qat_note(ctx, result)}; details: edgekit debug {ctx.out} --artifact "
            f"{result['name']} (--allow-fidelity-miss keeps going)")


def _qat_note(ctx: Context, result: dict) -> str:
    """An int8 miss after quantize.method auto skipped QAT: PTQ passed on the validation split and missed here,
    on the test split; QAT is the repair the user can ask for."""
    if result["precision"] != "int8" or not (ctx.out / "stages" / "quantize" / METRICS_FILE).is_file():
        return ""
    qat = ctx.metrics("quantize").get("qat") or {}
    if qat.get("ran") is not False or ctx.cfg.quantize.method != "auto":
        return ""
    return ("; QAT was skipped (quantize.method auto: PTQ passed on the validation split), so set quantize.method: "
            "qat and build into a new --out (the stage cache reuses the stages before quantize)")


def _repair_note(result: dict) -> str:
    repair = (result.get("int8") or {}).get("repair") or {}
    if result["format"] == "tflite" and result["precision"] == "int8":
        return "; TFLite int8 stays full int8 (its targets run integer-only kernels), so no layer can be kept float"
    if not repair.get("tried"):
        return ""
    return f"; keeping {', '.join(repair['tried'])} float did not meet the thresholds either"


def record(result: dict, limits: dict, found: list[str], layers: list[dict]) -> dict:
    keys = ("accuracy", "reference_accuracy", "top1_agreement", "confident_agreement", "confident_samples",
            "max_abs_diff", "sqnr_db")
    return {"artifact": result["name"], "misses": found, "thresholds": limits, "rule": fidelity.rule(limits),
            "numerics": result["numerics"], "metrics": {k: result[k] for k in keys}, "layers": layers}


def debug(ctx: Context, artifact: str) -> dict:
    """`edgekit debug`: the artifact's verdict and its layers, with the numerics its verification uses."""
    specs = {s["name"]: s for s in ctx.metrics("export")["artifacts"]}
    if artifact not in specs:
        raise FidelityError(f"no artifact '{artifact}' in '{ctx.out}'; valid: {', '.join(specs)}")
    if specs[artifact]["precision"] != "int8":
        raise FidelityError(f"{artifact} is not int8; layer-wise comparison is for int8 artifacts")
    limits = fidelity.thresholds(ctx.targets, artifact)
    result, found = verdict(ctx, specs[artifact], limits)
    return record(result, limits, found, localise(ctx, specs[artifact], result["numerics"]["name"]))


def run(ctx: Context) -> dict:
    checked = []
    for spec in ctx.metrics("export")["artifacts"]:
        limits = fidelity.thresholds(ctx.targets, spec["name"])
        result, found = verdict(ctx, spec, limits)
        result["fidelity_thresholds"] = limits
        print(f"  {result['name']:<20} accuracy {result['accuracy']:.4f}  agreement {result['top1_agreement']:.4f} "
              f"(confident {result['confident_agreement']:.4f})  SQNR {result['sqnr_db']:.1f} dB  "
              f"[{result['numerics']['name']} numerics]")
        result["fidelity_miss"] = bool(found)
        if found:
            message = report_miss(ctx, result, limits, found)
            if not ctx.cfg.build.allow_fidelity_miss:
                raise FidelityError(message)
            print(f"  warning: {message}")
        checked.append(result)
    return {"name": name, "artifacts": checked}
