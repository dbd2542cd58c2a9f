"""Training progress: complete lines on stdout (no carriage returns) where stderr is a file or pipe, tqdm's bar
on a terminal."""

import io

import numpy as np
import torch

from edgekit import progress, training
from edgekit.data import Split


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _fit_tiny(monkeypatch, stream: io.StringIO, epochs: int) -> str:
    """What a fit shows where stderr is `stream`: on it when it is a terminal, else on stdout (stderr left empty)."""
    out = stream if stream.isatty() else io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    monkeypatch.setattr("sys.stdout", out)
    rng = np.random.default_rng(0)
    split = Split(rng.normal(size=(32, 4)).astype(np.float32), np.arange(32) % 2)
    torch.manual_seed(0)
    training.fit(torch.nn.Linear(4, 2), split, split, epochs=epochs, lr=0.01, batch_size=16, desc="finetune")
    assert stream.isatty() or stream.getvalue() == ""
    return out.getvalue()


def test_fit_writes_whole_lines_to_a_log_file(monkeypatch):
    out = _fit_tiny(monkeypatch, io.StringIO(), epochs=3)
    assert "\r" not in out and out.endswith("\n")
    lines = [line for line in out.splitlines() if not line.startswith("[finetune] ")]  # the kept-start note
    assert [line.split(" loss=")[0] for line in lines] == [f" finetune: epoch {k}/3" for k in (1, 2, 3)]
    assert all("val_acc=" in line and "best=" in line for line in lines)


def test_many_epochs_give_about_ten_lines_ending_with_the_last():
    log = io.StringIO()
    for _ in progress.epochs(25, "train", file=log):
        pass
    lines = log.getvalue().splitlines(keepends=True)
    assert [line.strip() for line in lines] == [f"train: epoch {k}/25" for k in (3, 6, 9, 12, 15, 18, 21, 24, 25)]
    assert all(line.endswith("\n") for line in lines)


def test_a_long_loop_prints_a_line_once_quiet_s_has_passed_since_the_last():
    """A million quick epochs would print every 100,000th: 40 s epochs (on an injected clock) each get a line."""
    now = [0.0]
    log = io.StringIO()
    lines = progress.EpochLines(10**6, "train", log, clock=lambda: now[0])
    for epoch in lines:
        now[0] += 0.001 if epoch < 5 else progress.QUIET_S + 10
        lines.set_postfix(loss="0.5")
        if epoch == 7:  # epochs 6 and 7 have ended
            break
    assert log.getvalue().splitlines() == [f"    train: epoch {k}/1000000 loss=0.5" for k in (6, 7)]


def test_a_terminal_keeps_the_redrawn_bar(monkeypatch):
    assert "\r" in _fit_tiny(monkeypatch, Terminal(), epochs=2)


def test_export_progress_lines_go_to_stdout(capsys):
    """stderr holds only an error's one line: a build that succeeds writes nothing there."""
    import time

    from edgekit import formats

    formats.progress("onnx_int8", time.perf_counter(), 2048)
    out, err = capsys.readouterr()
    assert err == "" and out.startswith("export: onnx_int8") and "2.0 KB" in out
