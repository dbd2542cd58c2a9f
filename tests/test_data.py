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


def _save(tmp_path, source: str, x: np.ndarray, y: np.ndarray) -> tuple[object, object]:
    """x, y saved as d.npz or as x.npy + y.npy: data.path, and the file a refusal of x must name."""
    if source == "npz":
        np.savez(tmp_path / "d.npz", x=x, y=y)
        return tmp_path / "d.npz", tmp_path / "d.npz"
    np.save(tmp_path / "x.npy", x), np.save(tmp_path / "y.npy", y)
    return tmp_path, tmp_path / "x.npy"


def _load_saved(tmp_path, source: str, x: np.ndarray, y: np.ndarray) -> data.Dataset:
    path, _ = _save(tmp_path, source, x, y)
    return data.load_dataset(config.from_dict({"data": {"source": source, "path": str(path)}}))


def _refusal(tmp_path, source: str, x: np.ndarray, y: np.ndarray) -> tuple[str, object]:
    """The load error of x, y saved as d.npz or as x.npy + y.npy, and the file it must name."""
    path, named = _save(tmp_path, source, x, y)
    with pytest.raises(DataError) as err:
        data.load_dataset(config.from_dict({"data": {"source": source, "path": str(path)}}))
    return str(err.value), named


@pytest.mark.parametrize("source", ["npz", "npy"])
def test_nan_names_the_file_the_rows_and_the_first(tmp_path, monkeypatch, source):
    """One helper for in-memory and memory-mapped x; chunks smaller than x so the count crosses chunks."""
    monkeypatch.setattr(data, "NPY_CHUNK", 16)
    x = np.zeros((60, 2, 3), np.float32)
    x[7, 1, 2], x[50, 0, 0], x[51, 1, 1] = np.nan, np.inf, -np.inf
    y = np.arange(60) % 3
    err, named = _refusal(tmp_path, source, x, y)
    assert err.startswith(f"'{named}': x holds NaN or infinite values in 3 of 60 rows (the first is row 7)")


def test_imagefolder(tmp_path):
    for cls, value in (("cat", 30), ("dog", 220)):
        (tmp_path / cls).mkdir()
        for i in range(30):  # 60 images: enough for the smallest splits (data.MIN_SPLIT)
            Image.new("RGB", (20, 12), (value, i, 0)).save(tmp_path / cls / f"{i}.png")
    cfg = config.from_dict({"data": {"source": "imagefolder", "path": str(tmp_path), "image_size": 16}})
    ds = data.load_dataset(cfg)
    assert ds.sample_shape == (3, 16, 16) and ds.labels == ["cat", "dog"]
    assert "RGB" in ds.preprocessing
    # [height, width]: a 20x12 (width x height) image keeps its aspect at 12x20
    cfg = config.from_dict({"data": {"source": "imagefolder", "path": str(tmp_path), "image_size": [12, 20]}})
    ds = data.load_dataset(cfg)
    assert ds.sample_shape == (3, 12, 20) and "resized to 12x20 (Pillow bicubic)" in ds.preprocessing


@pytest.mark.parametrize("grayscale", [True, False])
def test_a_16_bit_png_reads_as_its_8_bit_copy(tmp_path, grayscale):
    """A 16-bit greyscale PNG (Pillow's mode I;16) is scaled to 8 bits, value / 257: Pillow's convert clipped it at
    255, and a 16-bit gradient read as almost all white."""
    rng = np.random.default_rng(0)
    for cls, top in (("dark", 20000), ("light", 65535)):
        for depth in (16, 8):
            (tmp_path / f"{depth}-bit" / cls).mkdir(parents=True)
        for i in range(30):
            x = rng.integers(0, top + 1, (8, 8)).astype(np.uint16)
            Image.fromarray(x).save(tmp_path / "16-bit" / cls / f"{i}.png")
            Image.fromarray(np.rint(x / 257).astype(np.uint8)).save(tmp_path / "8-bit" / cls / f"{i}.png")
    with Image.open(tmp_path / "16-bit" / "dark" / "0.png") as img:
        assert img.mode.startswith("I")  # what Pillow opens a 16-bit PNG as
    wide, narrow = (data.load_dataset(config.from_dict({"data": {"path": str(tmp_path / f"{depth}-bit"),
                                                                 "image_size": 6, "grayscale": grayscale}}))
                    for depth in (16, 8))
    np.testing.assert_array_equal(wide.train.x, narrow.train.x)
    assert wide.train.x.mean() < 0.5


