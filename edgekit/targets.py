"""Target profiles: one YAML file per device, validated on load.

Built-in profiles are the repository's `targets/*.yaml`, shipped inside the package (`edgekit/profiles` links
to that folder). A user's own: a path to a YAML file wherever a target name is taken, or a file in a user
folder (`$EDGEKIT_TARGETS`, several separated by `:`, and `~/.config/edgekit/targets`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

import yaml

from edgekit import formats, yamlfile
from edgekit.errors import TargetError

TARGETS_DIR = Path(__file__).resolve().parent / "profiles"  # the built-in profiles
ARCHES = ("x86_64", "aarch64")
REQUIRED = {"name": str, "description": str, "arch": str, "python": str, "artifacts": list, "threads": int,
            "budgets": dict, "accuracy_tolerance_pp": (int, float), "docker_base": str}
OPTIONAL = {"runtimes": dict, "fidelity": dict, "int8": dict, "round_to": int}  # optional; each has defaults
FIDELITY_DEFAULTS = {"min_agreement": 0.99, "min_sqnr_db": 15.0}  # every artifact against its torch model
# ONNX int4 weight-only (`fidelity: {int4: {...}}`): 4-bit weights carry ~24 dB less SQNR than 8-bit ones; measured
# int4 logit SQNR 16.7-26.9 dB (tests, benchmarks/results/lowbit.md), close to int8's 15, so int4's gate sits one bit
# (6 dB) lower and the target's accuracy_tolerance_pp, which holds as for every artifact, decides
INT4_FIDELITY_DEFAULTS = {"min_agreement": 0.97, "min_sqnr_db": 10.0}


@dataclass(frozen=True)
class Int8Settings:
    """How an ONNX int8 artifact is quantized for one target's CPU and runtime (onnxruntime quantize_static)."""

    activation_type: str = "uint8"  # uint8 | int8
    weight_type: str = "int8"  # int8 | uint8
    reduce_range: bool = True  # 7-bit weights: no u8 x s8 pair-sum saturation on AVX2 without VNNI
    per_channel: bool = True  # one weight scale per output channel (depthwise convs need it)
    symmetric_activations: bool = False  # zero-point 0 for activations (TensorRT requires it)
    float_first_conv: bool = True  # keep the input conv (few channels: slow in int8) in float
    calibration: str = "minmax"  # minmax | percentile
    preset: str = "x86-avx2"  # where these values came from

    @property
    def variant(self) -> str:
        """Suffix of the artifact key; the x86-avx2 defaults have none, so that artifact is `onnx_int8`."""
        if replace(self, preset="x86-avx2") == INT8_PRESETS["x86-avx2"]:
            return ""
        short = {"uint8": "u8", "int8": "s8"}
        parts = [short[self.activation_type], short[self.weight_type], "rr" if self.reduce_range else "",
                 "pc" if self.per_channel else "pt", "sym" if self.symmetric_activations else "",
                 "" if self.float_first_conv else "full", "" if self.calibration == "minmax" else self.calibration[:4]]
        return "".join(parts)


INT8_PRESETS = {  # what each CPU / runtime does well; values measured here are marked in the README
    "x86-avx2": Int8Settings(),
    "x86-vnni": Int8Settings(reduce_range=False, preset="x86-vnni"),
    "arm-neon-dot": Int8Settings(activation_type="int8", reduce_range=False, preset="arm-neon-dot"),
    "tensorrt": Int8Settings(activation_type="int8", reduce_range=False, symmetric_activations=True,
                             float_first_conv=False, preset="tensorrt"),
}
INT8_CHOICES = {"activation_type": ("uint8", "int8"), "weight_type": ("int8", "uint8"),
                "calibration": ("minmax", "percentile")}


