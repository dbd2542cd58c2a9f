"""Structured pruning: physically remove channels by filter L1 norm (Li et al. 2017), then fine-tune."""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from edgekit import training
from edgekit.errors import ConfigError
from edgekit.stages.base import Context, finish_torch_stage

name = "prune"
# Li et al. 2017: rank a group's channels by the L1 norm of the filters of its first (pruned) conv.
L1_FILTER_NORM = tp.importance.MagnitudeImportance(p=1, normalizer=None, group_reduction="first")


def _ignored(model: nn.Module, names: list[str], num_classes: int) -> list[nn.Module]:
    """The classifier (any Linear/conv that outputs num_classes) and the modules the user named."""
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise ConfigError(f"prune.ignore names '{unknown[0]}', which is not a module of the model; "
                          f"valid: {', '.join(n for n in modules if n)}")
    heads = [m for m in modules.values()
             if (isinstance(m, nn.Linear) and m.out_features == num_classes)
             or (isinstance(m, nn.modules.conv._ConvNd) and m.out_channels == num_classes)]
    return heads + [modules[n] for n in names]


def prune_l1(model: nn.Module, sample_shape: tuple[int, ...], num_classes: int, *, ratio: float,
             round_to: int | None, ignore: list[str]) -> nn.Module:
    """Remove `ratio` of the channels of every prunable layer; couplings are pruned as groups."""
    pruner = tp.pruner.MetaPruner(
        model, torch.zeros(1, *sample_shape), importance=L1_FILTER_NORM,
        pruning_ratio=ratio, ignored_layers=_ignored(model, ignore, num_classes), round_to=round_to,
    )
    pruner.step()
    return model


def run(ctx: Context) -> dict:
    p, data = ctx.cfg.prune, ctx.data
    model = ctx.load_model(ctx.latest_model_stage(before=name))
    prune_l1(model, data.sample_shape, data.num_classes, ratio=p.ratio, round_to=p.round_to, ignore=p.ignore)
    best_val = training.fit(model, data.train, data.val, epochs=p.finetune_epochs, lr=p.lr,
                            batch_size=ctx.cfg.train.batch_size, seed=ctx.cfg.train.seed, desc="finetune")
    return finish_torch_stage(ctx, name, model, val_accuracy=best_val, method=p.method,
                              settings={"ratio": p.ratio, "round_to": p.round_to, "ignore": p.ignore,
                                        "finetune_epochs": p.finetune_epochs})
