"""The on-device runner. A bundle carries a copy of runner.py for the device; on the build host edgekit runs only
this one, RUNNER, against a bundle (a bundle's own files are data, never code, here)."""

from pathlib import Path

RUNNER = Path(__file__).with_name("runner.py")
