"""Feasibility against the budgets, the Pareto front and the recommendation.

Objectives: accuracy (higher), p90 latency and primary-artifact size (lower). A trial over any budget it was
checked against is infeasible, with why (an estimated latency or peak memory says so); a value not known is not
checked and says so. The recommendation is the most accurate feasible trial (then the faster, then the smaller).
"""

from __future__ import annotations

BUDGET_KEYS = ("latency_ms", "memory_mb", "size_kb")


def measured(trial: dict) -> dict:
    """A trial's value for each budget key (None: not known)."""
    return {"latency_ms": trial.get("latency_p90_ms"), "memory_mb": trial.get("peak_rss_mb"),
            "size_kb": trial["size_bytes"] / 1024 if trial.get("size_bytes") is not None else None}


def feasibility(trial: dict, budgets: dict) -> tuple[bool | None, list[str], list[str]]:
    """(feasible, why not, budgets not checked); feasible None for a failed trial."""
    if trial.get("status") != "ok":
        return None, [], []
    values = measured(trial)
    names = {"latency_ms": "p90 {v:.3g} ms > {b:g} ms", "memory_mb": "peak RSS {v:.1f} MB > {b:g} MB",
             "size_kb": "size {v:.1f} KB > {b:g} KB"}
    over, unchecked = [], []
    for key in BUDGET_KEYS:
        budget, value = budgets.get(key), values[key]
        if not budget:
            continue
        if value is None:
            unchecked.append(key)
        elif value > budget:
            label = names[key].format(v=value, b=budget)
            over.append(label + (" (estimated)" if _estimated(trial, key) else ""))
    return not over, over, unchecked


SOURCE_OF = {"latency_ms": "latency_source", "memory_mb": "memory_source"}


def _estimated(trial: dict, key: str) -> bool:
    return key in SOURCE_OF and str(trial.get(SOURCE_OF[key]) or "").startswith("estimated")


def _objectives(trial: dict) -> tuple[float, float, float]:
    """All to minimise."""
    latency = trial.get("latency_p90_ms")
    return (-trial["accuracy"], latency if latency is not None else float("inf"), float(trial["size_bytes"]))


def dominates(a: dict, b: dict) -> bool:
    oa, ob = _objectives(a), _objectives(b)
    return all(x <= y for x, y in zip(oa, ob, strict=True)) and any(x < y for x, y in zip(oa, ob, strict=True))


def front(trials: list[dict]) -> list[str]:
    """Ids of the finished trials no other finished trial dominates (accuracy, p90 latency, size)."""
    ok = [t for t in trials if t.get("status") == "ok"]
    return [t["id"] for t in ok if not any(dominates(o, t) for o in ok if o is not t)]


def recommend(trials: list[dict]) -> dict | None:
    feasible = [t for t in trials if t.get("feasible")]
    if not feasible:
        return None
    return min(feasible, key=lambda t: (_objectives(t), t["id"]))


def mark(trials: list[dict], budgets: dict) -> dict | None:
    """Set feasible / infeasible_because / unchecked / pareto on each trial; return the recommendation."""
    for trial in trials:
        ok, over, unchecked = feasibility(trial, budgets)
        trial.update(feasible=ok, infeasible_because=over, budgets_unchecked=unchecked)
    on_front = set(front(trials))
    for trial in trials:
        trial["pareto"] = trial["id"] in on_front
    return recommend(trials)


def parse_budget(text: str | None, defaults: dict) -> dict:
    """`latency_ms=5,memory_mb=256,size_kb=500` over the target's budgets (0 or missing: none)."""
    import math

    from edgekit.errors import ConfigError

    budgets = {k: (defaults.get(k) or None) for k in BUDGET_KEYS}
    given: set[str] = set()
    for part in filter(None, (text or "").split(",")):
        key, eq, value = part.partition("=")
        key = key.strip()
        if key not in BUDGET_KEYS or not eq:
            raise ConfigError(f"--budget '{part}': give KEY=NUMBER with KEY one of {', '.join(BUDGET_KEYS)}")
        if key in given:
            raise ConfigError(f"--budget gives {key} twice; give each budget once")
        given.add(key)
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"--budget {key}={value!r} is not a number") from None
        if not math.isfinite(number) or number < 0:  # nan would pass every comparison: every trial would fit
            raise ConfigError(f"--budget {key}={value}: give a finite number >= 0 (0: no budget)")
        budgets[key] = number or None
    return budgets


def plot(trials: list[dict], budgets: dict, recommended: dict | None, path) -> None:
    """Accuracy against p90 latency: every finished trial, the front joined, infeasible ones greyed, the
    recommendation starred, the latency budget as a line; estimated latencies and peak memory say so."""
    from edgekit.report_plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ok = [t for t in trials if t.get("status") == "ok" and t.get("latency_p90_ms") is not None]
    for feasible, style in ((True, dict(marker="o", color="#1f77b4")), (False, dict(marker="X", color="#999999"))):
        pts = [t for t in ok if bool(t.get("feasible")) == feasible]
        ax.scatter([t["latency_p90_ms"] for t in pts], [100 * t["accuracy"] for t in pts],
                   label="feasible" if feasible else "over budget", **style)
    line, best = [], -1.0  # the front of accuracy against latency alone (trials.json's `pareto` counts size too)
    for t in sorted(ok, key=lambda t: (t["latency_p90_ms"], -t["accuracy"])):
        if t["accuracy"] > best:
            line.append(t)
            best = t["accuracy"]
    # ringed, so a front of one point shows, and a front point over a budget is a grey X in an orange ring
    ax.plot([t["latency_p90_ms"] for t in line], [100 * t["accuracy"] for t in line], "--o", color="#ff7f0e",
            markerfacecolor="none", markersize=11, label="Pareto front (accuracy vs p90; trials.csv's counts size too)")
    for t in ok:
        ax.annotate(t["id"], (t["latency_p90_ms"], 100 * t["accuracy"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    if recommended is not None and recommended in ok:
        ax.scatter([recommended["latency_p90_ms"]], [100 * recommended["accuracy"]], marker="*", s=220,
                   color="#2ca02c", label="recommended", zorder=3)
    slowest = max((t["latency_p90_ms"] for t in ok), default=0.0)
    if budgets.get("latency_ms") and budgets["latency_ms"] <= 3 * slowest:
        ax.axvline(budgets["latency_ms"], color="#d62728", lw=1, label=f"budget {budgets['latency_ms']:g} ms")
    elif budgets.get("latency_ms"):
        ax.set_title(f"latency budget {budgets['latency_ms']:g} ms: beyond every trial", fontsize=8)
    sources = sorted({t["latency_source"] for t in ok if t.get("latency_source")})
    ax.set_xlabel(f"p90 latency, ms ({', '.join(sources) or 'none'})")
    ax.set_ylabel("accuracy of the shipped artifact, %")
    ax.set_ylim(top=min(100.5, ax.get_ylim()[1]))  # the axis's margin must not suggest accuracy above 100 %
    memory = sorted({t["memory_source"] for t in ok if t.get("memory_source")})  # the grey points may be over it
    note = f"peak RSS {', '.join(memory)}" if memory else None
    if note and budgets.get("memory_mb"):
        note += f", budget {budgets['memory_mb']:g} MB"
    ax.legend(fontsize=7, title=note, title_fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": "edgekit"})
    plt.close(fig)
