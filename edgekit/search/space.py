"""The `search:` config section: which config keys a search varies and over which choices.

A space maps dotted config keys (`prune.ratio`) to lists of choices. Every choice is checked by building the
config with it (config.py passes its own builder in, so this module imports no config), so an unknown key or a
value out of range is the same one-line ConfigError a plain build gives.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal

from edgekit.errors import ConfigError

DEFAULT_SPACE = {
    "prune.ratio": [0.25, 0.5, 0.7],
    "prune.method": ["l1", "taylor"],
    # an unpruned stem keeps the largest activation at full width: unprotecting it was the squeeze's best move on
    # Fashion-MNIST (benchmarks/search_proof.py)
    "prune.protect_stem": [True, False],
    "distill.enabled": [True, False],
    "quantize.method": ["auto", "ptq", "qat"],  # auto: the default recipe's, so base_first has its point
}
FIXED_SECTIONS = ("data", "run", "build", "search")  # a trial varies the recipe, never the data or how it is run


@dataclass(frozen=True)
class SearchConfig:
    # dotted config key -> the choices a trial picks from (each validated by building the config with it)
    space: dict = field(default_factory=lambda: copy.deepcopy(DEFAULT_SPACE))
    trials: int = 16  # trials in all (`--trials` overrides); `--resume` counts the finished ones
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"  # Optuna's sampler; objectives: accuracy up, `objective` down
    # the sampler's second objective: latency, the p90 as timed (trials run in rounds of --workers, each round
    # timed before the next is sampled; a target only estimated falls back to MACs), or MACs (no waiting)
    objective: Literal["latency", "macs"] = "latency"
    seed: int = 0  # the sampler's seed
    base_first: bool = True  # the first trial is the config's own recipe (its values for the space's keys)
    # share of the trials that change one key of a good trial so far (in turn the most accurate over and within
    # the latency budget; without one, a trial of the Pareto front), the rest being the sampler's: TPE found the
    # best hand squeeze's pruning but never its distillation / quantization, one key away
    # (benchmarks/search_proof.py; edgekit.search.run.refinement)
    refine: float = 0.5


def set_key(raw: dict, key: str, value: object) -> dict:
    """A copy of a raw config dict with the dotted `key` set to `value`."""
    out = copy.deepcopy(raw)
    section, _, name = key.partition(".")
    node = out.setdefault(section, {})
    if not isinstance(node, dict):
        raise ConfigError(f"config: search.space key '{key}': section '{section}' is not a mapping")
    node[name] = copy.deepcopy(value)
    return out


def apply(raw: dict, overrides: dict) -> dict:
    """A raw config dict with each dotted key of `overrides` set."""
    for key, value in overrides.items():
        raw = set_key(raw, key, value)
    return raw


def check(search: SearchConfig, raw: dict, build) -> None:
    """Each key a dotted `section.key` outside the fixed sections, each choice a config `build(raw)` accepts."""
    if not isinstance(search.space, dict) or not search.space:
        raise ConfigError("config: search.space must map dotted keys (prune.ratio) to lists of choices")
    if search.trials < 1:
        raise ConfigError(f"config: 'search.trials' is out of range (got {search.trials!r}); give at least 1")
    base = {k: v for k, v in raw.items() if k != "search"}
    for key, choices in search.space.items():
        section, dot, name = str(key).partition(".")
        if not dot or not name or "." in name:
            raise ConfigError(f"config: search.space key {key!r} is not a dotted config key such as 'prune.ratio'")
        if section in FIXED_SECTIONS:
            raise ConfigError(f"config: search.space key '{key}': a search does not vary the {section} section; "
                              f"vary model, train, prune, distill, quantize or export keys")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"config: search.space.{key} must be a non-empty list of choices, got {choices!r}")
        for choice in choices:
            try:
                build(set_key(base, key, choice))
            except ConfigError as exc:
                raise ConfigError(f"config: search.space.{key} choice {choice!r}: "
                                  f"{str(exc).removeprefix('config: ')}") from exc


def _value(cfg_dict: dict, key: str) -> object:
    section, _, name = key.partition(".")
    return cfg_dict.get(section, {}).get(name)


def outside(space: dict, cfg_dict: dict) -> list[str]:
    """The config's values that are not among their key's choices ('quantize.method auto not in [ptq, qat]')."""
    return [f"{key} {_value(cfg_dict, key)} not in [{', '.join(map(str, choices))}]"
            for key, choices in space.items() if _value(cfg_dict, key) not in choices]


def base_point(space: dict, cfg_dict: dict) -> dict | None:
    """The config's own value of each key as a choice index, when every one of them is among the choices."""
    if outside(space, cfg_dict):
        return None
    return {key: choices.index(_value(cfg_dict, key)) for key, choices in space.items()}


def overrides_of(space: dict, point: dict) -> dict:
    """Choice indices (what the sampler picks) to values."""
    return {key: space[key][int(point[key])] for key in space}


def digest(overrides: dict) -> str:
    """Names a trial's recipe: equal overrides, equal digest (how --resume knows a finished one)."""
    return hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:12]
