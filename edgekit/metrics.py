"""Numbers every stage reports: accuracy, size, MACs, and fidelity of one output against a reference.

torch is imported where it is used: fidelity checks import this module in processes that run a runtime only
(e.g. under CPU emulation, where importing torch costs minutes)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import nn


def logits(model: nn.Module, x: np.ndarray, batch: int = 256) -> np.ndarray:
    import torch

    model.eval()
    with torch.no_grad():
        outs = [model(torch.from_numpy(x[i : i + batch])).float().numpy() for i in range(0, len(x), batch)]
    return np.concatenate(outs)


def accuracy(out: np.ndarray, y: np.ndarray) -> float:
    return float((out.argmax(1) == y).mean())


def macs_and_params(model: nn.Module, sample_shape: tuple[int, ...]) -> tuple[int, int]:
    import torch
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, *sample_shape))
    return int(macs), int(params)


def sqnr_db(reference: np.ndarray, value: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of `value` against `reference`, in dB (inf when equal)."""
    noise = float(np.sum((reference.astype(np.float64) - value) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    if noise == 0:
        return float("inf")
    return float(10 * np.log10(max(signal, 1e-30) / noise))


def fidelity(reference: np.ndarray, out: np.ndarray) -> dict:
    """Top-1 agreement, max abs diff and SQNR (dB) of `out` against `reference` logits."""
    sqnr = sqnr_db(reference, out)
    return {
        "top1_agreement": float((reference.argmax(1) == out.argmax(1)).mean()),
        "max_abs_diff": float(np.abs(reference - out).max()),
        "sqnr_db": sqnr,
    }
