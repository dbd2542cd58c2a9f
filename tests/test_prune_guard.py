"""The prune stage's accuracy guard (stop where validation accuracy falls past the tolerance) and the targets'
`round_to` (pruned channel counts that the int8 kernels like)."""

import dataclasses

import pytest
import yaml
from torch import nn

from edgekit import config, metrics, prunable, report, targets
from edgekit.errors import ConfigError, TargetError
from edgekit.stages import prune
from edgekit.stages.base import Context
from tests.conftest import tiny


def _prune(trained, tmp_path, chosen: list, **section) -> tuple[dict, Context]:
    import shutil

    cfg = config.from_dict(tiny(data={"limit": 300}, train={"epochs": 4}, prune=section))
    shutil.copytree(trained.stage_dir("train"), tmp_path / "stages" / "train")
    ctx = Context(cfg, trained.data, tmp_path, chosen)
    return prune.run(ctx), ctx


def _val(ctx: Context, stage: str) -> float:
    return metrics.accuracy(metrics.logits(ctx.load_model(stage), ctx.data.val.x), ctx.data.val.y)


def test_guard_undoes_the_round_past_the_tolerance_and_says_so(trained, tmp_path, capsys):
    """Removing 90 % of the channels without fine-tuning loses far more than one validation sample: the guard
    undoes that round, keeps the model it had (here: the unpruned one) and says which and why."""
    result, ctx = _prune(trained, tmp_path, [], ratio=0.9, steps=2, finetune_epochs=0, max_loss_pp=0.0)
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[prune] round")]
    assert line.startswith(f"[prune] round 1/2: removed {result['rounds'][0]['channels_removed']} channels")
    assert line.endswith("below the unpruned model; undone: past the accuracy guard")
    kept = result["kept"]
    assert kept["round"] == 0 and kept["of"] == 2 and len(result["rounds"]) == 1
    assert result["rounds"][0]["val_loss_pp"] > kept["max_loss_pp"]
    loss, samples = result["rounds"][0]["val_loss_pp"], len(ctx.data.val.y)
    assert kept["reason"] == (  # each thing once: the limit and where it came from are not said twice
        f"round 1 lost {loss:.2f} pp of validation accuracy against the unpruned model, more than the "
        f"{kept['max_loss_pp']:.3g} pp allowed (prune.max_loss_pp: 0 pp, raised to one of the {samples} "
        "validation samples), and was undone")
    (summary,) = report.prune_lines([result])
    assert summary == f"pruning kept the unpruned model, no round of 2 (100% of the MACs): {kept['reason']}"
    assert result["macs"] == ctx.metrics("train")["macs"] and kept["macs_kept"] == 1.0
    assert _val(ctx, "prune") == pytest.approx(kept["unpruned_val_accuracy"]) == pytest.approx(kept["val_accuracy"])


def test_without_the_guard_the_same_recipe_prunes_to_the_target(trained, tmp_path):
    result, ctx = _prune(trained, tmp_path, [], ratio=0.9, steps=2, finetune_epochs=0, max_loss_pp=0.0,
                         accuracy_guard=False)
    assert result["kept"]["round"] == 2 and result["kept"]["reason"].startswith("the full target, accuracy guard off")
    assert result["macs"] < 0.3 * ctx.metrics("train")["macs"]
    assert _val(ctx, "prune") == pytest.approx(result["val_accuracy"])


def test_guard_keeps_every_round_within_a_loose_tolerance(trained, tmp_path):
    from edgekit import ddp

    loops = ddp.loops_run()
    result, ctx = _prune(trained, tmp_path, [], ratio=0.5, steps=2, finetune_epochs=2, max_loss_pp=100.0)
    # each round's fine-tuning is named by its round: a warning it leaves in the report says which
    assert [loop["loop"] for loop in ddp.loops_since(loops)] == ["finetune round 1/2", "finetune round 2/2"]
    kept = result["kept"]
    assert kept["round"] == 2 and kept["reason"] == ("the full target, every round within the 100 pp allowed "
                                                     "(prune.max_loss_pp) of the unpruned model's validation "
                                                     f"accuracy {kept['unpruned_val_accuracy']:.4f}")
    (summary,) = report.prune_lines([result])
    assert summary == f"pruning kept round 2 of 2 ({kept['macs_kept']:.0%} of the MACs): {kept['reason']}"
    assert result["macs"] < 0.6 * ctx.metrics("train")["macs"]
    assert all("val_loss_pp" in r for r in result["rounds"])


