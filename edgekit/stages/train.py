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
    return finish_torch_stage(ctx, name, model, val_accuracy=best_val, method="adam+cosine",
                              settings={"epochs": t.epochs, "lr": t.lr, "batch_size": t.batch_size,
                                        "workers": t.workers})