def int8_settings(raw: dict, where: str, base: Int8Settings | None = None) -> Int8Settings:
    """`preset:` picks a preset, the other keys override it; unknown keys and values list the valid ones."""
    raw = dict(raw)
    preset = raw.pop("preset", None)
    if preset is not None and preset not in INT8_PRESETS:
        raise TargetError(f"{where}: int8 preset '{preset}' unknown; valid: {', '.join(INT8_PRESETS)}")
    settings = INT8_PRESETS[preset] if preset else (base or INT8_PRESETS["x86-avx2"])
    names = [f.name for f in fields(Int8Settings) if f.name != "preset"]
    for key, value in raw.items():
        if key not in names:
            raise TargetError(f"{where}: unknown int8 key '{key}'; valid: preset, {', '.join(names)}")
        valid = INT8_CHOICES.get(key, (True, False))
        if value not in valid or (key not in INT8_CHOICES and not isinstance(value, bool)):
            raise TargetError(f"{where}: int8.{key} is {value!r}; valid: {', '.join(map(str, valid))}")
    return replace(settings, **raw)


@dataclass(frozen=True)
class ArtifactSpec:
    format: str  # a registered format (edgekit.formats): onnx | tflite | ...
    precision: str  # one of the format's precisions: fp32 | fp16 | int8 | int4 (onnx)
    runtime: str  # one of the format's runtimes (edgekit.formats.Runtime)
    runtime_version: str  # the version pinned on the device
    io: str = "float32"  # tflite int8: int8 | float32 input/output tensors
    variant: str = ""  # onnx int8: Int8Settings.variant of the target (empty for the x86-avx2 defaults)

    @property
    def key(self) -> str:
        """Names the exported file: targets that need the same artifact share it."""
        suffix = "_int8io" if self.format == "tflite" and self.precision == "int8" and self.io == "int8" else ""
        variant = f"_{self.variant}" if self.variant else ""
        return f"{self.format}_{self.precision}{suffix}{variant}"


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    arch: str
    python: str
    artifacts: tuple[ArtifactSpec, ...]  # the first is the bundle's primary artifact (unless export.primary)
    threads: int
    memory_mb: int
    latency_ms: float
    accuracy_tolerance_pp: float
    docker_base: str
    source: str
    min_agreement: float = FIDELITY_DEFAULTS["min_agreement"]  # top-1 agreement of each artifact with torch
    min_sqnr_db: float = FIDELITY_DEFAULTS["min_sqnr_db"]
    int4_min_agreement: float = INT4_FIDELITY_DEFAULTS["min_agreement"]  # the same two for ONNX int4 artifacts
    int4_min_sqnr_db: float = INT4_FIDELITY_DEFAULTS["min_sqnr_db"]
    int8: Int8Settings = Int8Settings()  # ONNX int8 quantization settings (targets/*.yaml `int8:`)
    round_to: int | None = None  # pruned channel counts a multiple of this (what the int8 kernels like)

    @property
    def runs_here(self) -> bool:
        return host_arch() == self.arch


def host_arch() -> str:
    """This machine's CPU architecture in the targets' terms (x86_64, aarch64)."""
    import platform

    return {"arm64": "aarch64", "amd64": "x86_64"}.get(platform.machine().lower(), platform.machine())


def _artifact(raw: object, versions: dict, where: str) -> ArtifactSpec:
    if not isinstance(raw, dict) or not {"format", "precision", "runtime"} <= raw.keys():
        raise TargetError(f"{where}: each artifact needs format, precision and runtime")
    fmt, prec, rt = raw["format"], raw["precision"], raw["runtime"]
    known = formats.formats()
    if fmt not in known or prec not in known[fmt].precisions:
        raise TargetError(f"{where}: artifact {fmt}/{prec} unknown; valid: "
                          + ", ".join(f"{f}/{p}" for f, spec in known.items() for p in spec.precisions))
    if rt not in {r.name for r in known[fmt].runtimes}:
        valid = [r.name for r in known[fmt].runtimes]
        raise TargetError(f"{where}: runtime '{rt}' cannot run {fmt}; valid: {', '.join(valid)}")
    if rt not in versions:
        raise TargetError(f"{where}: runtime '{rt}' has no pinned version under 'runtimes:'")
    refusal = known[fmt].runtime_refusal(prec, rt, str(versions[rt]))
    if refusal:
        raise TargetError(f"{where}: {refusal}")
    io = raw.get("io", "float32")
    valid_io = ("float32", "int8") if known[fmt].int8_io and prec == "int8" else ("float32",)
    if io not in valid_io:
        raise TargetError(f"{where}: io '{io}' unknown for {fmt}/{prec}; valid: {', '.join(valid_io)}")
    return ArtifactSpec(fmt, prec, rt, str(versions[rt]), io)


