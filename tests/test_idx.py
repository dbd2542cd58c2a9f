"""MNIST-format IDX files and Fashion-MNIST (Debian's dataset-fashion-mnist): read memory-mapped, the publisher's
train/test split, damaged files and a missing package named in one line."""

import gzip
from pathlib import Path

import numpy as np
import pytest

from edgekit import config, data, idx
from edgekit.errors import DataError


def _write_idx(path: Path, array: np.ndarray) -> None:
    code = {np.uint8: 0x08, np.int32: 0x0C}[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def _mnist_folder(root: Path, n_train: int = 120, n_test: int = 40, gz: bool = True) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir()
    ext = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        y = (np.arange(n) % 3).astype(np.uint8)
        x = rng.integers(0, 60, (n, 6, 5)).astype(np.uint8) + (y * 60)[:, None, None].astype(np.uint8)
        _write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", x)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", y)
    return root


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_idx_reads_memory_mapped_with_the_publishers_split(tmp_path, gz, monkeypatch):
    monkeypatch.setattr(idx, "CACHE", tmp_path / "cache")
    folder = _mnist_folder(tmp_path / "m", gz=gz)
    raw = idx.read(folder / f"train-images-idx3-ubyte{'.gz' if gz else ''}")
    assert isinstance(raw, np.memmap) and raw.shape == (120, 6, 5) and raw.dtype == np.uint8
    ds = data.load_dataset(config.from_dict({"data": {"source": "idx", "path": str(folder), "calib_samples": 16}}))
    assert ds.test.x.shape == (40, 1, 6, 5)  # the t10k files, all of them, as the test split
    assert len(ds.train.x) + len(ds.val.x) == 120 and ds.calib.x.shape == (16, 1, 6, 5)
    assert isinstance(ds.train.x, data.Rows)  # the training split stays memory-mapped, read batch by batch
    train_x = np.asarray(ds.train.x)
    assert train_x.dtype == np.float32 and 0 <= train_x.min() and train_x.max() <= 1
    assert ds.labels == ["0", "1", "2"]
    expected_test = idx.read(folder / f"t10k-images-idx3-ubyte{'.gz' if gz else ''}")[:, None] / 255.0
    np.testing.assert_allclose(ds.test.x, expected_test.astype(np.float32))


def test_a_damaged_idx_file_and_a_missing_folder_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(idx, "CACHE", tmp_path / "cache")
    folder = _mnist_folder(tmp_path / "m", gz=False)
    images = folder / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-7])
    with pytest.raises(DataError, match="train-images-idx3-ubyte' is truncated: its header .120, 6, 5. needs"):
        idx.read(images)
    images.write_bytes(images.read_bytes() + b"\0" * 9)
    with pytest.raises(DataError, match="is damaged: its header .120, 6, 5. needs"):
        idx.read(images)
    packed = folder / "train-labels-idx1-ubyte.gz"
    packed.write_bytes(gzip.compress((folder / "train-labels-idx1-ubyte").read_bytes())[:-20])
    with pytest.raises(DataError, match="labels-idx1-ubyte.gz' is truncated: its gzip stream ends early; download"):
        idx.read(packed)
    images.write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(DataError, match="is not an IDX file"):
        idx.read(images)
    cfg = config.from_dict({"data": {"source": "fashion-mnist", "path": str(tmp_path / "nowhere")}})
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        data.load_dataset(cfg)


@pytest.mark.parametrize(("name", "content", "needle"), [
    ("train-labels-idx1-ubyte", b"", "train-labels-idx1-ubyte' is empty (0 bytes); download it again"),
    ("train-labels-idx1-ubyte.gz", b"", "train-labels-idx1-ubyte.gz' is empty (0 bytes)"),
    ("train-labels-idx1-ubyte", bytes([0, 0, 8, 1, 0, 0]),
     "train-labels-idx1-ubyte' is truncated: it ends inside its header (6 bytes"),
    ("train-labels-idx1-ubyte", np.arange(119) % 3,
     "train-images-idx3-ubyte has 120 images, train-labels-idx1-ubyte has 119 labels"),
    ("t10k-labels-idx1-ubyte", np.arange(41) % 3,
     "t10k-images-idx3-ubyte has 40 images, t10k-labels-idx1-ubyte has 41"),
    ("t10k-labels-idx1-ubyte", None,
     "has t10k-images-idx3-ubyte but no t10k-labels-idx1-ubyte[.gz]; add it, or remove"),
])
def test_a_bad_idx_file_in_a_folder_is_named(tmp_path, monkeypatch, name, content, needle):
    """An empty file, one cut inside its header, a pair of unequal length, half a test pair: one line naming it."""
    monkeypatch.setattr(idx, "CACHE", tmp_path / "cache")
    folder = _mnist_folder(tmp_path / "m", gz=False)
    path = folder / name
    if content is None or name.endswith(".gz"):  # the .gz in place of the plain file, which would be read first
        (folder / name.removesuffix(".gz")).unlink()
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        _write_idx(path, content.astype(np.uint8))
    with pytest.raises(DataError) as err:
        data.load_dataset(config.from_dict({"data": {"source": "idx", "path": str(folder)}}))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_fashion_mnist_from_the_debian_package():
    """A small slice of the real thing: 28x28 grey images, its ten class names, its own test set."""
    ds = data.load_dataset(config.from_dict({"data": {"source": "fashion-mnist", "limit": 600}}))
    assert ds.sample_shape == (1, 28, 28) and ds.labels[0] == "T-shirt/top" and ds.num_classes == 10
    assert len(ds.test.x) == 120 and len(ds.train.x) + len(ds.val.x) == 480
    assert set(np.unique(ds.test.y)) == set(range(10))
