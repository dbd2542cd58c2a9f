"""STUDY, not a shipped artifact: low-bit weights on Fashion-MNIST (issue #13).

    nice -n 19 .venv/bin/python benchmarks/lowbit.py                          # small_cnn
    nice -n 19 .venv/bin/python benchmarks/lowbit.py --models small_cnn resnet8

One float model per architecture is trained, then each row starts from it:

- fp32, int8 (edgekit's ONNX int8, x86-avx2 preset: first conv float), int4 weight-only per channel and
  blockwise (edgekit.onnx_int4): ONNX artifacts run by onnxruntime on the test split; file bytes and latency.
- int4 / ternary / binary weights by QAT with a straight-through estimator (weights quantized in the forward
  pass, gradients passed to the float weights unchanged), per output channel: int4 levels -7..7 x max|w|/7;
  ternary TWN (threshold 0.7 x mean|w|, scale the mean |w| above it); binary sign(w) x mean|w|. The first conv
  and the classifier stay int8 (fake-quantized) in the ternary and binary rows, as in the TWN / XNOR-Net papers.
  No target runtime runs 2- or 1-bit weights (onnxruntime and LiteRT have no such kernels), so these rows are
  torch accuracy with the quantized weights and packed sizes only: no file, no latency.
- mixed int4 / int8 / float per layer (weight-only, edgekit.onnx_int4 plans): each layer's sensitivity is the
  validation accuracy lost with that layer alone at int4; starting from all int4, the most sensitive layer is
  promoted (int4 -> int8, and when all are int8, int8 -> float) until validation accuracy is within the
  tolerance of fp32.

Packed weight bytes count Conv / Linear weights at their bit width plus one float32 scale per channel (or
block), the same formula for every row; biases, BatchNorm and activation parameters are left out. Latency: batch
1, onnxruntime with 1 thread, all optimizations, the artifacts timed in alternation (one run each per round).
Writes benchmarks/results/lowbit.json|md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repository root

from edgekit import config, data, metrics, models, onnx_int4, onnx_int8, training  # noqa: E402
from edgekit.formats import onnx as onnx_format  # noqa: E402
from edgekit.stages.export import fold_linear_bn  # noqa: E402
from edgekit.targets import Int8Settings  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DATA = {"source": "fashion-mnist", "limit": 22000, "test_fraction": 0.45}  # 10 285 train, 1 815 val, 9 900 test
EPOCHS, QAT_EPOCHS, LR, QAT_LR = 3, 1, 3e-3, 1e-3  # sized to fit ~10 min CPU per model on a shared machine
BLOCKS = (32, 16)  # int4 blockwise: input channels per scale
TOLERANCES_PP = (0.25, 1.0)  # mixed precision: validation accuracy within this of fp32
LATENCY_ROUNDS, WARMUP = 1000, 50
THREADS = 2  # torch training; latency is 1 onnxruntime thread


# --- QAT: weights quantized in the forward pass, straight-through gradients ------------------------------------

def _per_channel(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1)


def _shape(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (w.dim() - 1)))


def uniform(bits: int):
    top = onnx_int4.LEVELS[bits]

    def quantize(w: torch.Tensor) -> torch.Tensor:
        scale = _shape(_per_channel(w).abs().amax(1).clamp_min(1e-12) / top, w)
        return torch.clamp(torch.round(w / scale), -top, top) * scale
    return quantize


def ternary(w: torch.Tensor) -> torch.Tensor:
    """TWN (Li & Liu 2016): zero below 0.7 x mean|w|, else +-alpha, alpha the mean |w| of the rest, per channel."""
    a = _per_channel(w).abs()
    delta = 0.7 * a.mean(1, keepdim=True)
    mask = (a > delta).float()
    alpha = (a * mask).sum(1) / mask.sum(1).clamp_min(1)
    return _shape(alpha, w) * torch.sign(w) * mask.reshape(w.shape)


def binary(w: torch.Tensor) -> torch.Tensor:
    """BWN (XNOR-Net, Rastegari et al. 2016): sign(w) x mean|w| per output channel."""
    alpha = _per_channel(w).abs().mean(1)
    return _shape(alpha, w) * torch.where(w >= 0, 1.0, -1.0)


QUANTIZERS = {"int8": (uniform(8), 8), "int4": (uniform(4), 4), "ternary": (ternary, 2), "binary": (binary, 1)}


class STE(nn.Module):
    """A weight parametrization: the quantized weight forward, the identity backward."""

    def __init__(self, quantize) -> None:
        super().__init__()
        self.quantize = quantize

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (self.quantize(w) - w).detach()


def weighted(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def qat(base: nn.Module, kind: str, ds, edges: str) -> tuple[nn.Module, list[dict]]:
    """Fine-tune a copy of `base` with `kind` weights (first conv and classifier at `edges`); the weights it
    ends with are the quantized ones. Returns the model and its layers' (weights, bits, scales)."""
    model = copy.deepcopy(base)
    layers = weighted(model)
    plan = {}
    for i, (name, module) in enumerate(layers):
        chosen = edges if i in (0, len(layers) - 1) else kind
        plan[name] = chosen
        parametrize.register_parametrization(module, "weight", STE(QUANTIZERS[chosen][0]))
    training.fit(model, ds.train, ds.val, epochs=QAT_EPOCHS, lr=QAT_LR, desc=f"qat {kind}")
    for _, module in layers:
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model.eval(), [{"node": n, "bits": QUANTIZERS[plan[n]][1], "weights": m.weight.numel(),
                           "scales": m.weight.shape[0]} for n, m in layers]


