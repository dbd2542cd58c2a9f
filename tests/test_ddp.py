"""train.workers: data-parallel training in forked processes (edgekit/ddp.py) against one process.

Tolerances: without BatchNorm two workers take the steps one process takes (shares weighted by size, gradients
averaged), so the weights differ only by float summation order: 1e-5 (8.8e-8 measured; unweighted shares or
unaveraged adapter gradients give 0.04). With BatchNorm each worker normalises with
its half batch's statistics (SyncBatchNorm needs a GPU in torch 2.13), a different but equally valid training
run: test accuracy within 5 pp and the same class for at least 90% of test samples. Distillation (no BatchNorm,
with an adapter) is held to 1e-5; QAT (NNCF, the BatchNorm digits CNN) to the BatchNorm tolerance (measured:
73.3 % vs 71.7 %, the same class for 98.3 %).
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgekit import config, data, ddp, pipeline, targets, training
from edgekit.errors import ConfigError, StageFailed
from edgekit.stages import distill, keys, prune, quantize, train
from edgekit.stages.base import Context
from tests.conftest import tiny

USER_MODELS = Path(__file__).parent / "user_models"


@pytest.fixture(autouse=True)
def _short_timeout(monkeypatch):
    """A worker waiting on a dead peer fails in 60 s, not 10 minutes (a regression fails instead of hanging)."""
    monkeypatch.setattr(ddp, "TIMEOUT", datetime.timedelta(seconds=60))


def _digits(limit: int = 400) -> data.Dataset:
    return data.load_dataset(config.from_dict({"data": {"limit": limit, "calib_samples": 16}}))


def _no_batchnorm_fit(ds: data.Dataset, workers: int) -> tuple[dict, float]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10))
    scale = nn.Parameter(torch.ones(()))  # outside the model, as distillation's adapters are

    def loss(out, y, x):  # a closure: workers are forked, nothing is pickled
        return nn.functional.cross_entropy(out * scale, y)

    # 260 training samples in batches of 33: the last batch (29) splits 15 / 14, weighted by size
    training.fit(net, ds.train, ds.val, epochs=3, lr=0.01, batch_size=33, loss_fn=loss, extra_params=[scale],
                 keep_best=False, workers=workers)
    return {**net.state_dict(), "scale": scale.detach().clone()}, os.getpid()


def test_two_workers_take_the_steps_one_process_takes():
    ds = _digits()
    one, _ = _no_batchnorm_fit(ds, 1)
    two, parent = _no_batchnorm_fit(ds, 2)
    loop = ddp.loops_since(ddp.loops_run() - 1)[0]
    assert loop["workers"] == 2 and loop["world_size"] == 2 and loop["backend"] == "gloo"
    assert len(set(loop["pids"])) == 2 and parent not in loop["pids"]
    assert not torch.equal(one["scale"], torch.ones(()))  # the extra parameter trained and came back
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=0, atol=1e-5), name
    assert not multiprocessing.active_children()


def test_each_worker_reads_only_its_share_of_every_batch():
    shares = []
    for rank in (0, 1):
        torch.manual_seed(0)
        shares.append(list(training._Orders(70, 32, ddp.Group(rank, 2))))
    torch.manual_seed(0)
    batches = list(torch.randperm(70).split(32))
    assert len(shares[0]) == len(shares[1]) == 3
    for batch, (rows0, w0), (rows1, w1) in zip(batches, *shares, strict=True):
        assert not set(rows0.tolist()) & set(rows1.tolist())
        assert torch.equal(torch.cat([rows0, rows1]), batch)
        assert (w0 + w1) / 2 == pytest.approx(1.0)  # the average weight: the whole batch's mean gradient
    folded = []
    for rank in (0, 1):  # a last batch of 3
        torch.manual_seed(0)
        folded.append(list(training._Orders(67, 32, ddp.Group(rank, 2))))
    assert [[len(rows) for rows, _ in shares] for shares in folded] == [[16, 18], [16, 17]]  # joins the one before
    assert sorted(torch.cat([rows for shares in folded for rows, _ in shares]).tolist()) == list(range(67))


def test_no_worker_trains_batchnorm_on_a_share_of_one_sample():
    """67 samples in batches of 32 in two workers: the last batch of 3 would leave worker 1 one sample, which
    BatchNorm1d cannot train on; it joins the batch before it."""
    rng = np.random.default_rng(0)
    y = np.arange(67) % 2
    split = data.Split((rng.normal(size=(67, 4)) + y[:, None]).astype(np.float32), y)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    assert training.fit(net, split, split, epochs=2, lr=0.01, batch_size=32, workers=2) > 0.5
    assert not multiprocessing.active_children()


@pytest.mark.parametrize("readers", [0, 2])
def test_streamed_split_trains_in_two_workers_as_in_memory(tmp_path, readers):
    """data.workers DataLoader processes (forked by each training worker) read its share of each batch."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    np.save(tmp_path / "x.npy", (rng.random((200, 8, 8)) * 60 + y[:, None, None] * 60).astype(np.uint8))
    np.save(tmp_path / "y.npy", y)
    ds = data.load_dataset(config.from_dict({"data": {"source": "npy", "path": str(tmp_path), "calib_samples": 16,
                                                      "workers": readers}}))
    assert isinstance(ds.train.x, data.Rows)  # memory-mapped: each worker's DataLoader reads its rows only
    states = []
    for split in (ds.train, data.Split(np.asarray(ds.train.x), ds.train.y)):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
        training.fit(net, split, ds.val, epochs=2, lr=0.01, batch_size=16, keep_best=False, workers=2)
        states.append(net.state_dict())
    assert all(torch.allclose(states[0][k], states[1][k], rtol=0, atol=1e-6) for k in states[0])


