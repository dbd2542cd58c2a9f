"""report.json and the summary table printed at the end of a build."""

from __future__ import annotations

from edgekit import __version__
from edgekit.config import Config, to_dict

MODEL_STAGES = ("train", "prune", "distill", "quantize")


def artifact_rows(verified: list[dict], bundles: list[dict], targets: list) -> list[dict]:
    by_name = {a["name"]: a for a in verified}
    rows = []
    for target in targets:
        for spec in target.artifacts:
            a = by_name[spec.key]
            rows.append({"target": target.name, "name": a["name"], "format": a["format"],
                         "precision": a["precision"], "runtime": spec.runtime,
                         "runtime_version": spec.runtime_version,
                         "path": f"bundles/{target.name}/{a['file']}", "size_bytes": a["size_bytes"],
                         "accuracy": a["accuracy"], "top1_agreement": a["top1_agreement"],
                         "max_abs_diff": a["max_abs_diff"], "sqnr_db": a["sqnr_db"],
                         "source_stage": a["source_stage"], "graph": a["graph"]})
    return rows


def build_report(cfg: Config, stage_metrics: list[dict], targets: list, runs: dict) -> dict:
    by_name = {m["name"]: m for m in stage_metrics}
    rows = artifact_rows(by_name["verify"]["artifacts"], by_name["bundle"]["bundles"], targets)
    for row in rows:
        result = runs.get(row["target"], {}).get("artifacts", {}).get(row["name"])
        if result:
            row["measured"] = {"latency_ms": result["latency_ms"], "accuracy": result["accuracy"],
                               "peak_rss_mb": result["peak_rss_mb"], "runtime": result["runtime"]}
    return {
        "edgekit_version": __version__,
        "config": to_dict(cfg),
        "targets": [t.name for t in targets],
        "stages": [m for m in stage_metrics if m["name"] in MODEL_STAGES],
        "artifacts": rows,
        "bundles": by_name["bundle"]["bundles"],
        "runs": {t: {k: v for k, v in r.items() if k != "artifacts"} for t, r in runs.items()},
    }


def _fmt(value: object, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_table(report: dict) -> str:
    lines = [f"{'stage':<10} {'accuracy':>8} {'params':>8} {'MACs':>10} {'size KB':>8}"]
    for s in report["stages"]:
        lines.append(f"{s['name']:<10} {_fmt(s['accuracy'], '.4f'):>8} {_fmt(s['params'], 'd'):>8} "
                     f"{_fmt(s['macs'], 'd'):>10} {_fmt(s['size_bytes'] and s['size_bytes'] / 1024, '.1f'):>8}")
    lines.append("")
    lines.append(f"{'target':<17} {'artifact':<18} {'runtime':<12} {'size KB':>7} {'acc':>6} {'agree':>6} "
                 f"{'SQNR dB':>7} {'p50 ms':>7} {'p90 ms':>7} {'vs fp32':>7}")
    fp32 = {(r["target"], r["format"]): r for r in report["artifacts"] if r["precision"] == "fp32"}
    for r in report["artifacts"]:
        lat = r.get("measured", {}).get("latency_ms", {})
        base = fp32.get((r["target"], r["format"]), {}).get("measured", {}).get("latency_ms", {})
        ratio = lat["p50"] / base["p50"] if lat and base and r["precision"] != "fp32" else None
        lines.append(f"{r['target']:<17} {r['name']:<18} {r['runtime']:<12} {r['size_bytes'] / 1024:>7.1f} "
                     f"{r['accuracy']:>6.3f} {r['top1_agreement']:>6.3f} {_fmt(r['sqnr_db'], '.1f'):>7} "
                     f"{_fmt(lat.get('p50'), '.3f'):>7} {_fmt(lat.get('p90'), '.3f'):>7} {_fmt(ratio, '.2f'):>7}")
    return "\n".join(lines)
