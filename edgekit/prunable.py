"""What a structured pruner may touch: the weighted layers, the protected ones (classifier, stem, named, and those
feeding a channel shuffle), Li et al.'s filter-L1 ranking and the pruner itself. Shared by the prune stage and the
sensitivity analysis."""

from __future__ import annotations

import math

import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode

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


def protected_layers(model: nn.Module, names: list[str], num_classes: int, *, protect_stem: bool,
                     shape: tuple[int, ...]) -> list[nn.Module]:
    """The classifier (any Linear/conv that outputs num_classes), the stem (first conv), named modules and the
    layers whose channels are shuffled (`shuffled_layers`)."""
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
    return heads + stem + [modules[n] for n in names] + [modules[n] for n in shuffled_layers(model, shape)]


# Ops that move channels to other positions (or other counts): torch-pruning takes them for element-wise ops and
# removes channel k on both sides, which after a shuffle is another channel.
_SHUFFLES = {torch.pixel_shuffle, torch.pixel_unshuffle, torch.channel_shuffle, torch.native_channel_shuffle,
             nn.functional.pixel_shuffle, nn.functional.pixel_unshuffle, nn.functional.channel_shuffle}
_RESHAPES = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.unflatten, torch.unflatten}


def _splits_channels(before: torch.Size, after: torch.Size) -> bool:
    """A reshape that cuts the channel axis into pieces: dim 1 (N, C, ...: view to N, groups, C/groups, H, W, then
    transpose and reshape back) or the last one (channels last, after a permute). A flatten (fewer axes, dim 1
    merged with the spatial ones) is not one: torch-pruning maps it. Splitting a spatial last axis (N, C, L to
    N, C, H, W) is caught too: its layer is kept whole, which costs pruning, never correctness."""
    more_axes = len(after) > len(before) or (len(after) == len(before) and after[1] != before[1])
    return len(before) >= 3 and more_axes and (after[1] != before[1] or after[-1] != before[-1])


def _strided_channels(index) -> bool:
    """x[:, 0::2], x[:, perm]: channels taken out of order or every other one (ShuffleNetV2's split)."""
    if not isinstance(index, tuple) or len(index) < 2:
        return False
    pick = index[1]
    return (isinstance(pick, slice) and pick.step not in (None, 1)) or isinstance(pick, torch.Tensor | list)


class _Watch(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.found: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and args and isinstance(args[0], torch.Tensor) and (
                func in _SHUFFLES or (func in _RESHAPES and _splits_channels(args[0].shape, out.shape))
                or (func is torch.Tensor.__getitem__ and args[0].dim() >= 3 and _strided_channels(args[1]))):
            self.found.append(out)
        return out


SHUFFLED = ("their output channels pass a channel shuffle (a reshape that splits the channel axis, or a pixel/"
            "channel shuffle) the pruner cannot follow: cutting them would silently change what the model computes")


def shuffled_layers(model: nn.Module, shape: tuple[int, ...]) -> list[str]:
    """The weighted layers whose output channels reach a channel shuffle (a reshape that splits the channel
    axis, pixel/channel shuffle) before any other weighted layer, by module name. Pruning them would cut other
    channels on the two sides of the shuffle (a different function, silently), so they are kept whole."""
    owner: dict = {}

    def own(name: str):
        def hook(_module, _inputs, out) -> None:  # returns None: a value would replace the layer's output
            owner.setdefault(getattr(out, "grad_fn", None), name)
        return hook

    hooks = [m.register_forward_hook(own(n)) for n, m in weighted_layers(model)]
    watch, was_training = _Watch(), model.training
    try:
        with torch.enable_grad(), watch:
            model.eval()(torch.zeros(2, *shape, requires_grad=True).clone())  # not a leaf: `x -= 0.5` may run
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return sorted(_producers([t.grad_fn for t in watch.found], owner))


def _producers(fns: list, owner: dict) -> set[str]:
    """Walk the autograd graph back from `fns` to the first weighted layer on every path."""
    found, seen, stack = set(), set(), list(fns)
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if fn in owner:
            found.add(owner[fn])
        else:
            stack.extend(f for f, _ in fn.next_functions)
    return found


class Pruner(tp.pruner.MetaPruner):
    """torch-pruning's MetaPruner with `round_to` right for grouped convs. torch-pruning 1.6 rounds the cut of one
    group as if it were the whole layer's (64 channels in 4 groups, a 25 % cut: round_to 8 kept 32 channels,
    round_to 16 kept all 64); here each group keeps a count that makes the layer's total a multiple of round_to."""

    def __init__(self, *args, **kwargs):
        self._groups_of: dict = {}  # root layer -> its group's channel groups (MetaPruner asks while it builds)
        self._asked = None
        super().__init__(*args, **kwargs)
        for fn in ("get_out_channels", "get_in_channels"):  # the layer whose channels are rounded next
            ask = getattr(self.DG, fn)
            setattr(self.DG, fn, lambda m, ask=ask: (setattr(self, "_asked", m), ask(m))[1])

    def _get_channel_groups(self, group) -> int:
        groups = super()._get_channel_groups(group)
        self._groups_of[group[0].dep.target.module] = groups
        return groups

    def _round_to(self, n_pruned: int, current_channels: int, round_to: int) -> int:
        groups = self._groups_of.get(self._asked, 1)
        if groups <= 1:
            return super()._round_to(n_pruned, current_channels, round_to)
        per_group = current_channels // groups  # n_pruned counts the channels cut in each group
        step = round_to // math.gcd(round_to, groups)  # per-group counts that make the total a multiple
        kept = per_group - n_pruned
        return per_group - max(kept - kept % step, min(step, per_group))
