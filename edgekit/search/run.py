"""`edgekit search`: trials on Ray Tune, sampled by Optuna, then a serialized timing phase, then the outputs.

Phase 1 builds the trials, `workers` at a time (one CPU each), never timing anything. Phase 2 measures each
finished trial's primary artifact with the on-device runner, one at a time, with nothing else running: on the
device over SSH with `--host`, else here for targets this machine runs (a trial near the latency budget more
often); other targets get an estimate labelled `estimated (...)` (edgekit.search.latency), and so does their
peak memory (edgekit.search.memory). With `search.objective: latency` and measured timings, phases 1 and 2
alternate in rounds of `workers` trials, so the sampler learns each round's measured p90 before it picks the
next. Phase 3 marks feasibility and the Pareto front and writes trials.json, trials.csv, pareto.png and
best.yaml.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from edgekit import config, quiet, stop, targets
from edgekit.errors import BuildDirError, ConfigError
from edgekit.files import write_bytes, write_json
from edgekit.search import latency, memory, pareto, space, squeeze, trial

TRIALS_DIR = "trials"
TRIAL_THREADS = 1  # torch threads of a trial (one CPU each); float sums in training depend on the thread count
CONFIG_FILE = "config.yaml"
TIMING_FILE = "timing.json"
# trials timed here are timed this many times, in rotating order, and keep the median p50 / p90: on a shared
# 2-core VM one timing of a 0.06-0.2 ms model moved by up to 40 % between two phases (benchmarks/search_proof.py)
TIMING_ROUNDS = 3
# a trial whose median p90 lies within EDGE of the latency budget (either side) is timed EDGE_ROUNDS more times,
# with the others near it, before its feasibility is decided: at 0.3-0.5 ms a median of 3 still moved by up to
# 27 % between two phases, enough to put the most accurate trial over the budget (benchmarks/search_proof.py)
EDGE, EDGE_ROUNDS = 0.3, 6
CSV_COLUMNS = ("id", "status", "reason", "feasible", "infeasible_because", "pareto", "accuracy", "latency_p50_ms",
               "latency_p90_ms", "latency_source", "estimate", "peak_rss_mb", "memory_source", "memory_estimate",
               "timed_rounds", "size_bytes", "macs", "cached_stages", "proposed_by", "seconds", "sha256")


def search(cfg: config.Config, target: str, out: Path, *, trials: int | None = None, budget: str | None = None,
           resume: bool = False, ray_address: str | None = None, workers: int | None = None, log=print,
           device: Device | None = None, device_results: list[str] | None = None, stage_cache: bool = True) -> dict:
    """Run (or continue) a search into `out`; return what trials.json holds. `device`: time the trials there
    (`--host`); `device_results`: `edgekit run` results files or folders to fit the latency estimate of a target
    this machine cannot run; `stage_cache=False` (`--no-stage-cache`): every trial builds every stage."""
    t0 = time.time()
    tgt = targets.get([target])[0]
    points = None
    if device_results and (device is not None or tgt.runs_here):
        log(f"search: --device-results not used: the trials are measured {'on the device' if device else 'here'}")
    elif device_results:  # read before the trials run: a bad file is an error now, not after an hour
        points = latency.load(device_results, tgt.name)
    if device is not None:
        device.check(tgt)
    if ray_address:
        check_address(ray_address)
    target_arg = str(Path(target).resolve()) if targets.is_path(target) else target
    budgets = pareto.parse_budget(budget, {"latency_ms": tgt.latency_ms, "memory_mb": tgt.memory_mb})
    total = trials if trials is not None else cfg.search.trials
    if total < 1:
        raise ConfigError(f"--trials is {total}; give at least 1")
    _check_for(tgt, cfg.search.space)
    base = config.to_dict(config.absolute(cfg))
    with _claimed(out, base, resume):
        finished = load_trials(out)
        todo = total - len(finished)
        workers = workers or os.cpu_count() or 1
        cost = LATENCY if cfg.search.objective == "latency" and (device is not None or tgt.runs_here) else "macs"
        rounds = f", in rounds of {workers} each timed before the next is sampled" if cost == LATENCY else ""
        estimated = None if device is not None or tgt.runs_here else \
            squeeze.estimated_line(targets.primary(tgt, cfg.export.primary).key, tgt.arch, points)  # as time_trials
        log(f"search: {len(finished)} trials finished earlier, {max(todo, 0)} to run, {workers} at a time{rounds}, "
            f"target {tgt.name}, budgets {', '.join(f'{k}={v:g}' for k, v in budgets.items() if v) or 'none'}; the "
            f"sampler maximises accuracy and minimises {'the measured p90' if cost == LATENCY else 'MACs'}")
        t1, timing_s = time.time(), 0.0
        with ray_session(workers, ray_address) if todo > 0 else contextlib.nullcontext():
            while todo > 0:
                n, known = (min(workers, todo), load_trials(out)) if cost == LATENCY else (todo, finished)
                if cost == LATENCY:  # what the sampler learns from: every finished trial's measured p90
                    t = time.time()
                    time_trials(known, out, tgt, log, device, points, budgets["latency_ms"])
                    timing_s += time.time() - t
                tune_trials(base, cfg.base_dir, cfg.search, target_arg, out, n, known, workers, log, stage_cache, cost,
                            budgets, estimated)
                todo -= n
        t2 = time.time()
        done = load_trials(out)
        time_trials(done, out, tgt, log, device, points, budgets["latency_ms"])
        for source, how in sorted({(t["latency_source"], t["estimate"]) for t in done if t.get("estimate")}):
            log(f"latency {source}: {how}")
        for source, how in sorted({(t["memory_source"], t["memory_estimate"]) for t in done
                                   if t.get("memory_estimate")}):
            log(f"peak memory {source}: {how}")
        recommended = pareto.mark(done, budgets)
        result = {"target": tgt.name, "target_arg": target_arg, "budgets": budgets, "space": cfg.search.space,
                  "workers": workers, "ray_address": ray_address, "stage_cache": stage_cache,
                  "trials_run_now": len(done) - len(finished),
                  "sampler_objectives": ["accuracy", cost],
                  "seconds": {"search": round(t2 - t1 - timing_s, 1), "timing": round(time.time() - t2 + timing_s, 1),
                              "total": round(time.time() - t0, 1)},
                  "recommended": recommended["id"] if recommended else None, "trials": done}
        write_outputs(out, result, base, cfg.base_dir, target_arg, recommended)
        return result


def _check_for(tgt: targets.Target, space_: dict) -> None:
    """Choices `tgt` cannot build, refused before any trial (each trial would fail on them): export.primary."""
    for choice in space_.get("export.primary", []):
        targets.primary(tgt, choice)


@contextlib.contextmanager
def _claimed(out: Path, base: dict, resume: bool):
    """`out` claimed for this search (_claim) and locked while it writes there (_lock); the lock is taken first
    where a search may hold it, so a running search is what a second one is told of."""
    from edgekit.pipeline import LOCK_FILE

    lock = _lock(out) if (out / LOCK_FILE).is_file() else None
    try:
        _claim(out, base, resume)
        lock = _lock(out) if lock is None else lock
        yield
    finally:
        if lock is not None:
            os.close(lock)


def _claim(out: Path, base: dict, resume: bool) -> None:
    saved = out / CONFIG_FILE
    if resume:
        if not saved.is_file():
            raise BuildDirError(f"'{out}' holds no search to resume (no {CONFIG_FILE}); start one without --resume")
        old = yaml_load(saved)
        changed = [k for k in base if k != "search" and base[k] != old.get(k)]
        if changed or base["search"]["space"] != old.get("search", {}).get("space"):
            raise BuildDirError(f"--resume: the config differs from the one '{out}' was searched with in "
                                f"{', '.join(changed) or 'search.space'}; resume with the same config or pick "
                                "another --out")
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BuildDirError(f"'{out}' is not a new or empty folder; pick another --out, or --resume a search there")
    out.mkdir(parents=True, exist_ok=True)
    write_bytes(saved, yaml.safe_dump(base, sort_keys=False).encode())


def _lock(out: Path) -> int:
    """An flock on `out`'s lock file (a build's: edgekit.pipeline.LOCK_FILE), or a one-line error when another
    search or a build holds it: two searches in one folder would each remove the other's unfinished trials."""
    import fcntl

    from edgekit.pipeline import LOCK_FILE, busy

    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise busy(out) from None
    return fd


