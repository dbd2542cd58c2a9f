"""One training loop for every stage that trains: seeded, with a progress bar, keeping the best epoch."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from edgekit.data import Split
from edgekit.metrics import accuracy, logits

# loss(model outputs, labels, inputs) -> scalar; inputs let distillation ask the teacher
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cross_entropy(out: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y)


def fit(model: nn.Module, train: Split, val: Split, *, epochs: int, lr: float, batch_size: int = 64,
        weight_decay: float = 0.0, seed: int = 0, loss_fn: LossFn = cross_entropy, desc: str = "train",
        keep_best: bool = True, extra_params: list[nn.Parameter] | None = None, keep_zeros: bool = False) -> float:
    """Train in place with Adam and a cosine schedule; load the weights of the best validation epoch.

    Returns that best validation accuracy. `keep_best=False` keeps the last epoch (sparsity training, where
    the effect wanted builds up over the epochs); `extra_params` are trained too (distillation adapters);
    `keep_zeros` holds weights that are exactly zero at zero (unstructured sparsity survives fine-tuning).
    """
    seed_everything(seed)
    opt = torch.optim.Adam(list(model.parameters()) + list(extra_params or []), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    best_acc, best_state = accuracy(logits(model, val.x), val.y), copy.deepcopy(model.state_dict())
    masks = [(p, p.detach() != 0) for p in model.parameters() if p.dim() > 1] if keep_zeros else []
    bar = tqdm(range(epochs), desc=f"{desc:>9}", unit="epoch", leave=False)
    for _ in bar:
        model.train()
        order = torch.randperm(len(x))
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx], x[idx])
            loss.backward()
            opt.step()
            with torch.no_grad():
                for param, mask in masks:
                    param.mul_(mask)
        sched.step()
        acc = accuracy(logits(model, val.x), val.y)
        if acc > best_acc or not keep_best:
            best_acc, best_state = acc, copy.deepcopy(model.state_dict())
        bar.set_postfix(loss=f"{loss.item():.3f}", val_acc=f"{acc:.3f}", best=f"{best_acc:.3f}")
    model.load_state_dict(best_state)
    return best_acc
