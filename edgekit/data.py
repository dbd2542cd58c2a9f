"""Datasets: the built-in offline digits, Fashion-MNIST and MNIST-format IDX files, a user's .npz, an ImageFolder.

Every source ends as float32 arrays (N, *sample_shape) and int64 labels, split once with a fixed seed. The
memory-mapped sources (`npy`, `idx`, `fashion-mnist`) keep their training split on disk as `Rows`, read batch by
batch (in `data.workers` DataLoader processes when set), so a training set larger than memory can be trained on;
validation, test and calibration splits are read into memory.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekit import idx
from edgekit.config import Config, DataConfig
from edgekit.errors import DataError

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # where that Debian package puts the IDX files
FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                        "Ankle boot"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
SKIPPED = {  # files an ImageFolder does not read that may have been meant as data: noun, why, what to do
    "outside": ("image", "outside every class folder", "move each into its class's folder"),
    "nested": ("image", "in a subfolder of a class folder, where edgekit does not look",
               "move them up into the class folder"),
    "type": ("file", f"of a type edgekit does not read (it reads {', '.join(sorted(IMAGE_SUFFIXES))})",
             "convert the images among them to PNG"),
}
MIN_SPLIT = {"train": 10, "validation": 5, "test": 10}  # fewer gives accuracies that mean nothing
MAX_ZIP_RATIO = 1100  # deflate cannot compress better than about 1032:1
ZIP_MAGIC = b"PK\x03\x04"  # what every zip archive (a .npz) starts with


class Rows:
    """Rows of an on-disk array (a np.memmap) read on demand: indexing returns float32 in memory, divided by
    `divide_by` and with a channel axis added when `add_channel`. Each read is sorted by row (sequential reads)."""

    def __init__(self, array: np.ndarray, index: np.ndarray, *, divide_by: float = 1.0, add_channel: bool = False,
                 workers: int = 0) -> None:
        self.array, self.index = array, np.asarray(index, np.int64)
        self.divide_by, self.add_channel = divide_by, add_channel
        self.workers = workers  # DataLoader worker processes that training reads these rows with

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *((1,) if self.add_channel else ()), *self.array.shape[1:])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    dtype = np.dtype(np.float32)

    def __getitem__(self, key: object) -> np.ndarray:
        rows = self.index[np.asarray(key) if not isinstance(key, int | slice) else key]
        if np.ndim(rows) == 0:
            return self._read(np.asarray([rows]))[0]
        return self._read(rows)

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def _read(self, rows: np.ndarray) -> np.ndarray:
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), *self.shape[1:]), np.float32)
        out[order] = np.asarray(self.array[rows[order]], np.float32).reshape(len(rows), *self.shape[1:])
        if self.divide_by != 1.0:
            out /= np.float32(self.divide_by)
        return out


@dataclass(frozen=True)
class Split:
    x: np.ndarray | Rows  # float32 (N, *sample_shape), already preprocessed; Rows: read from disk on demand
    y: np.ndarray  # int64 (N,)


@dataclass(frozen=True)
class Dataset:
    train: Split
    val: Split
    test: Split
    calib: Split  # a subset of train, for int8 calibration
    labels: list[str]
    preprocessing: str  # what was done to raw inputs, written into bundle manifests
    warnings: tuple[str, ...] = ()  # files the source skipped that may have been meant as data (the train stage says)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.labels)


def _digits() -> tuple[np.ndarray, np.ndarray, list[str], str]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    return x, bunch.target.astype(np.int64), [str(c) for c in range(10)], "pixel / 16 (0..1), shape (1, 8, 8)"


def _digits32(copies: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str], str, np.ndarray]:
    """The harder task: digits upsampled to 32x32, `copies` randomly rotated, shifted, scaled, noisy versions each.

    Deterministic under `seed`. Returns the group (source image) of each sample, so that the copies of one
    image never land in different splits.
    """
    from scipy import ndimage
    from sklearn.datasets import load_digits

    bunch = load_digits()
    rng = np.random.default_rng(seed + 1)
    base = ndimage.zoom(bunch.images.astype(np.float32) / 16.0, (1, 4, 4), order=1)  # (N, 32, 32)
    n, xs = len(base), np.empty((len(base) * copies, 1, 32, 32), np.float32)
    center = np.array([15.5, 15.5])
    for k in range(n * copies):
        angle, scale = np.deg2rad(rng.uniform(-20, 20)), rng.uniform(0.85, 1.1)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) / scale
        shift = rng.uniform(-3, 3, size=2)
        offset = center - rot @ (center + shift)
        img = ndimage.affine_transform(base[k // copies], rot, offset=offset, order=1, mode="constant")
        img = img * rng.uniform(0.6, 1.0) + rng.normal(0, 0.2, img.shape)  # contrast and sensor noise
        xs[k, 0] = np.clip(img, -0.5, 1.5)
    y = np.repeat(bunch.target.astype(np.int64), copies)
    prep = (f"digits upsampled to 32x32, {copies} copies each: rotation +-20 deg, shift +-3 px, scale 0.85-1.1, "
            "contrast 0.6-1, Gaussian noise sd 0.2; shape (1, 32, 32)")
    return xs, y, [str(c) for c in range(10)], prep, np.repeat(np.arange(n), copies)


def _npy_header(f) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype a .npy stream declares; the stream is left at the start of its data."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
    return shape, dtype


def _check_npy_length(file: Path) -> None:
    """A .npy cut short (a copy or download that stopped) is named as such, before it is memory-mapped."""
    with open(file, "rb") as f:
        shape, dtype = _npy_header(f)
        need = f.tell() + int(np.prod(shape, dtype=object)) * dtype.itemsize
    have = file.stat().st_size
    if have < need:
        raise DataError(f"'{file}' is truncated: its header declares {dtype} {shape} ({need} bytes) but the file "
                        f"has {have}; write it again with numpy.save")


def _check_npz_sizes(path: Path) -> None:
    """Read each array's header, never its data: a damaged or hostile file may declare a shape of terabytes."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            starts_as_zip = f.read(4) == ZIP_MAGIC
        if starts_as_zip:  # a zip's directory is at its end: a cut-short copy or download starts right, ends wrong
            raise DataError(f"'{path}' looks truncated or corrupt: it starts as a zip archive but cannot be read to "
                            f"the end ({path.stat().st_size} bytes); save arrays x and y again with numpy.savez")
        raise DataError(f"'{path}' is not a .npz archive; save arrays x and y with numpy.savez")
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as f:
                shape, dtype = _npy_header(f)
            declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
            if declared > info.file_size or info.file_size > MAX_ZIP_RATIO * info.compress_size + 4096:
                name = info.filename[:-4]
                raise DataError(f"'{path}': array '{name}' declares shape {shape} ({declared} bytes) but holds "
                                f"{info.file_size}; the file is damaged, save it again with numpy.savez")


