"""Structured pruning: physically remove channels (torch-pruning's dependency graph), then fine-tune.

Methods (a registry; `prune.method`):
- l1:       filter L1 norm of the group's first conv (Li et al. 2017)
- slimming: Network Slimming (Liu et al. 2017): sparsity training with an L1 penalty on BatchNorm scales,
            then channels ranked by |gamma| (with `scope: global`, one threshold across all layers)
- taylor:   first-order Taylor importance |w * dL/dw| of the group (Molchanov et al. 2019)
- random:   the baseline every method must beat at the same MACs

Targets: `target_macs` / `target_params` (fraction of the unpruned model to keep at most) are met by calling
torch-pruning's `step()` in small increments until the count is under the target (torch-pruning has no
MACs target of its own); otherwise `ratio` of the channels of every prunable layer is removed. `steps: N`
spreads the target over N rounds with fine-tuning between them; a round that removes no channel (rounding to
`round_to` kept every count, or an earlier round already passed this round's share) is not fine-tuned, and the
later rounds still prune on to the full target. Residual, depthwise and concatenation couplings are pruned as
one group, so the pruned model still runs and exports.

Accuracy guard (`accuracy_guard`, on by default): after each round's fine-tuning the validation accuracy is
compared with the unpruned model's; the first round that loses more than `max_loss_pp` (default: the
strictest chosen target's `accuracy_tolerance_pp`) is undone and pruning stops there, so the target is an
upper bound and the tolerance the limit. `metrics.json` says which round was kept and why (`kept`).

Rounding (`round_to`): channel counts are kept multiples of it; unset, the chosen targets' `round_to` (what
their int8 kernels like) is used, their least common multiple when they differ.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from edgekit import metrics, tolerance, training
from edgekit.config import MAX_CHANNEL_RATIO, Config, PruneConfig
from edgekit.errors import ConfigError
from edgekit.files import write_json
from edgekit.prunable import (
    L1_FILTER_NORM,
    SHUFFLED,
    Pruner,
    layer_channels,
    output_channels,
    protected_layers,
    shuffled_layers,
)
from edgekit.stages.base import Context, finish_torch_stage
from edgekit.tolerance import Guard

name = "prune"
reads = ("prune", "train", "targets")
needs = ("train",)


def enabled(cfg: Config) -> bool:
    return cfg.prune.enabled

FINE_STEPS = 60  # increments of a target search; each removes about 1/60 of the maximum ratio
MAX_LAYER_RATIO = MAX_CHANNEL_RATIO  # no layer loses more of its channels (global ranking can gut one)
GRAD_SAMPLES = 128  # samples whose loss gradient feeds Taylor importance


@dataclass(frozen=True)
class Method:
    importance: Callable[[bool], tp.importance.Importance]  # global ranking? -> importance
    needs_grad: bool = False
    sparsity_training: bool = False
    reference: str = ""


def _l1(global_rank: bool) -> tp.importance.Importance:
    # across layers raw L1 norms are not comparable: normalise each layer by its mean for global ranking
    if global_rank:
        return tp.importance.MagnitudeImportance(p=1, normalizer="mean", group_reduction="first")
    return L1_FILTER_NORM


METHODS: dict[str, Method] = {
    "l1": Method(_l1, reference="Li et al. 2017, filter L1 norm"),
    "slimming": Method(lambda g: tp.importance.BNScaleImportance(normalizer=None), sparsity_training=True,
                       reference="Liu et al. 2017, Network Slimming (BN scale)"),
    "taylor": Method(lambda g: tp.importance.GroupTaylorImportance(normalizer="mean" if g else None),
                     needs_grad=True, reference="Molchanov et al. 2019, first-order Taylor"),
    "random": Method(lambda g: tp.importance.RandomImportance(), reference="random channels (baseline)"),
}


def method(key: str) -> Method:
    if key not in METHODS:
        raise ConfigError(f"prune.method '{key}' has no structured pruner; valid: {', '.join(METHODS)}")
    return METHODS[key]


# --- the pruning itself -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """How to prune one model: what ranks channels, what is protected, and where to stop."""
    method: str = "l1"
    scope: str = "local"  # local: every layer the same ratio; global: one ranking across layers
    ratio: float = 0.5  # used when neither target is set
    target_macs: float | None = None
    target_params: float | None = None
    round_to: int | None = None
    ignore: tuple[str, ...] = ()
    protect_stem: bool = True
    layer_ratios: tuple[tuple[str, float], ...] = ()  # per-layer ratios (sensitivity), ratio mode only


def _grad_fn(calib: tuple[np.ndarray, np.ndarray] | None) -> Callable[[nn.Module], None]:
    def accumulate(model: nn.Module) -> None:
        if calib is None:
            raise ConfigError("prune.method 'taylor' needs data for its gradients")
        x, y = torch.from_numpy(calib[0][:GRAD_SAMPLES]), torch.from_numpy(calib[1][:GRAD_SAMPLES])
        model.zero_grad()
        model.eval()  # BN statistics stay as trained; only the gradient is wanted
        nn.functional.cross_entropy(model(x), y).backward()
    return accumulate


def _pruner(model: nn.Module, shape: tuple[int, ...], plan: Plan, ignored: list[nn.Module], *, ratio: float,
            steps: int) -> tp.pruner.MetaPruner:
    global_rank = plan.scope == "global"
    modules = dict(model.named_modules())
    ratio_dict = {modules[n]: r for n, r in plan.layer_ratios if n in modules} or None
    return Pruner(
        model, torch.zeros(1, *shape), importance=method(plan.method).importance(global_rank),
        global_pruning=global_rank, pruning_ratio=ratio, pruning_ratio_dict=ratio_dict,
        max_pruning_ratio=MAX_LAYER_RATIO, iterative_steps=steps, ignored_layers=ignored, round_to=plan.round_to,
    )


def _count(model: nn.Module, shape: tuple[int, ...], what: str) -> int:
    macs, params = metrics.macs_and_params(model, shape)
    return macs if what == "macs" else params


def prune_model(model: nn.Module, shape: tuple[int, ...], num_classes: int, plan: Plan, *,
                keep: float | None = None, calib: tuple[np.ndarray, np.ndarray] | None = None,
                base: int | None = None) -> dict:
    """Prune in place. `keep` overrides the plan's target: the fraction of `base` to keep (default base: the
    model's count now; iterative rounds pass the unpruned model's).

    Returns what was done: the measure targeted, reached fraction and number of pruner steps.
    """
    ignored = protected_layers(model, list(plan.ignore), num_classes, protect_stem=plan.protect_stem, shape=shape)
    grads = _grad_fn(calib) if method(plan.method).needs_grad else None
    what = "macs" if plan.target_macs is not None else "params" if plan.target_params is not None else None
    if what is None:  # one shot at a channel ratio
        ratio = plan.ratio if keep is None else 1 - keep
        pruner = _pruner(model, shape, plan, ignored, ratio=ratio, steps=1)
        if grads:
            grads(model)
        pruner.step()
        model.zero_grad(set_to_none=True)
        return {"measure": "channels", "ratio": ratio, "pruner_steps": 1}
    goal_frac = keep if keep is not None else (plan.target_macs if what == "macs" else plan.target_params)
    base = base or _count(model, shape, what)
    pruner = _pruner(model, shape, plan, ignored, ratio=MAX_LAYER_RATIO, steps=FINE_STEPS)
    done = 0
    while _count(model, shape, what) > goal_frac * base and done < FINE_STEPS:
        if grads:
            grads(model)
        pruner.step()
        done += 1
    model.zero_grad(set_to_none=True)
    reached = _count(model, shape, what) / base
    if reached > goal_frac:
        raise ConfigError(f"prune.target_{what} {goal_frac:g} is out of reach: pruning stops at {reached:.2f} with "
                          f"every prunable layer at the {MAX_LAYER_RATIO:.0%} limit and the stem, classifier and "
                          "prune.ignore layers kept; raise the target, or set protect_stem: false")
    return {"measure": what, "target": goal_frac, "reached": reached, "pruner_steps": done}


def prune_l1(model: nn.Module, sample_shape: tuple[int, ...], num_classes: int, *, ratio: float,
             round_to: int | None, ignore: list[str]) -> nn.Module:
    """Remove `ratio` of the channels of every prunable layer by filter L1 norm (classifier kept)."""
    plan = Plan(method="l1", ratio=ratio, round_to=round_to, ignore=tuple(ignore), protect_stem=False)
    prune_model(model, sample_shape, num_classes, plan)
    return model


# --- Network Slimming's sparsity training -------------------------------------------------------------------

def bn_l1(model: nn.Module) -> torch.Tensor:
    """Sum of |gamma| over every BatchNorm layer (Liu et al. 2017's sparsity penalty)."""
    gammas = [m.weight.abs().sum() for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              and m.weight is not None]
    return torch.stack(gammas).sum() if gammas else torch.zeros(())


def sparsity_train(model: nn.Module, ctx_train, ctx_val, *, strength: float, epochs: int, lr: float,
                   batch_size: int, seed: int, workers: int = 1) -> float:
    """Train with CE + strength * sum|gamma| so that unimportant channels' BN scales go to zero."""
    def loss(out: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out, y) + strength * bn_l1(model)

    return training.fit(model, ctx_train, ctx_val, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                        loss_fn=loss, desc="sparsity", keep_best=False, workers=workers)


# --- the stage ----------------------------------------------------------------------------------------------

def plan_from_config(p: PruneConfig, layer_ratios: dict[str, float] | None = None) -> Plan:
    return Plan(method=p.method, scope=p.scope, ratio=p.ratio, target_macs=p.target_macs,
                target_params=p.target_params, round_to=p.round_to, ignore=tuple(p.ignore),
                protect_stem=p.protect_stem, layer_ratios=tuple(sorted((layer_ratios or {}).items())))


def _keep_schedule(plan: Plan, steps: int) -> list[float | None]:
    """Target mode: cumulative fraction of the unpruned count to keep after each round."""
    goal = plan.target_macs if plan.target_macs is not None else plan.target_params
    if steps <= 1:
        return [None]
    return [1 - (1 - goal) * k / steps for k in range(1, steps + 1)]


def ratio_rounds(model: nn.Module, shape: tuple[int, ...], num_classes: int, plan: Plan, steps: int,
                 calib: tuple[np.ndarray, np.ndarray] | None = None) -> Iterator[dict]:
    """Channel-ratio mode in `steps` rounds through one pruner: each advance prunes in place to `ratio * k / steps`
    of every layer's *unpruned* channels (torch-pruning's own iterative schedule). Rounding to `round_to` then
    never compounds across rounds (a new pruner each round would round the remaining channels down every time
    and overshoot: 32 channels at ratio 0.5 in 4 rounds of round_to 8 ended at 8)."""
    ignored = protected_layers(model, list(plan.ignore), num_classes, protect_stem=plan.protect_stem, shape=shape)
    grads = _grad_fn(calib) if method(plan.method).needs_grad else None
    pruner = _pruner(model, shape, plan, ignored, ratio=plan.ratio, steps=steps)
    for k in range(1, steps + 1):
        if grads:
            grads(model)
        pruner.step()
        model.zero_grad(set_to_none=True)
        yield {"measure": "channels", "ratio": plan.ratio * k / steps, "pruner_steps": 1}


def plan_rounds(model: nn.Module, shape: tuple[int, ...], num_classes: int, plan: Plan, steps: int,
                calib: tuple[np.ndarray, np.ndarray] | None = None) -> Iterator[dict]:
    """Advance to prune the next round in place; yields what that round did. `calib`: the samples whose loss
    gradient Taylor importance needs."""
    what = "macs" if plan.target_macs is not None else "params" if plan.target_params is not None else None
    if what is None:
        yield from ratio_rounds(model, shape, num_classes, plan, steps, calib)
        return
    start = _count(model, shape, what)  # the schedule counts from the unpruned model
    for keep in _keep_schedule(plan, steps):
        yield prune_model(model, shape, num_classes, plan, keep=keep, calib=calib, base=start)


def guard_for(p: PruneConfig, targets: list, baseline: float, val_samples: int) -> Guard | None:
    """The guard of this build: None when it is off or there is nothing to judge against."""
    if not p.accuracy_guard:
        return None
    return tolerance.guard_for(p.max_loss_pp, "prune.max_loss_pp", targets, baseline, val_samples)


def round_to_for(p: PruneConfig, targets: list) -> tuple[int | None, str]:
    """prune.round_to when set, else the least common multiple of the chosen targets' `round_to`."""
    if p.round_to is not None:
        return p.round_to, "prune.round_to"
    wanted = {t.name: t.round_to for t in targets if getattr(t, "round_to", None)}
    if not wanted:
        return None, "no chosen target sets round_to"
    value = math.lcm(*wanted.values())
    return value, "targets " + ", ".join(f"{n} ({r})" for n, r in wanted.items()) + (
        f": least common multiple {value}" if len(set(wanted.values())) > 1 else "")


def _limit(guard: Guard) -> str:
    """The loss the guard allows and where it comes from, e.g. 'the 1 pp allowed (prune.max_loss_pp)'."""
    raised = "" if guard.limit_pp <= guard.max_loss_pp else \
        f": {guard.max_loss_pp:g} pp, raised to one of the {guard.val_samples} validation samples"
    return f"the {guard.limit_pp:.3g} pp allowed ({guard.source}{raised})"


def _kept_record(rounds: list[dict], guard: Guard | None, stopped: dict | None) -> dict:
    """Which round's model the stage keeps and why. The reason says each thing once and never repeats what
    `round` / `of` say: report.prune_lines prints 'pruning kept round k of n (...): reason'."""
    n = len(rounds)
    if guard is None:
        return {"round": n, "of": n, "reason": "the full target, accuracy guard off (prune.accuracy_guard: false, "
                                               "or no target tolerance to judge against)"}
    if stopped is None:
        return {"round": n, "of": n, "reason": f"the full target, every round within {_limit(guard)} of the "
                                               f"unpruned model's validation accuracy {guard.baseline:.4f}"}
    return {"round": stopped["round"] - 1, "of": stopped["of"],
            "reason": f"round {stopped['round']} {tolerance.lost(stopped['loss_pp'])} of validation accuracy against "
                      f"the unpruned model, more than {_limit(guard)}, and was undone"}


def _finetune_epochs(total: int, rounds: int) -> list[int]:
    return [total // rounds + (i < total % rounds) for i in range(rounds)]


def round_line(record: dict, k: int, n: int, undone: bool = False) -> str:
    """The console line of one round: the channels it removed, those left, its validation accuracy."""
    loss = record.get("val_loss_pp")
    against = "" if loss is None else f", {abs(loss):.2f} pp {'below' if loss > 0 else 'above'} the unpruned model"
    nothing, ep = record.get("nothing_removed"), record["finetune_epochs"]
    removed = f"removed no channels ({nothing})" if nothing else f"removed {record['channels_removed']} channels"
    tuned = (f"fine-tuned the last cut for the {ep} epoch{'s' * (ep != 1)} of the rounds that removed nothing; " if ep
             else "not fine-tuned, nothing to recover; ") if nothing else ""
    return (f"[{name}] round {k}/{n}: {removed}, kept {record['channels_kept']} of {record['channels_unpruned']} "
            f"({record['channels_removed_total']} removed in all); " + tuned
            + f"val accuracy {record['val_accuracy']:.4f}{against}"
            + ("; undone: past the accuracy guard" if undone else ""))


def _why_nothing(info: dict, plan: Plan) -> str:
    """Why a round removed no channel: its target was already met, rounding kept every layer's count, or the
    layers left are tied to a protected one (a residual add or concat couples their channels)."""
    if info.get("pruner_steps") == 0:
        what = {"macs": "MACs", "params": "parameters"}[info["measure"]]
        return f"already at {info['reached']:.0%} of the unpruned {what}, under this round's {info['target']:.0%}"
    coupled = ("the layers left are tied (through a residual add or a concat) to a protected one: the stem "
               "(prune.protect_stem: false frees it), prune.ignore, the classifier or a layer before a channel shuffle")
    if plan.round_to and plan.round_to > 1:
        return f"every layer's count rounded to a multiple of {plan.round_to} stayed the same, or {coupled}"
    return f"the pruner found none to remove at this round's ratio (too small for any layer, or {coupled})"


def iterative_prune(ctx: Context, model: nn.Module, plan: Plan, p: PruneConfig,
                    guard: Guard | None = None) -> tuple[nn.Module, list[dict], float, dict]:
    """Prune in rounds with fine-tuning; with a guard, stop at the last round within its tolerance.

    Returns the kept model (the same object unless a round was undone), every round run, the kept model's
    validation accuracy and the `kept` record."""
    data, t = ctx.data, ctx.cfg.train
    rounds, best_val, stopped = [], guard.baseline if guard else 0.0, None
    pruning = plan_rounds(model, data.sample_shape, data.num_classes, plan, p.steps, (data.calib.x, data.calib.y))
    unpruned = channels = output_channels(model)
    owed = 0
    for i, ep in enumerate(_finetune_epochs(p.finetune_epochs, p.steps)):
        before = copy.deepcopy(model) if guard else None
        training.seed_everything(t.seed)  # random importance (and Taylor's batch) repeat under train.seed
        info = next(pruning)
        now = output_channels(model)
        info.update(channels_removed=channels - now, channels_kept=now, channels_removed_total=unpruned - now,
                    channels_unpruned=unpruned, channels=layer_channels(model))
        # what the ranking alone kept, before fine-tuning hides it (Li et al. 2017 compare methods here too)
        info["val_accuracy_before_finetune"] = metrics.accuracy(metrics.logits(model, data.val.x), data.val.y)
        if now == channels:  # later rounds still prune on to the target
            info["nothing_removed"] = _why_nothing(info, plan)
        # an unchanged model is not fine-tuned: its epochs go to the next cut, which is larger by theirs, or, when
        # no round after it cuts, to the last cut's model in the last round
        ep, owed = ep + owed, 0
        if now != channels or (i == p.steps - 1 and now < unpruned and ep):
            desc = "finetune" if p.steps == 1 else f"finetune round {i + 1}/{p.steps}"  # its warnings say which
            val = training.fit(model, data.train, data.val, epochs=ep, lr=p.lr, batch_size=t.batch_size,
                               seed=t.seed, desc=desc, workers=t.workers)
        else:
            owed, ep, val = ep, 0, info["val_accuracy_before_finetune"]
        channels = now
        rounds.append({**info, "finetune_epochs": ep, "val_accuracy": val})
        if guard is not None:
            rounds[-1]["val_loss_pp"] = guard.loss_pp(val)
            if not guard.within(val):
                stopped = {"round": i + 1, "of": p.steps, "loss_pp": guard.loss_pp(val)}
                print(round_line(rounds[-1], i + 1, p.steps, undone=True), flush=True)
                model = before
                break
        print(round_line(rounds[-1], i + 1, p.steps), flush=True)
        best_val = val
    return model, rounds, best_val, _kept_record(rounds, guard, stopped)


def magnitude_sparsity(model: nn.Module, ratio: float, example: torch.Tensor, fine_tune) -> nn.Module:
    """NNCF unstructured magnitude sparsity (one global threshold), fine-tuned with the masks on, then the
    masks burned into plain weights. Zeros shrink a compressed file; dense kernels run no faster."""
    from edgekit import quiet
    from edgekit.stages import quantize

    nncf = quantize.load_nncf()
    with quiet.silenced():
        sparse = nncf.prune(quantize.NncfRoot(model), mode=nncf.PruneMode.UNSTRUCTURED_MAGNITUDE_GLOBAL, ratio=ratio,
                            examples_inputs=example)
    fine_tune(sparse)
    with quiet.silenced():
        plain = nncf.strip(sparse, do_copy=True, strip_format=nncf.StripFormat.IN_PLACE, example_input=example)
    return quantize.copy_plain_weights(plain, model)


def weight_sparsity(model: nn.Module) -> float:
    weights = [p for p in model.parameters() if p.dim() > 1]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def run_magnitude(ctx: Context, model: nn.Module) -> dict:
    p, data, t = ctx.cfg.prune, ctx.data, ctx.cfg.train
    best: dict = {}

    def fine_tune(sparse: nn.Module) -> None:
        best["val"] = training.fit(sparse, data.train, data.val, epochs=p.finetune_epochs, lr=p.lr,
                                   batch_size=t.batch_size, seed=t.seed, desc="finetune", workers=t.workers)

    magnitude_sparsity(model, p.ratio, ctx.example_input(), fine_tune)
    return finish_torch_stage(ctx, name, model, val_accuracy=best["val"], method="magnitude", library="nncf",
                              reference="unstructured magnitude sparsity (NNCF, global threshold)",
                              settings={"ratio": p.ratio, "finetune_epochs": p.finetune_epochs},
                              sparsity=weight_sparsity(model), macs_kept=1.0, params_kept=1.0,
                              note="zeros shrink a compressed file, not dense latency: MACs are unchanged")


def run(ctx: Context) -> dict:
    p, data, t = ctx.cfg.prune, ctx.data, ctx.cfg.train
    source = ctx.latest_model_stage(before=name)
    model = ctx.load_model(source)
    if p.method == "magnitude":
        return run_magnitude(ctx, model)
    macs0, params0 = metrics.macs_and_params(model, data.sample_shape)
    extra: dict = {}
    if method(p.method).sparsity_training:
        sparsity_train(model, data.train, data.val, strength=p.sparsity_strength, epochs=p.sparsity_epochs,
                       lr=p.lr, batch_size=t.batch_size, seed=t.seed, workers=t.workers)
        extra["bn_l1_after_sparsity"] = float(bn_l1(model))
    layer_ratios = None
    if p.use_sensitivity:
        from edgekit import sensitivity

        result = sensitivity.analyse(model, ctx.data, protect_stem=p.protect_stem)
        write_json(ctx.stage_dir(name) / "sensitivity.json", result)
        layer_ratios = sensitivity.to_ratios(result)
        extra["layer_ratios"] = layer_ratios
    round_to, round_to_from = round_to_for(p, ctx.targets)
    shuffled = shuffled_layers(model, data.sample_shape)
    if shuffled:
        extra["kept_whole"] = {"layers": shuffled, "why": SHUFFLED}
        print(f"[{name}] kept whole: {', '.join(shuffled)} ({SHUFFLED})", flush=True)
    baseline = metrics.accuracy(metrics.logits(model, data.val.x), data.val.y)
    guard = guard_for(p, ctx.targets, baseline, len(data.val.y))
    plan = replace(plan_from_config(p, layer_ratios), round_to=round_to)
    model, rounds, best_val, kept = iterative_prune(ctx, model, plan, p, guard)
    macs1, params1 = metrics.macs_and_params(model, data.sample_shape)
    settings = {k: getattr(p, k) for k in PruneConfig.__dataclass_fields__}
    kept.update(macs_kept=macs1 / macs0, params_kept=params1 / params0, val_accuracy=best_val,
                unpruned_val_accuracy=baseline, max_loss_pp=guard.limit_pp if guard else None)
    return finish_torch_stage(ctx, name, model, val_accuracy=best_val, method=p.method, library="torch-pruning",
                              reference=METHODS[p.method].reference, settings=settings, rounds=rounds,
                              macs_kept=macs1 / macs0, params_kept=params1 / params0, kept=kept,
                              round_to=round_to, round_to_from=round_to_from, **extra)
