"""The stage cache: a finished stage's folder, stored under its input key, reused by any build with that key.

A stage's key (edgekit.stages.keys) digests everything its result depends on, so two builds that reach a stage
with the same key would compute the same thing: the second copies the first's folder instead (the same fp32
model under other pruning settings trains once). Only stages whose results live wholly in their own folder are
stored: the model stages and export. The cache lives in `$EDGEKIT_STAGE_CACHE/<key>/`, by default
`<edgekit cache>/stages/<key>/` (edgekit.files.cache_dir); delete that folder to empty it, or set
`build.stage_cache: false` to build without it.

Two builds that reach the same key at once (search trials sharing a prefix) do not both compute it: the first
holds the key's "being built" lock (`building`) while it looks up, runs and stores the stage; the second waits
for that lock and then finds the stage in the cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from edgekit.files import METRICS_FILE, READY, cache_dir, locked
from edgekit.stages import MODEL_STAGES

CACHEABLE = (*MODEL_STAGES, "export")


def folder(key: str) -> Path:
    return Path(os.environ.get("EDGEKIT_STAGE_CACHE") or cache_dir() / "stages") / key


@contextlib.contextmanager
def building(name: str, key: str, log=print) -> Iterator[None]:
    """Hold stage `name`'s key while looking it up and, on a miss, running and storing it (a lock file beside the
    entry, not `store`'s, which is taken inside this one)."""
    if name not in CACHEABLE:
        yield
        return
    entry = folder(key)
    with locked(entry.with_name(f"{key}.building"),
                on_wait=lambda: log(f"[{name}] waiting for another build that is making this stage (the same "
                                    "inputs), to reuse it")):
        yield


def lookup(name: str, key: str) -> dict | None:
    """The cached record of stage `name` with this key, or None."""
    entry = folder(key)
    if name not in CACHEABLE or not (entry / READY).is_file():
        return None
    record = json.loads((entry / METRICS_FILE).read_text())
    return record if record.get("name") == name and record.get("key") == key else None


def restore(key: str, stage_dir: Path) -> None:
    """Replace a stage's folder with the cached one, without its metrics.json (the caller writes it last): copied
    beside it and renamed, so a copy cut short (a full disk) leaves no stage that looks finished."""
    tmp = stage_dir.with_name(f".{stage_dir.name}.restoring")
    _copy(folder(key), tmp, skip=(READY, METRICS_FILE))
    shutil.rmtree(stage_dir, ignore_errors=True)
    tmp.rename(stage_dir)


def _copy(src: Path, dest: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy a folder; the first failed write raises its OSError (a full disk says so in one line, where
    shutil.copytree gathers them into one shutil.Error) and removes the partial copy."""
    shutil.rmtree(dest, ignore_errors=True)
    try:
        dest.mkdir(parents=True)
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src)
            if rel.parts[-1] in skip or any(part.startswith(".tmp-") for part in rel.parts):
                continue
            if path.is_dir():
                (dest / rel).mkdir(exist_ok=True)
            else:
                shutil.copy2(path, dest / rel)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def store(name: str, key: str, stage_dir: Path, out: Path) -> None:
    """Keep a copy of a finished stage's folder under its key (once; a half-copied entry is made again)."""
    entry = folder(key)
    if name not in CACHEABLE or (entry / READY).is_file():
        return
    with locked(entry):
        if (entry / READY).is_file():
            return
        _copy(stage_dir, entry, skip=("error.log",))
        (entry / READY).write_text(f"{out.resolve()}\n")  # which build made it, written last


def made_by(key: str) -> str:
    """The build folder that first made this cached stage."""
    return (folder(key) / READY).read_text().strip()