def yaml_load(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def load_trials(out: Path) -> list[dict]:
    """The finished trials (their trial.json, written last); an unfinished trial's folder is removed."""
    found = []
    root = out / TRIALS_DIR
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        path = folder / trial.TRIAL_FILE
        if path.is_file():
            found.append(json.loads(path.read_text()))
        elif folder.is_dir():
            shutil.rmtree(folder)
    return sorted(found, key=lambda t: (t["started"], t["id"]))


# --- phase 1: the trials, on Ray Tune with Optuna's sampler -------------------------------------------------

def _trainable(params: dict, *, base: dict, base_dir: str, space_: dict, target: str, trials_dir: str,
               cache_dir: str | None, done: dict, stage_cache: bool = True) -> None:
    import torch
    from ray import tune

    torch.set_num_threads(TRIAL_THREADS)  # what best.yaml's header says to rebuild with (bit-identical weights)
    overrides = space.overrides_of(space_, params)
    trial_id = tune.get_context().get_trial_id()
    earlier = done.get(space.digest(overrides))
    folder = Path(trials_dir) / trial_id
    if earlier is not None:  # the sampler proposed a recipe a finished trial built: reuse its result
        record = {**earlier, "id": trial_id, "status": "repeat", "repeat_of": earlier["id"], "started": time.time()}
        folder.mkdir(parents=True, exist_ok=True)
        (folder / trial.TRIAL_FILE).write_text(json.dumps(record, indent=1))
    else:
        record = trial.run(base, base_dir, overrides, target, folder, trial_id, cache_dir, stage_cache,
                           params.get(PROPOSED_BY))
    ok = record["status"] == "ok" or record.get("repeat_of") and earlier.get("status") == "ok"
    tune.report({"accuracy": float(record["accuracy"]) if ok else 0.0,  # latency is known only once timed
                 "macs": float(record.get("macs") or 0) if ok else 1e18, "status": record["status"],
                 "reason": record.get("reason") or ""})


def _sampler(name: str, seed: int):
    import optuna

    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


LATENCY = "latency_p90_ms"  # the trial field the sampler minimises with search.objective: latency


def _values(t: dict, cost: str, budget_ms: float | None = None) -> list[float] | None:
    """A finished trial's objective values for Optuna (accuracy, then MACs or the timed p90, a p90 within
    `budget_ms` counting as the budget: the user asked for the most accurate model that fits, not the fastest);
    None: it failed, or it has no value for `cost` (a trial's p90 before it is timed)."""
    if t["status"] != "ok" or t.get(cost) is None:
        return None
    return [float(t["accuracy"]), max(float(t[cost]), budget_ms or 0.0)]


def _constraints(t: dict, budgets: dict | None) -> dict:
    """A finished trial's Optuna constraints: for each budget it is measured against, the value's excess over it
    (relative; <= 0: within). TPE and NSGA-II rank a trial over a budget below every trial within it, the
    further over the lower."""
    values = pareto.measured(t) if t["status"] == "ok" else {}
    return {key: values[key] / b - 1 for key, b in (budgets or {}).items() if b and values.get(key) is not None}


def _budget_ms(cost: str, budgets: dict | None) -> float | None:
    """The latency budget the sampler's cost is compared with: only a measured p90 is."""
    return (budgets or {}).get("latency_ms") if cost == LATENCY else None


def _study(search_cfg, finished: list[dict], base: dict, cost: str = "macs", budgets: dict | None = None):
    """An Optuna study holding the finished trials (so the sampler knows them, after --resume or, minimising
    latency, the round before), each with its objective values (`_values`) and budget constraints
    (`_constraints`), and, first in line, the config's own recipe when no trial built it yet."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="edgekit", directions=["maximize", "minimize"],
                                sampler=_sampler(search_cfg.sampler, search_cfg.seed))
    dists = {k: optuna.distributions.CategoricalDistribution(list(range(len(c))))
             for k, c in search_cfg.space.items()}
    for t in finished:
        if t["status"] == "repeat" or set(t["overrides"]) != set(dists):
            continue
        params = {k: search_cfg.space[k].index(v) for k, v in t["overrides"].items() if v in search_cfg.space[k]}
        if len(params) != len(dists):
            continue
        values = _values(t, cost, _budget_ms(cost, budgets))
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=dists, values=values,
            constraints=_constraints(t, budgets) if values else None,
            state=optuna.trial.TrialState.COMPLETE if values else optuna.trial.TrialState.FAIL))
    point = space.base_point(search_cfg.space, base)
    digests = {t["digest"] for t in finished}
    if search_cfg.base_first and point is not None and \
            space.digest(space.overrides_of(search_cfg.space, point)) not in digests:
        study.enqueue_trial(point)
    return storage


@contextlib.contextmanager
def ray_session(workers: int, address: str | None):
    """Ray for the whole search (every round): joined at `address`, else started embedded with `workers` CPUs
    and shut down at the end. One already initialised (a caller's) is used and left running."""
    level = quiet.ray(embedded=not address)
    import ray

    owned = not ray.is_initialized()
    if owned and address:
        join(ray, address, level)
    elif owned:
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
                 logging_level=level)
    # ray.init installs a handler that answers SIGTERM (timeout, kill, a cancelled CI job) with a C++ stack dump
    # and exit 1; stopped that way, the search ends as on Ctrl-C: one line with the command that resumes it
    try:
        with stop.handled(signal.SIGTERM):
            yield
    finally:
        if owned:
            ray.shutdown()


def tune_trials(base: dict, base_dir: str, search_cfg, target: str, out: Path, n: int, finished: list[dict],
                workers: int, log, stage_cache: bool = True, cost: str = "macs",
                budgets: dict | None = None, estimated=None) -> None:
    """`n` trials on the Ray of ray_session, `workers` at a time, sampled knowing `finished` (by `cost`, and
    `budgets` as constraints; the refinements look at the latency budget when the cost is the measured p90:
    run.refinement). Proposals are squeezed into the latency budget (squeeze.within) by the line through the timed
    trials, or for a target only estimated by `estimated` (squeeze.estimated_line). The sampler's seed moves on
    with each finished trial: a round (or --resume) does not replay the random draws of the one before, which
    would all be repeats."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    missing = space.outside(search_cfg.space, base)
    if search_cfg.base_first and missing and not finished:
        log(f"[search] base_first: the config's own recipe is outside the space ({'; '.join(missing)}), so every "
            "trial is sampled; add those values to search.space to have it as the reference trial")
    line = squeeze.timed_line(finished, cost) if _budget_ms(cost, budgets) else estimated
    predict = squeeze.predictor(line, base, base_dir, target, search_cfg.space) \
        if line and (budgets or {}).get("latency_ms") else None
    landed = {t["digest"]: line(int(t["macs"])) for t in finished if predict and t["status"] == "ok" and t.get("macs")}
    algo = _searcher(OptunaSearch, search_cfg.space, finished, cost, search_cfg.seed + len(finished),
                     search_cfg.refine, budgets, predict, landed)(
        metric=["accuracy", "macs"], mode=["max", "min"], storage=_study(search_cfg, finished, base, cost, budgets),
        study_name="edgekit", sampler=_sampler(search_cfg.sampler, search_cfg.seed + len(finished)))
    done = {t["digest"]: t for t in finished if t["status"] != "repeat"}
    fn = tune.with_parameters(_trainable, base=base, base_dir=base_dir, space_=search_cfg.space, target=target,
                              trials_dir=str((out / TRIALS_DIR).resolve()),
                              cache_dir=os.environ.get("EDGEKIT_STAGE_CACHE"), done=done, stage_cache=stage_cache)
    tuner = tune.Tuner(
        tune.with_resources(fn, {"cpu": 1}),
        param_space={k: tune.choice(list(range(len(c)))) for k, c in search_cfg.space.items()},
        tune_config=tune.TuneConfig(search_alg=algo, num_samples=n, max_concurrent_trials=workers),
        run_config=tune.RunConfig(storage_path=str((out / ".ray").resolve()), name="tune", verbose=0,
                                  callbacks=[_Progress(log)]),
    )
    # Ray Tune catches Ctrl-C, ends the trials and returns as if the round were done: the search would then
    # present a partial result as its answer; without its handler the interrupt reaches the command
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    tuner.fit()


CONNECT_TIMEOUT_S = 5.0


def check_address(address: str) -> None:
    """Before anything is written: a `--ray-address` where nothing answers is a one-line error at once, not a hang
    in Ray's connection retries (`auto` is Ray's own look-up of a cluster on this machine)."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray-address '{address}' is not HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ConfigError(f"--ray-address {address}: nothing answers there ({exc.strerror or exc}); start the "
                          f"cluster (`ray start --head --port={port}`) or give its head's address") from None