def _npz(path: Path) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    if not path.is_file():
        raise DataError(f"data file '{path}' not found; set data.path to a .npz with arrays 'x' and 'y'")
    try:
        _check_npz_sizes(path)
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f or "y" not in f:
                raise DataError(f"'{path}' has arrays {sorted(f.files)}; it needs 'x' (float32) and 'y' (labels)")
            x, y = f["x"], f["y"]
            labels = [str(v) for v in f["labels"]] if "labels" in f else None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"'{path}' is not a readable .npz file ({_one_line(exc)}); save it with numpy.savez") from exc
    if x.ndim < 2 or y.ndim != 1:
        raise DataError(f"'{path}': x has shape {x.shape} and y {y.shape}; need x (N, ...) and y (N,)")
    _same_length(path, ("x", len(x)), ("y", len(y)))
    y = _class_ids(y, f"'{path}': y")
    n_classes = int(y.max()) + 1
    labels = labels or [str(c) for c in range(n_classes)]
    if len(labels) < n_classes:
        raise DataError(f"'{path}': {len(labels)} labels for {n_classes} classes; give one label per class")
    scale, how = _scaling(x, f"'{path}'")
    x = Rows(x, np.arange(len(x)), **scale)[:]  # float32, uint8 images divided by 255, as x.npy's rows are
    return x, y, labels, f"{how} in the .npz, shape {x.shape[1:]}"


