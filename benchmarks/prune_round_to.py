"""int8 / fp32 latency of a pruned MobileNetV2-0.35 (96x96, the zoo's) with and without `round_to`.

For each channel ratio, the zoo's MobileNetV2 (width_mult 0.35, 3x96x96, 10 classes) is pruned by the prune
stage's own `prune_model` (filter L1, stem and classifier kept) once without rounding and once with the
rounding of each `round_to` asked for; each is exported to ONNX fp32 and to edgekit's ONNX int8 (x86-avx2
preset: the x86-64 target's primary artifact), and all artifacts of one ratio are timed side by side in
onnxruntime, 1 thread, alternating one run of each per round (so load on the machine hits all alike).
Weights are untrained: latency depends on the channel counts, not on the values. For each fp32 model it counts
the convs that onnxruntime's optimizer leaves outside its blocked NCHWc layout (FusedConv nodes in the optimized
graph): those run the slower plain path.

Timing runs natively and, when /work/shared/tools/as-avx2 (or $AS_AVX2) exists, again as an AVX2 CPU without
AVX-512/VNNI under qemu: its numbers are emulated (TCG, about 1/20 speed), so only its ratios are indicative.

    .venv/bin/python benchmarks/prune_round_to.py [--ratios 0 0.3 0.5] [--round-to 8 16] [--rounds 1000]
    # writes benchmarks/results/prune_round_to.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
AS_AVX2 = Path(os.environ.get("AS_AVX2", "/work/shared/tools/as-avx2"))
SHAPE = (3, 96, 96)


def cpu() -> dict:
    info = Path("/proc/cpuinfo").read_text().splitlines()
    name = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), "unknown")
    flags = set(next((ln.split(":", 1)[1].split() for ln in info if ln.startswith("flags")), []))
    return {"name": name, "cores": os.cpu_count(), "flags": sorted(flags & {"avx2", "avx512f", "avx512_vnni",
                                                                            "avx_vnni"})}


# --- building: prune, export fp32 and int8 ONNX -------------------------------------------------------------

def channel_counts(model) -> list[int]:
    from torch import nn

    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def build(ratios: list[float], round_tos: list[int], folder: Path) -> list[dict]:
    import torch

    from edgekit import metrics, onnx_int8, quiet
    from edgekit.models import build_named
    from edgekit.stages.prune import Plan, prune_model
    from edgekit.targets import INT8_PRESETS

    quiet.setup()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    base = build_named("mobilenet_v2", SHAPE, 10, width_mult=0.35).eval()
    calib = np.random.default_rng(0).random((32, *SHAPE), dtype=np.float32)
    macs0, _ = metrics.macs_and_params(base, SHAPE)
    models = []
    for ratio in ratios:
        for rt in [None, *round_tos] if ratio else [None]:
            model = copy.deepcopy(base)
            if ratio:
                prune_model(model, SHAPE, 10, Plan(method="l1", ratio=ratio, round_to=rt))
            name = f"r{ratio:g}_" + (f"round{rt}" if rt else "plain")
            fp32 = folder / f"{name}_fp32.onnx"
            torch.onnx.export(model.eval(), (torch.zeros(1, *SHAPE),), str(fp32), dynamo=False, input_names=["input"])
            int8, _ = onnx_int8.quantize(fp32, calib, INT8_PRESETS["x86-avx2"])
            (folder / f"{name}_int8.onnx").write_bytes(int8)
            fp32_ops = onnx_int8.optimized_ops(fp32.read_bytes())
            counts = channel_counts(model)
            models.append({"name": name, "ratio": ratio, "round_to": rt, "macs_kept": metrics.macs_and_params(
                model, SHAPE)[0] / macs0, "channels": counts, "not_multiple_of_8": sum(c % 8 != 0 for c in counts),
                "fused": onnx_int8.fusion(int8), "fp32_convs_outside_nchwc": fp32_ops.get("FusedConv", 0),
                "fp32_optimized_ops": dict(fp32_ops)})
            print(f"built {name}: MACs kept {models[-1]['macs_kept']:.3f}, {models[-1]['not_multiple_of_8']} of "
                  f"{len(counts)} conv widths not a multiple of 8", flush=True)
    return models


# --- timing (a child process, so that it can run as AVX2 under qemu) ----------------------------------------

def time_folder(folder: Path, rounds: int, warmup: int) -> dict:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    files = sorted(folder.glob("*.onnx"))
    sessions = {f.stem: ort.InferenceSession(str(f), opts, providers=["CPUExecutionProvider"]) for f in files}
    x = np.random.default_rng(1).random((1, *SHAPE), dtype=np.float32)
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    names = list(sessions)
    for r in range(warmup + rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:  # a different order each round
            t0 = time.perf_counter()
            sessions[name].run(None, {"input": x})
            if r >= warmup:
                samples[name].append(1000 * (time.perf_counter() - t0))
    return {k: {"p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)), "runs": len(v)}
            for k, v in samples.items()}


def timed(folder: Path, rounds: int, warmup: int, emulate: bool) -> dict:
    cmd = [sys.executable, __file__, "--time-only", str(folder), "--rounds", str(rounds), "--warmup", str(warmup)]
    cmd = [str(AS_AVX2), *cmd] if emulate else cmd
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- report -------------------------------------------------------------------------------------------------

def rows(models: list[dict], times: dict) -> list[dict]:
    out = []
    for m in models:
        fp32, int8 = times[f"{m['name']}_fp32"], times[f"{m['name']}_int8"]
        keys = ("name", "ratio", "round_to", "macs_kept", "not_multiple_of_8", "fp32_convs_outside_nchwc")
        out.append({**{k: m[k] for k in keys},
                    "fp32_p50_ms": fp32["p50"], "int8_p50_ms": int8["p50"], "int8_over_fp32": int8["p50"] / fp32["p50"],
                    "runs": int8["runs"]})
    return out


def markdown(result: dict) -> str:
    c = result["cpu"]
    lines = [f"`{result['command']}`, {result['date']}, {c['name']}, {c['cores']} cores, flags {' '.join(c['flags'])};"
             " machine shared with other jobs (load hits every artifact of a run alike: they alternate).", "",
             "MobileNetV2-0.35 (zoo), 3x96x96, untrained weights, l1 channel pruning (stem and classifier kept); "
             "ONNX fp32 vs edgekit's ONNX int8 (x86-avx2 preset), onnxruntime "
             f"{result['onnxruntime']}, 1 thread, all artifacts timed alternately, "
             f"{result['rounds']} rounds after {result['warmup']} warm-up.", ""]
    for where, table in result["runs"].items():
        lines += [f"### {where}", "", "| channel ratio removed | round_to | MACs kept | conv widths not a multiple "
                  "of 8 | fp32 convs outside NCHWc | fp32 p50 ms | int8 p50 ms | int8/fp32 |", "|---" * 8 + "|"]
        for r in table:
            lines.append(f"| {r['ratio']:g} | {r['round_to'] or '-'} | {r['macs_kept']:.3f} | "
                         f"{r['not_multiple_of_8']} | {r['fp32_convs_outside_nchwc']} | {r['fp32_p50_ms']:.3f} | "
                         f"{r['int8_p50_ms']:.3f} | "
                         f"{r['int8_over_fp32']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.3, 0.5])
    ap.add_argument("--round-to", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--rounds", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--emulated-rounds", type=int, default=40)
    ap.add_argument("--time-only", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.time_only:
        print(json.dumps(time_folder(args.time_only, args.rounds, args.warmup)))
        return
    import onnxruntime

    result = {"command": " ".join(["python benchmarks/prune_round_to.py", *sys.argv[1:]]),
              "date": time.strftime("%Y-%m-%d"), "cpu": cpu(), "onnxruntime": onnxruntime.__version__,
              "rounds": args.rounds, "warmup": args.warmup, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="edgekit-round-to-") as tmp:
        models = build(args.ratios, args.round_to, Path(tmp))
        result["models"] = models
        for ratio in args.ratios:  # one alternating run per ratio: its plain and rounded artifacts side by side
            sub = Path(tmp) / f"r{ratio:g}"
            sub.mkdir()
            for f in Path(tmp).glob(f"r{ratio:g}_*.onnx"):
                f.rename(sub / f.name)
            mine = [m for m in models if m["ratio"] == ratio]
            native = timed(sub, args.rounds, args.warmup, emulate=False)
            result["runs"].setdefault(f"native ({result['cpu']['name']})", []).extend(rows(mine, native))
            print(f"timed ratio {ratio:g} natively", flush=True)
            if AS_AVX2.exists():
                emu = timed(sub, args.emulated_rounds, 3, emulate=True)
                result["runs"].setdefault("as AVX2 (qemu Haswell-v4, emulated: ratios only)", []).extend(
                    rows(mine, emu))
                print(f"timed ratio {ratio:g} as AVX2 (emulated)", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prune_round_to.json").write_text(json.dumps(result, indent=1))
    (RESULTS / "prune_round_to.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