def test_imagefolder_skips_metadata_unsaid_and_says_what_else_it_skipped(tmp_path):
    """macOS's AppleDouble ._x.png (metadata, not an image) stopped the build; nested, top-level and unread-type
    files were dropped without a word. Metadata is skipped as hidden folders are; the rest is one warning per kind:
    how many, one of them, why."""
    for cls, value in (("cat", 30), ("dog", 220)):
        (tmp_path / cls / "more").mkdir(parents=True)
        for i in range(30):
            Image.new("RGB", (8, 8), (value, i, 0)).save(tmp_path / cls / f"{i}.png")
            (tmp_path / cls / f"._{i}.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
        Image.new("RGB", (8, 8)).save(tmp_path / cls / "more" / "0.png")
        (tmp_path / cls / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
        (tmp_path / cls / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")  # Windows Explorer's, unhidden
    Image.new("RGB", (8, 8)).save(tmp_path / "dog" / "more" / "1.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "dog" / "scan.tif")
    (tmp_path / "cat" / "notes.txt").write_text("collected 2024")
    Image.new("RGB", (8, 8)).save(tmp_path / "unsorted.png")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / ".ipynb_checkpoints" / "x.png")
    ds = data.load_dataset(config.from_dict({"data": {"path": str(tmp_path), "image_size": 8}}))
    assert len(ds.train.y) + len(ds.val.y) + len(ds.test.y) == 60
    assert ds.warnings == (
        f"'{tmp_path}': 1 image not read (e.g. 'unsorted.png'): outside every class folder; move each into its "
        "class's folder",
        f"'{tmp_path}': 3 images not read (e.g. 'cat/more/0.png'): in a subfolder of a class folder, where edgekit "
        "does not look; move them up into the class folder",
        f"'{tmp_path}': 2 files not read (e.g. 'cat/notes.txt'): of a type edgekit does not read (it reads .bmp, "
        ".gif, .jpeg, .jpg, .png, .webp); convert the images among them to PNG")


def test_an_imagefolder_with_only_class_images_has_no_warnings(tmp_path):
    _write_source(tmp_path, "imagefolder", np.zeros((60, 8, 8), np.uint8), np.arange(60) % 2)
    ds = data.load_dataset(config.from_dict({"data": {"path": str(tmp_path), "image_size": 8}}))
    assert ds.warnings == ()


def test_an_imagefolder_too_large_for_memory_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """4096x4096 images were allowed and took a MemoryError traceback (or the OOM killer) after minutes."""
    _write_source(tmp_path, "imagefolder", np.zeros((60, 8, 8), np.uint8), np.arange(60) % 2)
    read = []
    monkeypatch.setattr(data, "_image", lambda *a: read.append(a))
    monkeypatch.setattr(data, "_available_bytes", lambda: 2**30)  # 1 GB free: 60 RGB images at 2048 need 5.6
    with pytest.raises(DataError, match=r"60 images at data.image_size take 5.6 GB while edgekit reads them "
                                        r"\(float32\), more than the 1.0 GB of memory free; lower data.image_size"):
        data.load_dataset(config.from_dict({"data": {"path": str(tmp_path), "image_size": 2048}}))
    assert read == []


def test_missing_data_path(tmp_path):
    with pytest.raises(DataError, match="not found"):
        data.load_dataset(config.from_dict({"data": {"source": "npz", "path": str(tmp_path / "x.npz")}}))


# --- classes: each one with samples in the training split -------------------------------------------------


def _seed_putting_last_in_test(n: int, test_fraction: float = 0.2) -> int:
    """A data.seed whose split puts sample n - 1 in the test split (every source shuffles the same way)."""
    return next(s for s in range(100) if n - 1 in np.random.default_rng(s).permutation(n)[: int(n * test_fraction)])


def _write_source(root, source: str, x: np.ndarray, y: np.ndarray):
    """x (N, 8, 8) uint8 and y as the files of `source`; the path to set as data.path."""
    from tests.test_idx import _write_idx

    if source == "npz":
        np.savez(root / "d.npz", x=x[:, None], y=y)
        return root / "d.npz"
    if source == "npy":
        np.save(root / "x.npy", x), np.save(root / "y.npy", y)
        return root
    if source == "idx":
        _write_idx(root / "train-images-idx3-ubyte", x)
        _write_idx(root / "train-labels-idx1-ubyte", y.astype(np.uint8))
        return root
    for i, (img, c) in enumerate(zip(x, y, strict=True)):  # imagefolder: class folders sort as their ids
        (root / f"c{c:02d}").mkdir(exist_ok=True)
        Image.fromarray(img).save(root / f"c{c:02d}" / f"{i:03d}.png")
    return root


@pytest.mark.parametrize("source", ["npz", "npy", "idx", "imagefolder"])
def test_a_class_with_one_sample_in_the_test_split_is_refused(tmp_path, source):
    """Labels 0..9 plus one stray 10: a class the training split never sees, whichever source reads it."""
    n = 101
    y = np.r_[np.arange(n - 1) % 10, 10]
    x = np.random.default_rng(0).integers(0, 255, (n, 8, 8)).astype(np.uint8)
    path = _write_source(tmp_path, source, x, y)
    seed = _seed_putting_last_in_test(n)
    cfg = {"source": source, "path": str(path), "seed": seed, **({"image_size": 8} if source == "imagefolder" else {})}
    with pytest.raises(DataError) as err:
        data.load_dataset(config.from_dict({"data": cfg}))
    name = "c10" if source == "imagefolder" else "10"
    assert str(err.value) == (f"'{path}': class {name} has 1 sample, none in the training split: a model cannot "
                              "learn a class it never sees; add samples of that class or drop them and renumber "
                              "the labels")


def test_a_class_only_in_the_idx_test_files_is_refused(tmp_path, monkeypatch):
    """With t10k files, a class only they hold is named, not built into a model that never trained on it."""
    from tests.test_idx import _mnist_folder, _write_idx

    monkeypatch.setattr(data.idx, "CACHE", tmp_path / "cache")
    folder = _mnist_folder(tmp_path / "m", gz=False)
    _write_idx(folder / "t10k-labels-idx1-ubyte", np.r_[np.arange(39) % 3, 3].astype(np.uint8))
    with pytest.raises(DataError, match="m': class 3 has 1 sample, none in the training split"):
        data.load_dataset(config.from_dict({"data": {"source": "idx", "path": str(folder)}}))


def test_a_small_dataset_with_every_class_in_training_still_loads(tmp_path):
    """Few samples per class are fine as long as each class reaches the training split."""
    n = 101
    np.savez(tmp_path / "d.npz", x=np.zeros((n, 4), np.float32), y=np.r_[np.arange(n - 1) % 10, 10])
    seed = next(s for s in range(100) if n - 1 in np.random.default_rng(s).permutation(n)[int(n * 0.35):])
    ds = data.load_dataset(config.from_dict({"data": {"path": str(tmp_path / "d.npz"), "seed": seed}}))
    assert ds.num_classes == 11 and 10 in ds.train.y


@pytest.mark.parametrize("source", ["npz", "npy"])
def test_negative_label_names_the_value_and_the_first_row(tmp_path, source):
    y = np.arange(600) % 3
    y[[3, 400]] = -1
    path = _write_source(tmp_path, source, np.zeros((600, 8, 8), np.uint8), y)
    with pytest.raises(DataError) as err:
        data.load_dataset(config.from_dict({"data": {"source": source, "path": str(path)}}))
    named = path if source == "npz" else path / "y.npy"
    assert str(err.value).startswith(f"'{named}'{': y' if source == 'npz' else ''} holds negative class ids in 2 of "
                                     "600 rows (the first is row 3: -1)")


def test_uint8_npz_is_scaled_as_npy_is(tmp_path):
    """One rule for uint8 images: divided by 255, (N, H, W) given a channel axis, in .npz and x.npy alike."""
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (90, 6, 5)).astype(np.uint8), np.arange(90) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    (tmp_path / "n").mkdir()
    np.save(tmp_path / "n" / "x.npy", x), np.save(tmp_path / "n" / "y.npy", y)
    a = data.load_dataset(config.from_dict({"data": {"source": "npz", "path": str(tmp_path / "d.npz")}}))
    b = data.load_dataset(config.from_dict({"data": {"source": "npy", "path": str(tmp_path / "n")}}))
    assert a.sample_shape == b.sample_shape == (1, 6, 5) and a.test.x.max() <= 1.0
    np.testing.assert_array_equal(a.test.x, b.test.x)
    np.testing.assert_array_equal(a.train.x, np.asarray(b.train.x))
    assert a.preprocessing == "pixel / 255 in the .npz, shape (1, 6, 5)"
    assert b.preprocessing.startswith("pixel / 255, shape (1, 6, 5)")


@pytest.mark.parametrize("source", ["npz", "npy"])
@pytest.mark.parametrize("shape", [(60, 8, 8, 3), (60, 28, 28, 1)])
def test_channels_last_images_are_refused_with_the_transpose(tmp_path, source, shape):
    x, y = np.zeros(shape, np.float32), np.arange(60) % 3
    err, named = _refusal(tmp_path, source, x, y)
    assert err == (f"'{named}': x has shape {shape}, channels last; samples are (C, H, W): save "
                              "x.transpose(0, 3, 1, 2)")


@pytest.mark.parametrize("source", ["npz", "npy"])
@pytest.mark.parametrize("shape", [(60, 8, 12, 3), (60, 5, 7, 4), (60, 3, 8, 8)])
def test_channels_first_samples_ending_in_3_are_read_as_they_are(tmp_path, source, shape):
    """8 sensors x 12 steps x 3 axes is a (C, H, W) sample, not a channels-last image: kept as saved."""
    x, y = np.random.default_rng(0).normal(size=shape).astype(np.float32), np.arange(60) % 3
    ds = _load_saved(tmp_path, source, x, y)
    assert ds.sample_shape == shape[1:]


@pytest.mark.parametrize("source", ["npz", "npy"])
@pytest.mark.parametrize("shape", [(60, 20, 30, 3), (60, 6, 6, 4)])
def test_large_or_square_channels_last_images_are_refused(tmp_path, source, shape):
    err, named = _refusal(tmp_path, source, np.zeros(shape, np.float32), np.arange(60) % 3)
    assert err.startswith(f"'{named}': x has shape {shape}, channels last")


@pytest.mark.parametrize("source", ["npz", "npy"])
def test_float64_x_is_used_as_float32_in_npz_and_npy_alike(tmp_path, source):
    x = np.random.default_rng(0).normal(size=(60, 2, 5)).astype(np.float64)
    ds = _load_saved(tmp_path, source, x, np.arange(60) % 3)
    assert np.asarray(ds.test.x).dtype == np.float32 and ds.preprocessing.startswith("as stored")
    assert np.isin(np.asarray(ds.test.x), x.astype(np.float32)).all()


@pytest.mark.parametrize("source", ["npz", "npy"])
@pytest.mark.parametrize("dtype", [np.int16, np.int64, np.bool_])
def test_integer_x_other_than_uint8_is_refused_in_npz_and_npy_alike(tmp_path, source, dtype):
    """No scale fits every integer range; uint8 images alone are divided by 255."""
    x = np.ones((60, 2, 5), dtype)
    err, named = _refusal(tmp_path, source, x, np.arange(60) % 3)
    assert err == (f"'{named}': x is {np.dtype(dtype)} (60, 2, 5); samples are float (used as stored) or uint8 "
                   "images (divided by 255): save x.astype(numpy.float32), scaled as the model should see it")


def test_a_class_id_past_the_declared_labels_is_refused(tmp_path, monkeypatch):
    """fashion-mnist declares its 10 class names: an id 10 in the files at data.path is named, not trained."""
    from tests.test_idx import _write_idx

    monkeypatch.setattr(data.idx, "CACHE", tmp_path / "cache")
    y = (np.arange(110) % 11).astype(np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((110, 6, 5), np.uint8))
    _write_idx(tmp_path / "train-labels-idx1-ubyte", y)
    with pytest.raises(DataError, match=r"a sample has class id 10 but there are 10 classes \(ids 0..9: T-shirt/top"):
        data.load_dataset(config.from_dict({"data": {"source": "fashion-mnist", "path": str(tmp_path)}}))
