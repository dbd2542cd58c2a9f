"""Artifact formats and the runtimes that run them: one registry, one module per format.

A format module (edgekit.formats.onnx, edgekit.formats.tflite) registers, in one place, what the rest of
edgekit asks of it: its precisions, the runtimes that run it on a device (pinned package, whether it needs a
GPU, which engine of the standalone runner loads it), the runtime that verifies it on the build machine, and
its exporter. Target profiles are validated against this registry; the export stage hands each format the
artifacts the targets want (ArtifactSpec objects, not key strings); verify, bundle, the runner and the
pinned-runtime check read the rest from here. Adding a format is one module that calls `register`.

This module and the registrations import nothing heavy: exporters import torch, onnx or TensorFlow when called.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from typing import NotRequired, TypedDict

from edgekit.errors import EdgekitError

ENGINES = ("onnxruntime", "tflite")  # what the standalone runner can load (edgekit/runner/runner.py)
LAYOUTS = {1: ("NF", "NF"), 2: ("NCL", "NLC"), 3: ("NCHW", "NHWC"), 4: ("NCDHW", "NDHWC")}
CHECK_SAMPLES = 16  # calibration samples used to check an export against its source


@dataclass(frozen=True)
class Runtime:
    name: str  # as target profiles name it
    package: str  # the pip package a device installs
    engine: str  # the runner's loader: one of ENGINES
    numpy: str = "numpy"  # the numpy requirement beside it
    gpu: bool = False  # needs a CUDA device: not run by the pinned-runtime check on a CPU build machine

    def requirements(self, version: str) -> list[str]:
        return [f"{self.package}=={version}", self.numpy]


@dataclass(frozen=True)
class Format:
    name: str
    suffix: str  # file extension of its artifacts
    precisions: tuple[str, ...]
    runtimes: tuple[Runtime, ...]
    host_runtime: str  # the runtime that runs it on the build machine (verify, debug)
    exporter: str  # "module:function" making its artifacts: fn(job: ExportJob, specs) -> [(record, bytes)]
    order: int = 100  # where its artifacts come in listings (ONNX first, then TFLite)
    int8_io: bool = False  # has int8-input/output variants (ArtifactSpec.io)
    # precision -> {runtime: first version that runs it}: such a precision runs on the runtimes named, from
    # that version on (targets that pin an older one are refused); a precision not named runs on all of them
    min_versions: dict = field(default_factory=dict, compare=False, hash=False)

    def runtime_refusal(self, precision: str, runtime: str, version: str) -> str | None:
        """Why `runtime` at `version` cannot run this format's `precision`; None when it can."""
        from packaging.version import InvalidVersion, Version

        needs = self.min_versions.get(precision)
        if needs is None:
            return None
        art = f"{self.name}/{precision}"
        if runtime not in needs:
            return (f"{art} runs on {', '.join(f'{r} >= {v}' for r, v in needs.items())} only, not {runtime}; "
                    f"ship it to a target with one of those runtimes")
        try:
            old = Version(version) < Version(needs[runtime])
        except InvalidVersion:
            return f"{runtime} version '{version}' is not a version number; pin one like {needs[runtime]}"
        return (f"{art} needs {runtime} >= {needs[runtime]}, the target pins {version}; pin {needs[runtime]} or "
                f"newer under 'runtimes:' or drop the {art} artifact") if old else None

    def export(self, job: ExportJob, specs: list) -> list[tuple[dict, bytes]]:
        module, _, function = self.exporter.partition(":")
        return getattr(importlib.import_module(module), function)(job, specs)


@dataclass
class ExportJob:
    """What a format's exporter gets: the build, the torch model, its fp32 ONNX (every format starts from it:
    checked against torch already) and a private work folder."""

    ctx: object  # edgekit.stages.base.Context
    model: object  # the torch model, eval mode, BN folded
    fp32_onnx: object  # Path of the checked fp32 ONNX export (dynamic batch)
    work: object  # Path of a temporary folder inside the stage folder
    source: str  # the stage the model comes from
    int8_settings: dict = field(default_factory=dict)  # ONNX int8: artifact key -> Int8Settings
    float_modules: list = field(default_factory=list)  # modules the quantize stage kept float


class TensorRecord(TypedDict):
    name: str
    shape: list[int]  # batch 1
    dtype: str  # float32 | int8 | uint8
    scale: float | None  # int8 input/output: its quantization
    zero_point: int | None
    layout: NotRequired[str | None]  # input: NCHW, NHWC, ...
    transpose: NotRequired[list[int] | None]  # input: dataset layout -> this artifact's


