"""Issue #13: the compression study on Fashion-MNIST (28x28, the publisher's 10 000 test images).

Zoo models ResNet-8, DS-CNN and MobileNetV2-0.35 through edgekit's own stages, each row written to the JSON as
soon as it is measured; a rerun skips the rows already there (build folders live under --work):

    nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.compression_fashion --out benchmarks/results

Scale (stated in the results; `--scale`): `cpu` trains on a slice of 5 000 images with short schedules (about
an hour on one core), `full` on the whole training split (all 60 000 images but the validation carve) with
longer ones, so that the fp32 models reach the published range (several hours per model: it resumes row by row,
into its own results file). One fp32 model per zoo model; the pruning-method comparison at 70 % MACs removed and the KD
study run SEEDS on ResNet-8 (the seed drives fine-tuning, batch order and the random baseline's channels) and
one seed on the others (`--seeds N`: N on every model). int8 TFLite: rpi5's full-int8 artifact with int8 I/O,
checked on all 10 000 test images.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import re
import shutil
import statistics
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from benchmarks.compression import artifacts, fork
from benchmarks.compression import stage as run_stage
from edgekit import config, data, targets
from edgekit.formats import tflite
from edgekit.stages import distill, prune, quantize, train
from edgekit.stages.base import Context

MODELS = [("resnet8", 1.0), ("mobilenet_v2", 0.35), ("ds_cnn", 1.0)]  # in priority order
N_VAL = 1000  # validation images (carved from the training part); the test split is all 10 000
DATA = {"source": "fashion-mnist"}


@dataclasses.dataclass(frozen=True)
class Scale:
    results: str  # the results files' stem
    n_train: int | None  # a random slice of the training split; None: all of it
    epochs: dict


SCALES = {"cpu": Scale("compression-fashion", 5000, {"train": 6, "finetune": 2, "distill": 2, "qat": 1}),
          "full": Scale("compression-fashion-full", None, {"train": 10, "finetune": 3, "distill": 3, "qat": 1})}
SEEDS = {"resnet8": [0, 1, 2]}  # others: [0]
METHODS = [("l1", "local"), ("slimming", "global"), ("taylor", "local"), ("random", "local")]
PUBLISHED = "Zalando's benchmark (full 60 000 training images): small CNNs 90-92 %, ResNet-18 94.9 %, MobileNet 95.0 %"
TFLITE_INT8 = "tflite_int8_int8io"
LITERATURE = ("What the literature finds on ranking vs random: Liu et al. 2019 (\"Rethinking the Value of Network "
              "Pruning\", ICLR) show that for structured (channel) pruning the inherited weights and the importance "
              "criterion matter little once the pruned network is trained enough: the pruned architecture trained "
              "from scratch matches or beats fine-tuning, and criteria beat random channel choice mainly right "
              "after pruning (before fine-tuning), by little after it. A gap larger than one seed-std after "
              "fine-tuning is therefore not expected; with short fine-tuning (as here) a gap can survive.")


def seeds(model: str) -> list[int]:
    return SEEDS.get(model, [0])


def seeds_in(rows: dict, model: str) -> list[int]:
    """The seeds a model's rows were measured with (whatever --seeds the runs that made them had)."""
    found = {int(m.group(1)) for key in rows if key.startswith(f"{model}:") and (m := re.search(r" seed (\d+)$", key))}
    return sorted(found)


def make_cfg(model: str, width: float, seed: int = 0, epochs: dict = SCALES["cpu"].epochs,
             **sections: dict) -> config.Config:
    raw = {"data": DATA, "model": {"name": model, "width_mult": width},
           "train": {"epochs": epochs["train"], "lr": 3e-3, "seed": seed},
           "prune": {"method": "l1", "target_macs": 0.3, "steps": 1, "accuracy_guard": False,
                     "finetune_epochs": epochs["finetune"], "sparsity_epochs": 1, "sparsity_strength": 1e-3},
           "distill": {"epochs": epochs["distill"]},
           "quantize": {"method": "qat", "qat_epochs": epochs["qat"], "subset_size": 128}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return config.from_dict(raw)


def load_data(n_train: int | None) -> data.Dataset:
    """A random slice of `n_train` training images (None: all) and of the validation split, in memory (a
    memory-mapped training split cannot be fingerprinted by the stage keys); the publisher's whole test set."""
    ds = data.load_dataset(make_cfg("resnet8", 1.0))
    n = len(ds.train.y)
    pick = np.sort(np.random.default_rng(0).choice(n, n_train, replace=False)) if n_train else np.arange(n)
    return dataclasses.replace(ds, train=data.Split(np.asarray(ds.train.x[pick]), ds.train.y[pick]),
                               val=data.Split(ds.val.x[:N_VAL], ds.val.y[:N_VAL]))


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "seeds": values}


