"""A stage's input key: a hash of everything its result depends on.

The key covers the data (a fingerprint of every split's arrays), the config sections the stage reads, the code
of a user's model, the graph it builds and its checkpoint, the target profiles (for stages that read them),
edgekit's version and code, the libraries' versions and torch's thread count, and the keys of the stages it
needs. It is recorded in the stage's metrics.json; `--resume` keeps a finished stage only when its recorded key is
the key it would have now, so a build never mixes a stage made from other data, code or libraries with stages
made from these.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import sys
import weakref
from pathlib import Path

import numpy as np

from edgekit import __version__, config
from edgekit.config import Config
from edgekit.versions import library_versions

CHUNK = 1 << 24  # bytes hashed at a time: a memory-mapped split larger than memory is read piece by piece
_FINGERPRINTS: dict[int, tuple[weakref.ref, str]] = {}  # id(dataset) -> (the dataset, its fingerprint)


def _hash_array(h: hashlib._Hash, a) -> None:
    """The samples as training sees them: an array in memory, or a memory-mapped split (data.Rows, which reads
    and scales rows on demand), a block of rows at a time; the same samples give the same digest either way."""
    h.update(f"{a.dtype.str}{tuple(a.shape)}".encode())
    if isinstance(a, np.ndarray):
        flat = a.reshape(-1)
        step = max(1, CHUNK // max(1, a.itemsize))
        for start in range(0, flat.size, step):
            h.update(np.ascontiguousarray(flat[start:start + step]).tobytes())
        return
    row_bytes = max(1, a.dtype.itemsize * int(np.prod(a.shape[1:])))
    step = max(1, CHUNK // row_bytes)
    for start in range(0, len(a), step):
        h.update(np.ascontiguousarray(a[start:start + step]).tobytes())


def data_fingerprint(data) -> str:
    """sha256 of every split's samples and labels, the label names and the preprocessing (once per dataset)."""
    ref, digest = _FINGERPRINTS.get(id(data), (None, ""))
    if ref is None or ref() is not data:
        h = hashlib.sha256(json.dumps([data.labels, data.preprocessing]).encode())
        for split in (data.train, data.val, data.test, data.calib):
            _hash_array(h, split.x)
            _hash_array(h, split.y)
        digest = h.hexdigest()
        _FINGERPRINTS[id(data)] = (weakref.ref(data), digest)
    return digest


