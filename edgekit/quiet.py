"""Keep TensorFlow, absl, onnx2tf and Ray log noise off the terminal.

Call `setup()` before anything imports tensorflow (the environment variables only work then), and wrap
calls into onnx2tf or the TFLite converter in `silenced()`: they print from C++ and Python alike, so only
redirecting the file descriptors 1 and 2 catches everything.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "3",  # TensorFlow's C++ INFO/WARNING/ERROR lines
    "TF_CPP_MIN_VLOG_LEVEL": "0",
    "GRPC_VERBOSITY": "ERROR",
    "GLOG_minloglevel": "3",
    "ABSL_MIN_LOG_LEVEL": "3",
}
_NOISY_LOGGERS = ("tensorflow", "absl", "h5py", "onnx2tf", "tf_keras", "keras")


def setup() -> None:
    """Quiet what can be quieted without redirecting output; a user's own settings win."""
    for key, value in _ENV.items():
        os.environ.setdefault(key, value)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from absl import logging as absl_logging
    except ImportError:
        return
    absl_logging.set_verbosity(absl_logging.ERROR)


def ray(embedded: bool) -> int:
    """Before `import ray`: no usage report to the internet, Tune's legacy output (silent at verbose=0; the new
    one prints a configuration table and paths whatever the verbosity), and for the Ray that edgekit starts
    itself, token authentication asked for explicitly: Ray's default, made explicit so that Ray does not warn
    about it; for a cluster at --ray-address, token mode when this user has a token (as Ray's own `auto` does).
    Returns the `logging_level` for `ray.init`."""
    token = embedded or _ray_token_here()
    defaults = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AIR_NEW_OUTPUT": "0"} | ({"RAY_AUTH_MODE": "token"}
                                                                           if token else {})
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    if "ray._raylet" in sys.modules and os.environ.get("RAY_AUTH_MODE") == "token":
        # a Ray imported before this (a caller's program, a test) cached its auth mode: without a refresh, ray.init
        # makes no token for a new cluster and its GCS, which reads the environment, dies looking for one (seen on
        # a machine without ~/.ray/auth_token); Ray's own switch to token mode refreshes it the same way
        sys.modules["ray._raylet"].Config.initialize("")
    logging.getLogger("ray").setLevel(logging.ERROR)
    return logging.ERROR


def _ray_token_here() -> bool:
    """A Ray auth token this user has (`ray start` made one, or the environment names one). `ray.init(address=X)`
    sends none unless RAY_AUTH_MODE=token, and a cluster with token auth (`ray start`'s default once a token
    exists) then refuses it for 20 s before failing; a cluster without token auth ignores one that is sent."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or os.path.isfile(path)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, OSError, ValueError):
            stream.flush()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).fflush(None)  # C stdio buffers (printf from native code)


@contextlib.contextmanager
def silenced(log: str | Path | None = None) -> Iterator[None]:
    """Send everything written to fd 1 and 2 (Python, C++, child processes) to `log` or /dev/null."""
    setup()
    _flush()
    target = open(log, "ab") if log else open(os.devnull, "wb")  # closed in finally
    saved = (os.dup(1), os.dup(2))
    try:
        os.dup2(target.fileno(), 1)
        os.dup2(target.fileno(), 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        _flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        target.close()


@contextlib.contextmanager
def phase(stage: str, what: str, done: str | None = None) -> Iterator[None]:
    """A progress line before a long phase whose own output goes to a log (enter it before `silenced()`), and,
    with `done`, one after it with the time taken."""
    print(f"[{stage}] {what} ...", flush=True)
    t0 = time.perf_counter()
    yield
    if done:
        print(f"[{stage}] {done} in {time.perf_counter() - t0:.1f} s", flush=True)
