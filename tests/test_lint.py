import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_is_clean():
    """Style and complexity (mccabe <= 10) stay in check."""
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "edgekit", "tests", "benchmarks"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
