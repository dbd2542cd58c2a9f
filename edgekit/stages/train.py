"""Train the fp32 model (or take the user's checkpoint as it is when train.epochs is 0)."""

from __future__ import annotations

from edgekit import models, training
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
    if t.epochs == 0 and not cfg.model.checkpoint:
        print(f"[{name}] train.epochs is 0 and model.checkpoint is not set: the model keeps the weights its factory "
              "gave it (random, unless the factory loads some); set train.epochs or model.checkpoint")
    best_val = training.fit(model, data.train, data.val, epochs=t.epochs, lr=t.lr, batch_size=t.batch_size,
                            weight_decay=t.weight_decay, seed=t.seed, desc="train", workers=t.workers)
    near = near_chance(best_val, data.num_classes)
    if near:
        print(f"[{name}] warning: {near}", flush=True)
    return finish_torch_stage(ctx, name, model, val_accuracy=best_val, method="adam+cosine",
                              settings={"epochs": t.epochs, "lr": t.lr, "batch_size": t.batch_size,
                                        "workers": t.workers}, **({"warnings": [near]} if near else {}))


def near_chance(val_accuracy: float, num_classes: int) -> str | None:
    """The warning when the model has not clearly learned: its validation accuracy is below both 1.5 x chance
    (1/K for K classes) and chance + 10 pp. A model that learned anything useful clears one of them (10 classes:
    0.15; 2 classes: 0.60; 1000 classes: 0.0015); everything after train would compress noise."""
    chance = 1 / num_classes
    if val_accuracy >= min(1.5 * chance, chance + 0.10):
        return None
    return (f"validation accuracy {val_accuracy:.3f} is near chance ({chance:.3f} for {num_classes} classes): the "
            "later stages compress a model that has not learned; train longer (train.epochs), raise train.lr, "
            "or check the labels")