def _ctx(tmp_path, name: str, **sections) -> Context:
    cfg = config.from_dict(tiny(data={"limit": 400}, **sections))
    return Context(cfg, data.load_dataset(cfg), tmp_path / name, targets.get(["x86-64"]))


def test_user_factory_model_with_batchnorm_trains_in_two_workers(tmp_path):
    model = {"factory": f"{USER_MODELS}/local_classes.py:build"}  # classes pickle cannot name
    runs = {}
    for workers in (1, 2):
        ctx = _ctx(tmp_path, f"w{workers}", model=model, train={"workers": workers, "epochs": 6})
        record = pipeline.run_stage(ctx, "train")
        saved = json.loads((ctx.out / "stages" / "train" / "metrics.json").read_text())
        assert [(t["workers"], t["backend"]) for t in saved["training"]] == \
            [(workers, "gloo" if workers > 1 else "in-process")]
        runs[workers] = record["accuracy"], np.load(ctx.out / "stages" / "train" / "test_logits.npy").argmax(1)
    assert abs(runs[1][0] - runs[2][0]) <= 0.05
    assert (runs[1][1] == runs[2][1]).mean() >= 0.9


CRASHING = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, channels, classes):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(channels, 8, 3, padding=1), nn.Linear(8, classes)

    def forward(self, x):
        if torch.distributed.is_initialized() and torch.distributed.get_rank() == 1:
            raise ZeroDivisionError("worker 1 cannot divide")
        return self.fc(self.conv(x).mean((2, 3)))


def build(num_classes, input_shape):
    return Net(input_shape[0], num_classes)
'''


def test_a_failing_worker_stops_the_stage_in_one_line(tmp_path):
    (tmp_path / "crashing.py").write_text(CRASHING)
    ctx = _ctx(tmp_path, "b", model={"factory": f"{tmp_path}/crashing.py:build"}, train={"workers": 2})
    with pytest.raises(StageFailed) as err:
        pipeline.run_stage(ctx, "train")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"stage train failed in your code ({tmp_path}/crashing.py:")
    assert "worker 1 of 2" in message and "ZeroDivisionError: worker 1 cannot divide" in message
    assert "in forward" in (ctx.out / "stages" / "train" / "error.log").read_text()  # the worker's traceback
    assert not multiprocessing.active_children()  # worker 0, waiting on worker 1, was stopped


def test_a_killed_worker_is_reported_not_waited_for():
    ds = _digits(200)

    def loss(out, y, x):
        if torch.distributed.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return nn.functional.cross_entropy(out, y)

    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(ddp.WorkerFailed, match=r"worker 1 of 2 \(pid \d+\) was killed by SIGKILL"):
        training.fit(net, ds.train, ds.val, epochs=1, lr=0.01, loss_fn=loss, workers=2)
    assert not multiprocessing.active_children()


def test_a_diverging_loss_in_a_worker_is_edgekits_one_line_not_a_worker_failure():
    """train.lr 1e30 in two workers: the worker's TrainingDiverged comes back as itself, saying what to do, not as
    'stage train failed in edgekit: WorkerFailed ...'."""
    from edgekit.errors import TrainingDiverged

    ds = _digits(200)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))  # 1e30 x 1e30 overflows
    with pytest.raises(TrainingDiverged, match=r"^training diverged in stage train at epoch 1/2: the loss became "
                       r"(nan|inf); lower train.lr \(now 1e\+30\)"):
        training.fit(net, ds.train, ds.val, epochs=2, lr=1e30, batch_size=16, workers=2)
    assert not multiprocessing.active_children()


def _stage_in_workers(trained, tmp_path, stage, workers: int, **sections) -> tuple[dict, np.ndarray, dict]:
    """One stage run on the shared tiny trained model with `train.workers: workers`: its record, its test-split
    predictions and its training loop's record."""
    import shutil

    cfg = config.from_dict(tiny(data={"limit": 300}, train={"epochs": 4, "workers": workers}, **sections))
    ctx = Context(cfg, trained.data, tmp_path / f"w{workers}", targets.get(["x86-64"]))
    shutil.copytree(trained.stage_dir("train"), ctx.stage_dir("train"), dirs_exist_ok=True)
    start = ddp.loops_run()
    record = stage.run(ctx)
    loops = ddp.loops_since(start)
    assert len(loops) == 1, loops
    predicted = np.load(ctx.out / "stages" / stage.name / "test_logits.npy").argmax(1)
    return record, predicted, loops[0]


def _same_run_within_batchnorm_tolerance(one: tuple, two: tuple, desc: str) -> None:
    """The module docstring's BatchNorm tolerance: accuracy within 5 pp, the same class for 90% of test samples."""
    (rec1, pred1, loop1), (rec2, pred2, loop2) = one, two
    assert (loop1["loop"], loop1["workers"], loop1["backend"]) == (desc, 1, "in-process")
    assert (loop2["loop"], loop2["workers"], loop2["backend"], loop2["world_size"]) == (desc, 2, "gloo", 2)
    print(f"{desc}: test accuracy {rec1['accuracy']:.3f} (1 worker), {rec2['accuracy']:.3f} (2 workers), "
          f"same class {(pred1 == pred2).mean():.1%}")  # the margins, in the -s log
    assert abs(rec1["accuracy"] - rec2["accuracy"]) <= 0.05, (rec1["accuracy"], rec2["accuracy"])
    assert (pred1 == pred2).mean() >= 0.9, (pred1 == pred2).mean()
    assert not multiprocessing.active_children()


NO_BATCHNORM = '''
from torch import nn