def join(ray, address: str, level: int) -> None:
    """Join the Ray cluster at `--ray-address`; Ray's failure to is one line (its retries' log lines, from C++,
    are kept off the terminal)."""
    try:
        with quiet.silenced():
            ray.init(address=address, log_to_driver=False, logging_level=level)
    except (ConnectionError, RuntimeError, TimeoutError, ValueError) as exc:  # what ray.init raises for these
        text = " ".join(str(exc).split())[:200]
        raise ConfigError(f"--ray-address {address}: cannot join a Ray cluster there ({type(exc).__name__}: "
                          f"{text}); check the address, that this machine has the cluster's Ray version and, for "
                          "a cluster with token auth, its token (RAY_AUTH_TOKEN or ~/.ray/auth_token)") from None


REPEAT_TRIES = 8  # proposals asked of the sampler for a recipe not yet built before one is drawn at random
RANDOM_TRIES = 1000  # random draws for a recipe not yet built, in a space too large to list (ENUMERATE)
ENUMERATE = 100_000  # a space of at most this many recipes is listed to find those not yet built


def unseen_point(space_: dict, seen, rng) -> dict | None:
    """Choice indices of a recipe whose digest is not in `seen`, drawn at random; None when every one is."""
    import itertools
    import math

    keys = list(space_)

    def digest(idx):
        return space.digest(space.overrides_of(space_, dict(zip(keys, idx, strict=True))))
    if math.prod(len(c) for c in space_.values()) <= ENUMERATE:
        left = [idx for idx in itertools.product(*(range(len(space_[k])) for k in keys)) if digest(idx) not in seen]
        return dict(zip(keys, rng.choice(left), strict=True)) if left else None
    for _ in range(RANDOM_TRIES):
        idx = tuple(rng.randrange(len(space_[k])) for k in keys)
        if digest(idx) not in seen:
            return dict(zip(keys, idx, strict=True))
    return None


