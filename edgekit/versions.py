"""The versions of the libraries a build uses: recorded in report.json and part of every stage's input key."""

from __future__ import annotations

import functools
from importlib import metadata

LIBRARIES = ("torch", "torch-pruning", "nncf", "onnx", "onnxruntime", "onnx2tf", "tensorflow", "ai-edge-litert",
             "numpy")


@functools.cache
def library_versions() -> dict:
    """From package metadata (nothing is imported); None for a library that is not installed."""
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found
