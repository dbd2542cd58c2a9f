"""A bundle's manifest and the files it names. A bundle may come from anyone: every name in its manifest must be a
relative path to a regular file inside the bundle, with no link on the way, before edgekit reads, copies or sends
it (the runner on the device applies the same rule, `runner.bundle_path`)."""

from __future__ import annotations

import json
from pathlib import Path

from edgekit.errors import BundleError
from edgekit.runner import runner

MANIFEST = "manifest.json"


def read_manifest(bundle: Path) -> dict:
    """The bundle's manifest, refused when it names a file outside the bundle or a link."""
    if not (bundle / MANIFEST).is_file():
        raise BundleError(f"'{bundle}' is not a bundle (no manifest.json); pass a folder from DIR/bundles/")
    path = bundle_file(bundle, MANIFEST)
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"'{path}' is not valid JSON; rebuild the bundle") from exc
    bundle_files(bundle, manifest)
    return manifest


def bundle_file(bundle: Path, rel: str) -> Path:
    """A regular file inside the bundle by a relative path, no link on the way (else BundleError)."""
    try:
        path = runner.bundle_path(bundle, rel)
    except runner.UnsafePath as exc:
        raise BundleError(f"'{bundle}': {exc}") from None
    if not path.is_file():
        raise BundleError(f"'{bundle}' has no file '{rel}', which its manifest lists; copy or rebuild the bundle")
    return path


def bundle_files(bundle: Path, manifest: dict) -> dict[str, Path]:
    """What a copy of the bundle holds, by name: the manifest's files, the manifest and the results schema."""
    schema = [runner.SCHEMA_FILE] if (bundle / runner.SCHEMA_FILE).exists() else []
    return {rel: bundle_file(bundle, rel) for rel in dict.fromkeys([*manifest.get("files", {}), MANIFEST, *schema])}