def _available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux); None where there is none."""
    try:
        line = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) * 1024


def _check_memory(root: Path, images: int, values: int) -> None:
    """An ImageFolder is read whole into memory, as float32, and stacked once (twice its size at the peak): refuse
    one that cannot fit before reading it, rather than swap or a MemoryError traceback after minutes."""
    need, free = 2 * images * values * 4, _available_bytes()
    if free is not None and need > free:
        raise DataError(f"'{root}': {images} images at data.image_size take {need / 2**30:.1f} GB while edgekit reads "
                        f"them (float32), more than the {free / 2**30:.1f} GB of memory free; lower data.image_size, "
                        "or write them to an .npy pair (data.source: npy), which edgekit memory-maps")


def _imagefolder(root: Path, size: int | list[int],
                 grayscale: bool) -> tuple[np.ndarray, np.ndarray, list[str], str, list[str]]:
    height, width = size if isinstance(size, list) else (size, size)
    if not root.is_dir():
        raise DataError(f"image folder '{root}' not found; set data.path to a folder with one subfolder per class")
    # a hidden folder (.ipynb_checkpoints, .git) is never a class
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(_other_source(root) or f"'{root}' has {len(classes)} class folder"
                        f"{'' if len(classes) == 1 else 's'}; an ImageFolder needs at least two")
    files, skipped = _image_files(root, classes)
    _check_memory(root, len(files), (1 if grayscale else 3) * height * width)
    xs = [_image(file, height, width, grayscale) for file, _ in files]
    ys = [class_id for _, class_id in files]
    if not xs:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under '{root}'")
    used = set(ys)
    empty = [name for class_id, name in enumerate(classes) if class_id not in used]
    if empty:  # a class folder without images: a class no sample has
        raise DataError(f"class folder '{root / empty[0]}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                        "add images of that class or remove the folder")
    mode = "grayscale" if grayscale else "RGB"
    how = f"{mode}, resized to {height}x{width} (Pillow bicubic), pixel / 255, CHW"
    return np.stack(xs), np.asarray(ys, np.int64), classes, how, skipped


def _image_files(root: Path, classes: list[str]) -> tuple[list[tuple[Path, int]], list[str]]:
    """The images directly in each class folder, with its class id, and a warning for each kind of file skipped
    that may have been meant as data (SKIPPED: how many, one of them, why). Hidden files and folders (macOS's
    ._x.png and .DS_Store, .ipynb_checkpoints) and Windows' Thumbs.db and desktop.ini are metadata, skipped without
    a word."""
    def image(path: Path) -> bool:  # a broken link is an image that cannot be read (_image says so)
        return path.suffix.lower() in IMAGE_SUFFIXES and not path.is_dir()

    def hidden(path: Path) -> bool:  # Windows' Explorer leaves Thumbs.db and desktop.ini, unhidden, in folders
        return any(part.startswith(".") or part.lower() in ("thumbs.db", "desktop.ini")
                   for part in path.relative_to(root).parts)

    found, skipped = [], {why: [] for why in SKIPPED}
    skipped["outside"] = [p for p in sorted(root.iterdir()) if image(p) and not hidden(p)]
    for class_id, name in enumerate(classes):
        for path in sorted(p for p in (root / name).iterdir() if not hidden(p)):
            if path.is_dir():
                skipped["nested"] += [p for p in sorted(path.rglob("*")) if image(p) and not hidden(p)]
            elif image(path):
                found.append((path, class_id))
            else:
                skipped["type"].append(path)
    warnings = []
    for why, paths in skipped.items():
        noun, reason, fix = SKIPPED[why]
        if paths:
            warnings.append(f"'{root}': {len(paths)} {noun}{'s' * (len(paths) > 1)} not read (e.g. "
                            f"'{paths[0].relative_to(root)}'): {reason}; {fix}")
    return found, warnings


def _other_source(root: Path) -> str | None:
    """The error for a folder read as an ImageFolder that holds the files of another source."""
    npy = sorted(p.name for p in root.glob("*.npy"))
    if npy:
        more = f" and {len(npy) - 3} more" if len(npy) > 3 else ""
        return (f"'{root}' holds .npy files ({', '.join(npy[:3])}{more}), not one subfolder of images per class; "
                "set data.source: npy to read x.npy (samples) and y.npy (labels) from it")
    if any(root.glob("*-idx[13]-ubyte*")):
        return (f"'{root}' holds IDX files, not one subfolder of images per class; set data.source: idx "
                "(or fashion-mnist) to read them")
    return None


def _image(file: Path, height: int, width: int, grayscale: bool) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(file) as img:
            img = _eight_bit(img).convert("L" if grayscale else "RGB").resize((width, height), Image.Resampling.BICUBIC)
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:  # PIL's damaged-file errors
        raise DataError(f"'{file}' is not a readable image ({_one_line(exc)}); replace or remove it") from exc
    return arr[None] if grayscale else arr.transpose(2, 0, 1)


def _eight_bit(img):
    """A 16-bit greyscale image (a PNG opens as Pillow's I;16, I;16B or I) as the 8-bit image a copy saved at 8 bits
    holds: value / 257, so 65535 is 255. Pillow's convert clips it at 255 instead: a 16-bit gradient went white."""
    from PIL import Image

    if not img.mode.startswith("I"):
        return img
    return Image.fromarray(np.clip(np.rint(np.asarray(img, np.float64) / 257), 0, 255).astype(np.uint8))  # mode L


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _class_ids(y: np.ndarray, what: str) -> np.ndarray:
    """y as int64 class ids; a non-integer dtype or a negative id is named (the value, how many rows, the first)."""
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{what} must hold non-negative integer class ids, got dtype {y.dtype}")
    negative = np.asarray(y < 0)
    if negative.any():
        first = int(np.argmax(negative))
        raise DataError(f"{what} holds negative class ids in {int(negative.sum())} of {len(y)} rows (the first is "
                        f"row {first}: {y[first]}); class ids run 0..K-1: renumber the labels "
                        "(numpy.unique(y, return_inverse=True))")
    return np.asarray(y, np.int64)


def _check_classes(y: np.ndarray, labels: list[str], where: str) -> None:
    """Class ids 0..K-1 (K: the number of labels), each with samples, K >= 2: a gap would build a model with
    classes nobody has."""
    present = np.unique(y)
    if len(present) and present[-1] >= len(labels):
        raise DataError(f"{where}: a sample has class id {present[-1]} but there are {len(labels)} classes (ids "
                        f"0..{len(labels) - 1}: {', '.join(labels[:3])}{', ...' if len(labels) > 3 else ''}); "
                        "fix the labels or give one label name per class")
    if len(present) < 2:
        raise DataError(f"{where}: every sample is of class {labels[int(present[0])] if len(present) else '-'}; "
                        "a classifier needs samples of at least two classes")
    missing = sorted(set(range(len(labels))) - set(present.tolist()))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        shown = ", ".join(labels[i] for i in missing[:5]) + more
        below = present[present < missing[0]]
        jump = f"the class ids jump from {below[-1]} to {present[present > missing[0]][0]}: " if (
            len(below) and missing[0] < present[-1]) else ""
        raise DataError(f"{where}: {jump}no sample has class {shown}; {len(present)} classes are used but the class "
                        f"ids run to {len(labels) - 1}; renumber the labels 0..{len(present) - 1} "
                        "(numpy.unique(y, return_inverse=True)) or drop the unused labels")


def _check_train_classes(ds: Dataset, where: str, cfg: DataConfig) -> None:
    """Every class in the training split, once the splits are made: a model cannot learn a class it never sees
    (a class with one sample can land in the test split). Every source's dataset passes through here."""
    in_train = np.bincount(ds.train.y, minlength=ds.num_classes)
    lacking = np.flatnonzero(in_train == 0)
    if not len(lacking):
        return
    n = int(np.count_nonzero(ds.val.y == lacking[0]) + np.count_nonzero(ds.test.y == lacking[0]))
    kept = f" of the {cfg.limit} data.limit keeps" if cfg.limit else ""
    more = f" (and {len(lacking) - 1} more classes)" if len(lacking) > 1 else ""
    raise DataError(f"{where}: class {ds.labels[lacking[0]]} has {n} sample{'s' * (n != 1)}{kept}, none in the "
                    f"training split{more}: a model cannot learn a class it never sees; add samples of that class"
                    f"{', raise data.limit' if cfg.limit else ''} or drop them and renumber the labels")


def _check_split_sizes(sizes: dict[str, int], cfg: DataConfig) -> None:
    if all(sizes[k] >= MIN_SPLIT[k] for k in MIN_SPLIT):
        return
    got = ", ".join(f"{v} {k}" for k, v in sizes.items())
    need = ", ".join(f"{v} {k}" for k, v in MIN_SPLIT.items())
    cause = f"data.limit {cfg.limit} leaves" if cfg.limit else "the dataset gives"
    raise DataError(f"{cause} {sum(sizes.values())} samples: {got}; each split needs at least {need} samples "
                    f"(data.test_fraction {cfg.test_fraction}, data.val_fraction {cfg.val_fraction}); "
                    "use more data or a larger data.limit")


def split_gaps(ds: Dataset) -> list[str]:
    """Classes the validation or test split has no sample of (the training split has every class:
    _check_train_classes). Warnings, not refusals: a small data.limit for a quick look often leaves one out."""
    out = []
    for what, split, key, sees in (
            ("validation", ds.val, "val_fraction", "the accuracy that guards pruning and repairs int8 does"),
            ("test", ds.test, "test_fraction", "the test accuracy and the fidelity check do")):
        missing = np.flatnonzero(np.bincount(split.y, minlength=ds.num_classes) == 0)
        if not len(missing):
            continue
        many = len(missing) > 1
        names = ", ".join(ds.labels[i] for i in missing[:5]) + (f" and {len(missing) - 5} more" if
                                                                 len(missing) > 5 else "")
        out.append(f"the {what} split ({len(split.y)} samples) has no sample of class{'es' * many} {names}: {sees} "
                   f"not see {'them' if many else 'it'}; raise data.{key} or add samples")
    return out


def _split(x: np.ndarray, y: np.ndarray, cfg: DataConfig,
           groups: np.ndarray | None = None) -> tuple[Split, Split, Split, Split]:
    order = np.random.default_rng(cfg.seed).permutation(len(x))
    if groups is not None:  # whole groups in one split: shuffle groups, keep each group's samples together
        rank = np.random.default_rng(cfg.seed).permutation(groups.max() + 1)
        order = np.lexsort((order, rank[groups]))
    if cfg.limit:
        order = order[: cfg.limit]
    n = len(order)
    n_test, n_val = max(1, int(n * cfg.test_fraction)), max(1, int(n * cfg.val_fraction))
    _check_split_sizes({"train": n - n_test - n_val, "validation": n_val, "test": n_test}, cfg)
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    calib = train[: cfg.calib_samples]
    return tuple(Split(x[i], y[i]) for i in (train, val, test, calib))  # type: ignore[return-value]


def _official_split(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                    cfg: DataConfig) -> tuple[Split, Split, Split, Split]:
    """The publisher's test set as the test split (its first data.limit * test_fraction samples with a limit);
    validation carved from the training set. Only the samples used are read and converted."""
    n_test = min(len(test[0]), max(1, int(cfg.limit * cfg.test_fraction))) if cfg.limit else len(test[0])
    order = np.random.default_rng(cfg.seed).permutation(len(train[0]))[: cfg.limit - n_test if cfg.limit else None]
    n_val = max(1, int(len(order) * cfg.val_fraction))
    _check_split_sizes({"train": len(order) - n_val, "validation": n_val, "test": n_test}, cfg)
    val, fit = np.sort(order[:n_val]), np.sort(order[n_val:])  # sorted: sequential reads of memory-mapped files

    def take(x: np.ndarray, y: np.ndarray, i: np.ndarray | slice) -> Split:
        return Split(np.asarray(x[i], np.float32)[:, None] / 255.0, np.asarray(y[i], np.int64))

    streamed = Split(Rows(train[0], fit, divide_by=255.0, add_channel=True, workers=cfg.workers),
                     np.asarray(train[1][fit], np.int64))  # read from the memory-mapped file batch by batch
    return streamed, take(*train, val), take(*test, slice(0, n_test)), take(*train, fit[: cfg.calib_samples])


def _idx_sets(folder: Path, hint: str) -> tuple[tuple, tuple | None]:
    """(train images, labels) and, when present, (t10k images, labels): MNIST's file names, .gz or not."""
    def find(stem: str) -> Path | None:
        return next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)

    names = {k: f"{k}-idx{3 if 'images' in k else 1}-ubyte" for k in ("train-images", "train-labels",
                                                                      "t10k-images", "t10k-labels")}
    files = {k: find(name) for k, name in names.items()}
    if not folder.is_dir() or files["train-images"] is None or files["train-labels"] is None:
        raise DataError(f"no train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz] in '{folder}'; {hint}")
    if (files["t10k-images"] is None) != (files["t10k-labels"] is None):  # half a test set
        have, lack = sorted(("t10k-images", "t10k-labels"), key=lambda k: files[k] is None)
        raise DataError(f"'{folder}' has {files[have].name} but no {names[lack]}[.gz]; add it, or remove "
                        f"{files[have].name} to carve the test split from the training files")
    sets = []
    for s in ("train", "t10k") if files["t10k-images"] else ("train",):
        images, labels = idx.read(files[f"{s}-images"]), idx.read(files[f"{s}-labels"])
        if images.ndim != 3 or labels.ndim != 1:
            raise DataError(f"'{folder}': {files[f'{s}-images'].name} is {images.shape} and "
                            f"{files[f'{s}-labels'].name} {labels.shape}; need images (N, H, W) and labels (N,)")
        _same_length(folder, (files[f"{s}-images"].name, len(images)), (files[f"{s}-labels"].name, len(labels)),
                     unit="images")
        sets.append((images, _class_ids(labels, f"'{files[f'{s}-labels']}'")))
    return sets[0], sets[1] if len(sets) > 1 else None