class ArtifactRecord(TypedDict):
    """One exported artifact, as export writes it (artifacts.json, the export stage's record) and verify,
    bundle and the report read it: plain JSON, so a build folder is read without edgekit's classes."""

    name: str  # ArtifactSpec.key
    file: str
    format: str
    precision: str
    io: str
    source_stage: str  # the stage whose torch model it was made from (its fidelity reference)
    size_bytes: int
    host: dict  # the runtime that runs it on the build machine: {"runtime", "engine"}
    input: TensorRecord
    output: TensorRecord
    graph: dict  # {"ops": {op: count}}
    int8: NotRequired[dict]  # ONNX int8: settings, kept-float layers, fusion, repair, float twin
    int4: NotRequired[dict]  # ONNX int4: scheme, per-layer bits, packed weight bytes, what onnxruntime computes in
    float_twin: NotRequired[str]  # TFLite int8: the float model of the same conversion
    activation_ranges: NotRequired[dict | str]  # TFLite int8: the quantize stage's ranges carried, or the converter's


_REGISTRY: dict[str, Format] = {}
_LOADED: list[bool] = []  # the built-in and entry-point formats were imported


def register(fmt: Format) -> Format:
    """Add (or replace) a format; its runtimes become valid in target profiles."""
    if fmt.host_runtime not in {r.name for r in fmt.runtimes} | {r.name for f in _REGISTRY.values()
                                                                  for r in f.runtimes}:
        raise ValueError(f"format {fmt.name}: host runtime {fmt.host_runtime} is not registered")
    for rt in fmt.runtimes:
        if rt.engine not in ENGINES:
            raise ValueError(f"runtime {rt.name}: engine {rt.engine} unknown; the runner has {', '.join(ENGINES)}")
    _REGISTRY[fmt.name] = fmt
    return fmt


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def formats() -> dict[str, Format]:
    _builtin()
    return dict(sorted(_REGISTRY.items(), key=lambda item: item[1].order))


def get(name: str) -> Format:
    found = formats()
    if name not in found:
        raise EdgekitError(f"format '{name}' unknown; valid: {', '.join(found)}")
    return found[name]


def runtimes() -> dict[str, Runtime]:
    return {rt.name: rt for fmt in formats().values() for rt in fmt.runtimes}


def runtime(name: str) -> Runtime:
    found = runtimes()
    if name not in found:
        raise EdgekitError(f"runtime '{name}' unknown; valid: {', '.join(found)}")
    return found[name]


def requirements(package: str, version: str) -> list[str]:
    """What a device installs for a runtime package: it at the pinned version, and numpy as it needs."""
    found = [r for r in runtimes().values() if r.package == package]
    return found[0].requirements(version) if found else [f"{package}=={version}", "numpy"]


BUILTIN = ("edgekit.formats.onnx", "edgekit.formats.tflite")
ENTRY_POINTS = "edgekit.formats"  # a package's own formats: modules named in this entry-point group


def _builtin() -> None:
    """Import the format modules (each registers itself when imported): edgekit's own, then those that installed
    packages declare in the `edgekit.formats` entry-point group. By name, when first asked: a format module
    imports this one, never the other way round."""
    from importlib import metadata

    if _LOADED:
        return
    _LOADED.append(True)
    for module in BUILTIN:
        importlib.import_module(module)
    for entry in metadata.entry_points(group=ENTRY_POINTS):
        try:
            importlib.import_module(entry.value.partition(":")[0])
        except Exception as exc:  # a broken plugin must not break the built-in formats
            raise EdgekitError(f"the format plugin '{entry.name}' ({entry.value}) cannot be imported: "
                               f"{type(exc).__name__}: {exc}; fix or uninstall that package") from exc


# --- shared by the exporters ------------------------------------------------------------------------------------

def record(spec, source: str, size: int) -> ArtifactRecord:
    """The artifact record every stage after export reads (verify, bundle, report); `host` is the runtime
    that runs it on this build machine (verify, debug)."""
    fmt = get(spec.format)
    host = runtime(fmt.host_runtime)
    return {"name": spec.key, "file": f"{spec.key}.{fmt.suffix}", "format": spec.format,
            "precision": spec.precision, "io": spec.io, "source_stage": source, "size_bytes": size,
            "host": {"runtime": host.name, "engine": host.engine}}


def layout(rank: int, *, channels_last: bool) -> str | None:
    return LAYOUTS[rank][int(channels_last)] if rank in LAYOUTS else None


def progress(key: str, t0: float, size: int) -> None:
    print(f"export: {key:<20} {size / 1024:8.1f} KB  {time.perf_counter() - t0:5.1f} s")  # stderr: errors only
