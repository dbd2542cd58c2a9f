"""Ctrl-C and SIGTERM, remembered as well as raised: a library that swallows KeyboardInterrupt (onnx2tf wraps
steps in bare `except:`) cannot make a build run on after it; the stage ends unfinished at `check`."""

from __future__ import annotations

import contextlib
import signal
import threading

_requested: list[int] = []  # the signals received
_depth = [0]  # handled() blocks open: the signals are forgotten when the outermost ends


def _stop(signum: int, _frame) -> None:
    _requested.append(signum)
    raise KeyboardInterrupt


def check() -> None:
    """Raise KeyboardInterrupt when a stop was asked for, even if something caught the first one."""
    if _requested:
        raise KeyboardInterrupt


@contextlib.contextmanager
def handled(*signals: int):
    """`signals` (default SIGINT and SIGTERM) stop the program as Ctrl-C does, and are remembered (`check`);
    the handlers before are put back after. Only the main thread can set handlers: elsewhere this does nothing."""
    signals = signals or (signal.SIGINT, signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.signal(s, _stop) for s in signals}
    _depth[0] += 1
    try:
        yield
    finally:
        for s, handler in before.items():  # None: a handler not set from Python (a library's)
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        _depth[0] -= 1
        if not _depth[0]:
            _requested.clear()
