"""Streaming training data: memory-mapped .npy pairs (and IDX files) whose training split stays on disk and is
read batch by batch, in DataLoader worker processes when data.workers is set."""

import multiprocessing

import numpy as np
import pytest
import torch

from edgekit import config, data, models, training
from edgekit.errors import ConfigError, DataError


def _write_npy(folder, n=240, dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = (rng.random((n, 8, 8)) * 60 + y[:, None, None] * 60).astype(dtype)  # classes differ in brightness
    folder.mkdir(exist_ok=True)
    np.save(folder / "x.npy", x)
    np.save(folder / "y.npy", y)
    return x, y


def _cfg(folder, **extra) -> config.Config:
    return config.from_dict({"data": {"source": "npy", "path": str(folder), "calib_samples": 16, **extra},
                             "model": {"width": 8}})


def test_npy_training_split_stays_on_disk(tmp_path):
    x, y = _write_npy(tmp_path / "d")
    ds = data.load_dataset(_cfg(tmp_path / "d"))
    assert isinstance(ds.train.x, data.Rows) and isinstance(ds.train.x.array, np.memmap)
    assert isinstance(ds.val.x, np.ndarray) and isinstance(ds.test.x, np.ndarray)
    assert ds.sample_shape == (1, 8, 8) and ds.num_classes == 3
    rows = ds.train.x.index
    assert len(rows) + len(ds.val.y) + len(ds.test.y) == len(y)
    expected = x[rows].astype(np.float32)[:, None] / 255.0
    picks = np.array([5, 0, 17, 3])  # unsorted: returned in the order asked
    assert np.array_equal(ds.train.x[picks], expected[picks]) and np.array_equal(ds.train.x[2:6], expected[2:6])
    assert np.array_equal(ds.train.x[7], expected[7]) and np.array_equal(np.asarray(ds.train.x), expected)
    assert np.array_equal(ds.train.y, y[rows])


def _trained(split: data.Split, val: data.Split) -> dict:
    torch.manual_seed(0)
    model = models.build_model(config.from_dict({"model": {"width": 8}}), (1, 8, 8), 3)
    training.fit(model, split, val, epochs=2, lr=0.01, batch_size=16, seed=0, keep_best=False)
    return model.state_dict()


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_training_equals_in_memory_training(tmp_path, workers):
    """Same batches in the same order, whether read from disk (in worker processes or not) or from memory."""
    _write_npy(tmp_path / "d")
    ds = data.load_dataset(_cfg(tmp_path / "d", workers=workers))
    assert ds.train.x.workers == workers
    streamed = _trained(ds.train, ds.val)
    assert not multiprocessing.active_children()  # the fit's DataLoader workers ended with it (no leak per fit)
    in_memory = _trained(data.Split(np.asarray(ds.train.x), ds.train.y), ds.val)
    assert all(torch.equal(streamed[k], in_memory[k]) for k in streamed)
    untrained = models.build_model(config.from_dict({"model": {"width": 8}}), (1, 8, 8), 3).state_dict()
    assert not all(torch.equal(streamed[k], untrained[k]) for k in streamed)  # it did train


def test_float_npy_with_limit_and_bad_files(tmp_path):
    x, _ = _write_npy(tmp_path / "f", dtype=np.float32)
    ds = data.load_dataset(_cfg(tmp_path / "f", limit=100))
    assert len(ds.train.y) + len(ds.val.y) + len(ds.test.y) == 100
    assert np.array_equal(ds.train.x[:3], x[ds.train.x.index[:3]][:, :])  # float32 as stored, no channel added
    x[7, 0, 0] = np.nan
    np.save(tmp_path / "f" / "x.npy", x)
    with pytest.raises(DataError, match="x.npy': x holds NaN or infinite values in 1 of"):
        data.load_dataset(_cfg(tmp_path / "f"))
    (tmp_path / "f" / "y.npy").unlink()
    with pytest.raises(DataError) as err:
        data.load_dataset(_cfg(tmp_path / "f"))
    assert "needs x.npy" in str(err.value) and "\n" not in str(err.value)
    np.save(tmp_path / "f" / "y.npy", np.zeros(3, np.int64))
    with pytest.raises(DataError, match="x.npy has 240 samples, y.npy has 3 labels"):
        data.load_dataset(_cfg(tmp_path / "f"))


@pytest.mark.parametrize(("section", "needle"), [
    ({"workers": -1}, "'data.workers' is out of range"),
    ({"workers": 1.5}, "'data.workers' is 1.5; expected int"),
    ({"source": "npy"}, "data.source 'npy' needs data.path"),
])
def test_stream_keys_are_validated(section, needle):
    with pytest.raises(ConfigError) as err:
        config.from_dict({"data": section})
    assert needle in str(err.value) and "\n" not in str(err.value)
