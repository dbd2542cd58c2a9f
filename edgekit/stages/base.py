"""The stage contract: a stage reads earlier stages' files through the Context and writes its own folder.

A stage is a module of edgekit.stages (listed in edgekit.stages.ORDER) with
  name      its folder under stages/ and its name in logs and the report;
  reads     the config sections (and "targets") its result depends on;
  needs     the stages whose results it reads (their metrics.json and files, through the Context);
  enabled   enabled(cfg) -> bool: whether it runs in this build;
  run       run(ctx) -> dict: does the work, writes its folder, returns what it hands on and reports.
edgekit.pipeline.run_stage runs one and writes its `metrics.json` last, with the stage's input key
(edgekit.stages.keys) and its seconds: a folder with a metrics.json of the current key is a finished stage
(what --resume keeps). Stages talk through these records and files, never through each other's functions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NotRequired, Protocol, TypedDict

import numpy as np
import torch
from torch import nn

from edgekit import models
from edgekit.config import Config
from edgekit.data import Dataset
from edgekit.files import METRICS_FILE, MODEL_FILE, stage_files
from edgekit.stages import ORDER
from edgekit.targets import Target

LOGITS_FILE = "test_logits.npy"  # the stage's torch model on the test split: the reference for fidelity


class StageRecord(TypedDict):
    """A stage's metrics.json: what it reported and handed on (its own keys, e.g. `artifacts` of export,
    `bundles` of bundle, `accuracy`/`params`/`macs` of a model stage), plus what edgekit.pipeline adds."""

    name: str
    key: str  # the input key (edgekit.stages.keys)
    inputs: dict[str, str]  # a digest per kind of input: which changed, when the key did
    seconds: float
    cached_from: NotRequired[str]  # the build that made it, when it came from the stage cache
    warnings: NotRequired[list[str]]  # what the report repeats (a model near chance, starting weights kept)


class Stage(Protocol):
    name: str
    reads: tuple[str, ...]
    needs: tuple[str, ...]

    def enabled(self, cfg: Config) -> bool: ...

    def run(self, ctx: Context) -> dict: ...


def always(_cfg: Config) -> bool:
    """`enabled` of a stage that every build runs."""
    return True


@dataclass
class Context:
    cfg: Config
    data: Dataset
    out: Path  # the build directory
    targets: list[Target]

    @property
    def keep_zeros(self) -> bool:
        """Unstructured sparsity made by the prune stage must survive later training (distill, QAT)."""
        return self.cfg.prune.enabled and self.cfg.prune.method == "magnitude"

    def stage_dir(self, name: str) -> Path:
        path = self.out / "stages" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def done(self, name: str) -> bool:
        return (self.out / "stages" / name / METRICS_FILE).is_file()

    def metrics(self, name: str) -> StageRecord:
        return json.loads((self.out / "stages" / name / METRICS_FILE).read_text())

    def has_model(self, name: str) -> bool:
        return (self.out / "stages" / name / MODEL_FILE).is_file()

    def load_model(self, name: str) -> nn.Module:
        return models.load_model(self.cfg, self.data.sample_shape, self.data.num_classes,
                                 self.out / "stages" / name / MODEL_FILE)

    def latest_model_stage(self, before: str | None = None) -> str:
        """The last finished stage (in pipeline order, before `before`) that produced a torch model."""
        names = ORDER[: ORDER.index(before)] if before else ORDER
        found = [n for n in names if self.has_model(n)]
        if not found:
            raise RuntimeError("no finished stage has produced a model yet")
        return found[-1]

    def reference_logits(self, name: str) -> np.ndarray:
        return np.load(self.out / "stages" / name / LOGITS_FILE)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.from_numpy(self.data.train.x[:batch])


def finish_torch_stage(ctx: Context, name: str, model: nn.Module, **extra: object) -> dict:
    """Save a stage's torch model and its test logits; return the stage metrics."""
    from edgekit import metrics

    out_dir = ctx.stage_dir(name)
    models.save_model(model, out_dir / MODEL_FILE)
    test_logits = metrics.logits(model, ctx.data.test.x)
    np.save(out_dir / LOGITS_FILE, test_logits)
    macs, params = metrics.macs_and_params(model, ctx.data.sample_shape)
    return {
        "name": name,
        "accuracy": metrics.accuracy(test_logits, ctx.data.test.y),
        "params": params,
        "macs": macs,
        **stage_files(out_dir),
        **extra,
    }
