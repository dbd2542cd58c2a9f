"""Pruning sensitivity: prune each prunable layer alone at several ratios and measure the accuracy drop.

`edgekit sensitivity [CONFIG]` trains (or loads) the config's model, writes `sensitivity.json` and
`sensitivity.png`; `prune.use_sensitivity: true` turns the result into per-layer ratios (each layer gets the
largest tested ratio whose drop stays within TOLERANCE, so sensitive layers are pruned less).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from edgekit import metrics
from edgekit.data import Dataset
from edgekit.prunable import L1_FILTER_NORM, Pruner, protected_layers, weighted_layers

RATIOS = (0.25, 0.5, 0.75)
TOLERANCE = 0.02  # accuracy drop (absolute) a layer may cost without fine-tuning


def prunable_layers(model: nn.Module, num_classes: int, shape: tuple[int, ...], protect_stem: bool = True) -> list[str]:
    protected = set(map(id, protected_layers(model, [], num_classes, protect_stem=protect_stem, shape=shape)))
    return [n for n, m in weighted_layers(model) if id(m) not in protected]


def _prune_one(model: nn.Module, layer: str, ratio: float, shape: tuple[int, ...], num_classes: int) -> nn.Module:
    m = copy.deepcopy(model)
    modules = dict(m.named_modules())
    ignored = protected_layers(m, [], num_classes, protect_stem=False, shape=shape)
    pruner = Pruner(m, torch.zeros(1, *shape), importance=L1_FILTER_NORM, pruning_ratio=0.0,
                    pruning_ratio_dict={modules[layer]: ratio}, ignored_layers=ignored)
    pruner.step()
    return m


def analyse(model: nn.Module, data: Dataset, ratios: tuple[float, ...] = RATIOS,
            protect_stem: bool = True) -> dict:
    """{"baseline": acc, "layers": {name: {ratio: accuracy drop}}} on the validation split, L1 ranking."""
    base = metrics.accuracy(metrics.logits(model, data.val.x), data.val.y)
    layers = {}
    for name in prunable_layers(model, data.num_classes, data.sample_shape, protect_stem):
        drops = {}
        for r in ratios:
            pruned = _prune_one(model, name, r, data.sample_shape, data.num_classes)
            drops[str(r)] = base - metrics.accuracy(metrics.logits(pruned, data.val.x), data.val.y)
        layers[name] = drops
    return {"baseline": base, "ratios": list(ratios), "tolerance": TOLERANCE, "layers": layers}


def to_ratios(result: dict, tolerance: float = TOLERANCE) -> dict[str, float]:
    """Per layer, the largest tested ratio whose drop is within tolerance (0 when none is)."""
    out = {}
    for name, drops in result["layers"].items():
        ok = [float(r) for r, d in drops.items() if d <= tolerance]
        out[name] = max(ok) if ok else 0.0
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, drops in result["layers"].items():
        ax.plot([float(r) for r in drops], [100 * d for d in drops.values()], marker="o", label=name)
    ax.axhline(100 * result["tolerance"], color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("fraction of the layer's channels removed (L1, no fine-tuning)")
    ax.set_ylabel("validation accuracy drop (pp)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
