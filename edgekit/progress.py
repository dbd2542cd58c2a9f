"""Epoch progress: tqdm's redrawn bar on a terminal, complete lines anywhere else.

In a log file or a pipe (`edgekit build > log.txt 2>&1`) tqdm's carriage returns leave every redraw of the
bar in the file and put the next stage line on the bar's line; there a line is printed instead every tenth of
the epochs (and after the last), and after any epoch that ends QUIET_S or more after the last line (a long loop
is never silent for long), each ending in a newline, on stdout with the stage lines.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO

from tqdm import tqdm

LINES = 10  # lines per loop where the output is not a terminal, when epochs are quick
QUIET_S = 30.0  # and a line after an epoch that ends this long after the last line, however many epochs that is


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def epochs(total: int, desc: str, *, disable: bool = False, file: TextIO | None = None) -> tqdm | EpochLines:
    """Iterate over range(total) showing progress; `set_postfix(**values)` adds the values to what is shown next.
    `disable` shows nothing (data-parallel workers other than the lead). Where stderr is a terminal, tqdm's bar
    there; else lines on stdout, beside the stage lines, so that stderr holds nothing but an error's one line.
    `file`: lines to this stream instead."""
    if disable or (file is None and _is_terminal(sys.stderr)):
        return tqdm(range(total), desc=f"{desc:>9}", unit="epoch", leave=False, disable=disable, file=sys.stderr)
    return EpochLines(total, desc, file or sys.stdout)


class EpochLines:
    """One complete line after every `ceil(total / LINES)` epochs, after the last, and after any epoch ending
    QUIET_S or more (on `clock`) after the last line: `  finetune: epoch 3/6 ...`."""

    def __init__(self, total: int, desc: str, file: TextIO, clock: Callable[[], float] = time.perf_counter) -> None:
        self.total, self.desc, self.file, self.clock = total, desc, file, clock
        self.every = max(1, math.ceil(total / LINES))
        self.postfix: dict[str, object] = {}

    def set_postfix(self, **values: object) -> None:
        self.postfix = values

    def __iter__(self) -> Iterator[int]:
        last = self.clock()
        for epoch in range(self.total):
            yield epoch  # the loop body runs (and sets the postfix) before the line below
            done, now = epoch + 1, self.clock()
            if done % self.every == 0 or done == self.total or now - last >= QUIET_S:
                last = now
                values = "".join(f" {k}={v}" for k, v in self.postfix.items())
                print(f"{self.desc:>9}: epoch {done}/{self.total}{values}", file=self.file, flush=True)