def _idx_dataset(cfg: Config) -> Dataset:
    d = cfg.data
    fashion = d.source == "fashion-mnist"
    folder = cfg.resolve(d.path) if d.path else FASHION_MNIST_DIR
    hint = (f"install Debian's package (apt-get install {FASHION_MNIST_PACKAGE}) or set data.path to a folder with "
            "Fashion-MNIST's four IDX files") if fashion else "set data.path to a folder of MNIST-format IDX files"
    train, test = _idx_sets(folder, hint)
    y = np.concatenate([s[1] for s in (train, test) if s is not None])  # a class only in t10k: not in training
    labels = FASHION_MNIST_LABELS if fashion else [str(c) for c in range(int(y.max()) + 1)]
    _check_classes(y, labels, f"'{folder}'")
    prep = f"pixel / 255, shape (1, {train[0].shape[1]}, {train[0].shape[2]})"
    if test is None:  # no t10k files: one pool, split like any other source
        x = np.asarray(train[0], np.float32)[:, None] / 255.0
        return Dataset(*_split(x, np.asarray(train[1], np.int64), d), labels, prep)
    return Dataset(*_official_split(train, test, d), labels, prep + "; the publisher's train/test split")


NPY_CHUNK = 4096  # rows per read when an on-disk array is checked