# --- ONNX artifacts ----------------------------------------------------------------------------------------------

def session(payload: bytes, threads: int = 1):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3
    return ort.InferenceSession(payload, opts, providers=["CPUExecutionProvider"])


def ort_logits(payload: bytes, x: np.ndarray) -> np.ndarray:
    sess = session(payload, threads=THREADS)
    return np.concatenate([sess.run(None, {"input": x[i:i + 500]})[0] for i in range(0, len(x), 500)])


def latency_p50(payloads: dict[str, bytes], x: np.ndarray) -> dict[str, float]:
    """Batch-1 p50 (ms) of each artifact, timed in alternation so that machine load hits all alike."""
    sessions = {k: session(p) for k, p in payloads.items()}
    times = {k: [] for k in sessions}
    for r in range(WARMUP + LATENCY_ROUNDS):
        sample = x[r % len(x)][None]
        for k, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run(None, {"input": sample})
            if r >= WARMUP:
                times[k].append(time.perf_counter() - t0)
    return {k: round(1e3 * float(np.median(v)), 4) for k, v in times.items()}


def float_layers(model: nn.Module, bits: int = 32, int8_first_float: bool = False) -> list[dict]:
    layers = weighted(model)
    return [{"node": n, "bits": 32 if (int8_first_float and i == 0) else bits, "weights": m.weight.numel(),
             "scales": 0 if bits == 32 or (int8_first_float and i == 0) else m.weight.shape[0]}
            for i, (n, m) in enumerate(layers)]


