"""How much validation accuracy a compression step may lose: the limit both the prune stage's guard and the
quantize stage's PTQ-first decision judge against."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Guard:
    """A step is within the limit while its validation accuracy is at most `max_loss_pp` below `baseline`."""
    baseline: float  # validation accuracy of the model before the step
    max_loss_pp: float
    source: str  # where max_loss_pp came from
    val_samples: int

    @property
    def limit_pp(self) -> float:
        """The tolerance, but never finer than one validation sample (a finer loss cannot be judged)."""
        return max(self.max_loss_pp, 100 / self.val_samples)

    def loss_pp(self, val_accuracy: float) -> float:
        return 100 * (self.baseline - val_accuracy)

    def within(self, val_accuracy: float) -> bool:
        return self.loss_pp(val_accuracy) <= self.limit_pp + 1e-9


def lost(loss_pp: float) -> str:
    """'lost 0.56 pp', or 'gained 0.56 pp' when the step raised the accuracy (a negative loss)."""
    return f"lost {loss_pp:.2f} pp" if loss_pp >= 0 else f"gained {-loss_pp:.2f} pp"


def guard_for(explicit: float | None, key: str, targets: list, baseline: float, val_samples: int) -> Guard | None:
    """`explicit` (the config key `key`) when set, else the strictest chosen target's accuracy_tolerance_pp;
    None when there is neither."""
    if explicit is not None:
        return Guard(baseline, explicit, key, val_samples)
    if not targets:
        return None
    strictest = min(targets, key=lambda t: t.accuracy_tolerance_pp)
    return Guard(baseline, strictest.accuracy_tolerance_pp,
                 f"accuracy_tolerance_pp of target {strictest.name}, the strictest chosen", val_samples)