def _ask_again(searcher, ask, trial_id: str, digest: str, fresh: dict | None = None) -> tuple[dict, str]:
    """Tell Optuna the recipe `digest` it proposed (its earlier result for a repeat; failed when it has none) and
    ask again, for `fresh` when given; the new proposal and its digest."""
    import optuna

    values = searcher.seen.get(digest)
    state = optuna.trial.TrialState.COMPLETE if values else optuna.trial.TrialState.FAIL
    told = searcher._ot_trials.pop(trial_id)
    for key, excess in searcher.limits.get(digest, {}).items() if values else ():
        told.set_constraint(key, excess)
    searcher._ot_study.tell(told, values, state=state)
    if fresh is not None:
        searcher._ot_study.enqueue_trial(fresh)  # the next ask returns it
    params = ask(trial_id)
    return params, space.digest(space.overrides_of(searcher.space_, params))


PROPOSED_BY = "_proposed_by"  # not a space key: what the searcher adds to a trial's parameters (trial.json)


def _point(space_: dict, overrides: dict) -> dict | None:
    """A recipe's choice indices; None when one of its values is not among the space's choices (a changed space)."""
    if set(overrides) != set(space_) or any(v not in space_[k] for k, v in overrides.items()):
        return None
    return {k: space_[k].index(v) for k, v in overrides.items()}