def test_each_round_records_and_prints_the_channels_it_removed(trained, tmp_path, capsys):
    result, ctx = _prune(trained, tmp_path, [], ratio=0.5, steps=2, finetune_epochs=0, accuracy_guard=False)
    first, second = result["rounds"]
    unpruned = prunable.output_channels(trained.load_model("train"))
    kept = prunable.output_channels(ctx.load_model("prune"))
    assert first["channels_unpruned"] == second["channels_unpruned"] == unpruned
    assert first["channels_removed"] > 0 and second["channels_removed"] > 0
    assert first["channels_removed"] + second["channels_removed"] == second["channels_removed_total"]
    assert second["channels_kept"] == kept == unpruned - second["channels_removed_total"]
    # per layer (a user checking residual coupling): each layer's output channels after the round
    assert second["channels"] == prunable.layer_channels(ctx.load_model("prune"))
    assert sum(first["channels"].values()) == first["channels_kept"]
    assert first["channels"].keys() == second["channels"].keys() and first["channels"] != second["channels"]
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[prune] round")]
    assert lines == [f"[prune] round {k}/2: removed {r['channels_removed']} channels, kept {r['channels_kept']} of "
                     f"{unpruned} ({r['channels_removed_total']} removed in all); val accuracy "
                     f"{r['val_accuracy']:.4f}" for k, r in ((1, first), (2, second))]


def test_a_round_that_removes_no_channel_is_not_fine_tuned_and_later_rounds_reach_the_target(trained, tmp_path,
                                                                                              capsys):
    """MACs target 0.5 in 4 rounds with round_to 8 (x86-64): the first round's 8-channel steps already pass the
    second round's share, so that round removes nothing. It is not fine-tuned and says so; the third round prunes
    again and the target is reached."""
    result, ctx = _prune(trained, tmp_path, targets.get(["x86-64"]), target_macs=0.5, steps=4, finetune_epochs=4,
                         accuracy_guard=False)
    rounds = result["rounds"]
    idle = [k for k, r in enumerate(rounds, 1) if r["channels_removed"] == 0]
    assert idle and any(r["channels_removed"] > 0 for r in rounds[idle[0]:]), rounds  # pruning went on after it
    assert result["macs_kept"] <= 0.5
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[prune] round")]
    for k, r in enumerate(rounds, 1):
        owed = sum(1 for j in range(k - 1, 0, -1) if j in idle and all(i in idle for i in range(j, k)))
        if k in idle:
            assert r["nothing_removed"].startswith("already at ") and "under this round's" in r["nothing_removed"]
            assert lines[k - 1].startswith(f"[prune] round {k}/4: removed no channels ({r['nothing_removed']}), "
                                           f"kept {r['channels_kept']} of ")
            if k < len(rounds):
                assert r["finetune_epochs"] == 0 and r["val_accuracy"] == r["val_accuracy_before_finetune"]
                assert "; not fine-tuned, nothing to recover; val accuracy" in lines[k - 1]
            else:  # the last round idled: it fine-tunes the last cut for the epochs the idle rounds left
                assert r["finetune_epochs"] == 1 + owed
                assert f"; fine-tuned the last cut for the {1 + owed} epoch" in lines[k - 1]
        else:  # a round after skipped ones gets their epochs
            assert r["finetune_epochs"] == 1 + owed and "nothing_removed" not in r
    assert sum(r["finetune_epochs"] for r in rounds) == 4  # every epoch spent
    (summary,) = report.prune_lines([result])
    assert summary.endswith(f"; round{'s' if len(idle) > 1 else ''} {', '.join(map(str, idle))} removed no channels "
                            "(the fine-tuning epochs went to the next cut, or after the last round to the last cut)")


def test_a_ratio_round_that_rounding_leaves_unchanged_is_not_fine_tuned(trained, tmp_path):
    """Ratio 0.2 in 4 rounds of round_to 8: the first round already removes a multiple of 8 per layer, the next
    rounds' shares round to the same counts."""
    result, _ = _prune(trained, tmp_path, targets.get(["x86-64"]), ratio=0.2, steps=4, finetune_epochs=4,
                       accuracy_guard=False)
    rounds = result["rounds"]
    idle = [r for r in rounds if r["channels_removed"] == 0]
    assert idle and all(r["finetune_epochs"] == 0 for r in idle if r is not rounds[-1])
    assert all(r["nothing_removed"].startswith("every layer's count rounded to a multiple of 8 stayed the same, or the "
                                               "layers left are tied") for r in idle)
    # trailing rounds that removed nothing: the last one fine-tunes the last cut for their epochs, none lost
    assert rounds[-1] in idle and sum(r["finetune_epochs"] for r in rounds) == 4


