"""The report's figures: matplotlib, rendered to inline SVG (text kept as text, so the page's numbers can be read
and searched; every point and curve carries an id that the page's data tables name).

A point is a dict with `id`, `label`, `x`, `y` and `kind` ("local", "device", "invalid"); a curve has `id`,
`label` and `samples` (milliseconds).
"""

from __future__ import annotations

import io

import numpy as np

KIND_STYLE = {  # marker, colour, filled
    "local": ("o", "#1f77b4", True),
    "device": ("s", "#2ca02c", True),
    "invalid": ("X", "#999999", False),
}
SERIES_COLOURS = ("#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
ECDF_POINTS = 400  # quantiles drawn per latency curve: the shape without tens of thousands of SVG vertices


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "edgekit", "font.size": 9})
    return plt


def to_svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": "edgekit"})
    _pyplot().close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # inline: no XML prolog or DOCTYPE


def pareto_front(points: list[dict]) -> list[str]:
    """Ids of the points no other valid point beats: lower or equal x and higher or equal y, one of them strictly."""
    valid = [p for p in points if p["kind"] != "invalid"]
    front = []
    for p in valid:
        beaten = any(q["x"] <= p["x"] and q["y"] >= p["y"] and (q["x"] < p["x"] or q["y"] > p["y"]) for q in valid)
        if not beaten:
            front.append(p["id"])
    return front


def _crowding(points: list[dict], log_x: bool) -> dict:
    """How many earlier points sit close to each point (as drawn), so that its label can go below theirs."""
    if log_x:
        points = [{**p, "x": float(np.log10(p["x"]))} for p in points]
    xs = [p["x"] for p in points] or [0.0]
    ys = [p["y"] for p in points] or [0.0]
    dx, dy = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    return {p["id"]: sum(abs(q["x"] - p["x"]) < 0.15 * dx and abs(q["y"] - p["y"]) < 0.05 * dy for q in points[:i])
            for i, p in enumerate(points)}


def tradeoff(points: list[dict], xlabel: str, title: str, *, log_x: bool = False) -> str:
    """Accuracy (y) against a cost (x), one marker per point, the Pareto front joined and ringed."""
    return to_svg(tradeoff_figure(points, xlabel, title, log_x=log_x))


def tradeoff_figure(points: list[dict], xlabel: str, title: str, *, log_x: bool = False):
    """The figure of `tradeoff`. Each label points into the plot (left of a point in the right half, below a point
    in the upper half), so none runs off an edge; the legend sits outside the axes, over no point."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    xs = [p["x"] for p in points if p["x"] and p["x"] > 0]
    log_x = bool(log_x and xs and len(xs) == len(points) and max(xs) / min(xs) > 20)  # log only across decades
    crowd = _crowding(points, log_x)
    where = _fractions(points, log_x)
    for p in points:
        marker, colour, filled = KIND_STYLE[p["kind"]]
        if p["kind"] != "invalid" and p.get("series"):  # one colour per build when there are several
            colour = SERIES_COLOURS[p["series"] % len(SERIES_COLOURS)]
        (line,) = ax.plot([p["x"]], [p["y"]], marker=marker, markersize=7, linestyle="none", color=colour,
                          markerfacecolor=colour if filled else "none")
        line.set_gid(p["id"])
        right, upper = where[p["id"]]
        step = 4 + 10 * crowd[p["id"]]  # crowded labels move further into the plot, away from their neighbours'
        ax.annotate(p["short"], (p["x"], p["y"]), textcoords="offset points", fontsize=7,
                    xytext=(-5 if right else 5, -step if upper else step), ha="right" if right else "left",
                    va="top" if upper else "bottom")
    front = sorted((p for p in points if p["id"] in set(pareto_front(points))), key=lambda p: p["x"])
    if front:
        (line,) = ax.plot([p["x"] for p in front], [p["y"] for p in front], drawstyle="steps-post", color="#d62728",
                          linewidth=1.2, marker="o", markersize=12, markerfacecolor="none", label="Pareto front")
        line.set_gid("pareto-front")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8)
    ax.margins(x=0.08, y=0.12)  # room for the rings and the labels at the edges
    if log_x:
        _log_axis(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    return fig


def _fractions(points: list[dict], log_x: bool) -> dict:
    """Per point: whether it lies in the right half of the x range and in the upper half of the y range."""
    def x_of(p: dict) -> float:
        return float(np.log10(p["x"])) if log_x else p["x"]

    xs, ys = [x_of(p) for p in points] or [0.0], [p["y"] for p in points] or [0.0]
    mid_x, mid_y = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    return {p["id"]: (x_of(p) > mid_x, p["y"] > mid_y) for p in points}


def _log_axis(ax) -> None:
    """A log x axis labelled with plain numbers (0.05, not 5x10^-2)."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda _v, _pos: ""))


def ecdf_points(samples: list[float]) -> tuple[np.ndarray, np.ndarray]:
    probs = np.linspace(0.0, 1.0, min(ECDF_POINTS, len(samples)))
    return np.quantile(np.asarray(samples, dtype=float), probs), probs


def latency_distribution(curves: list[dict]) -> str:
    """The cumulative distribution of every measured artifact's raw latency samples (log time axis), p50 and
    p90 dotted."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.25 * max(12, len(curves))))
    for c in curves:
        xs, ps = ecdf_points(c["samples"])
        (line,) = ax.plot(xs, ps, drawstyle="steps-post", linewidth=1.3, label=c["label"])
        line.set_gid(c["id"])
    for level in (0.5, 0.9):
        ax.axhline(level, color="#888888", linewidth=0.6, linestyle=":")
    _log_axis(ax)
    ax.set_xlabel("latency per inference, ms (log)")
    ax.set_ylabel("fraction of runs")
    ax.set_title("latency distribution (raw samples)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return to_svg(fig)


def sensitivity(result: dict) -> str:
    """`edgekit sensitivity`: the accuracy drop of each prunable layer against the fraction of its channels
    removed, the tolerance dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, (name, drops) in enumerate(result["layers"].items()):
        (line,) = ax.plot([float(r) for r in drops], [100 * d for d in drops.values()], marker="o", label=name)
        line.set_gid(f"sens-{i}")
    ax.axhline(100 * result["tolerance"], color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("fraction of the layer's channels removed (L1, no fine-tuning)")
    ax.set_ylabel("validation accuracy drop (pp)")
    ax.set_title("pruning sensitivity per layer", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return to_svg(fig)
