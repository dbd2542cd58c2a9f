"""report.json and the summary table printed at the end of a build."""

from __future__ import annotations

from edgekit import __version__
from edgekit.config import Config, to_dict
from edgekit.runner.runner import latency_of
from edgekit.versions import library_versions


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
                         "source_stage": a["source_stage"], "graph": a["graph"],
                         "fidelity_miss": a.get("fidelity_miss", False), "int8": _int8_summary(a)})
    return rows


def _int8_summary(artifact: dict) -> dict | None:
    """ONNX int8: its settings and what fused in onnxruntime's optimized graph (edgekit.onnx_int8.fusion)."""
    info = artifact.get("int8")
    if not info:
        return None
    fusion = info["fusion"]
    return {"settings": info["settings"], "kept_float": info["kept_float"], "fused": fusion["fused"],
            "fused_count": fusion["fused_count"], "unfused_count": fusion["unfused_count"],
            "size_vs_fp32": info["size_vs_fp32"]}


def _side_by_side(rows: list[dict], bundles: list[dict]) -> None:
    """The bundle stage's alternating timing (int8/fp32 ratio), its recommendation and its primary artifact (what
    `edgekit run` and a search time and score), onto each row."""
    by_target = {b["target"]: b for b in bundles}
    for row in rows:
        bundle = by_target.get(row["target"], {})
        rec = bundle.get("recommended") or {}
        cand = {c["artifact"]: c for c in rec.get("candidates", [])}.get(row["name"])
        row["recommended"] = rec.get("artifact") == row["name"]
        row["primary"] = bundle.get("primary") == row["name"]
        if cand:
            keys = ("p50_ms", "p90_ms", "vs_fp32", "vs_fp32_ci", "fp32_artifact")
            row["side_by_side"] = {k: cand.get(k) for k in keys}


def build_report(cfg: Config, stage_metrics: list[dict], targets: list, runs: dict, model_stages: tuple) -> dict:
    """report.json from the stages' records; `model_stages`: those that made a torch model (the stage table)."""
    by_name = {m["name"]: m for m in stage_metrics}
    rows = artifact_rows(by_name["verify"]["artifacts"], by_name["bundle"]["bundles"], targets)
    _side_by_side(rows, by_name["bundle"]["bundles"])
    for row in rows:
        result = runs.get(row["target"], {}).get("artifacts", {}).get(row["name"])
        if result:
            row["measured"] = {"latency_ms": latency_of(result), "accuracy": result["accuracy"],
                               "peak_rss_mb": result["peak_rss_mb"], "runtime": result["runtime"]}
    budgets = {t.name: {"latency_ms": t.latency_ms or None, "memory_mb": t.memory_mb or None} for t in targets}
    tolerance = {t.name: t.accuracy_tolerance_pp for t in targets}
    for row in rows:
        lat = _latency(row)[0] or {}
        row["budget"] = budget_check(budgets[row["target"]], lat.get("p90"),
                                     row.get("measured", {}).get("peak_rss_mb"))
        row["vs_unpruned_fp32"] = accuracy_loss(row["accuracy"], by_name["train"]["accuracy"],
                                                tolerance[row["target"]])
    return {
        "edgekit_version": __version__,
        "versions": library_versions(),
        "config": to_dict(cfg),
        "targets": [t.name for t in targets],
        "stages": [m for m in stage_metrics if m["name"] in model_stages],
        "cached_stages": {m["name"]: m["cached_from"] for m in stage_metrics if m.get("cached_from")},
        "artifacts": rows,
        "bundles": by_name["bundle"]["bundles"],
        "runs": {t: {k: v for k, v in r.items() if k != "artifacts"} for t, r in runs.items()},
        "over_budget": [f"{r['target']}/{r['name']}: {'; '.join(r['budget']['over'])}"
                        for r in rows if r["budget"]["ok"] is False],
        # each stage's warnings (a float model near chance, a loop that kept its starting weights)
        "warnings": [f"{m['name']}: {line}" for m in stage_metrics for line in m.get("warnings", [])],
        "over_tolerance": [f"{r['target']}/{r['name']}: {r['vs_unpruned_fp32']['pp']:+.1f} pp against the unpruned "
                           f"fp32 model, the target allows {r['vs_unpruned_fp32']['tolerance_pp']:g} pp"
                           for r in rows if not r["vs_unpruned_fp32"]["ok"]],
    }


