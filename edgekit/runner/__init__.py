"""The on-device runner. A bundle carries a copy of runner.py for the device; on the build host edgekit runs only
this one, RUNNER, against a bundle (a bundle's own files are data, never code, here)."""

import re
from pathlib import Path

RUNNER = Path(__file__).with_name("runner.py")
OP_VERSION = re.compile(r"Didn't find op for builtin opcode '(?P<op>\w+)' version '(?P<version>\d+)'")


def error_line(stderr: str, returncode: int) -> str:
    """The one line of a failed runner that says why: a known runtime message, else the last real line."""
    found = OP_VERSION.search(stderr)
    if found:
        return found.group(0)
    if returncode < 0:  # the runner checked the file's sha256 before loading it: the file was built or copied bad
        return (f"the runtime crashed on the file (signal {-returncode}); the artifact is probably damaged "
                "(truncated or corrupt): rebuild the bundle")
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.startswith(("INFO:", "WARNING:"))]
    return (lines or [f"exit code {returncode}"])[-1]