def _check_finite(x: np.ndarray, what: str) -> None:
    """NaN or inf in x: name the array, how many rows hold one and the first, reading a chunk at a time
    (x may be memory-mapped and larger than memory)."""
    bad, first = 0, None
    for i in range(0, len(x), NPY_CHUNK):
        rows = ~np.isfinite(x[i : i + NPY_CHUNK].reshape(min(NPY_CHUNK, len(x) - i), -1)).all(axis=1)
        bad += int(rows.sum())
        if first is None and rows.any():
            first = i + int(np.argmax(rows))
    if bad:
        raise DataError(f"{what}: x holds NaN or infinite values in {bad} of {len(x)} rows (the first is row "
                        f"{first}); clean them (drop the rows or numpy.nan_to_num) before building")


def _npy_arrays(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """x.npy memory-mapped (never read whole) and y.npy, checked against each other."""
    files = [folder / "x.npy", folder / "y.npy"]
    if not folder.is_dir():
        raise DataError(f"data.path '{folder}' is not a folder; set it to the folder that holds x.npy and y.npy")
    if not all(f.is_file() for f in files):
        raise DataError(f"'{folder}' needs x.npy (samples, float or uint8 images) and y.npy (labels); "
                        "write them with numpy.save")
    x, y = _open_npy(files[0], mmap_mode="r"), _open_npy(files[1], mmap_mode=None)
    if x.ndim < 2:
        raise DataError(f"'{files[0]}' has shape {x.shape}; it needs samples (N, ...) or uint8 images (N, H, W)")
    if y.ndim != 1:
        raise DataError(f"'{files[1]}' has shape {y.shape}; it needs one class id per sample, shape (N,)")
    _same_length(folder, ("x.npy", len(x)), ("y.npy", len(y)))
    y = _class_ids(y, f"'{files[1]}'")
    if np.issubdtype(x.dtype, np.floating):  # the dtype itself is judged by _scaling
        _check_finite(x, f"'{files[0]}'")
    return x, y


def _open_npy(file: Path, mmap_mode: str | None) -> np.ndarray:
    """One .npy file; an empty, damaged or unreadable one is named with what is wrong with it."""
    if file.stat().st_size == 0:
        raise DataError(f"'{file}' is empty (0 bytes); write it again with numpy.save")
    try:
        _check_npy_length(file)
        return np.load(file, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"'{file}' is not a readable .npy file ({_one_line(exc)}); write it again with "
                        "numpy.save") from exc


def _same_length(where: Path, samples: tuple[str, int], labels: tuple[str, int], unit: str = "samples") -> None:
    """Samples and labels pair up one to one, and there are some: both counts when they do not."""
    if samples[1] != labels[1]:
        raise DataError(f"'{where}': {samples[0]} has {samples[1]} {unit}, {labels[0]} has {labels[1]} labels; "
                        "give one label per sample, in the same order")
    if not samples[1]:
        raise DataError(f"'{where}': {samples[0]} and {labels[0]} hold no samples")


def _npy_dataset(cfg: Config) -> Dataset:
    """A pair of .npy files opened memory-mapped: the training split stays on disk (Rows), read batch by batch.
    uint8 images are divided by 255; 3-D uint8 arrays (N, H, W) get a channel axis."""
    d = cfg.data
    folder = cfg.resolve(d.path)
    x, y = _npy_arrays(folder)
    labels = [str(c) for c in range(int(y.max()) + 1)]
    _check_classes(y, labels, f"'{folder}'")
    scale, how = _scaling(x, f"'{folder / 'x.npy'}'")
    order = np.random.default_rng(d.seed).permutation(len(x))[: d.limit]
    n_test, n_val = max(1, int(len(order) * d.test_fraction)), max(1, int(len(order) * d.val_fraction))
    _check_split_sizes({"train": len(order) - n_test - n_val, "validation": n_val, "test": n_test}, d)
    test, val, fit = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]

    def split(i: np.ndarray, lazy: bool = False) -> Split:
        rows = Rows(x, i, workers=d.workers, **scale)
        return Split(rows if lazy else rows[:], y[i])

    return Dataset(split(fit, lazy=True), split(val), split(test), split(fit[: d.calib_samples]), labels,
                   f"{how}, shape {split(order[:1]).x.shape[1:]}; training split memory-mapped from x.npy")


