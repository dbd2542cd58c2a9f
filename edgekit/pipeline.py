"""The build: the ordered list of stages (edgekit.stages), each writing its own folder; --resume keeps the
finished ones whose inputs are unchanged (edgekit.stages.keys).

Everything that can be checked is checked before the build folder is touched; the folder is locked while
a build writes into it, and a build that fails before its first stage leaves nothing it created.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sysconfig
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

from edgekit import config, ddp, models, onnx_int8, prunable, stop, targets
from edgekit.config import Config
from edgekit.data import Dataset, load_dataset
from edgekit.errors import WRITE_ERRORS, BuildDirError, ConfigError, EdgekitError, StageFailed, first_line
from edgekit.files import LOCK_FILE, lock_held, write_bytes, write_json
from edgekit.formats import onnx, tflite
from edgekit.runner import runner
from edgekit.stages import (
    ORDER,
    bundle,
    cache,
    check,
    distill,
    export,
    keys,
    measure,
    prune,
    quantize,
    report,
    train,
    verify,
)
from edgekit.stages.base import METRICS_FILE, Context, StageRecord

EDGEKIT_DIR = Path(__file__).resolve().parent
STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()
_MODULES = (train, prune, distill, quantize, export, verify, bundle, measure, check, report)
STAGES = [{m.name: m for m in _MODULES}[n] for n in ORDER]
CONFIG_FILE = "config.yaml"


def stage(name: str):
    """The stage module called `name`."""
    if name not in ORDER:
        raise ValueError(f"no stage '{name}'; stages: {', '.join(ORDER)}")
    return STAGES[ORDER.index(name)]


def upstream_keys(ctx: Context) -> dict[str, str]:
    """The recorded keys of the finished stages (what a stage run on its own hashes as its upstream)."""
    return {n: ctx.metrics(n).get("key") for n in ORDER if ctx.done(n)}


def run_stage(ctx: Context, name: str, upstream: dict[str, str] | None = None) -> StageRecord:
    """Run one stage into ctx.out (a library's exception becomes StageFailed) and write its metrics.json last,
    with its input key and seconds; return that record. Tests and benchmarks run single stages with it."""
    module = stage(name)
    parts = keys.inputs(ctx, module, upstream_keys(ctx) if upstream is None else upstream)
    (ctx.stage_dir(name) / METRICS_FILE).unlink(missing_ok=True)  # not finished until it is written again
    t0, loops = time.perf_counter(), ddp.loops_run()
    result = run_guarded(module, ctx)
    stop.check()  # a Ctrl-C or SIGTERM a library swallowed: the stage stays unfinished (no metrics.json)
    if ddp.loops_since(loops):  # how it trained: train.workers, gloo or in-process, the workers' pids
        result["training"] = ddp.loops_since(loops)
        kept = [loop["warning"] if loop["loop"] == name else f"{loop['loop']}: {loop['warning']}"
                for loop in result["training"] if loop.get("warning")]
        if kept:  # a loop that kept its starting weights (edgekit.training.fit): the report shows it
            result["warnings"] = result.get("warnings", []) + kept
    result.update(key=keys.key_of(parts), inputs=parts, seconds=round(time.perf_counter() - t0, 2),
                  outputs=_digests(ctx.stage_dir(name)))
    write_json(ctx.stage_dir(name) / METRICS_FILE, result)
    return result


def _digests(folder: Path) -> dict[str, str]:
    """sha256 of every file a stage left in its folder (not its metrics.json): what --resume checks is still there."""
    return {p.relative_to(folder).as_posix(): runner.sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != METRICS_FILE}


def damaged(ctx: Context, module, record: StageRecord) -> list[str]:
    """What a finished stage made that is no longer as it left it (edited, truncated or deleted since)."""
    folder = ctx.out / "stages" / module.name
    changed = [f"stages/{module.name}/{rel} changed" for rel, digest in record.get("outputs", {}).items()
               if not (folder / rel).is_file() or runner.sha256(folder / rel) != digest]
    return changed + (module.damaged(ctx) if hasattr(module, "damaged") else [])  # what it wrote outside it


def run_stages(ctx: Context, log=print) -> list[StageRecord]:
    """Every enabled stage in order. A finished stage is kept while its recorded key is its key now and no
    stage before it ran again (a stage that runs replaces files that later stages read or wrote into)."""
    done, upstream, ran = [], {}, False
    for module in STAGES:
        if not module.enabled(ctx.cfg):
            log(f"[{module.name}] skipped (disabled in config)")
            continue
        parts = keys.inputs(ctx, module, upstream)
        if ctx.done(module.name):
            record = ctx.metrics(module.name)
            broken = [] if ran else damaged(ctx, module, record)
            if record.get("key") == keys.key_of(parts) and not ran and not broken:
                log(f"[{module.name}] finished earlier, kept (resume)")
                say_warnings(record, log)
                done.append(record)
                upstream[module.name] = record["key"]
                continue
            log(f"[{module.name}] finished earlier, running again ({_why_again(record, parts, ran, broken)})")
            shutil.rmtree(ctx.stage_dir(module.name))
        ran = True
        key = keys.key_of(parts)
        with cache.building(module.name, key, log) if ctx.cfg.build.stage_cache else contextlib.nullcontext():
            done.append(_from_cache(ctx, module.name, key, log) or _run_logged(ctx, module.name, upstream, log))
        upstream[module.name] = key
    return done


def _why_again(record: StageRecord, parts: dict[str, str], ran: bool, broken: list[str]) -> str:
    if ran:
        return "an earlier stage ran again"
    if broken:
        return f"what it made is damaged: {', '.join(broken)}"
    if "inputs" not in record:
        return "an older edgekit made it, without an input key"
    return f"its inputs changed since: {', '.join(keys.changed(record['inputs'], parts))}"


def _run_logged(ctx: Context, name: str, upstream: dict[str, str], log) -> StageRecord:
    log(f"[{name}] running")
    record = run_stage(ctx, name, upstream)
    if ctx.cfg.build.stage_cache:
        cache.store(name, record["key"], ctx.stage_dir(name), ctx.out)
    return record


def _from_cache(ctx: Context, name: str, key: str, log) -> StageRecord | None:
    """The stage's folder from the stage cache, when an earlier build finished it with the same inputs."""
    record = cache.lookup(name, key) if ctx.cfg.build.stage_cache else None
    if record is None:
        return None
    cache.restore(key, ctx.stage_dir(name))
    record["cached_from"] = cache.made_by(key)
    write_json(ctx.stage_dir(name) / METRICS_FILE, record)
    log(f"[{name}] reused from the stage cache: the same inputs as in {record['cached_from']} "
        "(build.stage_cache: false builds it again)")
    say_warnings(record, log)
    return record


def say_warnings(record: StageRecord, log) -> None:
    """A kept or reused stage's recorded warnings, as its run printed them (a reused model is no better)."""
    for line in record.get("warnings", []):
        log(f"[{record['name']}] warning: {line}")


def run_guarded(stage, ctx: Context) -> dict:
    """Run one stage; a library's exception becomes one line naming stage and library (traceback kept in the
    stage's error.log). edgekit's own errors already say what to do and pass through."""
    try:
        return stage.run(ctx)
    except EdgekitError:
        raise
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRORS:
            raise  # a full disk or read-only folder: the build says what to do
        log_file = ctx.stage_dir(stage.name) / "error.log"
        log_file.write_text("".join(traceback.format_exception(exc)))
        first = first_line(exc)
        raise StageFailed(
            f"stage {stage.name} failed in {failing_library(exc)}: {type(exc).__name__}: {first}; traceback in "
            f"{log_file}; fix what it names and continue with `edgekit build --resume {ctx.out}`, or report it "
            "with that file") from exc


def failing_library(exc: BaseException) -> str:
    """Where it broke: the user's own code (a model's forward, say) if it ran after edgekit's last frame, else
    the installed package edgekit called. A data-parallel worker's failure: where it broke in the worker."""
    frames = getattr(exc, "frames", None) or traceback.extract_tb(exc.__traceback__)
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


def chosen_targets(cfg: Config, target_names: list[str] | None) -> list[targets.Target]:
    """--target names or paths (relative to the working folder), else build.targets (relative to the config)."""
    return targets.get(target_names) if target_names else targets.get(cfg.build.targets, Path(cfg.base_dir))


def make_context(cfg: Config, out: Path, target_names: list[str] | None) -> Context:
    chosen = chosen_targets(cfg, target_names)
    return Context(cfg, load_dataset(cfg), out, chosen)


# --- checks before the build folder is touched ------------------------------------------------------------

def validate(cfg: Config, target_names: list[str] | None) -> tuple[list[targets.Target], Dataset]:
    """Everything a stage would otherwise find out late: targets, export.int8, data, model, teachers."""
    chosen = chosen_targets(cfg, target_names)
    _check_export(cfg, chosen)
    data = load_dataset(cfg)
    model = models.build_model(cfg, data.sample_shape, data.num_classes)  # factory, checkpoint, one forward pass
    what = f"model.factory '{cfg.model.factory}'" if cfg.model.factory else f"model.name '{cfg.model.name}'"
    fp32 = onnx.check_exportable(model, data.calib.x[:8], cfg.export.opset, what)  # once per build; 0.05-1 s
    onnx_int8.check_folds(fp32, chosen, what)
    tflite.check_convertible(model, chosen, what)
    tflite.check_converts(model, data.calib.x[:20], chosen, what, keys.model_structure(cfg, data), cfg.export.opset)
    if prune.enabled(cfg):
        prunable.protected_layers(model, list(cfg.prune.ignore), data.num_classes, protect_stem=cfg.prune.protect_stem,
                                  shape=data.sample_shape)
    if distill.enabled(cfg):
        distill._pairs(cfg.distill.feature_layers)  # the form of each entry; the layers are found in the stage
        for path in cfg.distill.teachers:
            teacher = config.with_checkpoint(cfg, path)
            models.build_model(teacher, data.sample_shape, data.num_classes)
    return chosen, data


def _check_export(cfg: Config, chosen: list[targets.Target]) -> None:
    """export.int8's overrides and export.primary against the chosen targets."""
    names = set(targets.available()) | {t.name for t in chosen}  # a config may serve targets not built now
    for key, value in cfg.export.int8.items():
        if isinstance(value, dict) and key not in names:
            raise ConfigError(f"config: export.int8.{key} names no known target; "
                              f"valid targets: {', '.join(sorted(names))}")
    for target in chosen:
        onnx_int8.effective(target, cfg.export.int8)
        targets.primary(target, cfg.export.primary)
    onnx_int8.settings_by_key(chosen, cfg.export.int8)


def check_out(cfg: Config, out: Path, resume: bool) -> None:
    """A new build needs a new or empty folder; a resumed one the folder of a build with the same config."""
    if out.exists() and not out.is_dir():
        raise BuildDirError(f"'{out}' is a file, not a folder; pick another --out")
    if lock_held(out):  # a build writing there: say that, not "already holds a build; use --resume"
        raise busy(out)
    if not resume:
        _check_empty(out)
        return
    check_resumable(out)
    changed = changed_sections(cfg, out)
    if changed:
        raise BuildDirError(f"--resume: the config differs from the one '{out}' was built with in "
                            f"{', '.join(changed)}; resume with the same config (omit CONFIG to use "
                            f"{out / CONFIG_FILE}) or build into a new --out")


def check_resumable(out: Path) -> None:
    """--resume needs the folder of an earlier build: one that is missing, a file or without its config is named."""
    again = "pass the --out folder of an interrupted build"
    if not out.exists():
        raise BuildDirError(f"--resume '{out}': the folder does not exist; {again}")
    if not out.is_dir():
        raise BuildDirError(f"--resume '{out}' is a file, not a build folder; {again}")
    if _holds_search(out):
        raise BuildDirError(f"'{out}' holds a search, not a build; continue it with `edgekit search --target "
                            f"TARGET --resume --out {out}`")
    if not (out / CONFIG_FILE).is_file():
        raise BuildDirError(f"'{out}' has no {CONFIG_FILE} from an earlier build; nothing to resume ({again})")


def changed_sections(cfg: Config, out: Path) -> list[str]:
    saved = config.to_dict(config.absolute(config.load(out / CONFIG_FILE)))
    new = config.to_dict(config.absolute(cfg))
    for key in config.NO_EFFECT:  # they change no file
        new["build"][key] = saved["build"][key]
    new.pop("search", None)  # read by `edgekit search`, never by a build
    saved.pop("search", None)
    return [key for key in new if new[key] != saved.get(key)]


def _holds_search(out: Path) -> bool:
    return (out / "trials").is_dir()  # edgekit.search.run.TRIALS_DIR, beside its config.yaml


def busy(out: Path) -> BuildDirError:
    return BuildDirError(f"another edgekit build or search is writing into '{out}' (it holds {out / LOCK_FILE}); "
                         "wait for it to end or pick another --out")


def _check_empty(out: Path) -> None:
    if not out.is_dir() or not [p for p in out.iterdir() if p.name != LOCK_FILE]:
        return
    if _holds_search(out):
        raise BuildDirError(f"'{out}' holds a search (edgekit search), not a build; pick another --out")
    if (out / CONFIG_FILE).exists():
        raise BuildDirError(f"'{out}' already holds a build; use --resume to continue it or pick another --out")
    raise BuildDirError(f"'{out}' is not empty; pick a new or empty --out (a build never writes among other files)")


# --- the build folder: created after the checks, locked, cleaned when no stage ran ------------------------

@dataclass
class Claim:
    out: Path
    created: Path | None = None  # the outermost folder this build made
    lock_made: bool = False
    config_written: bool = False
    started: bool = False  # a stage ran: keep everything, for --resume
    fd: int | None = field(default=None, repr=False)

    def release(self, failed: bool) -> None:
        if failed and not self.started:
            if self.created is not None:
                shutil.rmtree(self.created, ignore_errors=True)
            if self.config_written:
                (self.out / CONFIG_FILE).unlink(missing_ok=True)
            if self.lock_made:
                (self.out / LOCK_FILE).unlink(missing_ok=True)
        if self.fd is not None:
            os.close(self.fd)


@contextlib.contextmanager
def claim(out: Path, resume: bool):
    """The build folder, made if missing and locked (flock) while this build writes into it."""
    held = Claim(out, created=None if resume else _create(out))
    try:
        _lock(held)
        if not resume:
            _check_empty(out)  # again, under the lock: another build may have started meanwhile
        yield held
    except BaseException:
        held.release(failed=True)
        raise
    held.release(failed=False)


def _create(out: Path) -> Path | None:
    """Make `out` and missing parents; return the outermost folder made (None when `out` was there)."""
    missing = []
    for path in (out, *out.parents):
        if path.exists() or path.is_symlink():
            if not path.is_dir():
                raise BuildDirError(f"'{path}' is a file, not a folder; pick another --out")
            break
        missing.append(path)
    if not missing:
        return None
    try:
        out.mkdir(parents=True)
    except FileExistsError:
        return None  # another build made it just now; the lock decides
    except OSError as exc:
        if missing[-1].exists():
            shutil.rmtree(missing[-1], ignore_errors=True)
        raise BuildDirError(f"cannot create '{out}': {exc.strerror}; pick a writable --out") from exc
    return missing[-1]


def _lock(held: Claim) -> None:
    path = held.out / LOCK_FILE
    try:
        try:
            held.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            held.lock_made = True
        except FileExistsError:
            held.fd = os.open(path, os.O_RDWR)
        fcntl.flock(held.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        raise busy(held.out) from exc
    except OSError as exc:
        raise BuildDirError(f"cannot write into '{held.out}': {exc.strerror}; pick a writable --out") from exc


def _write_error(exc: OSError, held: Claim) -> BuildDirError | None:
    """A full disk or a read-only folder, in one line that says how to go on."""
    hint = WRITE_ERRORS.get(exc.errno)
    if hint is None:
        return None
    then = f", then `edgekit build --resume {held.out}`" if held.started else " and build again"
    return BuildDirError(f"cannot write '{exc.filename or held.out}': {exc.strerror}; {hint}{then}")


# --- the build ---------------------------------------------------------------------------------------------

def build(cfg: Config, out: Path, target_names: list[str] | None = None, *, resume: bool = False,
          log=print) -> dict:
    """Check everything, then run every stage into `out`: the model stages, export, verify and bundle, then run
    the bundles this machine can run, check every artifact with its target's pinned runtime (aarch64 also under
    qemu) and write report.json and report.html. Returns the report."""
    if target_names:  # DIR/config.yaml records what was built: --resume continues these targets, not the file's
        built_for = [str(Path(t).resolve()) if targets.is_path(t) else t for t in target_names]
        cfg = replace(cfg, build=replace(cfg.build, targets=built_for))
    check_out(cfg, out, resume)
    chosen, data = validate(cfg, target_names)
    with claim(out, resume) as held:
        try:
            return _build_in(held, Context(cfg, data, out, chosen), resume, log)
        except OSError as exc:
            error = _write_error(exc, held)
            if error is None:
                raise
            raise error from exc


def _build_in(held: Claim, ctx: Context, resume: bool, log) -> dict:
    if not resume:
        write_bytes(ctx.out / CONFIG_FILE, config.dump(config.absolute(ctx.cfg)).encode())
        held.config_written = True
    held.started = True
    run_stages(ctx, log)
    return json.loads((ctx.out / report.FILES[0]).read_text())
