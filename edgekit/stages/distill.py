"""Knowledge distillation: a student learns from one or more teachers with combinable losses.

Losses (a registry; `distill.losses`, each with its weight):
- soft:     Hinton et al. 2015: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels)
- feature:  FitNets (Romero et al. 2015) hint: MSE between a teacher layer's output and a student layer's
            output through a 1x1 adapter (conv or linear) where channel counts differ
- relation: RKD (Park et al. 2019): distance (weight 1) and angle (weight 2) relations between the samples of
            a batch, on the features that enter the classifier

Teachers: the trained unpruned model, or `distill.teachers` checkpoints (averaged logits). Student: the pruned
model, or a fresh zoo model (`distill.student: resnet8`, `student_width_mult`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgekit import models, training
from edgekit.config import Config
from edgekit.errors import ConfigError
from edgekit.stages.base import Context, finish_torch_stage

name = "distill"
reads = ("distill", "train", "model")
needs = ("train", "prune")


def enabled(cfg: Config) -> bool:
    """A pruned student needs the prune stage: with nothing smaller than the teacher there is nothing to distil."""
    return cfg.distill.enabled and (cfg.prune.enabled or cfg.distill.student != "pruned")

F = nn.functional


# --- the losses ---------------------------------------------------------------------------------------------

def soft_target_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, *,
                     temperature: float, alpha: float) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1), reduction="batchmean",
                  log_target=True)
    return alpha * t * t * kl + (1 - alpha) * F.cross_entropy(student, labels)


def soft_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher_T || student_T): the soft part alone."""
    return soft_target_loss(student, teacher, teacher.argmax(1), temperature=temperature, alpha=1.0)


def _match(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Teacher features pooled to the student's spatial size (FitNets uses a regressor; sizes agree here)."""
    if teacher.dim() == 4 and teacher.shape[2:] != student.shape[2:]:
        return F.adaptive_avg_pool2d(teacher, student.shape[2:])
    if teacher.dim() == 3 and teacher.shape[2:] != student.shape[2:]:
        return F.adaptive_avg_pool1d(teacher, student.shape[2])
    return teacher


def hint_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, adapter: nn.Module | None) -> torch.Tensor:
    """FitNets hint: MSE(adapter(student), teacher)."""
    s = adapter(student_feat) if adapter is not None else student_feat
    return F.mse_loss(s, _match(teacher_feat, s))


def _pdist(e: torch.Tensor) -> torch.Tensor:
    e = e.flatten(1)
    d = (e.unsqueeze(0) - e.unsqueeze(1)).pow(2).sum(-1).clamp_min(1e-12).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device))


def rkd_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Pairwise distances, each normalised by its mean, compared with smooth L1 (Park et al. 2019, eq. 3-4)."""
    with torch.no_grad():
        td = _pdist(teacher)
        td = td / td[td > 0].mean().clamp_min(1e-12)
    sd = _pdist(student)
    sd = sd / sd[sd > 0].mean().clamp_min(1e-12)
    return F.smooth_l1_loss(sd, td)


def _angles(e: torch.Tensor) -> torch.Tensor:
    e = e.flatten(1)
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # diff[i, j] = e_j - e_i, unit length
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


def rkd_angle(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Cosines of the angles formed by every triplet of samples (Park et al. 2019, eq. 5-6)."""
    with torch.no_grad():
        ta = _angles(teacher)
    return F.smooth_l1_loss(_angles(student), ta)


def relation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD with the paper's weights: distance 1, angle 2."""
    return rkd_distance(student, teacher) + 2 * rkd_angle(student, teacher)


LOSSES = ("soft", "feature", "relation")


# --- reading features with hooks ----------------------------------------------------------------------------

