"""Models: the built-in small CNN, a user's own factory and checkpoint, saving pruned models."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import sys
from pathlib import Path

import torch
from torch import nn

from edgekit.config import Config
from edgekit.errors import ModelError
from edgekit.models import persist


def _load_factory(spec: str, base: Config) -> object:
    """`path/to/file.py:function`, or `package.module:function` importable from sys.path."""
    source, sep, func = spec.rpartition(":")
    if not sep or not source or not func:
        raise ModelError(f"model.factory '{spec}' must look like path/to/file.py:function or package.module:function")
    module = _import_file(base.resolve(source)) if source.endswith(".py") else _import_module(source)
    if not callable(getattr(module, func, None)):
        raise ModelError(f"'{source}' has no function '{func}'")
    return getattr(module, func)


def _import_module(name: str) -> object:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise ModelError(f"model.factory module '{name}' not found on sys.path ({exc}); give the file as "
                         "path/to/file.py:function or add its folder to PYTHONPATH") from exc
    except Exception as exc:  # the user's code can raise anything; report it in one line
        raise ModelError(f"importing '{name}' failed: {type(exc).__name__}: {exc}") from exc


def _import_file(path: Path) -> object:
    """Import a user's file under a stable name, registered in sys.modules (copies and dataclasses need it),
    with its folder on sys.path (last, so it shadows no installed package) so that it can import its siblings."""
    if not path.is_file():
        raise ModelError(f"model.factory file '{path}' not found")
    name = f"edgekit_user_model_{path.stem}"
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, path))  # type: ignore[arg-type]
    sys.modules[name] = module
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    try:
        module.__spec__.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as exc:  # the user's file can raise anything; report it in one line
        sys.modules.pop(name, None)
        raise ModelError(f"importing '{path}' failed: {type(exc).__name__}: {exc}") from exc
    return module


def _call_factory(factory: object, sample_shape: tuple[int, ...], num_classes: int, spec: str) -> nn.Module:
    offered = {"num_classes": num_classes, "input_shape": sample_shape, "in_channels": sample_shape[0]}
    params = inspect.signature(factory).parameters  # type: ignore[arg-type]
    kwargs = {k: v for k, v in offered.items() if k in params}
    try:
        model = factory(**kwargs)  # type: ignore[operator]
    except Exception as exc:
        if isinstance(exc, TypeError) and "argument" in str(exc):  # most likely its signature
            raise ModelError(f"model.factory '{spec}' raised TypeError: {exc}; edgekit passes only the arguments "
                             f"it names among {', '.join(offered)} (give the others defaults)") from exc
        raise ModelError(f"model.factory '{spec}' raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"model.factory '{spec}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _load_checkpoint(model: nn.Module, path: Path, num_classes: int | None = None) -> None:
    """A state_dict (or a training checkpoint around one, or a model.pt an edgekit build saved) into `model`;
    one line when it does not fit (`num_classes`: the data's, to name a classifier made for another number)."""
    if not path.is_file():
        raise ModelError(f"checkpoint '{path}' not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if "Unsupported global" in str(exc):  # weights_only refused a pickled object: torch.save(model), say
            raise ModelError(f"checkpoint '{path}' holds pickled Python objects (a whole model saved with "
                             "torch.save(model)?), which edgekit does not unpickle, as that can run any code; save "
                             "torch.save(model.state_dict(), path) instead") from exc
        raise ModelError(f"checkpoint '{path}' cannot be read as a torch or safetensors file "
                         f"({type(exc).__name__}); save torch.save(model.state_dict(), path)") from exc
    saved_by_edgekit = isinstance(state, dict) and state.get("format") == persist.FORMAT
    state = _edgekit_weights(model, state) if saved_by_edgekit else _unwrapped(state)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:
        misfit = _misfit(model, state, exc, num_classes, saved_by_edgekit)
        raise ModelError(f"checkpoint '{path}' does not fit the model: {misfit}") from exc


def _edgekit_weights(model: nn.Module, saved: dict) -> dict:
    """The state_dict in a model.pt edgekit saved (edgekit.models.persist: every parameter and buffer, with the
    modules' attributes), so that a build's stages/train/model.pt restarts a build from its trained weights:
    its tensors without the buffers a state_dict leaves out (non-persistent ones)."""
    tensors = saved.get("tensors") or {}
    # a module or weight reachable under two names is saved once, under its first name; state_dict wants both
    first = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}
    aliases = {n: first.get(id(t)) for n, t in [*model.named_parameters(remove_duplicate=False),
                                                  *model.named_buffers(remove_duplicate=False)]}
    source = {k: aliases.get(k) or k for k in model.state_dict()}
    state = {k: tensors[src] for k, src in source.items() if src in tensors}
    left_out = {n for n, _ in model.named_buffers()} - set(source)  # non-persistent: no state_dict key
    state.update({k: v for k, v in tensors.items() if k not in set(source.values()) | left_out})  # misfits named
    return state


CHECKPOINT_WRAPPERS = ("state_dict", "model_state_dict", "model", "net")  # {'model': state_dict, 'epoch': 3}


def _unwrapped(state: object) -> object:
    """The state_dict inside a training checkpoint's usual wrapper, without DistributedDataParallel's 'module.'."""
    if isinstance(state, dict):
        inner = next((state[k] for k in CHECKPOINT_WRAPPERS if isinstance(state.get(k), dict)), None)
        state = inner if inner is not None else state
        if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
            state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _misfit(model: nn.Module, state: object, exc: BaseException, num_classes: int | None = None,
            saved_by_edgekit: bool = False) -> str:
    """Which keys are missing or unexpected, or which shape does not match: one line."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a state_dict; save model.state_dict()"
    want, got = set(model.state_dict()), set(state)
    missing, extra = sorted(want - got), sorted(map(str, got - want))
    if missing or extra:
        def some(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
        parts = [f"{len(missing)} of the model's keys missing ({some(missing)})" if missing else "",
                 f"{len(extra)} keys the model does not have ({some(extra)})" if extra else ""]
        return "; ".join(p for p in parts if p) + "; save model.state_dict() of this architecture"
    return _shape_misfit(model, state, num_classes, saved_by_edgekit) or _torch_says(exc)


def _torch_says(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return next((ln for ln in lines if "size mismatch" in ln), lines[0] if lines else type(exc).__name__)


def _shape_misfit(model: nn.Module, state: dict, num_classes: int | None, saved_by_edgekit: bool) -> str | None:
    """A classifier made for another number of classes, or a pruned model edgekit saved, said as such."""
    want = model.state_dict()
    other = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in want.items()
             if isinstance(state.get(k), torch.Tensor) and state[k].shape != v.shape]
    if not other:
        return None
    key, got, shape = other[0]
    if num_classes is not None and all(g[1:] == s[1:] and s[0] == num_classes != g[0] for _, g, s in other):
        return (f"its {key} is shaped for {got[0]} classes, the data has {num_classes}: give a checkpoint of a "
                f"{num_classes}-class model, or load these weights in your model.factory and give it a new "
                "classifier for num_classes there")
    if saved_by_edgekit:
        return (f"an edgekit build saved it for other shapes ({key} is {got}, the model's {shape}): a pruned "
                "stage's model.pt, or a build of another model config; model.checkpoint gives weights to the "
                "unpruned model this config builds: use stages/train/model.pt of a build with this model config")
    return None


def build_named(name: str, sample_shape: tuple[int, ...], num_classes: int, *, width: int = 32,
                width_mult: float = 1.0) -> nn.Module:
    """A model of the zoo (edgekit.models.zoo) by name."""
    from edgekit.models import zoo

    return zoo.get(name)(sample_shape, num_classes, width=width, width_mult=width_mult)


def build_model(cfg: Config, sample_shape: tuple[int, ...], num_classes: int, *,
                with_checkpoint: bool = True) -> nn.Module:
    """The model the config names, with its checkpoint loaded; checked with one forward pass."""
    if cfg.model.factory:
        model = _call_factory(_load_factory(cfg.model.factory, cfg), sample_shape, num_classes, cfg.model.factory)
    else:
        model = build_named(cfg.model.name, sample_shape, num_classes, width=cfg.model.width,
                            width_mult=cfg.model.width_mult)
    if with_checkpoint and cfg.model.checkpoint:
        _load_checkpoint(model, cfg.resolve(cfg.model.checkpoint), num_classes)
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *sample_shape))
    except Exception as exc:
        hint = (f"; samples of shape {sample_shape} are read as (channels, length) signals, which need Conv1d "
                "layers: for one-channel images save x as (N, 1, H, W)" if len(sample_shape) == 2 else "")
        raise ModelError(f"the model cannot take samples of shape {sample_shape}: {type(exc).__name__}: {exc}"
                         f"{hint}") from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"the model must return logits (batch, {num_classes}); it returned {shape}")
    return model


SPEC_FILE = "model_spec.json"  # beside a model.pt whose architecture is not the config's (a zoo student)


def save_model(model: nn.Module, path: Path, spec: dict | None = None) -> None:
    """Save weights and pruned shapes as plain tensors (edgekit.models.persist), atomically.

    `spec` ({"name", "width", "width_mult"}) records a zoo architecture other than the config's model.
    """
    persist.save(model, path)
    if spec is not None:
        (path.parent / SPEC_FILE).write_text(json.dumps(spec))


def load_model(cfg: Config, sample_shape: tuple[int, ...], num_classes: int, path: Path) -> nn.Module:
    """Rebuild the config's model (or the zoo model of a spec file beside it) and give it the saved state."""
    state = persist.read(path)
    spec_file = path.parent / SPEC_FILE
    if spec_file.is_file():
        spec = json.loads(spec_file.read_text())
        model = build_named(spec["name"], sample_shape, num_classes, width=spec["width"],
                            width_mult=spec["width_mult"])
    else:
        model = build_model(cfg, sample_shape, num_classes, with_checkpoint=False)
    return persist.apply_state(model, state, str(path)).eval()