def _scaling(x: np.ndarray, where: str) -> tuple[dict, str]:
    """The one rule for user arrays (x.npy, a .npz's x): float samples are used as stored (as float32), uint8
    images are divided by 255 and (N, H, W) gets a channel axis; returns Rows' keyword arguments and the
    preprocessing said. Other dtypes are refused (0..65535 or -1..1 integers: no scale fits them all), and so are
    channels-last images, which would be read as H channels."""
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{where}: x is {x.dtype} {x.shape}; samples are float (used as stored) or uint8 images "
                        "(divided by 255): save x.astype(numpy.float32), scaled as the model should see it")
    if _channels_last(x.shape):
        raise DataError(f"{where}: x has shape {x.shape}, channels last; samples are (C, H, W): save "
                        "x.transpose(0, 3, 1, 2)")
    if x.dtype == np.uint8:
        return {"divide_by": 255.0, "add_channel": x.ndim == 3}, "pixel / 255"
    return {}, "as stored"


def _channels_last(shape: tuple[int, ...]) -> bool:
    """(N, H, W, C) images: a last axis of 1 (a (C, H, 1) sample is no image), or of 3 or 4 (RGB, RGBA) after a
    square or an at least 16 x 16 H x W. (N, C, H, 3) with a non-square, small C x H stays channels-first (say 8
    sensors x 12 steps x 3 axes), and so does anything with 1, 3 or 4 in the channel place."""
    if len(shape) != 4 or shape[1] in (1, 3, 4):
        return False
    h, w, c = shape[1:]
    return c == 1 or (c in (3, 4) and (h == w or min(h, w) >= 16))


