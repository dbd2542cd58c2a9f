import numpy as np
import pytest
from PIL import Image

from edgekit import config, data
from edgekit.errors import DataError


def test_digits_default_split_is_fixed_and_disjoint():
    a = data.load_dataset(config.from_dict({}))
    b = data.load_dataset(config.from_dict({}))
    assert a.sample_shape == (1, 8, 8) and a.num_classes == 10
    assert len(a.train.y) + len(a.val.y) + len(a.test.y) == 1797
    np.testing.assert_array_equal(a.test.x, b.test.x)
    assert 0 <= a.train.x.min() and a.train.x.max() <= 1
    assert len(a.calib.y) == 256


@pytest.mark.parametrize("shape", [(2, 16), (5,), (3, 6, 6)])
def test_npz_any_sample_shape(tmp_path, shape):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(60, *shape)).astype(np.float32), y=rng.integers(0, 3, 60))
    ds = data.load_dataset(config.from_dict({"data": {"source": "npz", "path": str(tmp_path / "d.npz")}}))
    assert ds.sample_shape == shape and ds.num_classes == 3


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        ({"x": np.zeros((4, 2), np.float32)}, "it needs 'x' (float32) and 'y'"),
        ({"x": np.zeros((4, 2), np.float32), "y": np.zeros(3, int)}, "x has 4 samples, y has 3 labels"),
        ({"x": np.zeros((4, 2), np.float32), "y": np.full(4, 0.5)}, "integer class ids"),
        ({"x": np.full((40, 2), np.nan, np.float32), "y": np.zeros(40, int)}, "NaN"),
    ],
)
def test_bad_npz_is_a_clear_error(tmp_path, arrays, needle):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError) as err:
        data.load_dataset(config.from_dict({"data": {"source": "npz", "path": str(tmp_path / "d.npz")}}))
    assert needle in str(err.value)


def test_truncated_npz_says_truncated_not_wrong_format(tmp_path):
    """The first half of a valid numpy.savez file: a zip whose directory (at its end) is missing."""
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((60, 4), np.float32), y=np.arange(60) % 3)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError) as err:
        data.load_dataset(config.from_dict({"data": {"source": "npz", "path": str(path)}}))
    assert "d.npz' looks truncated or corrupt" in str(err.value) and "numpy.savez" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("cut", ["x.npy", "y.npy"])
def test_truncated_npy_pair_names_the_file(tmp_path, cut):
    np.save(tmp_path / "x.npy", np.zeros((60, 4), np.float32))
    np.save(tmp_path / "y.npy", np.arange(60) % 3)
    (tmp_path / cut).write_bytes((tmp_path / cut).read_bytes()[:-100])
    with pytest.raises(DataError) as err:
        data.load_dataset(config.from_dict({"data": {"source": "npy", "path": str(tmp_path)}}))
    assert f"{cut}' is truncated: its header declares" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("name", "content", "needle"), [
    ("y.npy", b"", "y.npy' is empty (0 bytes); write it again with numpy.save"),
    ("x.npy", b"", "x.npy' is empty (0 bytes)"),
    ("y.npy", b"labels,0,1,2\n", "y.npy' is not a readable .npy file (the magic string is not correct"),
    ("y.npy", np.arange(999) % 3, "x.npy has 1000 samples, y.npy has 999 labels"),
    ("y.npy", np.zeros((1000, 2), np.int64), "y.npy' has shape (1000, 2); it needs one class id per sample"),
])
def test_bad_npy_file_is_named_with_what_is_wrong(tmp_path, name, content, needle):
    np.save(tmp_path / "x.npy", np.zeros((1000, 4), np.float32))
    np.save(tmp_path / "y.npy", np.arange(1000) % 3)
    if isinstance(content, bytes):
        (tmp_path / name).write_bytes(content)
    else:
        np.save(tmp_path / name, content)
    with pytest.raises(DataError) as err:
        data.load_dataset(config.from_dict({"data": {"source": "npy", "path": str(tmp_path)}}))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_npy_folder_read_as_an_imagefolder_says_set_source_npy(tmp_path):
    """A folder path without data.source is an ImageFolder; one of .npy files says which source reads it."""
    np.save(tmp_path / "x.npy", np.zeros((60, 4), np.float32))
    np.save(tmp_path / "y.npy", np.arange(60) % 3)
    with pytest.raises(DataError) as err:
        data.load_dataset(config.from_dict({"data": {"path": str(tmp_path)}}))
    assert str(err.value) == (f"'{tmp_path}' holds .npy files (x.npy, y.npy), not one subfolder of images per "
                              "class; set data.source: npy to read x.npy (samples) and y.npy (labels) from it")


@pytest.mark.parametrize("source", ["npz", "npy"])
def test_nan_names_the_file_the_rows_and_the_first(tmp_path, monkeypatch, source):
    """One helper for in-memory and memory-mapped x; chunks smaller than x so the count crosses chunks."""
    monkeypatch.setattr(data, "NPY_CHUNK", 16)
    x = np.zeros((60, 2, 3), np.float32)
    x[7, 1, 2], x[50, 0, 0], x[51, 1, 1] = np.nan, np.inf, -np.inf
    y = np.arange(60) % 3
    if source == "npz":
        np.savez(tmp_path / "d.npz", x=x, y=y)
        path, named = tmp_path / "d.npz", tmp_path / "d.npz"
    else:
        np.save(tmp_path / "x.npy", x), np.save(tmp_path / "y.npy", y)
        path, named = tmp_path, tmp_path / "x.npy"
    with pytest.raises(DataError) as err:
        data.load_dataset(config.from_dict({"data": {"source": source, "path": str(path)}}))
    assert str(err.value).startswith(f"'{named}': x holds NaN or infinite values in 3 of 60 rows (the first is row 7)")


def test_imagefolder(tmp_path):
    for cls, value in (("cat", 30), ("dog", 220)):
        (tmp_path / cls).mkdir()
        for i in range(30):  # 60 images: enough for the smallest splits (data.MIN_SPLIT)
            Image.new("RGB", (20, 12), (value, i, 0)).save(tmp_path / cls / f"{i}.png")
    cfg = config.from_dict({"data": {"source": "imagefolder", "path": str(tmp_path), "image_size": 16}})
    ds = data.load_dataset(cfg)
    assert ds.sample_shape == (3, 16, 16) and ds.labels == ["cat", "dog"]
    assert "RGB" in ds.preprocessing


def test_missing_data_path(tmp_path):
    with pytest.raises(DataError, match="not found"):
        data.load_dataset(config.from_dict({"data": {"source": "npz", "path": str(tmp_path / "x.npz")}}))
