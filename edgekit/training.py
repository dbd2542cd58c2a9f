"""One training loop for every stage that trains: seeded, with a progress bar, keeping the best epoch."""

from __future__ import annotations

import copy
import functools
import random
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from edgekit import ddp, progress
from edgekit.data import Split
from edgekit.errors import TrainingDiverged
from edgekit.metrics import accuracy, logits

# loss(model outputs, labels, inputs) -> scalar; inputs let distillation ask the teacher
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# each loop (fit's `desc`, up to a space: "finetune round 2/3") -> its stage and the setting of its learning rate
LOOPS = {"train": ("train", "train.lr"), "sparsity": ("prune", "prune.lr"), "finetune": ("prune", "prune.lr"),
         "distill": ("distill", "distill.lr"), "qat": ("quantize", "quantize.lr")}
HIGH_LR = 0.01  # Adam's usual learning rates are 1e-4 to 1e-2: above, "raise the lr" is not the advice


def lr_advice(lr: float, setting: str = "train.lr") -> str:
    """What to do with the learning rate when a model did not learn: raise it, unless it is already high."""
    return f"lower {setting} ({lr:g} is above Adam's usual 1e-4 to 1e-2)" if lr > HIGH_LR else f"raise {setting}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cross_entropy(out: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y)


class _BatchReader(torch.utils.data.Dataset):
    """One whole batch per item: a memory-mapped split is read with one sorted read per batch, not per sample."""

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split.y)

    def __getitem__(self, item: tuple[torch.Tensor, float]) -> tuple[torch.Tensor, torch.Tensor, float]:
        rows, share = item[0].numpy(), item[1]
        return torch.from_numpy(self.split.x[rows]), torch.from_numpy(self.split.y[rows]), share


class _Orders(torch.utils.data.Sampler):
    """One (index tensor, weight) per batch, a new shuffle each epoch from torch's global generator (so
    train.seed repeats them), drawn in the training process; also the DataLoader's sampler.

    Among data-parallel workers (edgekit.ddp) every worker draws the same shuffle and takes its own slice of
    each batch, so it reads only its share; the weight (share size x workers / batch size) makes the averaged
    gradient the whole batch's when the last batch does not divide evenly.

    A last batch that would give some worker a share of one sample (one sample in one process) joins the batch
    before it: BatchNorm cannot train on one sample ("Expected more than 1 value per channel"); none is dropped."""

    def __init__(self, n: int, batch_size: int, group: ddp.Group | None = None) -> None:
        self.n, self.batch_size = n, batch_size
        self.rank, self.world = (group.rank, group.world) if group else (0, 1)
        self.fold = n > batch_size and 0 < n % batch_size < 2 * self.world

    def __iter__(self):
        # lazily: a DataLoader makes a sampler iterator it never reads (_BaseDataLoaderIter, then _reset) and the
        # order must be drawn once per epoch, as the in-memory path draws it
        batches = list(torch.randperm(self.n).split(self.batch_size))
        if self.fold:
            batches[-2:] = [torch.cat(batches[-2:])]
        for batch in batches:
            if len(batch) < self.world:
                continue  # the only batch, too small to share: every worker skips it
            rows = batch.tensor_split(self.world)[self.rank]
            yield rows, len(rows) * self.world / len(batch)

    def __len__(self) -> int:
        return -(-self.n // self.batch_size) - self.fold


class Batches:
    """Shuffled mini-batches of a split (a worker's share of each, among data-parallel workers), each with its
    weight (1.0 in one process). In-memory arrays are indexed directly; a memory-mapped split (data.Rows)
    is read batch by batch, in `Rows.workers` DataLoader processes when set: they stay up for the whole fit and
    end with this object (nothing here refers back to it, so no garbage cycle keeps them alive)."""

    def __init__(self, split: Split, batch_size: int, group: ddp.Group | None = None) -> None:
        self.orders = _Orders(len(split.y), batch_size, group)
        workers = getattr(split.x, "workers", 0)
        self.loader = None if isinstance(split.x, np.ndarray) else torch.utils.data.DataLoader(
            _BatchReader(split), batch_size=None, sampler=self.orders, num_workers=workers,
            persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))
        self.tensors = (torch.from_numpy(split.x), torch.from_numpy(split.y)) if self.loader is None else None

    def __iter__(self):
        if self.loader is not None:
            return iter(self.loader)
        x, y = self.tensors
        return ((x[idx], y[idx], share) for idx, share in self.orders)