def mixed(fp32: bytes, ds, ref_val: float, tolerance_pp: float) -> tuple[bytes, dict]:
    """Greedy weight-only mixed precision by measured sensitivity (see the module docstring)."""
    import onnx

    names = [n.name for n, _ in onnx_int4.weighted_nodes(onnx.load_from_string(fp32))]

    def val_acc(plan: dict) -> float:
        return metrics.accuracy(ort_logits(onnx_int4.quantize(fp32, plan=plan)[0], ds.val.x), ds.val.y)

    drop = {n: ref_val - val_acc({m: 4 if m == n else 32 for m in names}) for n in names}
    order = sorted(names, key=lambda n: drop[n], reverse=True)
    plan, steps = dict.fromkeys(names, 4), 0
    while (acc := val_acc(plan)) < ref_val - tolerance_pp / 100 and any(b < 32 for b in plan.values()):
        low = min(plan.values())
        layer = next(n for n in order if plan[n] == low)
        plan[layer] = {4: 8, 8: 32}[low]
        steps += 1
    payload, info = onnx_int4.quantize(fp32, plan=plan)
    return payload, {"plan": plan, "sensitivity_pp": {n: round(100 * d, 2) for n, d in drop.items()},
                     "val_accuracy": acc, "promotions": steps, "layers": info["layers"]}


# --- one architecture ----------------------------------------------------------------------------------------------

def study(model_name: str, ds, work: Path) -> dict:
    cfg = config.from_dict({"data": DATA, "model": {"name": model_name}})
    training.seed_everything(0)
    base = models.build_model(cfg, ds.sample_shape, ds.num_classes)
    t0 = time.perf_counter()
    training.fit(base, ds.train, ds.val, epochs=EPOCHS, lr=LR, weight_decay=1e-4, desc=model_name)
    base.eval()
    train_s = time.perf_counter() - t0
    ref_val = metrics.accuracy(metrics.logits(base, ds.val.x), ds.val.y)
    x_test, y_test = ds.test.x, ds.test.y

    folded = fold_linear_bn(copy.deepcopy(base))
    fp32_path = onnx_format.torch_to_onnx(folded, ds.calib.x[:1], work / f"{model_name}.onnx", 17, dynamic_batch=True)
    fp32 = fp32_path.read_bytes()
    int8, _ = onnx_int8.quantize(fp32_path, ds.calib.x, Int8Settings())
    payloads = {"fp32": fp32, "int8 (edgekit ONNX int8)": int8}
    int4_info = {}
    payloads["int4 per-channel"], int4_info["int4 per-channel"] = onnx_int4.quantize(fp32)
    for block in BLOCKS:
        key = f"int4 blockwise {block}"
        payloads[key], int4_info[key] = onnx_int4.quantize(fp32, block_size=block)
    mixes = {}
    for tol in TOLERANCES_PP:
        key = f"mixed int4/int8/float (tol {tol:g} pp)"
        payloads[key], mixes[key] = mixed(fp32, ds, ref_val, tol)

    rows = []
    bytes_of = {"fp32": float_layers(folded), "int8 (edgekit ONNX int8)": float_layers(folded, 8, True)}
    bytes_of |= {k: v["layers"] for k, v in int4_info.items()} | {k: v["layers"] for k, v in mixes.items()}
    latency = latency_p50(payloads, x_test[:200])
    ref_logits = ort_logits(fp32, x_test)
    for key, payload in payloads.items():
        out = ort_logits(payload, x_test)
        rows.append({"variant": key, "accuracy": metrics.accuracy(out, y_test),
                     "agreement_vs_fp32": float((out.argmax(1) == ref_logits.argmax(1)).mean()),
                     "sqnr_db_vs_fp32": metrics.sqnr_db(ref_logits, out),
                     "packed_weight_bytes": onnx_int4.packed_weight_bytes(bytes_of[key]), "file_bytes": len(payload),
                     "p50_ms": latency[key], "runs_in": _runs_in(key),
                     **({"plan": mixes[key]["plan"], "sensitivity_pp": mixes[key]["sensitivity_pp"]}
                        if key in mixes else {})})
    for kind, edges in (("int4", "int4"), ("ternary", "int8"), ("binary", "int8")):
        t1 = time.perf_counter()
        model, layers = qat(base, kind, ds, edges)
        out = metrics.logits(model, x_test)
        label = f"{kind} QAT (STE)" + ("" if edges == kind else ", first conv + classifier int8")
        rows.append({"variant": label, "accuracy": metrics.accuracy(out, y_test),
                     "agreement_vs_fp32": float((out.argmax(1) == ref_logits.argmax(1)).mean()),
                     "sqnr_db_vs_fp32": metrics.sqnr_db(ref_logits, out),
                     "packed_weight_bytes": onnx_int4.packed_weight_bytes(layers), "file_bytes": None,
                     "p50_ms": None, "runs_in": "torch only (study): no target runtime has such kernels",
                     "qat_s": round(time.perf_counter() - t1, 1)})
    return {"model": model_name, "params": sum(p.numel() for p in base.parameters()), "train_s": round(train_s, 1),
            "fp32_val_accuracy": ref_val, "rows": rows}


