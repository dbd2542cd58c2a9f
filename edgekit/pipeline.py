"""The build: an ordered list of stages, each writing its own folder; --resume skips finished ones."""

from __future__ import annotations

import sysconfig
import time
import traceback
from pathlib import Path

from edgekit import bundle, config, targets
from edgekit.config import Config
from edgekit.data import load_dataset
from edgekit.errors import EdgekitError, StageFailed
from edgekit.stages import distill, export, prune, quantize, train, verify
from edgekit.stages.base import METRICS_FILE, Context, write_bytes, write_json

EDGEKIT_DIR = Path(__file__).resolve().parent
STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()
STAGES = [train, prune, distill, quantize, export, verify, bundle]
STAGE_NAMES = [s.name for s in STAGES]
OPTIONAL = {"prune": "prune", "distill": "distill", "quantize": "quantize"}  # stage -> config section


def enabled(cfg: Config, stage_name: str) -> bool:
    section = OPTIONAL.get(stage_name)
    if section is None:
        return True
    if stage_name == "distill" and not cfg.prune.enabled and cfg.distill.student == "pruned":
        return False  # nothing smaller than the teacher to distil into
    return getattr(cfg, section).enabled


def run_stages(ctx: Context, log=print) -> list[dict]:
    done = []
    for stage in STAGES:
        if not enabled(ctx.cfg, stage.name):
            log(f"[{stage.name}] skipped (disabled in config)")
            continue
        if ctx.done(stage.name):
            log(f"[{stage.name}] finished earlier, kept (resume)")
            done.append(ctx.metrics(stage.name))
            continue
        log(f"[{stage.name}] running")
        t0 = time.perf_counter()
        result = run_guarded(stage, ctx)
        result["seconds"] = round(time.perf_counter() - t0, 2)
        write_json(ctx.stage_dir(stage.name) / METRICS_FILE, result)
        done.append(result)
    return done


def run_guarded(stage, ctx: Context) -> dict:
    """Run one stage; a library's exception becomes one line naming stage and library (traceback kept in the
    stage's error.log). edgekit's own errors already say what to do and pass through."""
    try:
        return stage.run(ctx)
    except EdgekitError:
        raise
    except Exception as exc:
        log_file = ctx.stage_dir(stage.name) / "error.log"
        log_file.write_text("".join(traceback.format_exception(exc)))
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise StageFailed(
            f"stage {stage.name} failed in {failing_library(exc)}: {type(exc).__name__}: {first}; traceback in "
            f"{log_file}; fix what it names and continue with `edgekit build --resume {ctx.out}`, or report it "
            "with that file") from exc


def failing_library(exc: BaseException) -> str:
    """Where it broke: the user's own code (a model's forward, say) if it ran after edgekit's last frame, else
    the installed package edgekit called."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [i for i, f in enumerate(frames) if Path(f.filename).is_relative_to(EDGEKIT_DIR)]
    after = frames[ours[-1] + 1:] if ours else frames
    for frame in reversed(after):
        path = Path(frame.filename)
        if not ({"site-packages", "dist-packages"} & set(path.parts) or path.is_relative_to(STDLIB)):
            return f"your code ({frame.filename}:{frame.lineno})"
    for frame in after:
        parts = Path(frame.filename).parts
        for folder in ("site-packages", "dist-packages"):
            if folder in parts[:-2]:
                return parts[parts.index(folder) + 1].removesuffix(".py")
    return "edgekit"


def make_context(cfg: Config, out: Path, target_names: list[str] | None) -> Context:
    chosen = targets.get(target_names) if target_names else targets.get(cfg.build.targets, Path(cfg.base_dir))
    return Context(cfg, load_dataset(cfg), out, chosen)


def build(cfg: Config, out: Path, target_names: list[str] | None = None, *, resume: bool = False,
          log=print) -> dict:
    """Run every stage into `out`, run the bundles this machine can run, check every artifact with its
    target's pinned runtime (aarch64 also under qemu), write report.json."""
    from edgekit import measure, report, report_html, runtime_check

    if out.exists() and any(out.iterdir()) and not resume:
        raise EdgekitError(f"'{out}' already holds a build; use --resume to continue it or pick another --out")
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        write_bytes(out / "config.yaml", config.dump(config.absolute(cfg)).encode())
    ctx = make_context(cfg, out, target_names)
    stage_metrics = run_stages(ctx, log)
    runs = {}
    if cfg.build.run_local:
        for target in ctx.targets:
            if target.runs_here:
                runs[target.name] = measure.run_bundle(out / "bundles" / target.name, log=log)
            else:
                log(f"[run] {target.name}: {target.arch} bundle, not runnable on this machine; "
                    f"measure it on the device with `edgekit run`")
    result = report.build_report(cfg, stage_metrics, ctx.targets, runs)
    runtime_check.add_to_report(result, log=log)  # each artifact with its pinned runtime; aarch64 under qemu
    write_json(out / "report.json", result)
    report_html.write([out], out / "report.html")  # the page people look at, from report.json and the results
    runtime_check.raise_on_failures(result)
    return result
