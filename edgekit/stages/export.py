"""Export stage: the shipped files. The fp32 torch model to ONNX, checked against torch; every format
(edgekit.formats) makes the artifacts the chosen targets list from it.

fp32 artifacts come from the last float stage; int8 artifacts from the quantize stage's QAT-tuned weights when
QAT ran (the weights learned under int8 fake quantization), else from the same float model. Targets with
different ONNX `int8:` settings get different artifacts (`onnx_int8_<variant>`). Every artifact is made and
checked before any is written.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from edgekit import formats, onnx_int8
from edgekit.files import temp_root, write_bytes, write_json
from edgekit.formats import onnx
from edgekit.stages import quantize
from edgekit.stages.base import Context, always

name = "export"
reads = ("export", "targets")
needs = ("train", "prune", "distill", "quantize")
enabled = always

ARTIFACT_FILE = "artifacts.json"


def run(ctx: Context) -> dict:
    """Make every artifact the targets need and check it; only then write them and artifacts.json."""
    specs = needed_specs(ctx)
    fp32_source, int8_source = sources(ctx)
    passes = {fp32_source: [s for s in specs if s.precision != "int8"]}
    passes.setdefault(int8_source, []).extend(s for s in specs if s.precision == "int8")
    built: list[tuple[dict, bytes]] = []
    for stale in ctx.stage_dir(name).glob(".tmp-*"):  # left by a killed export
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=ctx.stage_dir(name)) as tmp, temp_root(Path(tmp)):
        for source, wanted in passes.items():
            if wanted:
                (Path(tmp) / source).mkdir()
                built += _export_from(ctx, source, wanted, Path(tmp) / source)
    order = [s.key for s in specs]
    built.sort(key=lambda item: order.index(item[0]["name"]))
    out = ctx.stage_dir(name)
    for record, payload in built:
        write_bytes(out / record["file"], payload)
    records = [record for record, _ in built]
    write_json(out / ARTIFACT_FILE, records)
    return {"name": name, "artifacts": records, "size_bytes": sum(r["size_bytes"] for r in records),
            "targets": [t.name for t in ctx.targets]}


def sources(ctx: Context) -> tuple[str, str]:
    """The stages whose torch models the fp32 and the int8 artifacts come from."""
    fp32_source = ctx.latest_model_stage(before="quantize")
    return fp32_source, "quantize" if ctx.has_model("quantize") else fp32_source


def needed_specs(ctx: Context) -> list:
    """One ArtifactSpec per artifact the targets list, in the registry's order (format, then precision)."""
    by_key = {}
    for target in ctx.targets:
        for spec in target.artifacts:
            by_key.setdefault(spec.key, spec)
    order = formats.formats()

    def rank(spec) -> tuple:
        fmt = order[spec.format]
        return list(order).index(spec.format), fmt.precisions.index(spec.precision), spec.io, spec.variant

    return sorted(by_key.values(), key=rank)


def _export_from(ctx: Context, source: str, specs: list, work: Path) -> list[tuple[dict, bytes]]:
    """The artifacts `specs` of one stage's torch model: its fp32 ONNX, checked against torch, then each
    format's exporter."""
    model = fold_linear_bn(ctx.load_model(source).eval())
    fp32 = onnx.torch_to_onnx(model, ctx.data.calib.x[:1], work / "fp32.onnx", ctx.cfg.export.opset,
                              dynamic_batch=True)
    onnx.check_against_torch(fp32, model, ctx.data.calib.x[:formats.CHECK_SAMPLES])
    job = formats.ExportJob(ctx, model, fp32, work, source, onnx_int8.settings_by_key(ctx.targets, ctx.cfg.export.int8),
                            kept_float_modules(ctx))
    built = []
    for fmt_name, fmt in formats.formats().items():
        mine = [s for s in specs if s.format == fmt_name]
        if mine:
            built += fmt.export(job, mine)
    return built


def kept_float_modules(ctx: Context) -> list[str]:
    """Torch module paths of the layers the quantize stage kept float (quantize.keep_float, mixed precision).

    They stay float in the ONNX int8 artifacts. TFLite int8 stays full int8: every TFLite target here runs
    integer-only kernels (checked after conversion), so a float layer is not an option there."""
    if not ctx.done("quantize"):
        return []
    nodes = ctx.metrics("quantize")["settings"].get("keep_float", [])
    return [quantize.module_of_nncf_node(n) for n in nodes]


@torch.no_grad()
def fold_linear_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Fold each BatchNorm1d that directly follows a Linear in a Sequential into that Linear (eval mode).

    onnxruntime's pre-processing folds BN into Conv but not into Gemm, and an int8 graph must hold no BN.
    """
    for seq in [m for m in model.modules() if isinstance(m, torch.nn.Sequential)]:
        for i in range(len(seq) - 1):
            lin, bn = seq[i], seq[i + 1]
            if isinstance(lin, torch.nn.Linear) and isinstance(bn, torch.nn.BatchNorm1d) and bn.affine:
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                bias = lin.bias if lin.bias is not None else torch.zeros_like(bn.running_mean)
                folded = torch.nn.Linear(lin.in_features, lin.out_features)
                folded.weight.copy_(lin.weight * scale[:, None])
                folded.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
                seq[i], seq[i + 1] = folded, torch.nn.Identity()
    return model
