"""What a structured pruner may touch: the weighted layers, the protected ones (classifier, stem, named), and
Li et al.'s filter-L1 ranking. Shared by the prune stage and the sensitivity analysis."""

from __future__ import annotations

import torch_pruning as tp
from torch import nn

from edgekit.errors import ConfigError

# Li et al. 2017: rank a group's channels by the L1 norm of the filters of its first (pruned) conv.
L1_FILTER_NORM = tp.importance.MagnitudeImportance(p=1, normalizer=None, group_reduction="first")


def weighted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.modules.conv._ConvNd)]


def output_channels(model: nn.Module) -> int:
    """Output channels (conv) and features (linear) summed over the weighted layers: what pruning removes."""
    return sum(layer_channels(model).values())


def layer_channels(model: nn.Module) -> dict[str, int]:
    """Output channels (conv) or features (linear) of each weighted layer, by module name."""
    return {n: m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features
            for n, m in weighted_layers(model)}


def protected_layers(model: nn.Module, names: list[str], num_classes: int, *, protect_stem: bool) -> list[nn.Module]:
    """The classifier (any Linear/conv that outputs num_classes), the stem (first conv) and named modules."""
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise ConfigError(f"prune.ignore names '{unknown[0]}', which is not a module of the model; "
                          f"valid: {', '.join(n for n in modules if n)}")
    heads = [m for m in modules.values()
             if (isinstance(m, nn.Linear) and m.out_features == num_classes)
             or (isinstance(m, nn.modules.conv._ConvNd) and m.out_channels == num_classes)]
    layers = weighted_layers(model)
    stem = [layers[0][1]] if protect_stem and layers and layers[0][1] not in heads else []
    return heads + stem + [modules[n] for n in names]