def incumbent(known: list[tuple[dict, list[float]]], budget_ms: float | None, rng, over: bool = False) -> dict | None:
    """The recipe to refine among `known` (choice indices, [accuracy, cost]). With `budget_ms` (the cost being the
    measured p90): the most accurate within it, or with `over` the most accurate over it (a neighbour may make it
    fit, as a user squeezes a model by hand); the other side when that one is empty. Else one of the Pareto front
    at random."""
    if budget_ms:
        sides = [[pv for pv in known if (pv[1][1] > budget_ms) == side] for side in (over, not over)]
        side = next((s for s in sides if s), None)
        if side:
            return max(side, key=lambda pv: pv[1][0])[0]
    front = [p for p, v in known if not any(w[0] >= v[0] and w[1] <= v[1] and w != v for _, w in known)]
    return rng.choice(front) if front else None


def neighbour(space_: dict, point: dict, seen, rng) -> dict | None:
    """Choice indices of a recipe one key away from `point` whose digest is not in `seen`, at random; None when
    every one is built or building."""
    near = [{**point, k: i} for k in space_ for i in range(len(space_[k])) if i != point[k]]
    near = [p for p in near if space.digest(space.overrides_of(space_, p)) not in seen]
    return rng.choice(near) if near else None


def refinement(k: int, refine: float, space_: dict, points: dict, seen: dict, budget_ms: float | None,
               rng, predict=None, landed: dict | None = None) -> tuple[dict, str] | None:
    """For the search's `k`-th trial (from 0): a recipe near the best so far when this trial is one of the share
    `refine` that refine (evenly spread), with how it was made; else None. Refinements alternate between the most
    accurate trial within the budget and the most accurate over it; each changes one key of it ("refine"), except
    that with `predict` (squeeze.predictor) the one over the budget is pruned harder into it when it can be
    (squeeze.harder, "refine+squeeze"). `points` / `seen`: choice indices / values by digest; `landed`: p90
    predicted at the MACs each finished trial measured, by digest."""
    import math

    if math.floor((k + 1) * refine) <= math.floor(k * refine):
        return None
    over = math.floor((k + 1) * refine) % 2 == 0  # the 1st, 3rd, ... refinement: within the budget
    known = {d: v for d, v in seen.items() if v and points.get(d)}
    best = incumbent([(points[d], v) for d, v in known.items()], budget_ms, rng, over)
    if best is None:
        return None
    if predict and budget_ms and any(points[d] == best and v[1] > budget_ms for d, v in known.items()):
        harder = squeeze.harder(best, space_, points, seen, predict, budget_ms, landed)
        if harder:
            return harder, "refine+squeeze"
    near = neighbour(space_, best, seen, rng)
    return (near, "refine") if near else None


def _unseen(searcher, ask, trial_id: str) -> tuple[dict, str]:
    """The sampler's proposal, asked again while it is a recipe built or building, REPEAT_TRIES times; then one
    not yet built, drawn at random; when there is none, the repeat."""
    params = ask(trial_id)
    digest = space.digest(space.overrides_of(searcher.space_, params))
    for _ in range(REPEAT_TRIES):  # the sampler's own proposals
        if digest not in searcher.seen:
            return params, digest
        params, digest = _ask_again(searcher, ask, trial_id, digest)
    if digest in searcher.seen:  # a peaked sampler: a recipe not yet built, at random (none: a repeat)
        fresh = unseen_point(searcher.space_, searcher.seen, searcher.rng)
        if fresh is not None:
            params, digest = _ask_again(searcher, ask, trial_id, digest, fresh)
    return params, digest


