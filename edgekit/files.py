"""Writing files atomically: a crash or a full disk leaves the old file or none, never half of one."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def write_json(path: Path, data: object) -> None:
    """Write JSON atomically: a crash leaves the old file or none, never half of one."""
    write_bytes(path, (json.dumps(data, indent=2, default=_json_default) + "\n").encode())


def write_bytes(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600: a bundle must be readable by the device's (or image's) user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # a full disk leaves no half-written temp file behind
        raise


def _json_default(obj: object) -> object:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


READY = ".edgekit-ready"  # written last into a cached folder: one without it is incomplete and made again


def cache_dir() -> Path:
    """edgekit's cache: $EDGEKIT_CACHE, else $XDG_CACHE_HOME/edgekit, else ~/.cache/edgekit."""
    if os.environ.get("EDGEKIT_CACHE"):
        return Path(os.environ["EDGEKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgekit"


@contextlib.contextmanager
def locked(path: Path, on_wait=None) -> Iterator[None]:
    """One process at a time makes a cached folder: two builds at once wait for each other. `on_wait()` is
    called once when another holds the lock, before waiting for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def temp_root(folder: Path) -> Iterator[None]:
    """Every temporary file made meanwhile (ours, onnxruntime's quantizer's, onnx2tf's) goes under `folder` (inside
    the build folder): a killed stage leaves nothing in the system's temp folder."""
    saved = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = saved


MODEL_FILE = "model.pt"  # a stage's torch model (edgekit.models.persist)
METRICS_FILE = "metrics.json"  # a stage's record, written last (edgekit.stages.base)


def stage_files(out_dir: Path, model_file: str = MODEL_FILE) -> dict:
    """The real sizes of the files a stage saved: `size_bytes` is its model file's, `files` all of them (not its
    metrics.json, not hidden files)."""
    files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())
             if p.is_file() and p.name != METRICS_FILE and not p.name.startswith(".")}
    return {"size_bytes": files.get(model_file), "size_file": model_file, "files": files}


def cached_record(section: str, key: str) -> dict | None:
    """A JSON record stored under cache_dir()/section by `store_record`, or None (missing or unreadable)."""
    try:
        record = json.loads(_record_path(section, key).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def store_record(section: str, key: str, record: dict) -> bool:
    """Keep a JSON record under cache_dir()/section (atomically); a cache that cannot be written is no error."""
    try:
        write_json(_record_path(section, key), record)
    except OSError:
        return False
    return True


def _record_path(section: str, key: str) -> Path:
    if not key.isalnum():
        raise ValueError(f"a cache key is a hex digest, not '{key}'")
    return cache_dir() / section / key[:2] / f"{key}.json"


LOCK_FILE = ".edgekit.lock"  # flock'ed by the build or search writing into a folder


def lock_held(out: Path) -> bool:
    """Whether a build or search holds `out`'s lock now (taken and let go at once; nothing is written)."""
    try:
        fd = os.open(out / LOCK_FILE, os.O_RDONLY)
    except OSError:  # no lock file: nothing runs there
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False  # a file system without flock: claim() says so when it locks
    finally:
        os.close(fd)
    return False