class Study:
    """Rows keyed by name in one JSON file, written after each; a key already there is not measured again."""

    def __init__(self, out: Path, work: Path, ds: data.Dataset, log, scale: Scale = SCALES["cpu"]) -> None:
        self.json, self.work, self.ds, self.log, self.scale = out / f"{scale.results}.json", work, ds, log, scale
        self.rows = json.loads(self.json.read_text()) if self.json.is_file() else {}
        self.on_row = lambda rows: None

    def once(self, key: str, measure) -> dict:
        if key not in self.rows:
            t0 = time.perf_counter()
            self.rows[key] = {**measure(), "seconds": round(time.perf_counter() - t0, 1)}
            self.json.write_text(json.dumps(self.rows, indent=2, default=float))
            self.on_row(self.rows)
            self.log(f"{key}: {json.dumps(self.rows[key], default=float)[:200]}")
        return self.rows[key]

    def ctx(self, cfg: config.Config, name: str, src: Path | None = None, stages: tuple = (),
            target_names: tuple = ()) -> Context:
        dst = self.work / name
        for half in (dst / "stages").glob("*"):  # a stage a killed run left unfinished
            if not (half / "metrics.json").is_file():
                shutil.rmtree(half)
        dst.mkdir(parents=True, exist_ok=True)
        if src is not None:
            fork(src, dst, [s for s in stages if not (dst / "stages" / s).is_dir()])
        return Context(cfg, self.ds, dst, targets.get(list(target_names)) if target_names else [])


def stage(ctx: Context, module) -> dict:
    """The stage's record: finished by an earlier, killed run (its metrics.json written last), else run now."""
    done = ctx.stage_dir(module.name) / "metrics.json"
    return json.loads(done.read_text()) if done.is_file() else run_stage(ctx, module)


def tflite_cells(arts: dict) -> dict:
    fp32, int8 = arts.get("tflite_fp32", (None, None)), arts.get(TFLITE_INT8, (None, None))
    return {"tflite_fp32_acc": fp32[0], "tflite_fp32_bytes": fp32[1], "tflite_int8_acc": int8[0],
            "tflite_int8_bytes": int8[1], "export_error": arts.get("error")}


def recalibrated(ctx: Context) -> dict:
    """The same QAT model exported the old way: the TFLite converter recalibrates every activation range."""
    with mock.patch.object(tflite, "carried_ranges", lambda *_a, **_k: None):
        return artifacts(ctx)


