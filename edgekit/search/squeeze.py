"""Squeezing a proposal into the latency budget before it is built: a search under a budget spends its trials on
recipes that can fit (NetAdapt, Yang et al. 2018, prunes to a latency budget by the same kind of prediction).

- MACs (`recipe_macs`): the recipe's model, built untrained, pruned by its own plan
  (edgekit.stages.prune.plan_rounds) and counted. With `scope: local` every ranking removes the same number of
  channels from each layer, so the count is the one its build reaches. With the accuracy guard on, the build may
  undo rounds, down to the unpruned model: the recipe costs between the two counts. Global ranking and
  sensitivity ratios depend on the trained weights, and a zoo student replaces the pruned model: those have no
  count (None).
- p90 (`predictor`): at both counts, by the line edgekit.search.latency.fit draws through the trials timed so far
  (MACs, p90; `timed_line`), or, for a target this machine does not run and no device times, by the search's own
  estimate of every trial (`estimated_line`, which follows MACs too).
- `within`: a proposal predicted over the budget by more than SLACK even at its fewest MACs is replaced by the
  recipe nearest it (fewest keys changed) not yet built that fits even at its most MACs, among the nearest the
  one predicted slowest (the most compute that fits): what a user squeezing a model by hand does, the least
  change that fits. A guarded recipe whose guard may keep it over the budget is not a squeeze's answer: the
  proof's first squeeze (2026-12-03) picked one, and its guard kept it unpruned at 44.1 M MACs (an architecture
  timed at 0.35-0.42 ms, about twice the budget).
- `harder`: the most accurate trial over the budget, pruned harder into it: its own trained model (only `prune.*`
  keys change, so the stage cache reuses its training), at the largest count of known cost predicted to fit that
  it was not yet built at, down the counts until one loses accuracy. Run after run, the proof's search lost to the
  default recipe squeezed by hand (a wide model pruned hard and distilled from itself) because TPE and the one-key
  refinements rarely stepped three keys at once; this is that squeeze, from the search's own best model.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

from edgekit import config
from edgekit.search import latency, space, trial

# a proposal predicted at most this much over the latency budget is built as proposed: the line is fitted to
# noisy timings, and the recipes near the budget are the ones worth measuring
SLACK = 0.3
_SHAPES: dict[str, tuple[tuple[int, ...], int]] = {}  # data section -> (sample shape, classes)
_MACS: dict[str, tuple[int, int]] = {}  # what recipe_macs counts -> (pruned MACs, unpruned MACs)


def _shape(cfg: config.Config) -> tuple[tuple[int, ...], int]:
    from edgekit.data import load_dataset

    key = repr(cfg.data)
    if key not in _SHAPES:
        ds = load_dataset(cfg)
        _SHAPES[key] = (tuple(ds.sample_shape), ds.num_classes)
    return _SHAPES[key]


def recipe_macs(cfg: config.Config) -> tuple[int, int] | None:
    """The fewest and the most MACs the model `cfg` builds can have: counted on its untrained model pruned by its
    plan, and, with the accuracy guard on, unpruned (the module's docstring says why); None when the count depends
    on trained weights."""
    from edgekit import metrics, models, targets
    from edgekit.stages import prune

    p = cfg.prune
    pruned = prune.enabled(cfg) and p.method != "magnitude"  # magnitude zeroes weights: no MACs removed
    if pruned and (p.scope == "global" or p.use_sensitivity) or cfg.distill.enabled and cfg.distill.student != \
            "pruned":
        return None
    # the ranking, the guard and the fine-tuning do not change a local plan's channel counts
    counted = replace(p, method="l1", accuracy_guard=False, finetune_epochs=0) if pruned else None
    key = repr((cfg.data, cfg.model, counted, cfg.build.targets))
    if key not in _MACS:
        shape, classes = _shape(cfg)
        model = models.build_model(cfg, shape, classes)
        unpruned = metrics.macs_and_params(model, shape)[0]
        if counted is not None:
            round_to, _ = prune.round_to_for(p, targets.get(list(cfg.build.targets)))
            plan = replace(prune.plan_from_config(counted), round_to=round_to)
            for _ in prune.plan_rounds(model, shape, classes, plan, p.steps):
                pass
        _MACS[key] = (metrics.macs_and_params(model, shape)[0], unpruned)
    fewest, unpruned = _MACS[key]
    return fewest, unpruned if pruned and p.accuracy_guard else fewest


def timed_line(timed: list[dict], field: str):
    """MACs -> p90 ms: the line edgekit.search.latency.fit draws through `timed`'s MACs and p90 (`field`), for
    their most common artifact; None when no trial is timed yet."""
    points = [latency.Point(t["artifact"], int(t["macs"]), float(t[field]), t["id"]) for t in timed
              if t["status"] == "ok" and t.get("macs") and t.get(field) is not None]
    if not points:
        return None
    names = [p.artifact for p in points]
    a, b, _, _ = latency.fit(points, max(set(names), key=names.count))
    return lambda macs: a + b * macs


def estimated_line(artifact: str, arch: str, points: list | None):
    """MACs -> p90 ms of a target this machine does not run and no device times: the search's own estimate
    (edgekit.search.latency.estimate, fitted to `points` from device results, else from MACs)."""
    return lambda macs: latency.estimate(macs, artifact, arch, points).p90_ms


def predictor(line, base: dict, base_dir: str, target: str, space_: dict):
    """A recipe's predicted p90 at its fewest and most MACs (choice indices -> (ms, ms), or None when its MACs are
    not counted), by `line` (MACs -> ms: timed_line or estimated_line). A recipe that cannot be counted (its
    model fails to build or prune) is not predicted: its trial says why."""

    def predict(point: dict) -> tuple[float, float] | None:
        try:
            cfg = config.from_dict(trial.trial_config(base, space.overrides_of(space_, point), target), base_dir)
            macs = recipe_macs(cfg)
        except Exception:  # noqa: BLE001 -- the trial's own build reports it
            return None
        return None if macs is None else (line(macs[0]), line(macs[1]))

    return predict


def within(point: dict, space_: dict, seen, predict, budget_ms: float) -> dict | None:
    """Choice indices of the recipe to build instead of `point` when `point` is predicted over `budget_ms` by more
    than SLACK even at its fewest MACs: the nearest (fewest keys changed) whose digest is not in `seen` and whose
    p90 is predicted within the budget even at its most MACs, the slowest of those; None when `point` may fit,
    is not predicted, or no such recipe is left."""
    own = predict(point)
    if own is None or own[0] <= budget_ms * (1 + SLACK):
        return None
    keys = list(space_)
    for distance in range(1, len(keys) + 1):
        fits = []
        for changed in itertools.combinations(keys, distance):
            others = [[i for i in range(len(space_[k])) if i != point[k]] for k in changed]
            for values in itertools.product(*others):
                near = {**point, **dict(zip(changed, values, strict=True))}
                if space.digest(space.overrides_of(space_, near)) in seen:
                    continue
                p90 = predict(near)
                if p90 is not None and p90[1] <= budget_ms:
                    fits.append((p90[1], near))
        if fits:
            return max(fits, key=lambda pn: pn[0])[1]
    return None


def harder(point: dict, space_: dict, points: dict, seen: dict, predict, budget_ms: float,
           landed: dict | None = None) -> dict | None:
    """Choice indices of `point` pruned harder into `budget_ms`: among the recipes that change only its `prune.*`
    keys, whose cost is known (fewest and most MACs equal: no accuracy guard), predicted within the budget and not
    yet built or building (`points`: digest -> choice indices of those), the slowest whose count none of them has
    yet; the fewest keys changed of those. A guarded recipe counts at the count its build reached (`landed`:
    digest -> p90 predicted at the MACs a finished trial measured), so a build whose guard kept every round is not
    built again unguarded; one still building counts nowhere. None when there is none, or when the last one built
    lost accuracy (`seen`: digest -> [accuracy, p90], None while building): of this model's recipes built within
    the budget, the smallest count is not the most accurate, so pruning it harder again would not pay."""
    keys = [k for k in space_ if k.startswith("prune.")]
    built, scored = set(), []
    for d, p in points.items():
        cost = predict(p) if p and all(p[k] == point[k] for k in space_ if k not in keys) else None
        count = None if not cost else cost[0] if cost[0] == cost[1] else (landed or {}).get(d)
        if count is not None:
            built.add(count)
            if seen.get(d) and seen[d][1] <= budget_ms:
                scored.append((count, seen[d][0]))
    if scored and min(scored)[1] < max(acc for _, acc in scored):
        return None
    best = None
    for values in itertools.product(*(range(len(space_[k])) for k in keys)):
        near = {**point, **dict(zip(keys, values, strict=True))}
        if space.digest(space.overrides_of(space_, near)) in points:
            continue
        cost = predict(near)
        if cost is None or cost[0] != cost[1] or cost[0] > budget_ms or cost[0] in built:
            continue
        rank = (cost[0], -sum(near[k] != point[k] for k in keys))
        if best is None or rank > best[0]:
            best = (rank, near)
    return best[1] if best else None