def _searcher(base_cls, space_: dict, finished: list[dict], cost: str = "macs", seed: int = 0, refine: float = 0.0,
              budgets: dict | None = None, predict=None, landed: dict | None = None):
    """OptunaSearch that does not hand out a recipe already built or building: a repeat proposal is told to Optuna at
    once (with the earlier result and its budget constraints, when there is one) and Optuna is asked again; after
    REPEAT_TRIES repeats, a recipe not yet built is drawn at random (seeded by `seed`) and given to Optuna as the
    next proposal. TPE's proposal is the best of its candidates, so with a peaked model it proposed the same recipe
    65 times in a row, and two workers built it side by side. Only when every recipe is built or building is a
    repeat let through; the trial then reuses the earlier result (status: repeat). Minimising latency, a trial's
    result is not told at all: it has no p90 until it is timed, and the next round's study gets it from `finished`.
    A share `refine` of the trials (every other one at 0.5, counted over the whole search) is a recipe one key away
    from a good trial so far (`refinement`): the sampler's proposal is replaced by it. With `predict` (a recipe's
    predicted p90: squeeze.predictor) and a latency budget, a proposal predicted well over the budget is replaced by
    the nearest recipe predicted to fit (squeeze.within; proposed_by gains "+squeeze"): Optuna's proposal is told
    failed, and the recipe built is asked for, so a result told to Optuna (minimising MACs) is the recipe's own.
    `landed` (digest -> p90 predicted at a finished trial's measured MACs) tells squeeze.harder where a guarded
    build ended. Uses OptunaSearch's `_ot_study` / `_ot_trials` (ray 2.60)."""
    import random

    budget_ms = _budget_ms(cost, budgets)
    squeeze_ms = (budgets or {}).get("latency_ms")  # measured or estimated: `predict` says which

    class NoRepeats(base_cls):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.seen = {t["digest"]: _values(t, cost, budget_ms) for t in finished if t["status"] != "repeat"}
            self.limits = {t["digest"]: _constraints(t, budgets) for t in finished if t["status"] != "repeat"}
            self.points = {t["digest"]: _point(space_, t["overrides"]) for t in finished if t["status"] != "repeat"}
            self.digests = {}
            self.rng = random.Random(seed)
            self.space_ = space_
            self.count = len(finished)  # trials of the search proposed before this one

        def suggest(self, trial_id):
            self.count += 1
            near, how = refinement(self.count - 1, refine, space_, self.points, self.seen, budget_ms, self.rng,
                                   predict, landed) or (None, None)
            if near:
                self._ot_study.enqueue_trial(near)  # the ask below returns it
            params, digest = _unseen(self, super().suggest, trial_id)
            point = {key: int(params[key]) for key in space_}
            by = how if near and point == near else "sampler"
            fits = squeeze.within(point, space_, self.seen, predict, squeeze_ms) if predict and squeeze_ms else None
            if fits:  # Optuna is told its proposal failed (it learns nothing from it) and handed the squeeze's
                params, digest = _ask_again(self, super().suggest, trial_id, digest, fits)
                point, by = {key: int(params[key]) for key in space_}, f"{by}+squeeze"
            self.seen.setdefault(digest, None)
            self.points[digest] = point
            self.digests[trial_id] = digest
            return {**point, PROPOSED_BY: by}

        def on_trial_complete(self, trial_id, result=None, error=False):
            if cost != "macs":  # its p90 is not known yet: the next round's study has it
                return
            if result and result.get("status") == "ok" and trial_id in self.digests:
                self.seen[self.digests[trial_id]] = [result["accuracy"], result["macs"]]
            super().on_trial_complete(trial_id, result, error)

    return NoRepeats


class _Progress:
    """A Tune callback: one line per finished trial."""

    def __new__(cls, log):
        from ray.tune import Callback

        class Progress(Callback):
            def on_trial_complete(self, iteration, trials, trial, **info):
                r = trial.last_result or {}
                how = r.get("reason") or f"accuracy {r.get('accuracy', 0):.4f}"  # a failed trial has no accuracy
                log(f"  trial {trial.trial_id}: {r.get('status', '?')}, {how}")

            def on_trial_error(self, iteration, trials, trial, **info):
                log(f"  trial {trial.trial_id}: crashed ({trial.error_file})")

        return Progress()


# --- phase 2: timing, one trial at a time --------------------------------------------------------------------