def classifier_name(model: nn.Module) -> str:
    """The last Linear (or conv) module: its input is the embedding used for feature and relation losses."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.modules.conv._ConvNd)]
    if not names:
        raise ConfigError("distillation needs a model with a Linear or conv layer")
    return names[-1]


class Tap:
    """Keeps the output (or, for the classifier, the input) of named modules at each forward pass."""

    def __init__(self, model: nn.Module, layers: list[str], inputs_of: set[str]) -> None:
        modules = dict(model.named_modules())
        unknown = [n for n in layers if n not in modules]
        if unknown:
            raise ConfigError(f"distill.feature_layers names '{unknown[0]}', not a module of the model; "
                              f"valid: {', '.join(n for n in modules if n)}")
        self.values: dict[str, torch.Tensor] = {}
        self.handles = [modules[n].register_forward_hook(self._hook(n, n in inputs_of)) for n in layers]

    def _hook(self, key: str, want_input: bool):
        def hook(_module, args, out):
            self.values[key] = args[0] if want_input else out
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _adapter(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> nn.Module | None:
    cs, ct = student_feat.shape[1], teacher_feat.shape[1]
    if cs == ct:
        return None
    kind = {2: nn.Linear, 3: nn.Conv1d, 4: nn.Conv2d}[student_feat.dim()]
    return kind(cs, ct) if kind is nn.Linear else kind(cs, ct, 1)


# --- the combined objective ---------------------------------------------------------------------------------

@dataclass
class Objective:
    """The weighted sum of the chosen losses; call it as the training loss_fn."""
    student: nn.Module
    teachers: list[nn.Module]
    losses: list[str]
    temperature: float = 4.0
    alpha: float = 0.7
    feature_weight: float = 1.0
    relation_weight: float = 1.0
    pairs: list[tuple[str, str]] | None = None  # (teacher layer, student layer) for the hint loss

    def __post_init__(self) -> None:
        unknown = [n for n in self.losses if n not in LOSSES]
        if unknown:
            raise ConfigError(f"distill.losses has '{unknown[0]}'; valid: {', '.join(LOSSES)}")
        t_head, s_head = classifier_name(self.teachers[0]), classifier_name(self.student)
        self.pairs = self.pairs or [(t_head, s_head)]
        self.embed = (t_head, s_head)
        t_layers = {p[0] for p in self.pairs} | {t_head}
        s_layers = {p[1] for p in self.pairs} | {s_head}
        self.t_tap = Tap(self.teachers[0], sorted(t_layers), {t_head})
        self.s_tap = Tap(self.student, sorted(s_layers), {s_head})
        self.adapters = nn.ModuleList()
        self._adapter_of: dict[tuple[str, str], nn.Module | None] = {}

    def _teacher(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            outs = [t.eval()(x) for t in reversed(self.teachers)]  # the first teacher last: its taps stay
        return torch.stack(outs).mean(0)

    def _get_adapter(self, pair: tuple[str, str], s: torch.Tensor, t: torch.Tensor) -> nn.Module | None:
        if pair not in self._adapter_of:
            adapter = _adapter(s, t)
            self._adapter_of[pair] = adapter
            if adapter is not None:
                self.adapters.append(adapter)
        return self._adapter_of[pair]

    def parts(self, out: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        soft = self._teacher(x)
        tv, sv = self.t_tap.values, self.s_tap.values
        parts = {}
        if "soft" in self.losses:
            parts["soft"] = soft_target_loss(out, soft, y, temperature=self.temperature, alpha=self.alpha)
        else:
            parts["hard"] = F.cross_entropy(out, y)
        if "feature" in self.losses:
            hint = sum(hint_loss(sv[s], tv[t], self._get_adapter((t, s), sv[s], tv[t])) for t, s in self.pairs)
            parts["feature"] = self.feature_weight * hint / len(self.pairs)
        if "relation" in self.losses:
            parts["relation"] = self.relation_weight * relation_loss(sv[self.embed[1]], tv[self.embed[0]])
        return parts

    def __call__(self, out: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return sum(self.parts(out, y, x).values())

    def close(self) -> None:
        self.t_tap.close()
        self.s_tap.close()


def prime_adapters(objective: Objective, x: torch.Tensor) -> None:
    """Create the adapters before training so that the optimiser sees their parameters."""
    if "feature" not in objective.losses:
        return
    with torch.no_grad():
        objective.student.eval()(x)
        objective._teacher(x)
    for t, s in objective.pairs:
        objective._get_adapter((t, s), objective.s_tap.values[s], objective.t_tap.values[t])


# --- the stage ----------------------------------------------------------------------------------------------

def _teachers(ctx: Context) -> tuple[list[nn.Module], list[str]]:
    paths = ctx.cfg.distill.teachers
    if not paths:
        return [ctx.load_model("train")], ["train"]
    teachers = []
    for p in paths:
        model = models.build_model(ctx.cfg, ctx.data.sample_shape, ctx.data.num_classes, with_checkpoint=False)
        models._load_checkpoint(model, ctx.cfg.resolve(p))
        teachers.append(model.eval())
    return teachers, list(paths)


def _student(ctx: Context) -> tuple[nn.Module, dict | None]:
    d = ctx.cfg.distill
    if d.student == "pruned":
        return ctx.load_model(ctx.latest_model_stage(before=name)), None
    spec = {"name": d.student, "width": ctx.cfg.model.width, "width_mult": d.student_width_mult}
    training.seed_everything(ctx.cfg.train.seed)
    model = models.build_named(d.student, ctx.data.sample_shape, ctx.data.num_classes, width=spec["width"],
                               width_mult=spec["width_mult"])
    return model, spec


def _pairs(layers: list[str]) -> list[tuple[str, str]] | None:
    pairs = []
    for item in layers:
        t, sep, s = item.partition(":")
        if not sep or not t or not s:
            raise ConfigError(f"distill.feature_layers entry '{item}' must look like teacher_module:student_module")
        pairs.append((t, s))
    return pairs or None


def make_objective(ctx: Context, student: nn.Module, teachers: list[nn.Module]) -> Objective:
    d = ctx.cfg.distill
    objective = Objective(student, teachers, list(d.losses), temperature=d.temperature, alpha=d.alpha,
                          feature_weight=d.feature_weight, relation_weight=d.relation_weight,
                          pairs=_pairs(d.feature_layers))
    # the adapters' initial weights: from the seed, not from whatever this process drew before (a build after
    # another in one process, a search trial, a 1- and a 2-worker run would start them elsewhere)
    training.seed_everything(ctx.cfg.train.seed)
    prime_adapters(objective, ctx.example_input(8))
    return objective


def run(ctx: Context) -> dict:
    d, data = ctx.cfg.distill, ctx.data
    teachers, teacher_names = _teachers(ctx)
    student, spec = _student(ctx)
    objective = make_objective(ctx, student, teachers)
    best_val = training.fit(student, data.train, data.val, epochs=d.epochs, lr=d.lr,
                            batch_size=ctx.cfg.train.batch_size, seed=ctx.cfg.train.seed, loss_fn=objective,
                            desc="distill", extra_params=list(objective.adapters.parameters()),
                            keep_zeros=ctx.keep_zeros, workers=ctx.cfg.train.workers)
    objective.close()
    if spec is not None:
        models.save_model(student, ctx.stage_dir(name) / "model.pt", spec)
    return finish_torch_stage(ctx, name, student, val_accuracy=best_val, method="+".join(d.losses),
                              library="edgekit (hand-written losses)",
                              settings={"losses": list(d.losses), "temperature": d.temperature, "alpha": d.alpha,
                                        "feature_weight": d.feature_weight, "relation_weight": d.relation_weight,
                                        "feature_layers": [f"{t}:{s}" for t, s in objective.pairs],
                                        "epochs": d.epochs, "teachers": teacher_names, "student": d.student,
                                        "student_spec": spec, "adapters": len(objective.adapters)})


