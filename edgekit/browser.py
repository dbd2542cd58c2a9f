"""Headless Chromium (Debian's `chromium`) on a local page, with the network off: the DOM as rendered, the
console messages, and a screenshot. Used by `edgekit report --screenshot` and by the report's browser test."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgekit.errors import EdgekitError

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
NETWORK_OFF = ("--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",  # nothing resolves
               "--disable-background-networking", "--no-first-run", "--disable-extensions")
CONSOLE = re.compile(r":(INFO|WARNING|ERROR|FATAL|VERBOSE\d*):CONSOLE[^\]]*\] (.*)$")


@dataclass
class Page:
    dom: str  # the DOM after rendering
    console: list[str]  # console messages the page logged (errors and otherwise)


def find() -> str | None:
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


def _run(html: Path, extra: list[str], timeout: float) -> subprocess.CompletedProcess:
    exe = find()
    if exe is None:
        raise EdgekitError("no Chromium found for the screenshot; install it (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="edgekit-chromium-") as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}", *NETWORK_OFF,
               "--enable-logging=stderr", "--v=0", *extra, Path(html).resolve().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise EdgekitError(f"chromium failed on {html}: {last}")
    return proc


def console_messages(stderr: str) -> list[str]:
    return [m.group(2) for line in stderr.splitlines() if (m := CONSOLE.search(line))]


def load(html: Path, timeout: float = 120) -> Page:
    """Open the page with the network off; the rendered DOM and what the page wrote to its console."""
    proc = _run(html, ["--dump-dom"], timeout)
    return Page(proc.stdout, console_messages(proc.stderr))


def screenshot(html: Path, png: Path, width: int = 1280, height: int = 2000, timeout: float = 120) -> Path:
    png.parent.mkdir(parents=True, exist_ok=True)
    _run(html, [f"--screenshot={Path(png).resolve()}", f"--window-size={width},{height}",
                "--hide-scrollbars"], timeout)
    if not png.is_file():
        raise EdgekitError(f"chromium wrote no screenshot of {html}")
    return png