def test_guard_takes_the_strictest_chosen_target(trained):
    x86, rpi5 = targets.get(["x86-64", "rpi5"])
    strict = dataclasses.replace(rpi5, accuracy_tolerance_pp=0.25)
    p = config.from_dict({}).prune
    guard = prune.guard_for(p, [x86, strict], baseline=0.9, val_samples=1000)
    assert guard.max_loss_pp == 0.25 and "rpi5" in guard.source
    assert guard.limit_pp == 0.25 and prune.guard_for(p, [x86], 0.9, 100).limit_pp == 1.0  # one of 100 samples
    assert prune.guard_for(dataclasses.replace(p, max_loss_pp=2.0), [strict], 0.9, 1000).max_loss_pp == 2.0
    assert prune.guard_for(dataclasses.replace(p, accuracy_guard=False), [strict], 0.9, 1000) is None
    assert prune.guard_for(p, [], 0.9, 1000) is None  # no target, no tolerance to judge against


@pytest.mark.parametrize(("section", "needle"), [
    ({"max_loss_pp": -0.5}, "'prune.max_loss_pp' is out of range"),
    ({"accuracy_guard": "yes"}, "'prune.accuracy_guard' is 'yes'; expected bool"),
    ({"max_loss_pp": "1pp"}, "'prune.max_loss_pp' is '1pp'"),
])
def test_guard_keys_are_validated(section, needle):
    with pytest.raises(ConfigError) as err:
        config.from_dict({"prune": section})
    assert needle in str(err.value) and "\n" not in str(err.value)


# --- round_to per target ------------------------------------------------------------------------------------

def _pruned_counts(model: nn.Module) -> list[int]:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return [m.out_channels for m in convs[1:]]  # the stem is protected


def test_targets_round_to_sets_the_pruned_channel_counts(trained, tmp_path):
    chosen = targets.get(["x86-64"])
    assert chosen[0].round_to == 8
    result, ctx = _prune(trained, tmp_path / "rounded", chosen, ratio=0.3, steps=1, finetune_epochs=0,
                         accuracy_guard=False)
    assert result["round_to"] == 8 and "x86-64 (8)" in result["round_to_from"]
    counts = _pruned_counts(ctx.load_model("prune"))
    assert counts and all(c % 8 == 0 for c in counts), counts
    plain, ctx2 = _prune(trained, tmp_path / "plain", chosen, ratio=0.3, steps=1, finetune_epochs=0,
                         accuracy_guard=False, round_to=1)  # prune.round_to wins over the targets'
    assert plain["round_to"] == 1 and plain["round_to_from"] == "prune.round_to"
    assert any(c % 8 for c in _pruned_counts(ctx2.load_model("prune")))


def test_round_to_of_several_targets_is_their_common_multiple():
    x86, rpi5 = targets.get(["x86-64", "rpi5"])
    p = config.from_dict({}).prune
    assert prune.round_to_for(p, [x86, rpi5])[0] == 8
    value, why = prune.round_to_for(p, [x86, dataclasses.replace(rpi5, round_to=12)])
    assert value == 24 and "least common multiple 24" in why
    assert prune.round_to_for(p, [dataclasses.replace(x86, round_to=None)]) == (None, "no chosen target sets round_to")


@pytest.mark.parametrize("value", [0, "8", True, 2.5])
def test_target_round_to_is_validated(tmp_path, value):
    raw = yaml.safe_load((targets.TARGETS_DIR / "x86-64.yaml").read_text()) | {"round_to": value}
    with pytest.raises(TargetError) as err:
        targets.parse(raw, "mine.yaml")
    assert f"mine.yaml: round_to is {value!r}; give a whole number" in str(err.value) and "\n" not in str(err.value)


def test_console_says_which_round_pruning_kept_and_why():
    kept = {"round": 1, "of": 4, "macs_kept": 0.71, "reason": "round 2 lost 1.50 pp ..., and was undone"}
    stage = {"name": "prune", "accuracy": 0.8, "params": 1, "macs": 1, "size_bytes": 1, "kept": kept}
    table = report.summary_table({"stages": [stage], "artifacts": [], "bundles": []})
    assert "pruning kept round 1 of 4 (71% of the MACs): round 2 lost 1.50 pp ..., and was undone\n" in table
    assert "pruning kept" not in report.summary_table({"stages": [], "artifacts": [], "bundles": []})


def test_rounds_with_round_to_do_not_overshoot_the_ratio():
    """Four rounds of ratio 0.5 with round_to 8 end at half of every pruned layer, as one shot does: each round
    targets a fraction of the unpruned widths (a new pruner per round rounded down four times: 64 -> 24)."""
    import torch

    from edgekit import models

    torch.manual_seed(0)
    model = models.build_model(config.from_dict({"model": {"width": 32}}), (1, 8, 8), 10)
    before = _pruned_counts(model)
    plan = prune.Plan(ratio=0.5, round_to=8)
    done = list(prune.ratio_rounds(model, (1, 8, 8), 10, plan, steps=4))
    assert [r["ratio"] for r in done] == [0.125, 0.25, 0.375, 0.5]
    assert _pruned_counts(model) == [c // 2 for c in before] and all(c % 8 == 0 for c in _pruned_counts(model))