def parse(raw: object, source: str) -> Target:
    if not isinstance(raw, dict):
        raise TargetError(f"{source}: a target file must hold a mapping")
    problems = _key_problems(raw)
    if problems:
        raise TargetError(f"{source}: {'; '.join(problems)} (every key: targets/x86-64.yaml, or "
                          "`edgekit targets --check FILE`)")
    _round_to(raw, source)
    for key, kind in OPTIONAL.items():
        if key in raw and not isinstance(raw[key], kind):
            raise TargetError(f"{source}: '{key}' must be a mapping")
    if raw["arch"] not in ARCHES:
        raise TargetError(f"{source}: arch '{raw['arch']}' unknown; valid: {', '.join(ARCHES)}")
    versions = raw.get("runtimes") or {}
    int8 = int8_settings(raw.get("int8") or {}, source)
    arts = tuple(_with_int8(_artifact(a, versions, source), int8) for a in raw["artifacts"])
    if not arts:
        raise TargetError(f"{source}: 'artifacts' is empty; list at least one")
    budgets = _budgets(raw, source)
    return Target(raw["name"], raw["description"], raw["arch"], str(raw["python"]), arts, raw["threads"],
                  int(budgets["memory_mb"]), float(budgets["latency_ms"]),
                  float(raw["accuracy_tolerance_pp"]), raw["docker_base"], source,
                  **_fidelity(raw.get("fidelity") or {}, source), int8=int8, round_to=raw.get("round_to"))


def _key_problems(raw: dict) -> list[str]:
    """Every unknown (with the key it likely means), missing and wrongly typed top-level key at once."""
    import difflib

    valid = [*REQUIRED, *OPTIONAL]
    unknown = [f"'{k}'" + "".join(f" (did you mean '{m}'?)" for m in difflib.get_close_matches(str(k), valid, n=1))
               for k in sorted(set(raw) - set(valid), key=str)]
    missing = [k for k in REQUIRED if k not in raw]
    names = {str: "text", list: "a list", int: "a whole number", dict: "a mapping", (int, float): "a number"}
    wrong = [f"{k} (give {names[kind]})" for k, kind in REQUIRED.items()
             if k in raw and (not isinstance(raw[k], kind) or isinstance(raw[k], bool))]
    return ([f"unknown key{'s' * (len(unknown) > 1)} {', '.join(unknown)}"] if unknown else []) + \
        ([f"missing {', '.join(missing)}"] if missing else []) + ([f"wrong type: {', '.join(wrong)}"] if wrong else [])


def _round_to(raw: dict, source: str) -> None:
    value = raw.get("round_to", 1)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise TargetError(f"{source}: round_to is {value!r}; give a whole number of channels, at least 1 (e.g. 8)")


