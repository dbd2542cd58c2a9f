"""Numbers every stage reports: accuracy, size, MACs, and fidelity of one output against a reference."""

from __future__ import annotations

import numpy as np
import torch
import torch_pruning as tp
from torch import nn


@torch.no_grad()
def logits(model: nn.Module, x: np.ndarray, batch: int = 256) -> np.ndarray:
    model.eval()
    outs = [model(torch.from_numpy(x[i : i + batch])).float().numpy() for i in range(0, len(x), batch)]
    return np.concatenate(outs)


def accuracy(out: np.ndarray, y: np.ndarray) -> float:
    return float((out.argmax(1) == y).mean())


def macs_and_params(model: nn.Module, sample_shape: tuple[int, ...]) -> tuple[int, int]:
    macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, *sample_shape))
    return int(macs), int(params)


def fidelity(reference: np.ndarray, out: np.ndarray) -> dict:
    """Top-1 agreement, max abs diff and SQNR (dB) of `out` against `reference` logits."""
    noise = np.sum((reference - out) ** 2)
    signal = np.sum(reference**2)
    sqnr = float("inf") if noise == 0 else float(10 * np.log10(signal / noise))
    return {
        "top1_agreement": float((reference.argmax(1) == out.argmax(1)).mean()),
        "max_abs_diff": float(np.abs(reference - out).max()),
        "sqnr_db": sqnr,
    }
