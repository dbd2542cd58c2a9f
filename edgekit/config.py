"""Typed pipeline config: validated on load, unknown keys and wrong types are one-line errors."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from edgekit import targets, yamlfile
from edgekit.errors import ConfigError
from edgekit.search.space import SearchConfig
from edgekit.search.space import check as check_search

# keys only some sources read: those sources, the value they take when it is not set (null for the other sources,
# which refuse it) and what it does
SOURCE_KEYS = {
    "image_size": (("imagefolder",), 32, "only imagefolder resizes images; the other sources keep their samples' size"),
    "grayscale": (("imagefolder",), False, "only imagefolder converts images; the other sources keep their channels"),
    "copies": (("digits32",), 3, "only digits32 makes augmented copies"),
}


@dataclass(frozen=True)
class DataConfig:
    # digits32: the harder built-in task; fashion-mnist: Debian's dataset-fashion-mnist (or its IDX files at path)
    source: Literal["digits", "digits32", "npz", "imagefolder", "idx", "fashion-mnist", "npy"] = "digits"
    path: str | None = None  # .npz file, ImageFolder root, folder of IDX files or of x.npy + y.npy (npy: memory-
    #                          mapped, the training split read batch by batch), relative to the config file
    image_size: int | list[int] | None = None  # imagefolder: images resized to N x N, or [height, width] (32)
    grayscale: bool | None = None  # imagefolder: one channel instead of three (false)
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    calib_samples: int = 256  # taken from the train split, for int8 calibration
    limit: int | None = None  # use only this many samples (quick runs, tests)
    copies: int | None = None  # digits32: augmented copies of each digit (3)
    seed: int = 0
    workers: int = 0  # npy / idx / fashion-mnist: DataLoader processes reading training batches (0: in process)

    def __post_init__(self) -> None:
        for key, (sources, default, _) in SOURCE_KEYS.items():  # a source's own keys get its defaults
            if self.source in sources and getattr(self, key) is None:
                object.__setattr__(self, key, default)


@dataclass(frozen=True)
class ModelConfig:
    # built-in model (edgekit.models.zoo), used when no factory is given
    name: Literal["small_cnn", "resnet8", "ds_cnn", "mobilenet_v1", "mobilenet_v2", "conv1d", "mlp"] = "small_cnn"
    width: int = 32  # small_cnn / conv1d / mlp: channels of the first layer
    width_mult: float = 1.0  # width multiplier of every zoo model (MobileNet's alpha)
    factory: str | None = None  # path/to/file.py:function returning an nn.Module
    checkpoint: str | None = None  # .pt/.pth state_dict (loaded weights_only) or .safetensors


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 12  # 0 keeps the (checkpoint) weights as they are
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    # data-parallel processes for every training loop (train, prune fine-tuning, distill, QAT); each takes a
    # share of every batch (edgekit/ddp.py); 1 trains in this process
    workers: int = 1


@dataclass(frozen=True)
class PruneConfig:
    enabled: bool = True
    # how channels are ranked (edgekit.stages.prune); magnitude: NNCF unstructured sparsity, `ratio` of weights zeroed
    method: Literal["l1", "slimming", "taylor", "random", "magnitude"] = "l1"
    scope: Literal["local", "global"] = "local"  # local: same ratio per layer; global: one ranking across layers
    ratio: float = 0.5  # fraction of channels removed from each prunable layer (when no target is set)
    target_macs: float | None = None  # keep at most this fraction of the MACs (e.g. 0.5); wins over ratio
    target_params: float | None = None  # keep at most this fraction of the parameters
    round_to: int | None = None  # keep channel counts a multiple of this; None: the chosen targets' round_to
    ignore: list[str] = field(default_factory=list)  # module names never pruned (the classifier always is)
    protect_stem: bool = True  # never prune the first conv/linear layer's outputs
    steps: int = 4  # iterative pruning: reach the target in this many rounds, fine-tuning between them
    accuracy_guard: bool = True  # undo the first round whose val accuracy falls past max_loss_pp, and stop there
    max_loss_pp: float | None = None  # the guard's limit (pp below the unpruned model); None: strictest target's
    #                                   accuracy_tolerance_pp
    sparsity_strength: float = 1e-4  # slimming: L1 penalty on BatchNorm scales during sparsity training
    sparsity_epochs: int = 4  # slimming: epochs of sparsity training before channels are removed
    use_sensitivity: bool = False  # per-layer ratios from `edgekit sensitivity` (less for sensitive layers)
    finetune_epochs: int = 24  # over all rounds (6 per round of the default 4); benchmarks/prune_guard.py
    lr: float = 1e-3


@dataclass(frozen=True)
class DistillConfig:
    enabled: bool = True
    losses: list[Literal["soft", "feature", "relation"]] = field(default_factory=lambda: ["soft"])
    temperature: float = 4.0  # soft: softmax temperature
    alpha: float = 0.7  # soft: weight of the soft-target loss; 1 - alpha goes to the hard labels
    feature_weight: float = 1.0  # feature: weight of the FitNets hint loss
    feature_layers: list[str] = field(default_factory=list)  # "teacher_module:student_module"; [] = classifier input
    relation_weight: float = 1.0  # relation: weight of the RKD distance + angle loss
    teachers: list[str] = field(default_factory=list)  # checkpoints of the config's model; [] = the trained model
    student: Literal["pruned", "small_cnn", "resnet8", "ds_cnn", "mobilenet_v1", "mobilenet_v2", "conv1d",
                     "mlp"] = "pruned"  # the pruned model, or a fresh zoo model
    student_width_mult: float = 0.5  # width multiplier of a zoo student
    epochs: int = 6
    lr: float = 1e-3


@dataclass(frozen=True)
class QuantizeConfig:
    enabled: bool = True
    # ptq: calibrated ranges only; qat: then fine-tune with fake quant; auto: PTQ, and QAT only when PTQ loses more
    # than max_loss_pp of validation accuracy against the float model it quantizes (QAT as the repair)
    method: Literal["auto", "qat", "ptq"] = "auto"
    max_loss_pp: float | None = None  # auto's limit; None: the strictest chosen target's accuracy_tolerance_pp
    calibration: Literal["minmax", "percentile", "entropy"] = "minmax"  # how activation ranges are set
    percentile: float = 99.99  # calibration: percentile
    activations: Literal["symmetric", "asymmetric"] = "symmetric"
    per_channel: bool = True  # per-channel weight scales (per-tensor when false)
    bias_correction: bool = True  # NNCF's fast bias correction after calibration
    subset_size: int = 256  # calibration samples for the initial ranges
    keep_float: list[str] = field(default_factory=list)  # NNCF node names left in float (e.g. model/1/0/conv2d/0)
    mixed_precision_tolerance: float | None = None  # keep the most int8-sensitive layers float until PTQ val
    #                                                accuracy is within this (absolute) of the float model
    qat_epochs: int = 3
    lr: float = 1e-4


@dataclass(frozen=True)
class ExportConfig:
    opset: int = 17  # 13 (per-channel int8 Q/DQ) .. 21 (int4; the newest edgekit writes)
    # the artifact every bundle puts first, its primary (what `edgekit run` and a search time and score), as
    # format_precision (onnx_int8, onnx_fp32, onnx_fp16, tflite_int8, tflite_fp32); null: each target's first
    primary: str | None = None
    # ONNX int8 settings over the targets' `int8:` (keys of targets.Int8Settings, or {target name: {...}})
    int8: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RunConfig:
    warmup_runs: int = 10
    min_runs: int = 100
    min_seconds: float = 1.0
    max_seconds: float = 20.0


@dataclass(frozen=True)
class BuildConfig:
    targets: list[str] = field(default_factory=lambda: ["x86-64", "rpi5"])
    run_local: bool = True  # run the bundles this machine can run with the on-device runner
    allow_fidelity_miss: bool = False  # keep going when an artifact misses its target's fidelity thresholds
    stage_cache: bool = True  # reuse a stage that an earlier build finished with the same inputs (its input key)


EPOCH_KEYS = ("train.epochs", "prune.finetune_epochs", "prune.sparsity_epochs", "distill.epochs", "quantize.qat_epochs")
# keys whose range the refusal states: (least, most, what). An image of 100 000 pixels a side took 5.8 GB in PIL's
# resize before it stopped answering Ctrl-C; per-channel int8 (QuantizeLinear's axis, NNCF's and onnxruntime's Q/DQ)
# needs opset 13, and 21 is the newest edgekit writes (int4's DequantizeLinear; torch.onnx's TorchScript exporter,
# which edgekit uses, writes up to 20, and 21 with a warning)
RANGES = {
    "data.image_size": (1, 4096, "pixels a side (N, or [height, width])"),
    "export.opset": (13, 21, "(per-channel int8 needs opset 13, and 21 is the newest edgekit writes)"),
    **dict.fromkeys(EPOCH_KEYS, (0, 10_000, "epochs")),
}
MAX_CHANNEL_RATIO = 0.9  # no layer loses more of its channels (torch-pruning's max_pruning_ratio in stages/prune)
BUNDLE_ONLY = ("primary",)  # export keys only the bundle stage reads: the stages before it keep their keys
NO_EFFECT = ("allow_fidelity_miss", "stage_cache")  # build keys that change how a build goes, not what it makes


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    run: RunConfig = field(default_factory=RunConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    search: SearchConfig = field(default_factory=SearchConfig)  # `edgekit search` (edgekit/search/space.py)
    base_dir: str = "."  # directory relative paths are resolved against (set on load, not a config key)

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p


def _type_ok(value: object, hint: object) -> bool:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)  # type: ignore[arg-type]


def _describe(hint: object) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _build_section(cls: type, values: object, where: str) -> object:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"config: '{where}' must be a mapping of keys, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "base_dir"]
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"config: unknown key '{where}.{key}'; valid keys: {', '.join(names)}")
        if not _type_ok(value, hints[key]):
            raise ConfigError(
                f"config: '{where}.{key}' is {value!r}; expected {_describe(hints[key])}"
            )
        if isinstance(value, float) and not math.isfinite(value):  # .inf passes every lower bound, .nan every bound
            raise ConfigError(f"config: '{where}.{key}' is {value!r}; give a finite number "
                              "(see `edgekit config --default` for sane values)")
    return cls(**values)


def _check_ranges(cfg: Config) -> None:
    checks = [
        ("data.val_fraction", 0 < cfg.data.val_fraction < 0.5),
        ("data.test_fraction", 0 < cfg.data.test_fraction < 0.5),
        ("prune.ratio", 0 <= cfg.prune.ratio < 1),
        ("prune.target_macs", cfg.prune.target_macs is None or 0 < cfg.prune.target_macs <= 1),
        ("prune.target_params", cfg.prune.target_params is None or 0 < cfg.prune.target_params <= 1),
        ("prune.steps", cfg.prune.steps >= 1),
        ("prune.max_loss_pp", cfg.prune.max_loss_pp is None or cfg.prune.max_loss_pp >= 0),
        ("quantize.max_loss_pp", cfg.quantize.max_loss_pp is None or cfg.quantize.max_loss_pp >= 0),
        ("prune.sparsity_strength", cfg.prune.sparsity_strength >= 0),
        ("model.width_mult", cfg.model.width_mult > 0),
        ("distill.student_width_mult", cfg.distill.student_width_mult > 0),
        ("distill.losses", len(cfg.distill.losses) > 0),
        ("quantize.percentile", 50 < cfg.quantize.percentile <= 100),
        ("quantize.subset_size", cfg.quantize.subset_size > 0),
        ("distill.alpha", 0 <= cfg.distill.alpha <= 1),
        ("search.refine", 0 <= cfg.search.refine <= 1),
        ("distill.temperature", cfg.distill.temperature > 0),
        ("train.batch_size", cfg.train.batch_size > 0),
        ("train.workers", cfg.train.workers >= 1),
        ("data.calib_samples", cfg.data.calib_samples > 0),
        ("data.workers", cfg.data.workers >= 0),
        ("run.min_runs", cfg.run.min_runs > 0),
        *_counts_and_rates(cfg),
    ]
    for key, ok in checks:
        if not ok:
            value = _value(cfg, key)
            least, most, what = RANGES.get(key, (None, None, None))
            valid = f"give {least}..{most} {what}" if what else "see `edgekit config --default` for sane values"
            raise ConfigError(f"config: '{key}' is out of range (got {value!r}); {valid}")
    if cfg.prune.method != "magnitude" and cfg.prune.ratio > MAX_CHANNEL_RATIO:  # 0.95 kept more channels than 0.85
        raise ConfigError(f"config: 'prune.ratio' is {cfg.prune.ratio}, over {MAX_CHANNEL_RATIO}: channel pruning "
                          f"keeps at least {1 - MAX_CHANNEL_RATIO:.0%} of every layer's channels, and past that limit "
                          "the pruner's schedule removes fewer, not more; use at most "
                          f"{MAX_CHANNEL_RATIO}, prune.target_macs, or a smaller model.width")
    if cfg.data.source not in ("digits", "digits32", "fashion-mnist") and not cfg.data.path:
        raise ConfigError(f"config: data.source '{cfg.data.source}' needs data.path (a file or folder)")
    for key, (sources, _, does) in SOURCE_KEYS.items():
        if cfg.data.source not in sources and _value(cfg, f"data.{key}") is not None:
            raise ConfigError(f"config: data.{key} is set but data.source '{cfg.data.source}' ignores it: {does}; "
                              f"remove data.{key}")
    if cfg.data.source in ("digits", "digits32") and cfg.data.path:
        raise ConfigError(f"config: data.path is set but data.source '{cfg.data.source}' is built in and would "
                          "ignore it; set data.source to npz or imagefolder, or remove data.path")
    if cfg.train.workers > 1 and cfg.train.batch_size < 2 * cfg.train.workers:
        raise ConfigError(f"config: train.batch_size ({cfg.train.batch_size}) leaves some of the {cfg.train.workers} "
                          "train.workers fewer than 2 samples of every batch (each takes a share; BatchNorm cannot "
                          f"train on one): raise batch_size to {2 * cfg.train.workers} or lower workers")
    if not cfg.build.targets:
        raise ConfigError("config: build.targets is empty; list at least one target (see `edgekit targets`)")


def _counts_and_rates(cfg: Config) -> list[tuple[str, bool]]:
    """Epochs, counts and learning rates: a negative epoch count would ship untrained weights. The keys of RANGES
    within their range (an image size, when set, as N or [height, width])."""
    positive = ["train.lr", "prune.lr", "distill.lr", "quantize.lr", "model.width", "run.max_seconds"]
    non_negative = ["train.weight_decay", "distill.feature_weight", "distill.relation_weight", "run.warmup_runs",
                    "run.min_seconds"]
    optional_positive = ["data.limit", "data.copies", "prune.round_to",
                         "quantize.mixed_precision_tolerance"]
    size = cfg.data.image_size
    sides = [] if size is None else size if isinstance(size, list) else [size, size]
    ranged = {**{k: [_value(cfg, k)] for k in RANGES}, "data.image_size": sides}
    return ([(k, _value(cfg, k) > 0) for k in positive] + [(k, _value(cfg, k) >= 0) for k in non_negative]
            + [(k, _value(cfg, k) is None or _value(cfg, k) > 0) for k in optional_positive]
            + [("run.max_seconds", cfg.run.max_seconds >= cfg.run.min_seconds),
               ("data.image_size", size is None or len(sides) == 2)]
            + [(k, all(RANGES[k][0] <= v <= RANGES[k][1] for v in values)) for k, values in ranged.items()])


def _value(cfg: Config, key: str) -> object:
    section, _, name = key.partition(".")
    return getattr(getattr(cfg, section), name)


def _infer_source(data: object) -> object:
    """`data: {path: x.npz}` without a source means the user's file, never the built-in digits."""
    if not isinstance(data, dict) or "source" in data or not isinstance(data.get("path"), str):
        return data
    suffix = Path(data["path"]).suffix.lower()
    if suffix == ".npz":
        return {**data, "source": "npz"}
    if not suffix:
        return {**data, "source": "imagefolder"}
    raise ConfigError(f"config: data.path '{data['path']}' is neither a .npz file nor a folder; "
                      "save arrays x and y with numpy.savez, or set data.source")


