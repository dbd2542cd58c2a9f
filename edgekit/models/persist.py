"""Save and reload (pruned) models as plain tensors and numbers, never as pickled classes.

A pruned model differs from the one its factory builds in tensor shapes and in the plain attributes that
describe them (`out_channels`, `in_features`, `num_features`, `groups`, ...). Both are stored; loading
rebuilds the model from its factory and puts them back. No user class is pickled (a class local to a
factory never could be), and the file loads with `torch.load(weights_only=True)`: a planted pickle in a build
folder is refused, not executed.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn

from edgekit.errors import ModelError
from edgekit.files import write_bytes

FORMAT = "edgekit-model/1"
_PLAIN = (bool, int, float, str, type(None))


def _is_plain(value: object) -> bool:
    if isinstance(value, tuple | list):
        return all(_is_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def model_state(model: nn.Module) -> dict:
    """Every parameter and buffer (non-persistent ones too) and each module's plain public attributes."""
    tensors = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    attributes = {name: {k: v for k, v in vars(m).items() if not k.startswith("_") and _is_plain(v)}
                  for name, m in model.named_modules()}
    return {"format": FORMAT, "tensors": tensors, "attributes": attributes}


def apply_state(model: nn.Module, state: dict, where: str) -> nn.Module:
    """Give `model` (fresh from its factory) the saved shapes, attributes and values, in place."""
    modules = dict(model.named_modules())
    misfit = [n for n in state["attributes"] if n not in modules]
    misfit += [n for n in state["tensors"] if n.rpartition(".")[0] not in modules]
    if misfit:
        raise ModelError(f"'{where}' holds module '{misfit[0]}', which the model the config builds does not have; "
                         "the model code changed since that build: rebuild without --resume")
    missing = [n for n, _ in [*model.named_parameters(), *model.named_buffers()] if n not in state["tensors"]]
    if missing:
        raise ModelError(f"'{where}' has no '{missing[0]}', which the model the config builds has; "
                         "the model code changed since that build: rebuild without --resume")
    for name, attrs in state["attributes"].items():
        for key, value in attrs.items():
            setattr(modules[name], key, value)
    for full, tensor in state["tensors"].items():
        owner, _, leaf = full.rpartition(".")
        module = modules[owner]
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(tensor, requires_grad=module._parameters[leaf].requires_grad)
        else:
            module._buffers[leaf] = tensor
    return model


def save(model: nn.Module, path: Path) -> None:
    """Write atomically: a crash or a full disk leaves the old file or none."""
    buffer = io.BytesIO()
    torch.save(model_state(model), buffer)
    write_bytes(path, buffer.getvalue())


def read(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle with code, a damaged or foreign file: never executed, always refused
        raise ModelError(f"'{path}' is not a model file edgekit wrote ({type(exc).__name__}); it may be damaged "
                         "or from an older edgekit: rebuild without --resume") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ModelError(f"'{path}' is not a model file edgekit wrote (expected format {FORMAT}); "
                         "rebuild without --resume")
    return state
