"""Knowledge distillation (Hinton et al.): the pruned student learns the unpruned teacher's soft targets."""

from __future__ import annotations

import torch
from torch import nn

from edgekit import training
from edgekit.stages.base import Context, finish_torch_stage

name = "distill"


def soft_target_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, *,
                     temperature: float, alpha: float) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)."""
    t = temperature
    kl = nn.functional.kl_div(nn.functional.log_softmax(student / t, dim=1),
                              nn.functional.log_softmax(teacher / t, dim=1), reduction="batchmean", log_target=True)
    return alpha * t * t * kl + (1 - alpha) * nn.functional.cross_entropy(student, labels)


def run(ctx: Context) -> dict:
    d, data = ctx.cfg.distill, ctx.data
    teacher = ctx.load_model("train")
    student = ctx.load_model(ctx.latest_model_stage(before=name))

    def loss(out: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            soft = teacher(x)
        return soft_target_loss(out, soft, y, temperature=d.temperature, alpha=d.alpha)

    best_val = training.fit(student, data.train, data.val, epochs=d.epochs, lr=d.lr,
                            batch_size=ctx.cfg.train.batch_size, seed=ctx.cfg.train.seed, loss_fn=loss,
                            desc="distill")
    return finish_torch_stage(ctx, name, student, val_accuracy=best_val, method="soft",
                              settings={"temperature": d.temperature, "alpha": d.alpha, "epochs": d.epochs,
                                        "teacher": "train"})