def load_dataset(cfg: Config) -> Dataset:
    d = cfg.data
    if d.source in ("idx", "fashion-mnist"):
        ds = _idx_dataset(cfg)
    elif d.source == "npy":
        ds = _npy_dataset(cfg)
    else:
        ds = _memory_dataset(cfg)
    _check_train_classes(ds, f"'{cfg.resolve(d.path)}'" if d.path else f"data.source {d.source}", d)
    return ds


def _memory_dataset(cfg: Config) -> Dataset:
    """The sources read whole into memory: the built-in digits, a .npz, an ImageFolder."""
    d, groups, skipped = cfg.data, None, []
    if d.source == "digits":
        x, y, labels, prep = _digits()
    elif d.source == "digits32":
        x, y, labels, prep, groups = _digits32(d.copies, d.seed)
    elif d.source == "npz":
        x, y, labels, prep = _npz(cfg.resolve(d.path))
    else:
        x, y, labels, prep, skipped = _imagefolder(cfg.resolve(d.path), d.image_size, d.grayscale)
    where = f"'{cfg.resolve(d.path)}'" if d.path else f"data.source {d.source}"
    _check_finite(x, where)
    _check_classes(y, labels, where)
    train, val, test, calib = _split(x, y, d, groups)
    return Dataset(train, val, test, calib, labels, prep, tuple(skipped))