def _number(value: object) -> bool:
    """A finite number (.nan passes every bound, .inf every lower one)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _budgets(raw: dict, source: str) -> dict:
    """Threads, budgets and the accuracy tolerance: numbers in range (0 budget: none)."""
    if isinstance(raw["threads"], bool) or raw["threads"] < 1:
        raise TargetError(f"{source}: threads is {raw['threads']!r}; give a whole number of at least 1")
    if not _number(raw["accuracy_tolerance_pp"]) or raw["accuracy_tolerance_pp"] < 0:
        raise TargetError(f"{source}: accuracy_tolerance_pp is {raw['accuracy_tolerance_pp']!r}; give a number >= 0")
    budgets = {"memory_mb": 0, "latency_ms": 0} | raw["budgets"]
    unknown = set(budgets) - {"memory_mb", "latency_ms"}
    if unknown:
        raise TargetError(f"{source}: unknown budget '{sorted(unknown)[0]}'; valid: memory_mb, latency_ms")
    for key, value in budgets.items():
        if not _number(value) or value < 0:
            raise TargetError(f"{source}: budgets.{key} is {value!r}; give a number >= 0 (0: no budget)")
    return budgets


def _with_int8(spec: ArtifactSpec, int8: Int8Settings) -> ArtifactSpec:
    return replace(spec, variant=int8.variant) if (spec.format, spec.precision) == ("onnx", "int8") else spec


def _fidelity(raw: dict, source: str) -> dict:
    """The thresholds of every artifact, and under `int4:` those of ONNX int4 artifacts."""
    raw = dict(raw)
    int4 = raw.pop("int4", {})
    if not isinstance(int4, dict):
        raise TargetError(f"{source}: fidelity.int4 must be a mapping like {{min_agreement: 0.97, min_sqnr_db: 10}}")
    found = _thresholds(raw, FIDELITY_DEFAULTS, "fidelity", source, extra=("int4",))
    return found | {f"int4_{k}": v for k, v in _thresholds(int4, INT4_FIDELITY_DEFAULTS, "fidelity.int4",
                                                            source).items()}


def _thresholds(raw: dict, defaults: dict, where: str, source: str, extra: tuple = ()) -> dict:
    unknown = set(raw) - set(defaults)
    if unknown:
        raise TargetError(f"{source}: unknown {where} key '{sorted(unknown)[0]}'; valid: "
                          + ", ".join([*defaults, *extra]))
    merged = defaults | raw
    if not all(_number(v) for v in merged.values()):
        raise TargetError(f"{source}: {where} thresholds must be finite numbers")
    if not 0 <= merged["min_agreement"] <= 1:
        raise TargetError(f"{source}: {where}.min_agreement must be between 0 and 1")
    return {k: float(v) for k, v in merged.items()}


def load_file(path: Path) -> Target:
    try:
        raw = yamlfile.load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise TargetError(f"target file '{path}' {yamlfile.problem(exc)}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise TargetError(f"target file '{path}' cannot be read as YAML: {type(exc).__name__}") from exc
    return parse(raw, str(path))


def user_dirs() -> list[Path]:
    """Folders of a user's own profiles: $EDGEKIT_TARGETS (several joined by ':'), then the user config folder."""
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    listed = [Path(p).expanduser() for p in os.environ.get("EDGEKIT_TARGETS", "").split(os.pathsep) if p]
    return [*listed, config_home / "edgekit" / "targets"]


def _load_dir(folder: Path, found: dict[str, Target]) -> None:
    for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
        target = load_file(path)
        if target.name in found:
            raise TargetError(f"target '{target.name}' is defined twice: {found[target.name].source} and {path}; "
                              "rename one (targets are looked up by name)")
        found[target.name] = target


def builtin() -> dict[str, Target]:
    found: dict[str, Target] = {}
    _load_dir(TARGETS_DIR, found)
    return found


def available() -> dict[str, Target]:
    """Built-in profiles and the user folders' profiles, by name."""
    found = builtin()
    for folder in user_dirs():
        _load_dir(folder, found)
    return found


def is_path(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) or os.sep in name


def get(names: list[str], base: Path | None = None) -> list[Target]:
    """Targets by name, or by path to a YAML file (relative to `base`, default the working folder)."""
    known = available()
    chosen = []
    for name in names:
        if is_path(name):
            path = (base or Path.cwd()) / Path(name).expanduser()
            if not path.is_file():
                raise TargetError(f"target file '{path}' not found; give a target name ({', '.join(known)}) "
                                  "or the path of a target YAML file")
            chosen.append(load_file(path))
        elif name in known:
            chosen.append(known[name])
        else:
            raise TargetError(f"unknown target '{name}'; valid targets: {', '.join(known)}, or the path of a "
                              f"target YAML file (own targets may also live in {user_dirs()[-1]})")
    return chosen


def primary(target: Target, chosen: str | None) -> ArtifactSpec:
    """The artifact `target`'s bundle puts first: the one of format_precision `chosen` (export.primary), else
    the target's first; a target that ships none of `chosen` is a one-line error."""
    if chosen is None:
        return target.artifacts[0]
    found = [a for a in target.artifacts if f"{a.format}_{a.precision}" == chosen]
    if not found:
        from edgekit.errors import ConfigError

        ships = ", ".join(dict.fromkeys(f"{a.format}_{a.precision}" for a in target.artifacts))
        raise ConfigError(f"config: export.primary '{chosen}' is not among what {target.name} ships ({ships}); pick "
                          "one of those, or leave it null for each target's first")
    return found[0]