def run_model(st: Study, name: str, width: float) -> None:
    w, k = st.work / name, f"{name}:"
    base_dir = w / "base"

    def cfg(seed: int = 0, **sections: dict) -> config.Config:
        return make_cfg(name, width, seed, st.scale.epochs, **sections)

    def base() -> dict:
        ctx = st.ctx(cfg(), f"{name}/base", target_names=("rpi5",))
        m = stage(ctx, train)
        return {"accuracy": m["accuracy"], "params": m["params"], "macs": m["macs"], **tflite_cells(artifacts(ctx))}

    fp32 = st.once(k + "fp32", base)

    def shipped(label: str, src: Path, stages: tuple, keep: float | None, compare: bool = False) -> dict:
        c = cfg(prune={"target_macs": keep} if keep else {}, distill={"losses": ["soft"]})
        ctx = st.ctx(c, f"{name}/qat_{label}", src, stages, ("rpi5",))
        m = stage(ctx, quantize)
        carried = tflite_cells(artifacts(ctx))
        records = json.loads((ctx.stage_dir("export") / "artifacts.json").read_text())
        carried["ranges"] = next((r.get("activation_ranges") for r in records if r["name"] == TFLITE_INT8), None)
        old = tflite_cells(recalibrated(ctx)) if compare else {"tflite_int8_acc": None, "tflite_int8_bytes": None}
        return {"accuracy": m["accuracy"], "ptq_accuracy": m["ptq_accuracy"], "params": m["params"],
                "macs": m["macs"], **carried, "recalibrated_int8_acc": old["tflite_int8_acc"],
                "recalibrated_int8_bytes": old["tflite_int8_bytes"]}

    st.once(f"{k}qat unpruned", lambda: shipped("unpruned", base_dir, ("train",), None, True))

    def pruned(method: str, scope: str, seed: int, keep: float) -> dict:
        c = cfg(seed, prune={"method": method, "scope": scope, "target_macs": keep})
        m = stage(st.ctx(c, f"{name}/prune_{method}_{keep}_{seed}", base_dir, ("train",)), prune)
        return {"accuracy": m["accuracy"], "params": m["params"], "macs": m["macs"], "macs_kept": m["macs_kept"],
                "before_ft": m["rounds"][-1]["val_accuracy_before_finetune"]}

    def distilled(keep: float, seed: int, alpha: float) -> dict:
        c = cfg(seed, prune={"target_macs": keep}, distill={"alpha": alpha, "losses": ["soft"]})
        ctx = st.ctx(c, f"{name}/distill_{keep}_{alpha}_{seed}", w / f"prune_l1_{keep}_0", ("train", "prune"))
        return {"accuracy": stage(ctx, distill)["accuracy"]}

    def seed_rows(seed: int) -> None:
        for method, scope in METHODS:  # the pruning methods at 70 % MACs removed
            st.once(f"{k}prune {method} 70% seed {seed}", lambda m=method, s=scope: pruned(m, s, seed, 0.3))
        for alpha in (0.0, 0.7):  # KD (alpha 0.7, T 4) vs the same student and schedule on hard labels (alpha 0)
            st.once(f"{k}distill 70% alpha {alpha} seed {seed}", lambda a=alpha: distilled(0.3, seed, a))

    seed_rows(0)  # every goal measured on seed 0 first, then the seeds that give the spread
    st.once(f"{k}prune l1 50% seed 0", lambda: pruned("l1", "local", 0, 0.5))
    st.once(f"{k}distill 50% seed 0", lambda: distilled(0.5, 0, 0.7))
    st.once(f"{k}qat l1 50% + KD", lambda: shipped("50", w / "distill_0.5_0.7_0", ("train", "prune", "distill"), 0.5))
    st.once(f"{k}qat l1 70% + KD", lambda: shipped("70", w / "distill_0.3_0.7_0", ("train", "prune", "distill"), 0.3))
    for seed in seeds(name)[1:]:
        seed_rows(seed)
    del fp32


# --- the report ---------------------------------------------------------------------------------------------

def pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.2f}"


def ms(values: list[float]) -> str:
    s = mean_std(values)
    return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f} (n={len(values)})"


def goal(model: str, what: str, hit: bool | None, numbers: str) -> str:
    """hit None: not decidable from what was run (a seed comparison with one seed)."""
    verdict = "n/a (one seed)" if hit is None else "hit" if hit else "MISS"
    return f"| {model} | {what} | {verdict} | {numbers} |"


