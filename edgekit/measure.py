"""`edgekit run`: measure a bundle's artifacts on this machine with the bundle's own runner.

Each artifact runs in a child process: a damaged model can crash its runtime, not edgekit, and the
runner process imports only what a device has (numpy and the runtime).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from edgekit.errors import BundleError
from edgekit.stages.base import write_json


def read_manifest(bundle: Path) -> dict:
    path = bundle / "manifest.json"
    if not path.is_file():
        raise BundleError(f"'{bundle}' is not a bundle (no manifest.json); pass a folder from DIR/bundles/")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"'{path}' is not valid JSON; rebuild the bundle") from exc


def run_artifact(bundle: Path, name: str, threads: int | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        cmd = [sys.executable, str(bundle / "runner.py"), str(bundle), "--artifact", name, "--out", str(out)]
        if threads:
            cmd += ["--threads", str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            raise BundleError(f"the runner failed on artifact {name} of '{bundle}': {last}")
        return json.loads(out.read_text())


def run_bundle(bundle: Path, out: Path | None = None, artifacts: list[str] | None = None,
               threads: int | None = None, log=print) -> dict:
    """Run the chosen artifacts (default: all); the results file leads with the primary artifact."""
    manifest = read_manifest(bundle)
    names = [a["name"] for a in manifest["artifacts"]]
    unknown = [n for n in artifacts or [] if n not in names]
    if unknown:
        raise BundleError(f"no artifact '{unknown[0]}' in '{bundle}'; valid: {', '.join(names)}")
    chosen = artifacts or names
    results = {}
    for name in chosen:
        log(f"  measuring {manifest['target']['name']}/{name} ...")
        results[name] = run_artifact(bundle, name, threads)
    lead = manifest["primary"] if manifest["primary"] in results else chosen[0]
    summary = {**results[lead], "artifacts": results}
    write_json(out or bundle / "results.json", summary)
    return summary