class Net(nn.Module):
    def __init__(self, shape, classes):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(shape[0], 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * shape[1] * shape[2], classes)

    def forward(self, x):
        return self.fc(self.conv2(self.conv1(x).relu()).relu().flatten(1))


def build(num_classes, input_shape):
    return Net(input_shape, num_classes)
'''


def test_distill_in_two_workers_takes_the_steps_one_process_takes(tmp_path):
    """Soft and feature losses, the teacher's conv2 (16 channels) taught to the student's conv1 (8): the adapter
    between them is a parameter outside the model, its gradients averaged by hand. No BatchNorm: the weights
    match to float summation order (the module docstring's 1e-5)."""
    import shutil

    (tmp_path / "net.py").write_text(NO_BATCHNORM)
    sections = {"model": {"factory": f"{tmp_path}/net.py:build"},
                "distill": {"epochs": 3, "lr": 0.01, "losses": ["soft", "feature"],
                             "feature_layers": ["conv2:conv1"]}}
    teacher = _ctx(tmp_path, "teacher", **sections, train={"epochs": 1})  # half-trained: distilling improves it
    pipeline.run_stage(teacher, "train")
    students, adapters = {}, set()
    for workers in (1, 2):
        ctx = _ctx(tmp_path, f"w{workers}", **sections, train={"workers": workers})
        shutil.copytree(teacher.stage_dir("train"), ctx.stage_dir("train"), dirs_exist_ok=True)
        start = ddp.loops_run()
        record = distill.run(ctx)
        assert [(lp["loop"], lp["workers"]) for lp in ddp.loops_since(start)] == [("distill", workers)]
        students[workers], _ = ctx.load_model("distill").state_dict(), adapters.add(record["settings"]["adapters"])
    assert adapters == {1}
    assert not torch.equal(students[1]["conv1.weight"], teacher.load_model("train").state_dict()["conv1.weight"])
    for name in students[1]:
        assert torch.allclose(students[1][name], students[2][name], rtol=0, atol=1e-5), name
    assert not multiprocessing.active_children()


def test_qat_in_two_workers_trains_as_one_process(trained, tmp_path):
    """NNCF's QAT graph (fake-quantizers with trained ranges) trained in forked workers."""
    section = {"quantize": {"method": "qat", "qat_epochs": 2}}
    one = _stage_in_workers(trained, tmp_path, quantize, 1, **section)
    two = _stage_in_workers(trained, tmp_path, quantize, 2, **section)
    assert one[0]["method"] == two[0]["method"] == "nncf-qat"
    _same_run_within_batchnorm_tolerance(one, two, "qat")


@pytest.mark.parametrize("value, needle", [
    (0, "'train.workers' is out of range (got 0)"), (-2, "out of range"), ("2", "expected int"),
    (1.5, "expected int"), (65, "train.batch_size (64) leaves some of the 65 train.workers fewer than 2 samples"),
    (33, "raise batch_size to 66 or lower workers")])
def test_bad_worker_counts_are_one_line_errors(value, needle):
    with pytest.raises(ConfigError) as err:
        config.from_dict({"train": {"workers": value}})
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_workers_is_a_documented_key_and_part_of_every_training_stage_key(tmp_path):
    assert "  workers: 1" in config.default_yaml().split("prune:")[0].split("train:")[1]
    one, two = _ctx(tmp_path, "a"), _ctx(tmp_path, "a", train={"workers": 2})
    for stage in (train, prune, distill, quantize):  # shares change BatchNorm statistics: slightly other weights
        assert keys.key_of(keys.inputs(one, stage, {})) != keys.key_of(keys.inputs(two, stage, {}))
