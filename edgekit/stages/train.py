"""Train the fp32 model (or take the user's checkpoint as it is when train.epochs is 0)."""

from __future__ import annotations

import math

import numpy as np

from edgekit import models, training
from edgekit.data import split_gaps
from edgekit.stages.base import Context, always, finish_torch_stage

name = "train"
reads = ("data", "model", "train")
needs: tuple[str, ...] = ()
enabled = always


def run(ctx: Context) -> dict:
    cfg, data = ctx.cfg, ctx.data
    training.seed_everything(cfg.train.seed)
    model = models.build_model(cfg, data.sample_shape, data.num_classes)
    t = cfg.train
    for line in data.warnings:  # files the data source skipped: said before the training, not after it
        print(f"[{name}] warning: {line}", flush=True)
    if t.epochs == 0 and not cfg.model.checkpoint:
        print(f"[{name}] train.epochs is 0 and model.checkpoint is not set: the model keeps the weights its factory "
              "gave it (random, unless the factory loads some); set train.epochs or model.checkpoint")
    best_val = training.fit(model, data.train, data.val, epochs=t.epochs, lr=t.lr, batch_size=t.batch_size,
                            weight_decay=t.weight_decay, seed=t.seed, desc="train", workers=t.workers)
    near = near_chance(best_val, data.num_classes, len(data.val.y), majority_share(data.val.y), lr=t.lr)
    found = ([near] if near else []) + split_gaps(data)
    for line in found:
        print(f"[{name}] warning: {line}", flush=True)
    warnings = [*data.warnings, *found]
    return finish_torch_stage(ctx, name, model, val_accuracy=best_val, method="adam+cosine",
                              settings={"epochs": t.epochs, "lr": t.lr, "batch_size": t.batch_size,
                                        "workers": t.workers}, **({"warnings": warnings} if warnings else {}))


def majority_share(labels) -> float:
    """The accuracy of always answering the most common class of `labels`."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    return float(counts.max() / max(1, counts.sum()))


def near_chance(val_accuracy: float, num_classes: int, n_val: int, majority: float | None = None, *,
                lr: float | None = None) -> str | None:
    """The warning when the model has not clearly learned: its validation accuracy is below both 1.5 x chance
    (1/K for K classes) and chance + 10 pp, or, on few validation samples, below chance + two standard errors of
    a guessing model's accuracy there (10 classes, 40 samples: 0.195). A model that learned anything useful
    clears them (10 classes: 0.15; 2 classes: 0.60; 1000 classes: 0.0015); everything after train would
    compress noise. On imbalanced data, also below the `majority` class's share + two standard errors: a model
    that answers one class for every input scores that share (5 classes, 46 % of them one: 0.46, far above
    1/K), and has learned nothing either. The advice raises train.lr unless `lr` is already high for Adam."""
    chance = 1 / num_classes
    noise = chance + 2 * math.sqrt(chance * (1 - chance) / max(1, n_val))
    bar = max(min(1.5 * chance, chance + 0.10), noise)
    advice = ("the later stages compress a model that has not learned; train longer (train.epochs), "
              f"{training.lr_advice(lr) if lr is not None else 'raise train.lr'}, or check the labels")
    if val_accuracy < bar:
        small = f"; {noise:.3f} is within two standard errors of it on {n_val} validation samples" \
            if noise == bar else ""
        return f"validation accuracy {val_accuracy:.3f} is near chance ({chance:.3f} for {num_classes} " \
            f"classes{small}): {advice}"
    if majority and val_accuracy < majority + 2 * math.sqrt(majority * (1 - majority) / max(1, n_val)):
        return (f"validation accuracy {val_accuracy:.3f} is no better than always answering the most common class "
                f"({majority:.3f} of the {n_val} validation samples, within two standard errors): " + advice)
    return None
