"""Target profiles: targets/*.yaml, one file per device, validated on load."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from edgekit.errors import TargetError

TARGETS_DIR = Path(__file__).resolve().parent.parent / "targets"
FORMATS = {"onnx": ("fp32", "int8"), "tflite": ("fp32", "int8")}
RUNTIMES = {  # runtime name -> (pip package on the device, artifact format)
    "onnxruntime": ("onnxruntime", "onnx"),
    "onnxruntime-gpu": ("onnxruntime-gpu", "onnx"),
    "litert": ("ai-edge-litert", "tflite"),
    "tflite-runtime": ("tflite-runtime", "tflite"),
}
ARCHES = ("x86_64", "aarch64")
REQUIRED = {"name": str, "description": str, "arch": str, "python": str, "artifacts": list, "threads": int,
            "budgets": dict, "accuracy_tolerance_pp": (int, float), "docker_base": str}


@dataclass(frozen=True)
class ArtifactSpec:
    format: str  # onnx | tflite
    precision: str  # fp32 | int8
    runtime: str  # a key of RUNTIMES
    runtime_version: str  # the version pinned on the device
    io: str = "float32"  # tflite int8: int8 | float32 input/output tensors

    @property
    def key(self) -> str:
        """Names the exported file: targets that need the same artifact share it."""
        suffix = "_int8io" if self.format == "tflite" and self.precision == "int8" and self.io == "int8" else ""
        return f"{self.format}_{self.precision}{suffix}"


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    arch: str
    python: str
    artifacts: tuple[ArtifactSpec, ...]  # the first is the bundle's primary artifact
    threads: int
    memory_mb: int
    latency_ms: float
    accuracy_tolerance_pp: float
    docker_base: str
    source: str

    @property
    def runs_here(self) -> bool:
        import platform

        return platform.machine() == self.arch


def _artifact(raw: object, versions: dict, where: str) -> ArtifactSpec:
    if not isinstance(raw, dict) or not {"format", "precision", "runtime"} <= raw.keys():
        raise TargetError(f"{where}: each artifact needs format, precision and runtime")
    fmt, prec, rt = raw["format"], raw["precision"], raw["runtime"]
    if fmt not in FORMATS or prec not in FORMATS[fmt]:
        raise TargetError(f"{where}: artifact {fmt}/{prec} unknown; valid: "
                          + ", ".join(f"{f}/{p}" for f, ps in FORMATS.items() for p in ps))
    if rt not in RUNTIMES or RUNTIMES[rt][1] != fmt:
        valid = [r for r, (_, f) in RUNTIMES.items() if f == fmt]
        raise TargetError(f"{where}: runtime '{rt}' cannot run {fmt}; valid: {', '.join(valid)}")
    if rt not in versions:
        raise TargetError(f"{where}: runtime '{rt}' has no pinned version under 'runtimes:'")
    io = raw.get("io", "float32")
    if io not in ("float32", "int8"):
        raise TargetError(f"{where}: io '{io}' unknown; valid: float32, int8")
    return ArtifactSpec(fmt, prec, rt, str(versions[rt]), io)


def parse(raw: object, source: str) -> Target:
    if not isinstance(raw, dict):
        raise TargetError(f"{source}: a target file must hold a mapping")
    for key, kind in REQUIRED.items():
        if not isinstance(raw.get(key), kind):
            raise TargetError(f"{source}: '{key}' is missing or has the wrong type")
    unknown = set(raw) - set(REQUIRED) - {"runtimes"}
    if unknown:
        raise TargetError(f"{source}: unknown key '{sorted(unknown)[0]}'; valid keys: "
                          + ", ".join([*REQUIRED, "runtimes"]))
    if raw["arch"] not in ARCHES:
        raise TargetError(f"{source}: arch '{raw['arch']}' unknown; valid: {', '.join(ARCHES)}")
    versions = raw.get("runtimes") or {}
    arts = tuple(_artifact(a, versions, source) for a in raw["artifacts"])
    if not arts:
        raise TargetError(f"{source}: 'artifacts' is empty; list at least one")
    budgets = raw["budgets"]
    return Target(raw["name"], raw["description"], raw["arch"], str(raw["python"]), arts, raw["threads"],
                  int(budgets.get("memory_mb", 0)), float(budgets.get("latency_ms", 0)),
                  float(raw["accuracy_tolerance_pp"]), raw["docker_base"], source)


def load_file(path: Path) -> Target:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise TargetError(f"target file '{path}' cannot be read as YAML: {type(exc).__name__}") from exc
    return parse(raw, str(path))


def available() -> dict[str, Target]:
    found = {}
    for path in sorted(TARGETS_DIR.glob("*.yaml")):
        target = load_file(path)
        found[target.name] = target
    return found


def get(names: list[str]) -> list[Target]:
    known = available()
    missing = [n for n in names if n not in known]
    if missing:
        raise TargetError(f"unknown target '{missing[0]}'; valid targets: {', '.join(known)}")
    return [known[n] for n in names]