def from_dict(raw: dict | None, base_dir: str | Path = ".", *, check_space: bool = True) -> Config:
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError("config: the file must hold a mapping of sections (data, model, train, ...)")
    sections = {f.name: f for f in dataclasses.fields(Config) if f.name != "base_dir"}
    built = {}
    for key, value in raw.items():
        if key not in sections:
            raise ConfigError(f"config: unknown section '{key}'; valid sections: {', '.join(sections)}")
        value = _infer_source(value) if key == "data" else value
        built[key] = _build_section(sections[key].default_factory, value, key)  # type: ignore[misc]
    cfg = Config(**built, base_dir=str(base_dir))
    _check_ranges(cfg)
    if check_space and "search" in raw:  # every choice builds (the default space is checked by a test)
        check_search(cfg.search, raw, lambda r: from_dict(r, base_dir, check_space=False))
    return cfg






def load(path: str | Path | None, log=None) -> Config:
    """Load a YAML config; None gives the built-in default. `log` is told when a file holds no settings."""
    if path is None:
        return from_dict({})
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file '{path}' is a folder; pass a YAML file (see `edgekit config --default`)")
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found; write one from `edgekit config --default`")
    try:
        raw = yamlfile.load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' {yamlfile.problem(exc)}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file '{path}' cannot be read ({type(exc).__name__}); "
                          "write a YAML text file from `edgekit config --default`") from exc
    if raw is None and log is not None:
        log(f"note: '{path}' holds no settings; building the built-in digits demo (see `edgekit config --default`)")
    return from_dict(raw, base_dir=path.parent.resolve())