def report(rows: dict, seconds: float, command: str, note: str = "", scale: Scale = SCALES["cpu"]) -> str:
    lines = ["| model | row | test acc % | params | MACs | TFLite fp32 KB | TFLite int8 KB | TFLite int8 acc % |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    order = [n for n, _ in MODELS]
    kinds = ["fp32", "qat unpruned", "prune", "distill", "qat l1 50%", "qat l1 70%"]

    def rank(key: str) -> tuple:
        model, label = key.split(":", 1)
        return order.index(model), next(i for i, k in enumerate(kinds + [""]) if label.startswith(k)), label

    for key in sorted(rows, key=rank):
        r = rows[key]
        model, label = key.split(":", 1)
        lines.append(f"| {model} | {label} | {pct(r.get('accuracy'))} | {r.get('params') or ''} | "
                     f"{r.get('macs') or ''} | {_kb(r.get('tflite_fp32_bytes'))} | {_kb(r.get('tflite_int8_bytes'))}"
                     f" | {pct(r.get('tflite_int8_acc'))} |")
    g = ["| model | goal | hit | numbers (mean ± std over seeds, n = seeds) |", "| --- | --- | --- | --- |"]
    for name, _ in MODELS:
        g += model_goals(rows, name)
    e = scale.epochs
    return (f"# Compression study on Fashion-MNIST — {time.strftime('%Y-%m-%d')}, {cpu()}\n\n"
            f"`{command}` ({sum(r.get('seconds', 0) for r in rows.values()) / 60:.0f} min of measuring, summed over "
            f"the rows; a rerun resumes, skipping the rows in the JSON). Scale: {_train_images(scale)}, 28x28, "
            f"the full 10 000-image test set (one image = 0.01 pp); epochs: train {e['train']}, prune fine-tune "
            f"{e['finetune']}, distill {e['distill']}, QAT {e['qat']}; one fp32 model per zoo model; seeds measured "
            f"{ {n: seeds_in(rows, n) for n, _ in MODELS if seeds_in(rows, n)} }. "
            f"Published for comparison: {PUBLISHED}. int8 TFLite = full int8 with int8 I/O (rpi5); "
            "'carried' = NNCF's activation ranges written into the TFLite converter's calibration, "
            "'recalibrated' = the converter's own ranges from the calibration split."
            + (f" {note}" if note else "") + "\n\n"
            + "\n".join(lines) + "\n\n## Goals\n\n" + "\n".join(g) + "\n\n" + LITERATURE + "\n")


def _train_images(scale: Scale) -> str:
    if scale.n_train:
        return f"{scale.n_train} training images of the 60 000 (a random slice)"
    n = 60000 - int(60000 * make_cfg("resnet8", 1.0).data.val_fraction)
    return f"all {n} training images (the 60 000 less the validation carve)"


def _carried(r: dict) -> str:
    c = r.get("ranges")
    if not isinstance(c, dict):
        return "ranges carried: not recorded"
    left = len(c.get("per_channel_left_to_converter", []))
    return f"NNCF ranges carried {c['carried']}/{c['quantizers']}" + (f", {left} per-channel left to the converter"
                                                                    if left else "")


def _kb(v: int | None) -> str:
    return "" if v is None else f"{v / 1024:.1f}"


def model_goals(rows: dict, name: str) -> list[str]:
    k = f"{name}:"
    fp32 = rows.get(k + "fp32")
    if fp32 is None:
        return [goal(name, "measured", False, "not run (time budget)")]
    out, base = [], fp32["accuracy"]
    if fp32.get("tflite_int8_acc") is not None:
        d = fp32["tflite_int8_acc"] - base
        out.append(goal(name, "int8 TFLite (PTQ) within 0.5 pp of fp32", d >= -0.005,
                        f"fp32 {pct(base)} %, int8 {pct(fp32['tflite_int8_acc'])} % ({100 * d:+.2f} pp), n=1"))
    q = rows.get(k + "qat unpruned")
    if q and q.get("tflite_int8_acc") is not None:
        d = q["tflite_int8_acc"] - base
        out.append(goal(name, "int8 TFLite after QAT within 0.5 pp of fp32", d >= -0.005, f"{100 * d:+.2f} pp, n=1"))
        ptq, old = fp32.get("tflite_int8_acc"), q.get("recalibrated_int8_acc")
        out.append(goal(name, "shipped QAT TFLite (ranges carried) beats PTQ-only TFLite", q["tflite_int8_acc"] > ptq,
                        f"carried {pct(q['tflite_int8_acc'])} %, PTQ-only {pct(ptq)} %, QAT weights but converter "
                        f"ranges {pct(old)} %, NNCF QAT (torch) {pct(q['accuracy'])} %; {_carried(q)}; n=1"))
    for label, removed in (("50%", 0.5), ("70%", 0.7)):
        f = rows.get(f"{k}qat l1 {label} + KD")
        if not f or f.get("tflite_int8_acc") is None:
            continue
        d, cut = f["tflite_int8_acc"] - base, 1 - f["macs"] / fp32["macs"]
        out.append(goal(name, f"{label} MACs removed + KD + QAT: int8 TFLite within 1 pp of fp32",
                        cut >= removed - 0.02 and d >= -0.01,
                        f"{100 * cut:.0f} % removed, {100 * d:+.2f} pp; {_carried(f)}; n=1"))
        ratio = fp32["tflite_fp32_bytes"] / f["tflite_int8_bytes"]
        out.append(goal(name, f"{label}: ≥ 12× smaller than the fp32 TFLite within 1 pp", ratio >= 12 and d >= -0.01,
                        f"{ratio:.1f}× ({_kb(fp32['tflite_fp32_bytes'])} → {_kb(f['tflite_int8_bytes'])} KB), "
                        f"{100 * d:+.2f} pp"))
    measured = seeds_in(rows, name)
    accs = {m: [rows[f"{k}prune {m} 70% seed {s}"]["accuracy"] for s in measured
                if f"{k}prune {m} 70% seed {s}" in rows] for m, _ in METHODS}
    early = {m: [rows[f"{k}prune {m} 70% seed {s}"]["before_ft"] for s in measured
                 if f"{k}prune {m} 70% seed {s}" in rows] for m, _ in METHODS}
    rand = accs["random"]
    for m in ("l1", "slimming", "taylor"):
        if not accs[m] or not rand:
            continue
        d = statistics.mean(accs[m]) - statistics.mean(rand)
        d0 = statistics.mean(early[m]) - statistics.mean(early["random"])
        spread = max(mean_std(accs[m])["std"], mean_std(rand)["std"])
        out.append(goal(name, f"{m} beats random by > one seed-std at 70 % MACs removed (after FT)",
                        d > spread if len(accs[m]) > 1 else None,
                        f"{m} {ms(accs[m])}, random {ms(rand)}: {100 * d:+.2f} pp vs std {100 * spread:.2f}; "
                        f"right after pruning (val) {100 * d0:+.1f} pp"))
    ce = [rows[f"{k}distill 70% alpha 0.0 seed {s}"]["accuracy"] for s in measured
          if f"{k}distill 70% alpha 0.0 seed {s}" in rows]
    kd = [rows[f"{k}distill 70% alpha 0.7 seed {s}"]["accuracy"] for s in measured
          if f"{k}distill 70% alpha 0.7 seed {s}" in rows]
    if ce and kd and len(ce) == len(kd):
        d = statistics.mean(kd) - statistics.mean(ce)
        spread = max(mean_std(kd)["std"], mean_std(ce)["std"])  # a higher mean inside the seeds' noise is no win
        out.append(goal(name, "KD student (70 % pruned, alpha 0.7) beats the same student without KD by > one seed-std",
                        d > spread if len(kd) > 1 else None,
                        f"KD {ms(kd)}, CE {ms(ce)}: {100 * d:+.2f} pp vs std {100 * spread:.2f}"))
    return out


def cpu() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    return f"{model} ({', '.join(f for f in ('avx2', 'avx512_vnni') if f in flags) or 'no avx2'})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--work", default="/tmp/edgekit-compression-fashion", help="build folders (kept for resuming)")
    ap.add_argument("--models", nargs="*", help="zoo model names (default: all, in priority order)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the markdown from the JSON")
    ap.add_argument("--note", default="", help="a sentence about this run for the markdown (wall time, restarts)")
    ap.add_argument("--seeds", type=int, help="seeds for the seed comparisons, every model (default: 3 for ResNet-8, "
                    "1 for the others); a later run with more adds the missing seeds' rows")
    ap.add_argument("--scale", choices=sorted(SCALES), default="cpu",
                    help="cpu: 5 000 training images, short schedules; full: the whole training split, longer ones")
    args = ap.parse_args(argv)
    if args.seeds:
        SEEDS.update({name: list(range(args.seeds)) for name, _ in MODELS})
    scale = SCALES[args.scale]
    torch.set_num_threads(1)  # the study shares the machine; one thread is also the fastest per CPU here
    out, t0 = Path(args.out), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    command = "nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.compression_fashion" + \
        (f" --scale {args.scale}" if args.scale != "cpu" else "") + (f" --seeds {args.seeds}" if args.seeds else "")
    md = out / f"{scale.results}.md"

    def log(s: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {s}", flush=True)

    st = Study(out, Path(args.work) / args.scale, None if args.report_only else load_data(scale.n_train), log, scale)
    st.on_row = lambda rows: md.write_text(report(rows, time.perf_counter() - t0, command, args.note, scale))
    for name, width in ([] if args.report_only else MODELS):
        if not args.models or name in args.models:
            run_model(st, name, width)
    text = report(st.rows, time.perf_counter() - t0, command, args.note, scale)
    md.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