def accuracy_loss(accuracy: float, unpruned: float, tolerance_pp: float) -> dict:
    """What the whole recipe (pruning, distillation, int8) cost against the trained, unpruned fp32 model, on the
    same test split, judged against the target's `accuracy_tolerance_pp`."""
    pp = 100 * (accuracy - unpruned)
    return {"unpruned_fp32_accuracy": unpruned, "pp": pp, "tolerance_pp": tolerance_pp, "ok": pp >= -tolerance_pp}


def budget_check(budgets: dict, p90_ms: float | None, peak_rss_mb: float | None) -> dict:
    """Pass/fail of one artifact against its target's budgets: p90 latency (the headline) against
    `latency_ms`, peak RSS of the whole runner process against `memory_mb`. None: not measured or no budget."""
    lat_budget, mem_budget = budgets.get("latency_ms"), budgets.get("memory_mb")
    latency_ok = None if lat_budget is None or p90_ms is None else p90_ms <= lat_budget
    memory_ok = None if mem_budget is None or peak_rss_mb is None else peak_rss_mb <= mem_budget
    over = ([f"p90 {p90_ms:.3g} ms > {lat_budget:g} ms"] if latency_ok is False else []) + \
        ([f"peak RSS {peak_rss_mb:.1f} MB > {mem_budget:g} MB"] if memory_ok is False else [])
    known = [v for v in (latency_ok, memory_ok) if v is not None]
    return {"latency_ms": lat_budget, "memory_mb": mem_budget, "p90_ms": p90_ms, "peak_rss_mb": peak_rss_mb,
            "latency_ok": latency_ok, "memory_ok": memory_ok, "ok": all(known) if known else None, "over": over}


def budget_cell(check: dict | None) -> str:
    """What the console and the HTML say: ok, OVER, or - (not measured here / no budget)."""
    ok = (check or {}).get("ok")
    return "-" if ok is None else "ok" if ok else "OVER"