def time_trials(trials: list[dict], out: Path, tgt: targets.Target, log, device: Device | None = None,
                points: list | None = None, budget_ms: float | None = None) -> None:
    """Each finished trial's p90 latency and peak RSS: measured on the device over SSH (`device`), else here when
    this machine runs the target (and timed more when near `budget_ms`: time_edge), else estimated (fitted to
    `points` from device results, else from MACs and the runtime's memory rule)."""
    ok = [t for t in trials if t["status"] == "ok"]
    if device is not None:  # one at a time; a trial with the same bytes as one timed takes its timing
        while todo := shared(ok, out, device.timing_file):
            log(f"  timing trial {todo[0]['id']} ({todo[0]['artifact']}) on {device.conn.host} ...")
            device.measure(Path(todo[0]["bundle"]), todo[0]["artifact"], out / TRIALS_DIR / todo[0]["id"] /
                           device.timing_file)
    elif tgt.runs_here:
        time_here(shared(ok, out), out, log)
        time_edge(ok, out, budget_ms, log)
    for t in ok:
        if device is not None or tgt.runs_here:
            saved = out / TRIALS_DIR / t["id"] / (device.timing_file if device else TIMING_FILE)
            result = json.loads(saved.read_text())
            where = f"measured on {device.conn.host}" if device else "measured here"
            t.update(latency_p50_ms=result["latency_ms"]["p50"], latency_p90_ms=result["latency_ms"]["p90"],
                     peak_rss_mb=result["peak_rss_mb"], measured_accuracy=result.get("accuracy"),
                     latency_source=where, estimate=None, memory_source=where, memory_estimate=None,
                     timed_rounds=len(result.get("timing_rounds", [])) or 1)
        else:
            guess = latency.estimate(t.get("macs"), t["artifact"], tgt.arch, points)
            peak = memory.estimate(*_artifact_file(t), points)
            t.update(latency_p50_ms=None, latency_p90_ms=guess.p90_ms, peak_rss_mb=peak.peak_rss_mb,
                     measured_accuracy=None, latency_source=guess.source, estimate=guess.how,
                     memory_source=peak.source, memory_estimate=peak.how, timed_rounds=None)


def time_edge(trials: list[dict], out: Path, budget_ms: float | None, log) -> None:
    """Trials timed here whose median p90 lies within EDGE of `budget_ms` get EDGE_ROUNDS more rounds, timed
    together in rotating order, and keep the median over all their rounds: whether a trial fits is decided on
    TIMING_ROUNDS + EDGE_ROUNDS timings, not on one phase's three. A trial is timed more only once."""
    if not budget_ms:
        return
    near = []
    for t in trials:
        saved = json.loads((out / TRIALS_DIR / t["id"] / TIMING_FILE).read_text())
        if abs(saved["latency_ms"]["p90"] - budget_ms) <= EDGE * budget_ms and \
                len(_rounds(saved)) < TIMING_ROUNDS + EDGE_ROUNDS:
            near.append(t)
    if near:
        log(f"  {len(near)} trial(s) within {EDGE:.0%} of the {budget_ms:g} ms budget: {EDGE_ROUNDS} more timing "
            "rounds before feasibility is decided")
        time_here(near, out, log, EDGE_ROUNDS, add=True)


def shared(trials: list[dict], out: Path, name: str = TIMING_FILE) -> list[dict]:
    """The trials of `trials` still to time (into their `name`: here, or a device's file): one whose artifact is
    the same bytes as a trial timed already (in an earlier round, or before --resume) takes that timing
    (`same_bytes_as`) instead of being timed apart from it, which would let noise put one copy within the budget
    and the other over it."""
    timed: dict[tuple, tuple[str, Path]] = {}
    for t in trials:
        path = out / TRIALS_DIR / t["id"] / name
        if t.get("sha256") and path.is_file():
            timed.setdefault((t["sha256"], t["artifact"]), (t["id"], path))
    todo = []
    for t in trials:
        path = out / TRIALS_DIR / t["id"] / name
        if path.is_file():
            continue
        source = timed.get((t["sha256"], t["artifact"])) if t.get("sha256") else None
        if source is None:
            todo.append(t)
            continue
        record = json.loads(source[1].read_text())
        write_json(path, {**record, "same_bytes_as": record.get("same_bytes_as") or source[0]})
    return todo


def time_here(trials: list[dict], out: Path, log, rounds: int = TIMING_ROUNDS, add: bool = False) -> None:
    """Time each trial's primary artifact `rounds` times, the trials in rotating order (a slow spell of the
    machine falls on all of them), into its TIMING_FILE: the first round's result with the median p50 / p90 over
    the rounds, the largest peak RSS, and every round's latencies (`timing_rounds`); with `add`, over these
    rounds and those the file holds already. Trials whose artifacts are the same bytes are timed once and share
    the result (`same_bytes_as`): timing noise must not rank one copy above another."""
    import statistics
    import tempfile

    from edgekit.device import measure

    groups: dict[tuple, list[dict]] = {}
    for t in trials:
        groups.setdefault((t.get("sha256") or t["id"], t["artifact"]), []).append(t)
    timed = [members[0] for members in groups.values()]
    runs: dict[str, list[dict]] = {t["id"]: [] for t in timed}
    with tempfile.TemporaryDirectory(prefix="edgekit-timing-") as tmp:
        for r in range(rounds if timed else 0):
            log(f"  timing {len(timed)} trial(s) here, round {r + 1} of {rounds}{' more' if add else ''} ...")
            for t in timed[r % len(timed):] + timed[:r % len(timed)]:
                runs[t["id"]].append(measure.run_bundle(Path(t["bundle"]), Path(tmp) / f"{t['id']}-{r}.json",
                                                        [t["artifact"]], log=lambda _: None))
    for first_trial, *copies in groups.values():
        path = out / TRIALS_DIR / first_trial["id"] / TIMING_FILE
        before = json.loads(path.read_text()) if add else None
        got = runs[first_trial["id"]]
        first = before or got[0]
        latencies = (_rounds(before) if before else []) + [x["latency_ms"] for x in got]
        median = {k: statistics.median(x[k] for x in latencies) for k in ("p50", "p90")}
        peak = max([x["peak_rss_mb"] for x in got] + ([before["peak_rss_mb"]] if before else []))
        kept = {"latency_ms": {**first["latency_ms"], **median}, "peak_rss_mb": peak}
        artifacts = {name: {**r, **kept} for name, r in first["artifacts"].items()}  # the one artifact timed
        record = {**first, **kept, "artifacts": artifacts, "timing_rounds": latencies}
        record.pop("same_bytes_as", None)
        write_json(path, record)
        for t in copies:
            write_json(out / TRIALS_DIR / t["id"] / TIMING_FILE, {**record, "same_bytes_as": first_trial["id"]})


