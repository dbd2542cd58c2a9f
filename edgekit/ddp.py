"""Data-parallel training (`train.workers` > 1): N processes each train on a disjoint share of every batch.

edgekit.training.fit runs its loop in N processes forked from this one; DistributedDataParallel (gloo) averages
the gradients, so every process takes the step one process would take on the whole batch (each share's loss is
weighted by its size). Process 0 validates, keeps the best epoch and hands the weights back through a file;
the caller's model is then as if it had been trained here.

Why fork, not spawn or Ray: a forked process already holds everything the loop uses (a model from a user's
factory, with classes pickle cannot name; distillation's hooks and teachers; NNCF's QAT graph; loss closures;
memory-mapped data), so nothing is pickled and no stage builds its inputs twice.
Its price: GNU OpenMP (torch's CPU thread pool) hangs in a forked child whose parent has used it, unless the
child stays on one thread, so each worker computes on one thread; N workers use N cores.
BatchNorm: torch 2.13's SyncBatchNorm needs a GPU, so each process normalises with the statistics of its share
(batch_size / N samples) and the running statistics are process 0's, sent to the others at each forward.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import tempfile
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

from edgekit import errors
from edgekit.errors import EdgekitError, first_line

BACKEND = "gloo"  # edgekit trains on the CPU (fit never moves a model to a device), where NCCL cannot run
THREADS_PER_WORKER = 1  # see above: more hangs in OpenMP once the parent has trained
# a collective that waits longer than this for a peer fails (its process ends, the build stops) instead of
# hanging; process 0 validates between epochs while the others wait in the next step's all-reduce
TIMEOUT = timedelta(minutes=10)
RESULT_FILE = "result.pt"

_LOOPS: list[dict] = []  # every training loop this process ran: the pipeline adds a stage's to its metrics


def record(desc: str, workers: int, **extra: object) -> None:
    backend = BACKEND if workers > 1 else "in-process"
    _LOOPS.append({"loop": desc, "workers": workers, "backend": backend, **extra})


def note(**extra: object) -> None:
    """Add to the record of the loop that just ran (edgekit.training.fit: the starting weights were kept)."""
    _LOOPS[-1].update(extra)


def loops_run() -> int:
    return len(_LOOPS)


def loops_since(start: int) -> list[dict]:
    return [dict(loop) for loop in _LOOPS[start:]]


@dataclass(frozen=True)
class Group:
    """This process's place among the data-parallel workers."""
    rank: int
    world: int

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model behind DistributedDataParallel: its backward averages the gradients over the workers."""
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, forward_sync_buffers=True)

    def average_grads(self, params: list[nn.Parameter]) -> None:
        """Average the gradients of parameters outside the model (distillation's adapters) like DDP does."""
        import torch.distributed as dist

        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        for grad, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            grad.copy_(part.view_as(grad))


class WorkerFailed(RuntimeError):
    """A data-parallel worker ended with an error or was killed; the pipeline names the stage, and where it
    broke from `frames`, the worker's traceback (none when it was killed)."""

    def __init__(self, message: str, frames: list[traceback.FrameSummary] | None = None) -> None:
        super().__init__(message)
        self.frames = frames or []


class _RemoteTraceback(Exception):
    """The failed worker's traceback, chained under WorkerFailed so a stage's error.log shows it."""

    def __str__(self) -> str:
        return self.args[0]


def train(loop: Callable[[Group], dict], model: nn.Module, extra_params: list[nn.Parameter], workers: int,
          desc: str) -> dict:
    """Run `loop` (edgekit.training's, returning its outcome: the best validation accuracy...) in `workers`
    forked processes; load process 0's weights into `model` and `extra_params`; return its outcome."""
    import multiprocessing

    import torch._dynamo  # noqa: F401 - DDP's constructor imports it (seconds): once here, not in every worker
    import torch.distributed  # noqa: F401

    context = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="edgekit-ddp-") as tmp:
        folder = Path(tmp)
        procs = [context.Process(target=_worker, args=(loop, model, extra_params, rank, workers, folder),
                                 name=f"edgekit-{desc}-worker-{rank}") for rank in range(workers)]
        try:
            for proc in procs:
                proc.start()
            _wait(procs, folder, desc)
        finally:
            _stop(procs)
        result = torch.load(folder / RESULT_FILE, weights_only=True)
    model.load_state_dict(result["state"])
    with torch.no_grad():
        for param, value in zip(extra_params, result["extra"], strict=True):
            param.copy_(value)
    record(desc, workers, world_size=result["world_size"], pids=[p.pid for p in procs],
           threads_per_worker=THREADS_PER_WORKER)
    return result["outcome"]