def _runs_in(key: str) -> str:
    if key == "fp32":
        return "onnxruntime float kernels"
    if key.startswith("int8"):
        return "onnxruntime int8 kernels (QLinearConv / QGemm)"
    return "onnxruntime >= 1.19: int4 stored, DequantizeLinear each run, float kernels (size only)"


# --- report --------------------------------------------------------------------------------------------------------

def _cpu() -> str:
    text = Path("/proc/cpuinfo").read_text()
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    flags = sorted({f for f in text.split() if f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni")})
    return f"{model}, {len(text.split('processor')) - 1} cores, flags {' '.join(flags)}"


def markdown(report: dict) -> str:
    lines = ["# Low-bit weights on Fashion-MNIST — a study (ternary / binary are not shipped artifacts)", "",
             f"Command: `{report['command']}`  ",
             f"CPU: {report['cpu']} (load average {report['load_average_at_start']} at the start: a shared "
             f"machine); onnxruntime {report['onnxruntime']}  ",
             f"Data: {report['data']}; train {EPOCHS} epochs, QAT {QAT_EPOCHS} epochs from the trained model", ""]
    for m in report["models"]:
        lines += [f"## {m['model']} ({m['params']:,} parameters, fp32 val accuracy {m['fp32_val_accuracy']:.2%})", "",
                  "| variant | test accuracy | agreement vs fp32 | SQNR vs fp32 (dB) | packed weight bytes | "
                  "file bytes | p50 ms (1 thread) | runs in |", "|---|---|---|---|---|---|---|---|"]
        for r in m["rows"]:
            cells = [r["variant"], f"{r['accuracy']:.2%}", f"{r['agreement_vs_fp32']:.2%}",
                     f"{r['sqnr_db_vs_fp32']:.1f}",
                     f"{r['packed_weight_bytes']:,}", f"{r['file_bytes']:,}" if r["file_bytes"] else "—",
                     f"{r['p50_ms']:.3f}" if r["p50_ms"] else "—", r["runs_in"]]
            lines.append("| " + " | ".join(cells) + " |")
        for r in m["rows"]:
            if "plan" in r:
                lines.append(f"\n{r['variant']}: per layer bits {r['plan']} (sensitivity, val pp lost with the "
                             f"layer alone at int4: {r['sensitivity_pp']})")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["small_cnn"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    import onnxruntime

    ds = data.load_dataset(config.from_dict({"data": DATA}))
    report = {"command": "nice -n 19 .venv/bin/python benchmarks/lowbit.py " + " ".join(sys.argv[1:]),
              "cpu": _cpu(), "load_average_at_start": [round(v, 1) for v in os.getloadavg()],
              "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
              "data": f"Fashion-MNIST: {len(ds.train.y)} train, {len(ds.val.y)} val, {len(ds.test.y)} test",
              "models": []}
    with tempfile.TemporaryDirectory(prefix="edgekit-lowbit-") as tmp:
        for name in args.models:
            t0 = time.perf_counter()
            report["models"].append(study(name, ds, Path(tmp)) | {"wall_s": round(time.perf_counter() - t0, 1)})
            print(f"{name}: {report['models'][-1]['wall_s']} s", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lowbit.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "lowbit.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