def _rounds(timing: dict) -> list[dict]:
    """A TIMING_FILE's rounds; a file from an edgekit before rounds (a resumed older search) holds one."""
    return timing.get("timing_rounds") or [timing["latency_ms"]]


def _artifact_file(trial: dict) -> tuple[Path, str]:
    """A built trial's primary artifact file and the runtime the target runs it with (its bundle's manifest)."""
    bundle = Path(trial["bundle"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    entry = next(a for a in manifest["artifacts"] if a["name"] == trial["artifact"])
    return bundle / entry["file"], entry["runtime"]


@dataclass
class Device:
    """Where `--host` times the trials: `edgekit run --host`'s connection and options. A venv made by --setup
    on the first trial is used by the later ones."""

    conn: object  # edgekit.device.remote.Connection
    python: str = "python3"
    setup: bool = False

    @property
    def timing_file(self) -> str:
        from edgekit.device import remote

        return remote.results_path(Path("."), self.conn).name  # results-HOST.json: one file per device

    def check(self, tgt: targets.Target) -> None:
        """Reach the device before any trial runs: a wrong host, key or architecture is an error now."""
        from edgekit.device import remote
        from edgekit.errors import RemoteError

        info = remote.probe(self.conn, self.python)
        arch = remote.ARCH_ALIASES.get(info["machine"], info["machine"])
        if arch != tgt.arch:
            raise RemoteError(f"{self.conn.host} is {arch} and target {tgt.name} is {tgt.arch}; search for the "
                              "device's target, or pass the host of a device of this one")

    def measure(self, bundle: Path, artifact: str, out: Path) -> None:
        from edgekit.device import remote

        data, _ = remote.run_remote(bundle, self.conn, python=self.python, setup=self.setup, artifacts=[artifact],
                                    out=out, log=lambda _: None)
        self.python, self.setup = data["remote"]["python"], False


# --- phase 3: outputs -----------------------------------------------------------------------------------------

def write_outputs(out: Path, result: dict, base: dict, base_dir: str, target: str, best: dict | None) -> None:
    write_json(out / "trials.json", result)
    keys = list(result["space"])
    with open(out / "trials.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*CSV_COLUMNS, *keys])
        for t in result["trials"]:
            row = [t.get(c) for c in CSV_COLUMNS]
            row = [";".join(map(str, v)) if isinstance(v, list) else v for v in row]
            w.writerow([*row, *(_cell(t["overrides"].get(k)) for k in keys)])
    pareto.plot(result["trials"], result["budgets"], best, out / "pareto.png")
    (out / "best.yaml").unlink(missing_ok=True)
    if best is not None:
        write_bytes(out / "best.yaml", best_yaml(base, base_dir, best["overrides"], target).encode())


def _cell(value) -> object:
    """A choice as a CSV cell: a number or a string as itself (the csv module quotes what needs it), a list or
    mapping as JSON."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def best_yaml(base: dict, base_dir: str, overrides: dict, target: str) -> str:
    """A plain config that `edgekit build` turns into the recommended trial's artifact."""
    raw = trial.trial_config(base, overrides, target)
    raw["build"]["run_local"] = base.get("build", {}).get("run_local", True)
    cfg = config.from_dict(raw, base_dir)
    data = config.to_dict(config.absolute(cfg))
    data.pop("search")
    head = (f"# edgekit search: the recommended trial ({', '.join(f'{k}={v}' for k, v in overrides.items())})\n"
            f"# its weights were trained on {TRIAL_THREADS} torch thread; the same artifact, bit for bit:\n"
            f"#   OMP_NUM_THREADS={TRIAL_THREADS} edgekit build best.yaml  (other thread counts round float sums "
            "in another order: the same recipe, slightly different weights)\n")
    return head + yaml.safe_dump(data, sort_keys=False)
