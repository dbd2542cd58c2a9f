"""Pick what pays: time a target's candidate artifacts side by side and recommend the fastest accurate one.

Candidates run with the runtime the target uses (the bundle runner's own `Artifact`) at the target's thread
count, alternating one inference each per round so that machine noise hits them all alike. Only targets
whose architecture matches this machine are measured; the others get no recommendation, and say so.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np

from edgekit import quiet
from edgekit.runner.runner import Artifact, latency_stats


def alternate(artifacts: dict[str, Artifact], x: np.ndarray, *, warmup: int, min_rounds: int, min_s: float,
              max_s: float) -> dict[str, list[float]]:
    """One timed single-sample inference per artifact per round, rotating the order; samples in ms."""
    feeds = {name: a.encode(x[:1])[0] for name, a in artifacts.items()}
    for _ in range(warmup):
        for name, a in artifacts.items():
            a.run(feeds[name])
    names, samples = list(artifacts), {name: [] for name in artifacts}
    start, rounds, clock = time.perf_counter(), 0, time.perf_counter
    while True:
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = clock()
            artifacts[name].run(feeds[name])
            samples[name].append((clock() - t0) * 1000.0)
        rounds += 1
        elapsed = clock() - start
        if (rounds >= min_rounds and elapsed >= min_s) or elapsed >= max_s:
            return samples


def measure(folder: Path, entries: list[dict], x: np.ndarray, threads: int, run_cfg) -> dict[str, dict]:
    """p50 / p90 of every entry (manifest artifact records, files in `folder`) timed alternately."""
    with quiet.silenced():  # LiteRT announces its XNNPACK delegate on stderr
        arts = {e["name"]: Artifact(folder / e["file"], e, threads) for e in entries}
    samples = alternate(arts, x, warmup=run_cfg.warmup_runs, min_rounds=run_cfg.min_runs,
                        min_s=run_cfg.min_seconds, max_s=run_cfg.max_seconds)
    return {name: {k: v for k, v in latency_stats(s).items() if k in ("p50", "p90", "mean", "runs")}
            for name, s in samples.items()}


def _fp32_base(entry: dict, entries: list[dict], timing: dict) -> dict | None:
    """The fp32 artifact an int8 one is compared with: same format if there is one, else the fastest fp32."""
    fp32 = [e for e in entries if e["precision"] == "fp32"]
    same = [e for e in fp32 if e["format"] == entry["format"]]
    pool = same or fp32
    return min(pool, key=lambda e: timing[e["name"]]["p50"]) if pool else None


def candidates(entries: list[dict], timing: dict) -> list[dict]:
    rows = []
    for e in entries:
        base = _fp32_base(e, entries, timing) if e["precision"] != "fp32" else None
        t = timing[e["name"]]
        row = {"artifact": e["name"], "precision": e["precision"], "runtime": e["runtime"], "p50_ms": t["p50"],
               "p90_ms": t["p90"], "runs": t["runs"], "accuracy": e["reference"]["accuracy"],
               "size_bytes": e["size_bytes"], "vs_fp32": None, "fp32_artifact": None}
        if base:
            row |= {"vs_fp32": t["p50"] / timing[base["name"]]["p50"], "fp32_artifact": base["name"],
                    "size_vs_fp32": e["size_bytes"] / base["size_bytes"]}
        rows.append(row)
    return rows


def choose(rows: list[dict], tolerance_pp: float) -> tuple[dict, str]:
    """The fastest artifact whose accuracy is within the target's tolerance of the best fp32 one."""
    fp32 = [r for r in rows if r["precision"] == "fp32"]
    best = max(r["accuracy"] for r in (fp32 or rows))
    eligible = [r for r in rows if r["accuracy"] >= best - tolerance_pp / 100 - 1e-12]
    pick = min(eligible, key=lambda r: r["p50_ms"])
    fastest_fp32 = min(fp32, key=lambda r: r["p50_ms"]) if fp32 else None
    int8 = [r for r in rows if r["precision"] == "int8"]
    if pick["precision"] != "fp32":
        if not fastest_fp32:
            return pick, f"fastest measured artifact ({pick['p50_ms']:.3f} ms p50); no fp32 artifact to compare"
        ratio = pick["p50_ms"] / fastest_fp32["p50_ms"]
        return pick, (f"faster at equal accuracy: {ratio:.2f}x the p50 of {fastest_fp32['artifact']}, accuracy "
                      f"{pick['accuracy']:.4f} vs {fastest_fp32['accuracy']:.4f} (tolerance {tolerance_pp} pp), "
                      f"{fastest_fp32['size_bytes'] / pick['size_bytes']:.1f}x smaller")
    if not int8:
        return pick, "fastest measured artifact; the target lists no int8 artifact"
    smallest = min(int8, key=lambda r: r["size_bytes"])
    quickest = min(int8, key=lambda r: r["p50_ms"])
    return pick, (f"int8 is not faster here (fastest int8, {quickest['artifact']}, takes "
                  f"{quickest['p50_ms'] / pick['p50_ms']:.2f}x the p50 of {pick['artifact']}); "
                  f"{smallest['artifact']} is smaller by {pick['size_bytes'] / smallest['size_bytes']:.1f}x")


def recommend(folder: Path, entries: list[dict], target, x: np.ndarray, run_cfg) -> dict:
    """The manifest's `recommended` record for one target."""
    host = platform.machine()
    if not target.runs_here:
        return {"artifact": None, "measured": False, "candidates": [],
                "reason": f"not measured: the target is {target.arch} and this machine {host}; run each artifact "
                          "on the device (`runner.py BUNDLE --artifact NAME`) and compare"}
    timing = measure(folder, entries, x, target.threads, run_cfg)
    rows = candidates(entries, timing)
    pick, reason = choose(rows, target.accuracy_tolerance_pp)
    return {"artifact": pick["artifact"], "reason": reason, "measured": True, "host": host,
            "threads": target.threads, "method": "alternating single-sample runs, one per artifact per round",
            "candidates": rows}
