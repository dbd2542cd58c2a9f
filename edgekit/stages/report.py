"""report.json and report.html from every stage's record; then a runtime that cannot run an artifact fails the
build (after the report is written, so it shows why)."""

from __future__ import annotations

from edgekit import report, report_html
from edgekit.device import runtime_check
from edgekit.files import write_json
from edgekit.stages import MODEL_STAGES, ORDER
from edgekit.stages.base import Context, always

name = "report"
reads = ("data", "model", "train", "prune", "distill", "quantize", "export", "run", "build", "targets")
needs = ORDER[:ORDER.index(name)]
enabled = always
FILES = ("report.json", "report.html")


def add_checks(result: dict, checked: dict) -> None:
    """Each artifact row gets `runtime_check`; result['emulated'] says per aarch64 target whether qemu ran."""
    rows = {(a["target"], a["name"]): a for a in result["artifacts"]}
    result["emulated"] = {}
    for target, check in checked.items():
        for artifact, verdict in check["artifacts"].items():
            rows[(target, artifact)]["runtime_check"] = verdict
        if check["emulation"] is not None:
            result["emulated"][target] = check["emulation"]


def damaged(ctx: Context) -> list[str]:
    return [f"{name} is missing" for name in FILES if not (ctx.out / name).is_file()]


def run(ctx: Context) -> dict:
    records = [ctx.metrics(n) for n in needs if ctx.done(n)]
    runs = ctx.metrics("measure")["runs"] if ctx.done("measure") else {}
    result = report.build_report(ctx.cfg, records, ctx.targets, runs, MODEL_STAGES)
    add_checks(result, ctx.metrics("check")["bundles"])
    write_json(ctx.out / FILES[0], result)
    report_html.write([ctx.out], ctx.out / FILES[1])  # the page people look at, from report.json and the results
    runtime_check.raise_on_failures(result)
    return {"name": name, "files": list(FILES)}
