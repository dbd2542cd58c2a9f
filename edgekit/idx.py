"""IDX files (the MNIST / Fashion-MNIST format): read memory-mapped, checked against their header.

An IDX file is a 4-byte magic (0, 0, type code, number of dimensions), one big-endian uint32 per dimension,
then the values. `.gz` files are decompressed once into edgekit's cache and memory-mapped from there.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np

from edgekit.errors import DataError

DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgekit" / "idx"


def _plain(path: Path) -> Path:
    """The uncompressed file: `path` itself, or its decompressed copy in the cache (made atomically once)."""
    if path.suffix != ".gz":
        return path
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    dest = CACHE / f"{path.stem}-{key}"
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        try:
            with gzip.open(path, "rb") as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out)
        except EOFError as exc:  # gzip's "ended before the end-of-stream marker": a download cut short
            tmp.unlink(missing_ok=True)
            raise DataError(f"'{path}' is truncated: its gzip stream ends early; download it again") from exc
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise DataError(f"'{path}' is not a readable gzip file ({exc}); download it again") from exc
        tmp.replace(dest)
    return dest


def read(path: Path) -> np.ndarray:
    """The array an IDX file holds, memory-mapped (nothing is read until used)."""
    if not path.is_file():
        raise DataError(f"IDX file '{path}' not found")
    if path.stat().st_size == 0:
        raise DataError(f"'{path}' is empty (0 bytes); download it again")
    plain = _plain(path)
    size = plain.stat().st_size
    with open(plain, "rb") as f:
        head = f.read(4)
        if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in DTYPES or head[3] == 0:
            raise DataError(f"'{path}' is not an IDX file (its first bytes are {head.hex() or 'missing'})")
        raw = f.read(4 * head[3])
    if len(raw) < 4 * head[3]:
        raise DataError(f"'{path}' is truncated: it ends inside its header ({size} bytes, the header of a "
                        f"{head[3]}-D array alone takes {4 + 4 * head[3]}); download it again")
    dims = np.frombuffer(raw, ">u4")
    dtype, offset = np.dtype(DTYPES[head[2]]), 4 + 4 * head[3]
    need = offset + int(np.prod(dims.astype(np.int64))) * dtype.itemsize
    if size != need:
        what = "truncated" if size < need else "damaged"
        raise DataError(f"'{path}' is {what}: its header {tuple(int(d) for d in dims)} needs {need} bytes, the file "
                        f"has {size}; download it again")
    return np.memmap(plain, dtype=dtype, mode="r", offset=offset, shape=tuple(int(d) for d in dims))