def with_checkpoint(cfg: Config, checkpoint: str) -> Config:
    """The same config with another model checkpoint (a distillation teacher)."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, checkpoint=checkpoint))


def to_dict(cfg: Config) -> dict:
    data = dataclasses.asdict(cfg)
    data.pop("base_dir")
    return data


def absolute(cfg: Config) -> Config:
    """The same config with every path made absolute, so a copy saved elsewhere still points at the files."""
    data, model = cfg.data, cfg.model
    if data.path:
        data = dataclasses.replace(data, path=str(cfg.resolve(data.path).resolve()))
    if model.checkpoint:
        model = dataclasses.replace(model, checkpoint=str(cfg.resolve(model.checkpoint).resolve()))
    if model.factory and model.factory.rpartition(":")[0].endswith(".py"):  # not a package.module on sys.path
        file, _, func = model.factory.rpartition(":")
        model = dataclasses.replace(model, factory=f"{cfg.resolve(file).resolve()}:{func}")
    build = dataclasses.replace(cfg.build, targets=[str(cfg.resolve(t).resolve()) if targets.is_path(t) else t
                                                    for t in cfg.build.targets])
    return dataclasses.replace(cfg, data=data, model=model, build=build)


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def choices(hint: object) -> tuple:
    """The closed set of values a key (or each item of a list key) takes, else ()."""
    while typing.get_origin(hint) is list:
        (hint,) = typing.get_args(hint)
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


def default_yaml() -> str:
    """The default config; a key with a closed set of choices is followed by them, build.targets by the known
    target profiles, a key only some sources read by those sources."""
    lines, defaults = [], Config()
    for section, values in to_dict(defaults).items():
        hints = typing.get_type_hints(type(getattr(defaults, section)))
        for line in yaml.safe_dump({section: values}, sort_keys=False).splitlines():
            key = line.strip().partition(":")[0]
            top = line.startswith("  ") and not line.startswith("   ") and key in hints  # a key, not a list item
            listed = choices(hints[key]) if top else ()
            if (section, key) == ("build", "targets") and line.startswith("  targets"):
                listed = tuple(targets.available())
            if section == "data" and top and key in SOURCE_KEYS:  # null here: the demo's source does not read it
                sources, default, _ = SOURCE_KEYS[key]
                listed = (f"{' and '.join(sources)} only ({str(default).lower()} when not set)"
                          + ("; N or [height, width]" if key == "image_size" else ""),)
            lines.append(f"{line}  # {' | '.join(map(str, listed))}" if listed else line)
    return "\n".join(lines) + "\n"