def _fmt(value: object, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_table(report: dict) -> str:
    lines = [f"{'stage':<10} {'accuracy':>8} {'params':>8} {'MACs':>10} {'file KB':>8}  file"]
    for s in report["stages"]:
        lines.append(f"{s['name']:<10} {_fmt(s['accuracy'], '.4f'):>8} {_fmt(s['params'], 'd'):>8} "
                     f"{_fmt(s['macs'], 'd'):>10} {_fmt(s['size_bytes'] and s['size_bytes'] / 1024, '.1f'):>8}  "
                     f"{s.get('size_file') or '-'}")
    lines += prune_lines(report["stages"])
    lines.append("")
    lines.append(f"{'target':<17} {'artifact':<19} {'runtime':<12} {'size KB':>7} {'acc':>6} {'agree':>6} "
                 f"{'SQNR dB':>7} {'p50 ms':>7} {'p90 ms':>7} {'int8/fp32':>9} {'fused':>7} {'budget':>6}")
    for r in report["artifacts"]:
        lat = _latency(r)[0] or {}
        name = r["name"] + ("+" if r.get("primary") else "") + ("*" if r.get("recommended") else "")
        int8 = r.get("int8")
        fused = f"{int8['fused_count']}/{int8['unfused_count']}" if int8 else None
        lines.append(f"{r['target']:<17} {name:<19} {r['runtime']:<12} {r['size_bytes'] / 1024:>7.1f} "
                     f"{r['accuracy']:>6.3f} {r['top1_agreement']:>6.3f} {_fmt(r['sqnr_db'], '.1f'):>7} "
                     f"{_fmt(lat.get('p50'), '.4f'):>7} {_fmt(lat.get('p90'), '.4f'):>7} "
                     f"{_fmt(_ratio(r, report['artifacts']), '.2f'):>9} {_fmt(fused, 's'):>7} "
                     f"{budget_cell(r.get('budget')):>6}")
    lines.append("p50, p90, int8/fp32: one side-by-side run per target (artifacts timed alternately at the "
                 "target's threads, in blocks above one; else the runner's runs); int8/fp32 = p50 / p50 of the "
                 "same-format fp32 row, else the fastest fp32 row; * recommended; + primary (the bundle's first "
                 "artifact: what `edgekit run` times and scores)")
    lines.append("fused: int8 ops / float ops left unfused in onnxruntime's optimized graph; budget: the target's "
                 "latency_ms (against p90) and memory_mb (against the runner's peak RSS), - where not measured here")
    for line in report.get("over_budget", []):
        lines.append(f"OVER BUDGET {line}")
    for line in report.get("over_tolerance", []):
        lines.append(f"ACCURACY LOSS OVER TOLERANCE {line}")
    for line in report.get("warnings", []):
        lines.append(f"warning: {line}")  # not WARNING: the e2e test keeps library WARNING lines out
    losses = [r["vs_unpruned_fp32"]["pp"] for r in report["artifacts"] if r.get("vs_unpruned_fp32")]
    if losses:
        lines.append(f"against the unpruned fp32 model (train, test accuracy "
                     f"{report['artifacts'][0]['vs_unpruned_fp32']['unpruned_fp32_accuracy']:.4f}): "
                     f"{min(losses):+.1f} to {max(losses):+.1f} pp across the shipped artifacts")
    for b in report["bundles"]:
        rec = b.get("recommended") or {}
        lines.append(f"recommended for {b['target']}: {rec.get('artifact') or '-'} ({rec.get('reason', 'none')})")
    return "\n".join(lines)


def prune_lines(stages: list[dict]) -> list[str]:
    """Which pruning round the build kept and why (the prune stage's accuracy guard), and the rounds that removed
    no channel (their fine-tuning epochs went to a cut model)."""
    stage = next((s for s in stages if s["name"] == "prune"), {})
    kept = stage.get("kept")
    if not kept:
        return []
    n = kept["of"]
    what = f"round {kept['round']} of {n}" if kept["round"] else f"the unpruned model, no round of {n}"
    idle = [str(k) for k, r in enumerate(stage.get("rounds") or [], 1) if r.get("nothing_removed")]
    many = len(idle) > 1
    none = (f"; round{'s' if many else ''} {', '.join(idle)} removed no channels (the fine-tuning epochs went to "
            "the next cut, or after the last round to the last cut)") if idle else ""
    return [f"pruning kept {what} ({kept['macs_kept']:.0%} of the MACs): {kept['reason']}{none}"]


def model_line(config: dict) -> str:
    """What built the model: the user's factory (model.name, the built-in model, is then unused) or the zoo."""
    m = config.get("model") or {}
    built = f"factory {m['factory']}" if m.get("factory") else \
        f"built-in {m.get('name')} (width {m.get('width')}, width_mult {m.get('width_mult'):g})"
    return built + (f", checkpoint {m['checkpoint']}" if m.get("checkpoint") else "")


def shown_config(config: dict) -> dict:
    """The config as a report shows it: without model.name when a factory builds the model (it names a built-in
    model the build did not use)."""
    m = config.get("model") or {}
    if not m.get("factory"):
        return config
    return {**config, "model": {k: v for k, v in m.items() if k != "name"}}


def _latency(row: dict) -> tuple[dict | None, str | None]:
    """p50/p90 of a row and where they come from: the bundle stage's side-by-side run, else the runner's run."""
    side = row.get("side_by_side") or {}
    if side.get("p50_ms") is not None:
        return {"p50": side["p50_ms"], "p90": side["p90_ms"]}, "side_by_side"
    lat = row.get("measured", {}).get("latency_ms")
    return (lat, "run") if lat else (None, None)


def _ratio(row: dict, rows: list[dict]) -> float | None:
    """int8/fp32 p50 from the same measurement as the row's p50 column: the fp32 row the side-by-side run
    compared with, else the same format's fp32 row of the target."""
    lat, source = _latency(row)
    if row["precision"] == "fp32" or not lat:
        return None
    base_name = (row.get("side_by_side") or {}).get("fp32_artifact")
    base = next((r for r in rows if r["target"] == row["target"] and r["precision"] == "fp32"
                 and (r["name"] == base_name if base_name else r["format"] == row["format"])), None)
    base_lat, base_source = _latency(base) if base else (None, None)
    return lat["p50"] / base_lat["p50"] if base_lat and base_source == source else None