@functools.cache
def edgekit_code() -> str:
    """sha256 of edgekit's own Python modules: a stage made by other edgekit code (an upgrade or a checkout that
    kept the version number) is not reused."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def torch_threads() -> int:
    """The torch thread count this process computes with."""
    import torch

    return torch.get_num_threads()


def _file_digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


_LOADED: set[tuple[str, str]] = set()  # factories built once in this process: what they import is loaded
LIBRARY_DIRS = ("site-packages", "dist-packages")


def _code_root(cfg: Config) -> Path | None:
    """Where the user's model code lives: the factory file's folder, or the top folder of its package."""
    import importlib.util

    source = cfg.model.factory.rpartition(":")[0]
    if source.endswith(".py"):
        return cfg.resolve(source).resolve().parent
    try:
        spec = importlib.util.find_spec(source.partition(".")[0])
    except (ImportError, ValueError):
        return None  # the build's own check says what is wrong with it
    if spec is None or not spec.origin:
        return None
    locations = list(spec.submodule_search_locations or [])
    return Path(locations[0]).resolve() if locations else Path(spec.origin).resolve().parent


def user_code(cfg: Config, sample_shape: tuple, num_classes: int) -> dict:
    """The user's model code by content: every module loaded from the factory's folder (its package's, for
    package.module) once the factory has built a model, so an edited helper or subpackage counts and an unrelated
    file beside it does not. Installed libraries and edgekit itself are covered by their versions."""
    root = _code_root(cfg)
    if root is None:
        return {}
    if (cfg.model.factory, str(root)) not in _LOADED:
        from edgekit import models

        models.build_model(cfg, sample_shape, num_classes, with_checkpoint=False)  # imports what it imports
        _LOADED.add((cfg.model.factory, str(root)))
    edgekit_dir = Path(__file__).resolve().parents[1]
    files = set()
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)  # torch.ops and torch.classes say '_ops.py': not a file
        path = Path(path).resolve() if path and Path(path).is_absolute() and Path(path).is_file() else None
        if path and path.is_relative_to(root) and not path.is_relative_to(edgekit_dir) \
                and not set(LIBRARY_DIRS) & set(path.relative_to(root).parts):
            files.add(path)
    return {str(p.relative_to(root)): _file_digest(p) for p in sorted(files)}


_STRUCTURES: dict[tuple, tuple[weakref.ref, str]] = {}  # (id(dataset), model section) -> (the dataset, digest)


def model_structure(cfg: Config, data) -> str:
    """The graph the factory builds now, whatever it reads (a JSON or YAML of hyper-parameters beside it, which
    user_code does not hash): the ONNX export of its untrained model, op by op with their attributes, and the
    weights' shapes, not their values. Once per dataset object, so once per build (0.05-1 s)."""
    import io

    import onnx

    from edgekit import models
    from edgekit.formats.onnx import torch_to_onnx

    cache = (id(data), repr(cfg.model), cfg.export.opset)
    ref, digest = _STRUCTURES.get(cache, (None, ""))
    if ref is None or ref() is not data:
        model = models.build_model(cfg, data.sample_shape, data.num_classes, with_checkpoint=False)
        buffer = io.BytesIO()
        torch_to_onnx(model.eval(), np.zeros((1, *data.sample_shape), np.float32), buffer, cfg.export.opset,
                      dynamic_batch=False)
        graph = onnx.load_from_string(buffer.getvalue()).graph
        h = hashlib.sha256()
        for node in graph.node:
            h.update(node.op_type.encode() + b"".join(a.SerializeToString() for a in node.attribute))
        for weight in graph.initializer:
            h.update(f"{weight.data_type}{tuple(weight.dims)}".encode())
        digest = h.hexdigest()
        _STRUCTURES[cache] = (weakref.ref(data), digest)
    return digest


def model_fingerprint(cfg: Config, data) -> dict:
    """The user's model code (edgekit.stages.keys.user_code), the graph it builds (model_structure) and its
    checkpoint, by content."""
    found: dict = {}
    if cfg.model.factory:
        found["factory"] = user_code(cfg, data.sample_shape, data.num_classes)
        found["structure"] = model_structure(cfg, data)
    if cfg.model.checkpoint:
        found["checkpoint"] = _file_digest(cfg.resolve(cfg.model.checkpoint))
    return found


def targets_fingerprint(targets: list) -> list:
    """The chosen target profiles as edgekit read them (name, artifacts, runtimes, thresholds, budgets)."""
    return [{k: v for k, v in dataclasses.asdict(t).items() if k != "source"} for t in targets]


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:20]


def inputs(ctx, stage, upstream: dict[str, str]) -> dict[str, str]:
    """A digest of each kind of input of `stage` in the build `ctx`, given the keys of the stages before it."""
    cfg = config.to_dict(config.absolute(ctx.cfg))  # as saved in the build folder, so --resume sees the same
    cfg["build"] = {k: v for k, v in cfg["build"].items() if k not in config.NO_EFFECT}
    if stage.name != "bundle":  # export.primary orders the bundle; quantize and export make the same files
        cfg["export"] = {k: v for k, v in cfg["export"].items() if k not in config.BUNDLE_ONLY}
    return {
        # torch's thread count: training sums in another order on another count (search trials train on one)
        "edgekit and libraries": _digest([stage.name, __version__, edgekit_code(), library_versions(),
                                          torch_threads()]),
        "data": data_fingerprint(ctx.data)[:20],
        "model code and checkpoint": _digest(model_fingerprint(ctx.cfg, ctx.data)),
        "config": _digest({section: cfg[section] for section in stage.reads if section in cfg}),
        "targets": _digest(targets_fingerprint(ctx.targets) if "targets" in stage.reads else None),
        "earlier stages": _digest({name: upstream.get(name) for name in stage.needs}),
    }


def key_of(parts: dict[str, str]) -> str:
    """The stage's input key: one digest of all its inputs."""
    return _digest(parts)


def changed(old: dict, new: dict) -> list[str]:
    """The kinds of input that differ between a recorded stage and now."""
    return [part for part in new if old.get(part) != new[part]]
