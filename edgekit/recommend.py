"""Pick what pays: time a target's candidate artifacts side by side and recommend the fastest accurate one.

Candidates run with the runtime the target uses (the bundle runner's own `Artifact`) at the target's thread
count, alternating (one inference each per round at one thread, a block each at more) so that machine noise
hits them all alike. Only targets whose architecture matches this machine are measured; the others get no
recommendation, and say so.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np

from edgekit import quiet
from edgekit.runner.runner import Artifact, latency_stats

# onnxruntime's intra-op workers spin for about 40 ms after a run (onnxruntime 1.23 at 2 threads on a 2-core AMD
# EPYC with AVX2: 38 ms of CPU in the 50 ms after the last run), LiteRT's for under a millisecond. Alternating
# single runs at more than one thread therefore time each artifact against the others' spinning threads: LiteRT
# int8 took 0.018 / 0.025 ms (p50 / p90) alone and 0.021-0.028 / 0.16-0.18 ms alternating with two onnxruntime
# sessions. So at more than one thread every artifact runs a block of consecutive inferences (as it would
# deployed), after SETTLE_S of sleep (the spin is a count, longer on a slower CPU; watching the process's CPU time
# does not tell spinning from yielding on a loaded machine) and REWARM untimed runs. A block lasts about BLOCK_S
# for the slowest artifact, and every artifact gets the same number of runs per block, so sample i of each lies
# in one round.
SETTLE_S = 0.06
BLOCK_S = 0.02
REWARM = 2
MIN_BLOCK_ROUNDS = 20  # the p90 of a bimodal runtime swings from round to round: its interval needs rounds
METHOD = "alternating single-sample runs, one per artifact per round"
BLOCK_METHOD = (f"alternating blocks of consecutive single-sample runs (about {BLOCK_S * 1000:.0f} ms of the slowest "
                f"artifact, each after {SETTLE_S * 1000:.0f} ms of sleep), one block per artifact per round")


def alternate(artifacts: dict[str, Artifact], x: np.ndarray, *, warmup: int, min_rounds: int, min_s: float,
              max_s: float, blocks: bool = False) -> dict[str, list[float]]:
    """Rounds of timed single-sample inferences, the artifacts' order rotating each round; samples in ms.

    Without `blocks`, one inference per artifact per round (right at one thread, where no runtime keeps worker
    threads spinning). With `blocks`, a block per artifact per round, as above; at least `min_rounds` samples
    and MIN_BLOCK_ROUNDS rounds."""
    clock = time.perf_counter
    feeds = {name: a.encode(x[:1])[0] for name, a in artifacts.items()}
    slowest = 0.0
    for name, a in artifacts.items():
        warm = []
        for _ in range(max(warmup, 1)):
            t0 = clock()
            a.run(feeds[name])
            warm.append(clock() - t0)
        slowest = max(slowest, float(np.median(warm)))
    size = max(1, int(BLOCK_S / max(slowest, 1e-6))) if blocks else 1
    rewarm, least_rounds = (REWARM, MIN_BLOCK_ROUNDS) if blocks else (0, 1)
    names, samples = list(artifacts), {name: [] for name in artifacts}
    start, rounds = clock(), 0
    while True:
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            run, feed, out = artifacts[name].run, feeds[name], samples[name]
            if blocks:
                time.sleep(SETTLE_S)
            for _ in range(rewarm):
                run(feed)
            for _ in range(size):
                t0 = clock()
                run(feed)
                out.append((clock() - t0) * 1000.0)
        rounds += 1
        elapsed = clock() - start
        if (rounds * size >= min_rounds and rounds >= least_rounds and elapsed >= min_s) or elapsed >= max_s:
            return samples


def measure(folder: Path, entries: list[dict], x: np.ndarray, threads: int, run_cfg) -> dict[str, list[float]]:
    """Latency samples (ms) of every entry (manifest artifact records, files in `folder`) timed alternately, in
    blocks at more than one thread."""
    with quiet.silenced():  # LiteRT announces its XNNPACK delegate on stderr
        arts = {e["name"]: Artifact(folder / e["file"], e, threads) for e in entries}
    return alternate(arts, x, warmup=run_cfg.warmup_runs, min_rounds=run_cfg.min_runs,
                     min_s=run_cfg.min_seconds, max_s=run_cfg.max_seconds, blocks=threads != 1)


# A faster artifact must win on p50 and on p90 (the headline) by more than MIN_GAIN at the upper end of the
# interval: between two identical demo builds the tflite/fp32 p50 ratio moved from 0.99 to 1.05, so gains of a
# few percent are noise across runs even when one run's interval is tight.
MIN_GAIN = 0.05
CONFIDENCE = 0.95
RESAMPLES = 300
BLOCKS = 50
RULE = (f"faster = p50 or p90 lower by more than {MIN_GAIN:.0%} over the whole {CONFIDENCE:.0%} interval and the "
        "other not higher over its whole interval (block bootstrap over the alternating rounds); of several not "
        f"slower, one whose p90 is higher by more than {MIN_GAIN:.0%} over its whole interval drops out (p90 is the "
        "headline); otherwise a tie, and the smaller file wins, then int8")


def bootstrap(samples: dict, *, resamples: int = RESAMPLES, blocks: int = BLOCKS, seed: int = 0) -> dict:
    """(resamples, 2) p50/p90 per artifact, every artifact resampled on the same blocks of consecutive rounds.

    Blocks keep the load bursts of a shared machine together, and sharing them keeps the pairing of the
    alternating rounds, so noise that hit all artifacts alike cancels in their ratio. A resample is a count per
    block; its percentiles are weighted ones over the sorted samples (no copies of 10^4-sample resamples)."""
    n = min(len(s) for s in samples.values())
    k = min(blocks, n)
    block = np.arange(n) * k // n
    counts = np.random.default_rng(seed).multinomial(k, np.full(k, 1 / k), size=resamples).astype(np.float32)
    out = {}
    for name, s in samples.items():
        a = np.asarray(s[:n], dtype=float)
        order = np.argsort(a, kind="stable")
        member = np.zeros((k, n), np.float32)
        member[block[order], np.arange(n)] = 1
        cum = counts @ np.cumsum(member, axis=1)  # weighted rank of each sorted sample, per resample
        out[name] = np.stack([a[order][(cum < q * cum[:, -1:]).sum(axis=1)] for q in (0.5, 0.9)], axis=1)
    return out


def intervals(boot: dict, a: str, b: str) -> dict:
    """The CONFIDENCE intervals of a's p50 and p90 over b's."""
    tail = (1 - CONFIDENCE) / 2 * 100
    ratio = boot[a] / boot[b]
    return {q: [float(v) for v in np.percentile(ratio[:, i], [tail, 100 - tail])] for i, q in enumerate(("p50", "p90"))}


def beats(ci: dict) -> bool:
    """Faster beyond noise: one of p50 / p90 lower by more than MIN_GAIN over its whole interval, and neither
    higher over its whole interval (a clear trade-off, p50 lower and p90 higher, is no win)."""
    lower = [hi < 1 - MIN_GAIN for _, hi in ci.values()]
    higher = [lo > 1 for lo, _ in ci.values()]
    return any(lower) and not any(higher)


def _fp32_base(entry: dict, entries: list[dict], timing: dict) -> dict | None:
    """The fp32 artifact an int8 one is compared with: same format if there is one, else the fastest fp32."""
    fp32 = [e for e in entries if e["precision"] == "fp32"]
    same = [e for e in fp32 if e["format"] == entry["format"]]
    pool = same or fp32
    return min(pool, key=lambda e: timing[e["name"]]["p50"]) if pool else None


def candidates(entries: list[dict], timing: dict, boot: dict) -> list[dict]:
    rows = []
    for e in entries:
        base = _fp32_base(e, entries, timing) if e["precision"] != "fp32" else None
        t = timing[e["name"]]
        row = {"artifact": e["name"], "precision": e["precision"], "runtime": e["runtime"], "p50_ms": t["p50"],
               "p90_ms": t["p90"], "runs": t["runs"], "accuracy": e["reference"]["accuracy"],
               "size_bytes": e["size_bytes"], "vs_fp32": None, "fp32_artifact": None}
        if base:
            row |= {"vs_fp32": t["p50"] / timing[base["name"]]["p50"], "fp32_artifact": base["name"],
                    "vs_fp32_ci": intervals(boot, e["name"], base["name"]),
                    "size_vs_fp32": e["size_bytes"] / base["size_bytes"]}
        rows.append(row)
    return rows


def _by_rule(rows: list[dict]) -> dict:
    return min(rows, key=lambda r: (r["size_bytes"], r["precision"] != "int8"))


def _versus(pick: dict, other: dict, ci: dict) -> str:
    return (f"p50 {pick['p50_ms'] / other['p50_ms']:.2f}x (95% CI {ci['p50'][0]:.2f}-{ci['p50'][1]:.2f}) and "
            f"p90 {pick['p90_ms'] / other['p90_ms']:.2f}x (95% CI {ci['p90'][0]:.2f}-{ci['p90'][1]:.2f}) "
            f"of {other['artifact']}")


def _split(ci: dict) -> bool:
    """One of p50 / p90 clearly lower and the other clearly higher: a real trade-off, not noise."""
    return any(hi < 1 for _, hi in ci.values()) and any(lo > 1 for lo, _ in ci.values())


def choose(rows: list[dict], samples: dict, tolerance_pp: float) -> tuple[dict, str]:
    """Among artifacts within the target's accuracy tolerance of the best fp32 one, those no other one beats
    (`beats`); of several, those whose p90 (the headline, what budgets are checked on) no other's is clearly
    below. One left is the pick, several are a tie settled by RULE."""
    fp32 = [r for r in rows if r["precision"] == "fp32"]
    best = max(r["accuracy"] for r in (fp32 or rows))
    eligible = [r for r in rows if r["accuracy"] >= best - tolerance_pp / 100 - 1e-12]
    if len(eligible) == 1:
        return eligible[0], f"the only artifact within {tolerance_pp} pp of the best fp32 accuracy"
    boot = bootstrap({r["artifact"]: samples[r["artifact"]] for r in eligible})
    unbeaten = [r for r in eligible if not any(
        beats(intervals(boot, o["artifact"], r["artifact"])) for o in eligible if o is not r)]
    if len(unbeaten) == 1:
        pick = unbeaten[0]
        rival = min((r for r in eligible if r is not pick), key=lambda r: r["p50_ms"])
        ci = intervals(boot, pick["artifact"], rival["artifact"])
        clear = [q for q, (_, hi) in ci.items() if hi < 1 - MIN_GAIN]  # the quantile(s) that decided
        head = f"faster beyond noise on {' and '.join(clear)}" if clear else "the only one no other beats beyond noise"
        return pick, f"{head}: {_versus(pick, rival, ci)}"
    # a trade-off (one p50 clearly lower, its p90 clearly higher) goes to the lower p90
    headline = [r for r in unbeaten if not any(
        intervals(boot, r["artifact"], o["artifact"])["p90"][0] > 1 + MIN_GAIN for o in unbeaten if o is not r)]
    if len(headline) == 1:
        pick = headline[0]
        rival = min((r for r in unbeaten if r is not pick), key=lambda r: r["p50_ms"])
        ci = intervals(boot, pick["artifact"], rival["artifact"])
        return pick, f"p50 and p90 disagree, the lower p90 wins ({_versus(pick, rival, ci)})"
    pool = headline or unbeaten
    pick = _by_rule(pool)
    rival = min((r for r in pool if r is not pick), key=lambda r: r["p50_ms"])
    ci = intervals(boot, pick["artifact"], rival["artifact"])
    kind = "no clear winner, p50 and p90 disagree" if _split(ci) else "tie within noise"
    why = "smaller file" if pick["size_bytes"] < rival["size_bytes"] else "equal size, int8"
    return pick, f"{kind} ({_versus(pick, rival, ci)}): {why}"


def recommend(folder: Path, entries: list[dict], target, x: np.ndarray, run_cfg, time_here: bool = True) -> dict:
    """The manifest's `recommended` record for one target; `time_here` False (build.run_local: false, as in a
    search's trials, which are timed in a phase of their own) times nothing."""
    host = platform.machine()
    if not target.runs_here or not time_here:
        why = (f"the target is {target.arch} and this machine {host}" if not target.runs_here
               else "build.run_local is false")
        return {"artifact": None, "measured": False, "candidates": [],
                "reason": f"not measured: {why}; run each artifact on the device (`runner.py BUNDLE --artifact NAME`, "
                          "or `edgekit run`) and compare"}
    samples = measure(folder, entries, x, target.threads, run_cfg)
    timing = {name: latency_stats(s) for name, s in samples.items()}
    rows = candidates(entries, timing, bootstrap(samples))
    pick, reason = choose(rows, samples, target.accuracy_tolerance_pp)
    return {"artifact": pick["artifact"], "reason": reason, "rule": RULE, "measured": True, "host": host,
            "threads": target.threads, "method": METHOD if target.threads == 1 else BLOCK_METHOD,
            "candidates": rows}
