"""One trial: a full build of the base config with the trial's overrides, into its own folder.

A trial never raises (but on Ctrl-C): whatever stops its build (a fidelity miss, a stage that fails, a choice the
model cannot take) becomes `status: failed` with the one line the build would have printed. Its record goes to
`TRIAL_FILE` in its folder last, so a folder without one is a trial that did not finish (what --resume redoes).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import traceback
from pathlib import Path

from edgekit.search import space

TRIAL_FILE = "trial.json"
LOG_FILE = "build.log"


def trial_config(base: dict, overrides: dict, target: str, stage_cache: bool = True) -> dict:
    """The raw config a trial builds: the base with the overrides, for one target, not run here (timing is a
    separate phase), with the stage cache on (trials share their prefixes) unless `--no-stage-cache` said not."""
    raw = space.apply({k: v for k, v in base.items() if k != "search"}, overrides)
    raw.setdefault("build", {}).update(targets=[target], run_local=False, stage_cache=stage_cache)
    return raw


def run(base: dict, base_dir: str, overrides: dict, target: str, out: Path, trial_id: str,
        cache_dir: str | None = None, stage_cache: bool = True, proposed_by: str | None = None) -> dict:
    """Build one trial into `out`; return its record (also written to out/trial.json). `proposed_by`: the
    sampler, or the search's refinement of a good trial (run.refinement)."""
    from edgekit import config, pipeline

    if cache_dir:
        os.environ["EDGEKIT_STAGE_CACHE"] = cache_dir
    record = {"id": trial_id, "overrides": overrides, "digest": space.digest(overrides), "status": "ok",
              "reason": None, "proposed_by": proposed_by, "pid": os.getpid(), "torch_threads": _threads(),
              "started": time.time()}
    if out.exists():  # an unfinished try of this trial: start it again
        shutil.rmtree(out)
    out.mkdir(parents=True)
    lines: list[str] = []
    try:
        cfg = config.from_dict(trial_config(base, overrides, target, stage_cache), base_dir)
        report = pipeline.build(cfg, out / "build", [target], log=lines.append)
        record.update(metrics(report, out / "build", target))
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 -- any failure is this trial's result, never the search's end
        record.update(status="failed", reason=_one_line(exc))
        (out / "error.log").write_text("".join(traceback.format_exception(exc)))
    record.update(ended=time.time(), seconds=round(time.time() - record["started"], 2))
    (out / LOG_FILE).write_text("\n".join(lines) + "\n")
    (out / TRIAL_FILE).write_text(json.dumps(record, indent=1))
    return record


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _one_line(exc: BaseException) -> str:
    from edgekit.errors import EdgekitError

    text = " ".join(str(exc).split())[:300]
    return text if isinstance(exc, EdgekitError) else f"{type(exc).__name__}: {text}"


def metrics(report: dict, build_dir: Path, target: str) -> dict:
    """The primary artifact of the target's bundle: its accuracy (verified in its runtime on the test split),
    size, sha256 and the MACs of the model it came from; which stages came from the stage cache."""
    manifest = json.loads((build_dir / "bundles" / target_name(report, target) / "manifest.json").read_text())
    primary = manifest["primary"]
    row = next(r for r in report["artifacts"] if r["target"] == manifest["target"]["name"] and r["name"] == primary)
    stages = {s["name"]: s for s in report["stages"]}
    source = stages.get(row["source_stage"]) or stages[list(stages)[-1]]
    file = Path(row["path"]).name
    return {"artifact": primary, "bundle": str(build_dir / "bundles" / manifest["target"]["name"]),
            "accuracy": row["accuracy"], "size_bytes": row["size_bytes"], "sha256": manifest["files"][file],
            "macs": source.get("macs"), "params": source.get("params"), "fidelity_miss": row["fidelity_miss"],
            "cached_stages": cached_stages(build_dir), "prune_kept": (stages.get("prune") or {}).get("kept")}


def cached_stages(build_dir: Path) -> list[str]:
    """The stages this build copied from the stage cache (their metrics.json carries `cached_from`)."""
    from edgekit.stages import ORDER

    found = []
    for name in ORDER:
        path = build_dir / "stages" / name / "metrics.json"
        if path.is_file() and json.loads(path.read_text()).get("cached_from"):
            found.append(name)
    return found


def target_name(report: dict, target: str) -> str:
    return report["targets"][0] if report["targets"] else target