def _worker(loop: Callable[[Group], dict], model: nn.Module, extra_params: list[nn.Parameter], rank: int,
            world: int, folder: Path) -> None:
    try:
        import torch.distributed as dist

        torch.set_num_threads(THREADS_PER_WORKER)
        # a weight with a size-1 dimension (a 1-channel stem) has other strides than its bucket: only slower
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        os.environ["OMP_NUM_THREADS"] = str(THREADS_PER_WORKER)  # for anything this process starts
        _use_loopback()
        dist.init_process_group(BACKEND, init_method=f"file://{folder / 'rendezvous'}", rank=rank,
                                world_size=world, timeout=TIMEOUT)
        outcome = loop(Group(rank, world))
        if rank == 0:
            partial = folder / f"{RESULT_FILE}.partial"
            torch.save({"outcome": outcome, "state": model.state_dict(), "extra": [p.detach() for p in extra_params],
                        "world_size": dist.get_world_size()}, partial)
            partial.rename(folder / RESULT_FILE)  # whole or absent
        dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - any failure is reported to the parent, which stops the rest
        first = first_line(exc)
        frames = [(f.filename, f.lineno, f.name) for f in traceback.extract_tb(exc.__traceback__)]
        (folder / f"error-{rank}.json").write_text(json.dumps({
            "summary": f"{type(exc).__name__}: {first}", "frames": frames,
            "edgekit_error": [type(exc).__name__, str(exc)] if isinstance(exc, EdgekitError) else None,
            "traceback": "".join(traceback.format_exception(exc))}))
        os._exit(1)


def _use_loopback() -> None:
    """Every worker is on this machine: gloo talks over loopback, without resolving the host's name."""
    if "GLOO_SOCKET_IFNAME" not in os.environ:
        names = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
        if names:
            os.environ["GLOO_SOCKET_IFNAME"] = names[0]


def _wait(procs: list, folder: Path, desc: str) -> None:
    """Until every worker has ended; the first to fail stops the others and is reported (never a hang: a worker
    whose peer is gone fails at TIMEOUT at the latest)."""
    from multiprocessing.connection import wait

    pending = list(procs)
    while pending:
        ended = wait([p.sentinel for p in pending])
        for proc in [p for p in pending if p.sentinel in ended]:
            proc.join()
            pending.remove(proc)
            if proc.exitcode != 0:
                raise _failure(procs.index(proc), proc, len(procs), folder, desc)


def _failure(rank: int, proc, world: int, folder: Path, desc: str) -> Exception:
    """What the failed worker raised: edgekit's own error as it is (it says what to do: training diverged),
    anything else as WorkerFailed naming the worker."""
    where = f"data-parallel {desc} loop: worker {rank} of {world} (pid {proc.pid})"
    error = folder / f"error-{rank}.json"
    if error.is_file():
        found = json.loads(error.read_text())
        if found.get("edgekit_error"):
            name, message = found["edgekit_error"]
            kind = getattr(errors, name, EdgekitError)
            return (kind if isinstance(kind, type) and issubclass(kind, EdgekitError) else EdgekitError)(message)
        frames = [traceback.FrameSummary(*frame, lookup_line=False) for frame in found["frames"]]
        exc = WorkerFailed(f"{where} failed: {found['summary']}", frames)
        exc.__cause__ = _RemoteTraceback(found["traceback"])
        return exc
    code = proc.exitcode
    how = f"was killed by {signal.Signals(-code).name} (out of memory?)" if code < 0 else f"exited with {code}"
    return WorkerFailed(f"{where} {how}; set train.workers: 1 to train in this process")


def _stop(procs: list) -> None:
    """End the workers still running (after a failure, or when the parent is interrupted)."""
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        if proc.pid is not None:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
