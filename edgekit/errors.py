"""Errors a user can act on. Only the CLI turns them into an exit code."""

import errno
import re

SENTENCE_END = re.compile(r"[.!?;](?=\s)")  # a dot inside a URL or a file name is not followed by a space


# an OSError that a full disk or an unwritable place raises, and what to do about it
WRITE_ERRORS = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space",
                errno.EROFS: "pick a writable --out", errno.EACCES: "pick a writable --out",
                errno.EPERM: "pick a writable --out"}


class EdgekitError(Exception):
    """A problem the user can fix; the message says what is wrong and what to do."""


class ConfigError(EdgekitError):
    """The config file or a command-line option is invalid."""


class UsageError(ConfigError):
    """The command line cannot be parsed (unknown option, missing argument, wrong type)."""


class DataError(EdgekitError):
    """The dataset is missing or has the wrong form."""


class ModelError(EdgekitError):
    """The model factory or checkpoint cannot be used."""


class TargetError(EdgekitError):
    """A target profile is missing or invalid."""


class TrainingDiverged(EdgekitError):
    """A training loop's loss or the model's outputs became NaN or infinite (too high a learning rate, or NaN in
    the data); the stage ends unfinished."""


class FidelityError(EdgekitError):
    """An exported artifact is not the model that was validated (it misses its target's thresholds)."""


class NothingFeasible(EdgekitError):
    """A search ran and wrote its outputs, but no trial fits the budgets."""


class BundleError(EdgekitError):
    """A bundle is missing files or a file does not match its manifest."""


class StageFailed(EdgekitError):
    """A library failed inside a stage; the message names both, the traceback is in the stage's error.log."""


class BuildDirError(EdgekitError):
    """The build folder cannot be used: not a folder, not writable, locked by another build, or resumed with
    another config."""


class RuntimeEnvError(EdgekitError):
    """The isolated runtime environment could not be made (no package index, no such version...)."""


class DockerError(EdgekitError):
    """Docker is missing, or an image could not be made."""


class EmulationUnavailable(EdgekitError):
    """The emulator or its sysroot cannot be had here; the message says how to enable it."""


class RemoteError(EdgekitError):
    """The device cannot be reached, refused us, or does not match the bundle."""


class HostKeyError(RemoteError):
    """The device's host key is unknown (not accepted) or has changed."""


class ConnectionLost(RemoteError):
    """The SSH connection dropped in the middle of a step."""


class CommandFailed(RemoteError):
    """A command on the device ended with an error (ssh itself worked); `detail` is its last line of stderr."""

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The start of a library's message for a one-line error: its first line, and when that is longer than
    `limit`, cut at the last sentence end (else the last space) within it, never inside a word or a URL; without
    the final full stop."""
    line = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    if len(line) <= limit:
        return line.rstrip(" .;")  # the caller goes on after a ';'
    ends = [m.end() for m in SENTENCE_END.finditer(line, 0, limit)]
    if ends:
        return line[:ends[-1]].rstrip(" .;")
    space = line.rfind(" ", 0, limit)
    return line[:space if space > 0 else limit].rstrip(" .;") + " ..."