def fit(model: nn.Module, train: Split, val: Split, *, epochs: int, lr: float, batch_size: int = 64,
        weight_decay: float = 0.0, seed: int = 0, loss_fn: LossFn = cross_entropy, desc: str = "train",
        keep_best: bool = True, extra_params: list[nn.Parameter] | None = None, keep_zeros: bool = False,
        workers: int = 1) -> float:
    """Train in place with Adam and a cosine schedule; load the weights of the best validation epoch.

    Returns that best validation accuracy. `keep_best=False` keeps the last epoch (sparsity training, where
    the effect wanted builds up over the epochs); `extra_params` are trained too (distillation adapters);
    `keep_zeros` holds weights that are exactly zero at zero (unstructured sparsity survives fine-tuning);
    `workers` > 1 trains data-parallel in that many processes (edgekit.ddp), on the same batches.
    """
    loop = functools.partial(_fit, model, train, val, epochs=epochs, lr=lr, batch_size=batch_size,
                             weight_decay=weight_decay, seed=seed, loss_fn=loss_fn, desc=desc, keep_best=keep_best,
                             extra_params=list(extra_params or []), keep_zeros=keep_zeros)
    if workers > 1:
        outcome = ddp.train(loop, model, list(extra_params or []), workers, desc)
    else:
        ddp.record(desc, workers=1)
        outcome = loop(None)
    if outcome["kept_start"]:  # the stage's output is its input: say so, and the stage's metrics record it
        advice = "raise train.epochs or train.lr" if lr <= HIGH_LR else lr_advice(lr)
        note = (f"no epoch beat the starting model's validation accuracy {outcome['start']:.3f}; "
                "kept the starting weights" + (f", so nothing was trained ({advice})" if desc == "train" else ""))
        print(f"[{desc}] {note}", flush=True)
        ddp.note(start_val_accuracy=outcome["start"], kept_start_weights=True, warning=note)
    return outcome["best"]


def _fit(model: nn.Module, train: Split, val: Split, group: ddp.Group | None, *, epochs: int, lr: float,
         batch_size: int, weight_decay: float, seed: int, loss_fn: LossFn, desc: str, keep_best: bool,
         extra_params: list[nn.Parameter], keep_zeros: bool) -> dict:
    """The loop, in this process (group None) or in one data-parallel worker; the lead (the only process, or
    worker 0) validates, keeps the best epoch and shows progress. Returns the best and the starting validation
    accuracy, and whether no epoch beat the start (the starting weights kept)."""
    seed_everything(seed)
    net = model if group is None else group.wrap(model)
    opt = torch.optim.Adam(list(model.parameters()) + extra_params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    batches = Batches(train, batch_size, group)
    lead = group is None or group.rank == 0
    best_acc, best_state = (accuracy(logits(model, val.x), val.y), copy.deepcopy(model.state_dict())) if lead \
        else (0.0, None)
    start, improved = best_acc, False
    masks = [(p, p.detach() != 0) for p in model.parameters() if p.dim() > 1] if keep_zeros else []
    bar = progress.epochs(epochs, desc, disable=not lead)
    for epoch in bar:
        model.train()
        for step, (xb, yb, share) in enumerate(batches):
            opt.zero_grad()
            loss = loss_fn(net(xb), yb, xb)
            if not torch.isfinite(loss).all():
                raise diverged(desc, epoch, epochs, lr, f"the loss became {loss.item()}", first=epoch == step == 0)
            (loss if share == 1.0 else loss * share).backward()
            if group is not None:
                group.average_grads(extra_params)
            opt.step()
            with torch.no_grad():
                for param, mask in masks:
                    param.mul_(mask)
        sched.step()
        if not lead:
            continue
        out = logits(model, val.x)
        if not np.isfinite(out).all():  # weights that overflowed in the last step: no loss saw them yet
            raise diverged(desc, epoch, epochs, lr, "the model's outputs on the validation split became "
                           f"{out[~np.isfinite(out)].flat[0]}")
        acc = accuracy(out, val.y)
        if acc > best_acc or not keep_best:
            best_acc, best_state, improved = acc, copy.deepcopy(model.state_dict()), True
        bar.set_postfix(loss=f"{loss.item():.3f}", val_acc=f"{acc:.3f}", best=f"{best_acc:.3f}")
    if lead:
        model.load_state_dict(best_state)
    return {"best": best_acc, "start": start, "kept_start": lead and epochs > 0 and not improved}


def diverged(desc: str, epoch: int, epochs: int, lr: float, what: str, first: bool = False) -> TrainingDiverged:
    """The one line for a loop whose loss or outputs became NaN or infinite: where, and what to do. On the first
    batch, before any step, the learning rate is not to blame."""
    stage, setting = LOOPS.get(desc.split(" ")[0], ("train", "train.lr"))
    where = f"stage {stage}" + (f" ({desc})" if desc != stage else "")
    advice = "the model's outputs or the data hold NaN or infinite values before any step: check the data and " \
        "the model (and model.checkpoint)" if first else \
        f"lower {setting} (now {lr:g}) or check the data for NaN or infinite values"
    return TrainingDiverged(f"training diverged in {where} at epoch {epoch + 1}/{epochs}: {what}; {advice}")
