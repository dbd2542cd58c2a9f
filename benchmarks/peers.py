"""edgekit's int8 side by side with the int8 paths people use today, on the same models and calibration samples.

    .venv/bin/python -m benchmarks.peers [--out benchmarks/results] [--quick]

Per model it builds, from one fp32 torch model and one calibration set:
  fp32 ONNX (onnxruntime) and fp32 TFLite (LiteRT)           the baselines for the int8/fp32 ratios
  (a) ort_default   onnxruntime quantize_static with its defaults (QDQ, int8 activations and weights, per-tensor)
  (b) nncf_ptq      NNCF post-training quantization -> nncf.strip(NATIVE) -> ONNX, run in onnxruntime
  (c) tflite_int8   onnx2tf -> float SavedModel -> TensorFlow full-int8 converter (float I/O), run in LiteRT
  (d) edgekit       edgekit.onnx_int8 with the x86-64 profile's settings (and the x86-vnni preset for reference);
                    edgekit's recommendation for the x86-64 target is picked from its own candidates
                    (its onnx_int8, its TFLite int8 = (c)'s recipe, fp32 ONNX) the way `edgekit build` does
and reports accuracy, top-1 agreement with the fp32 torch model, size, p50/p90 latency at 1 and 2 threads
(every artifact of a model timed alternately, one single-sample inference each per round), int8/fp32 ratio
against the same runtime's fp32 artifact, and achieved GMAC/s. Results: peers.json and peers.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmarks.peer_models import mobilenet_v2
from edgekit import config, data, metrics, models, onnx_int8, quiet, recommend, targets, training
from edgekit.runner.runner import Artifact
from edgekit.stages.quantize import NncfRoot, load_nncf

ROOT = Path(__file__).resolve().parent
THREADS = (1, 2)
ONNX_FP32, TFLITE_FP32 = "fp32_onnx", "fp32_tflite"
TOOLS = {ONNX_FP32: "torch.onnx (fp32)", TFLITE_FP32: "onnx2tf + TFLiteConverter (fp32)",
         "ort_default": "onnxruntime quantize_static, defaults", "nncf_ptq": "NNCF PTQ -> strip -> ONNX",
         "tflite_int8": "onnx2tf + TFLiteConverter full-int8", "edgekit_onnx_int8": "edgekit onnx_int8 (x86-avx2)",
         "edgekit_onnx_int8_vnni": "edgekit onnx_int8 (x86-vnni preset)"}


# --- data and models ------------------------------------------------------------------------------------------

def digits() -> data.Dataset:
    return data.load_dataset(config.from_dict({}))


def _colour(x: np.ndarray, size: int, seed: int) -> np.ndarray:
    """8x8 grey digits -> 3 x size x size: upsampled, a random foreground and background colour, noise."""
    rng = np.random.default_rng(seed)
    up = torch.nn.functional.interpolate(torch.from_numpy(x), size=(size, size), mode="bilinear",
                                         align_corners=False).numpy()
    fg, bg = rng.uniform(0.4, 1.0, (len(x), 3, 1, 1)), rng.uniform(0.0, 0.4, (len(x), 3, 1, 1))
    out = bg + (fg - bg) * up + rng.normal(0, 0.03, (len(x), 3, size, size))
    return out.astype(np.float32)


def colour_digits(ds: data.Dataset, size: int) -> data.Dataset:
    splits = [data.Split(_colour(s.x, size, i), s.y) for i, s in enumerate((ds.train, ds.val, ds.test))]
    calib = data.Split(splits[0].x[: len(ds.calib.x)], ds.calib.y)
    return data.Dataset(*splits, calib, ds.labels, f"digits upsampled to 3x{size}x{size}, random colours")


def _fit(model: torch.nn.Module, ds: data.Dataset, epochs: int, lr: float, batch: int, cache: Path) -> torch.nn.Module:
    if cache.is_file():
        model.load_state_dict(torch.load(cache, weights_only=True))
        return model.eval()
    model = model.to(memory_format=torch.channels_last) if ds.train.x.ndim == 4 else model  # faster depthwise
    training.fit(model, ds.train, ds.val, epochs=epochs, lr=lr, batch_size=batch, weight_decay=1e-4, desc=cache.stem)
    model = model.to(memory_format=torch.contiguous_format)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), cache)
    return model.eval()


def _bn_stats(model: torch.nn.Module, x: np.ndarray) -> torch.nn.Module:
    """Untrained latency model: BatchNorm statistics from the data, so activation ranges are realistic."""
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), 32):
            model(torch.from_numpy(x[i : i + 32]))
    return model.eval()


def benchmark_models(quick: bool, cache: Path) -> list[dict]:
    torch.manual_seed(0)
    base = digits()
    cfg = config.from_dict({})
    cnn = models.build_model(cfg, base.sample_shape, base.num_classes, with_checkpoint=False)
    mb32_data = colour_digits(base, 32)
    mb96_data = colour_digits(base, 96)
    epochs, mb_epochs = (2, 2) if quick else (12, 16)
    mb32 = mobilenet_v2(0.5, 10, small=False, last_channels=512)
    return [
        {"name": "digits_cnn", "data": base, "trained": True,
         "model": _fit(cnn, base, epochs, 3e-3, 64, cache / f"digits_cnn_{epochs}.pt"),
         "what": "edgekit's default small_cnn (width 32) on digits 1x8x8, trained"},
        {"name": "mbv2_digits32", "data": mb32_data, "trained": True,
         "model": _fit(mb32, mb32_data, mb_epochs, 3e-3, 32, cache / f"mbv2_digits32_{mb_epochs}_b32.pt"),
         "what": "MobileNetV2 0.5 (last 512) on digits as 3x32x32 colour images, trained"},
        {"name": "mbv2_035_96", "data": mb96_data, "trained": False,
         "model": _bn_stats(mobilenet_v2(0.35, 1000), mb96_data.train.x[:256]),
         "what": "MobileNetV2 0.35, 1000 classes, 3x96x96; latency model (BN statistics from data, untrained)"},
    ]


# --- the artifacts --------------------------------------------------------------------------------------------

def _export(model: torch.nn.Module, example: np.ndarray, path: Path, *, dynamic: bool = True) -> Path:
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.from_numpy(example[:1]),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"], dynamic_axes=axes)
    return path


class _Reader:
    def __init__(self, x: np.ndarray) -> None:
        self.it = iter([{"input": s[None]} for s in x])

    def get_next(self):
        return next(self.it, None)


def ort_default(fp32: Path, calib: np.ndarray, out: Path) -> Path:
    from onnxruntime.quantization import quantize_static

    quantize_static(str(fp32), str(out), _Reader(calib))
    return out


def nncf_ptq(model: torch.nn.Module, calib: np.ndarray, out: Path) -> Path:
    import copy

    nncf = load_nncf()
    loader = torch.utils.data.DataLoader(torch.from_numpy(calib), batch_size=1)
    q = nncf.quantize(NncfRoot(copy.deepcopy(model)).eval(), nncf.Dataset(loader), subset_size=len(calib))
    example = torch.from_numpy(calib[:1])
    native = nncf.strip(q, do_copy=True, strip_format=nncf.StripFormat.NATIVE, example_input=example).eval()
    return _export(native, calib, out)


def tflite_pair(model: torch.nn.Module, ds: data.Dataset, work: Path) -> tuple[bytes, bytes, list[int] | None]:
    """fp32 and full-int8 TFLite the way edgekit's export stage makes them (onnx2tf, then TFLiteConverter)."""
    from edgekit.formats import onnx, tflite

    static = _export(model, ds.calib.x, work / "static.onnx", dynamic=False)
    log = work / "convert.log"
    saved = tflite.onnx_to_saved_model(static, work, ds.calib.x, log)
    fp32 = tflite.convert(saved, None, int8_io=False, log=log)
    reference = onnx.session(_export(model, ds.calib.x, work / "ref.onnx"), "reference")
    perm = tflite.find_transpose(fp32, reference, ds.calib.x[:16])
    calib = ds.calib.x.transpose(perm) if perm else ds.calib.x
    return fp32, tflite.convert(saved, calib, int8_io=False, log=log), perm


def build_artifacts(m: dict, work: Path) -> dict[str, dict]:
    """name -> {path, format, runtime, transpose, precision}; every artifact from the same calibration samples."""
    model, ds = m["model"], m["data"]
    calib = ds.calib.x
    fp32 = _export(model, calib, work / f"{ONNX_FP32}.onnx")
    arts = {ONNX_FP32: fp32, "ort_default": ort_default(fp32, calib, work / "ort_default.onnx")}
    with quiet.silenced(work / "nncf.log"):
        arts["nncf_ptq"] = nncf_ptq(model, calib, work / "nncf_ptq.onnx")
    (x86,) = targets.get(["x86-64"])
    edgekit = {"edgekit_onnx_int8": x86.int8, "edgekit_onnx_int8_vnni": targets.INT8_PRESETS["x86-vnni"]}
    for name, settings in edgekit.items():
        payload, _ = onnx_int8.quantize(fp32, calib, settings)
        (work / f"{name}.onnx").write_bytes(payload)
        arts[name] = work / f"{name}.onnx"
    specs = {n: {"file": p, "format": "onnx", "runtime": "onnxruntime", "input": {"transpose": None}}
             for n, p in arts.items()}
    tf_fp32, tf_int8, perm = tflite_pair(model, ds, work)
    for name, payload in ((TFLITE_FP32, tf_fp32), ("tflite_int8", tf_int8)):
        (work / f"{name}.tflite").write_bytes(payload)
        specs[name] = {"file": work / f"{name}.tflite", "format": "tflite", "runtime": "litert",
                       "input": {"transpose": perm}}
    for name, spec in specs.items():
        spec |= {"name": name, "precision": "fp32" if name.startswith("fp32") else "int8",
                 "size_bytes": Path(spec["file"]).stat().st_size}
    return specs


# --- measuring ------------------------------------------------------------------------------------------------

def evaluate(specs: dict[str, dict], ds: data.Dataset, reference: np.ndarray, trained: bool) -> dict[str, dict]:
    out = {}
    for name, spec in specs.items():
        with quiet.silenced():
            art = Artifact(spec["file"], spec, threads=2)
        logits = art.predict(ds.test.x)
        fid = metrics.fidelity(reference, logits)
        out[name] = {"accuracy": metrics.accuracy(logits, ds.test.y) if trained else None,
                     "agreement": fid["top1_agreement"], "sqnr_db": fid["sqnr_db"]}
    return out


def time_all(specs: dict[str, dict], x: np.ndarray, threads: int, quick: bool) -> dict[str, dict]:
    with quiet.silenced():
        arts = {n: Artifact(s["file"], s, threads) for n, s in specs.items()}
    samples = recommend.alternate(arts, x, warmup=20, min_rounds=50 if quick else 300,
                                  min_s=0.5 if quick else 4.0, max_s=10 if quick else 40)
    return {n: {"p50_ms": float(np.percentile(s, 50)), "p90_ms": float(np.percentile(s, 90)), "runs": len(s),
                "samples": s} for n, s in samples.items()}


def _fp32_of(name: str, spec: dict) -> str:
    return TFLITE_FP32 if spec["format"] == "tflite" else ONNX_FP32


def rows_for(m: dict, specs: dict, quality: dict, timing: dict[int, dict], macs: int) -> list[dict]:
    rows = []
    for name, spec in specs.items():
        row = {"model": m["name"], "artifact": name, "tool": TOOLS[name], "precision": spec["precision"],
               "runtime": spec["runtime"], "size_bytes": spec["size_bytes"], **quality[name]}
        base = _fp32_of(name, spec)
        row["size_vs_fp32"] = spec["size_bytes"] / specs[base]["size_bytes"]
        for t, tim in timing.items():
            row[f"p50_ms_{t}t"], row[f"p90_ms_{t}t"] = tim[name]["p50_ms"], tim[name]["p90_ms"]
            row[f"vs_fp32_{t}t"] = tim[name]["p50_ms"] / tim[base]["p50_ms"]
            row[f"gmacs_{t}t"] = macs / (tim[name]["p50_ms"] / 1000) / 1e9
        rows.append(row)
    return rows


def edgekit_pick(rows: list[dict], threads: int, samples: dict[str, list[float]]) -> tuple[str, str]:
    """edgekit's recommendation for the x86-64 target among its own candidates, as `edgekit build` makes it
    (at `threads`: the build measures at the target's thread count)."""
    (x86,) = targets.get(["x86-64"])
    own = {"edgekit_onnx_int8": "int8", "tflite_int8": "int8", ONNX_FP32: "fp32"}
    cands = [{"artifact": r["artifact"], "precision": own[r["artifact"]], "p50_ms": r[f"p50_ms_{threads}t"],
              "p90_ms": r[f"p90_ms_{threads}t"], "accuracy": r["accuracy"] if r["accuracy"] is not None
              else r["agreement"], "size_bytes": r["size_bytes"]} for r in rows if r["artifact"] in own]
    pick, reason = recommend.choose(cands, samples, x86.accuracy_tolerance_pp)
    return pick["artifact"], reason


def run_model(m: dict, quick: bool) -> dict:
    t0 = time.perf_counter()
    ds, model = m["data"], m["model"]
    reference = metrics.logits(model, ds.test.x)
    macs, params = metrics.macs_and_params(model, ds.sample_shape)
    with tempfile.TemporaryDirectory(prefix="edgekit-peers-") as tmp:
        specs = build_artifacts(m, Path(tmp))
        quality = evaluate(specs, ds, reference, m["trained"])
        timing = {t: time_all(specs, ds.test.x, t, quick) for t in THREADS}
    rows = rows_for(m, specs, quality, timing, macs)
    picks = {t: edgekit_pick(rows, t, {n: tim["samples"] for n, tim in timing[t].items()}) for t in THREADS}
    for r in rows:
        r["edgekit_recommended"] = [t for t in THREADS if picks[t][0] == r["artifact"]]
    fp32_acc = metrics.accuracy(reference, ds.test.y) if m["trained"] else None
    print(f"{m['name']}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return {"model": m["name"], "what": m["what"], "macs": macs, "params": params, "fp32_torch_accuracy": fp32_acc,
            "test_samples": len(ds.test.x), "calibration_samples": len(ds.calib.x),
            "edgekit_recommended": {t: pick for t, (pick, _) in picks.items()},
            "edgekit_reason": {t: reason for t, (_, reason) in picks.items()}, "rows": rows}


# --- goals and the table --------------------------------------------------------------------------------------

def goals(results: list[dict]) -> list[dict]:
    by = {r["model"]: r for r in results}
    out = []
    mb = {r["artifact"]: r for r in by["mbv2_035_96"]["rows"]}
    ratio = mb["edgekit_onnx_int8"]["vs_fp32_1t"]
    out.append({"goal": "x86 int8/fp32 p50 <= 0.7, MobileNetV2 0.35 96x96, 1 thread (edgekit onnx_int8 vs fp32 "
                        "ONNX, onnxruntime)", "value": round(ratio, 3), "hit": ratio <= 0.7})
    pick = mb[by["mbv2_035_96"]["edgekit_recommended"][1]]
    fastest_fp32 = min(mb[ONNX_FP32]["p50_ms_1t"], mb[TFLITE_FP32]["p50_ms_1t"])
    ratio = pick["p50_ms_1t"] / fastest_fp32
    out.append({"goal": f"x86 int8/fp32 p50 <= 0.7, MobileNetV2 0.35 96x96, 1 thread (edgekit's pick, "
                        f"{pick['artifact']}, vs the fastest fp32 artifact)", "value": round(ratio, 3),
                "hit": ratio <= 0.7})
    for name in ("digits_cnn", "mbv2_digits32"):
        res = by[name]
        for art in dict.fromkeys(["edgekit_onnx_int8", *res["edgekit_recommended"].values()]):
            row = next(r for r in res["rows"] if r["artifact"] == art)
            drop = (res["fp32_torch_accuracy"] - row["accuracy"]) * 100
            out.append({"goal": f"{name} {art}: accuracy within 0.5 pp of fp32, agreement >= 99.5 %",
                        "value": f"drop {drop:.2f} pp, agreement {row['agreement']:.4f}",
                        "hit": drop <= 0.5 and row["agreement"] >= 0.995})
    for res in results:
        out += _never_slower(res)
    return out


def _never_slower(res: dict) -> list[dict]:
    rows = {r["artifact"]: r for r in res["rows"]}
    out = []
    for t in THREADS:
        mine = rows[res["edgekit_recommended"][t]]
        key = "accuracy" if mine["accuracy"] is not None else "agreement"
        peers = [r for r in res["rows"] if r["artifact"] in ("ort_default", "nncf_ptq", "tflite_int8")
                 and r[key] >= mine[key]]
        fastest = min(peers, key=lambda r: r[f"p50_ms_{t}t"], default=None)
        ratio = mine[f"p50_ms_{t}t"] / fastest[f"p50_ms_{t}t"] if fastest else None
        out.append({"goal": f"{res['model']} {t} thread(s): edgekit's pick ({mine['artifact']}) not slower than the "
                            f"fastest peer of equal or better {key} ({fastest['artifact'] if fastest else '-'})",
                    "value": None if ratio is None else round(ratio, 3), "hit": ratio is None or ratio <= 1.0})
    return out


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(report: dict) -> str:
    lines = [f"# int8 side by side — {report['host']['cpu']}, {report['host']['cores']} cores", "",
             f"`{report['command']}` · {report['date']} · onnxruntime {report['versions']['onnxruntime']}, "
             f"LiteRT {report['versions']['litert']}, NNCF {report['versions']['nncf']}, "
             f"TensorFlow {report['versions']['tensorflow']}", "",
             "int8/fp32: p50 over the same runtime's fp32 artifact (ONNX: onnxruntime, TFLite: LiteRT), all "
             "artifacts of a model timed alternately (one single-sample inference each per round). "
             "**bold**: edgekit's recommendation for the x86-64 target at that thread count (the build "
             "measures at the target's threads, 2 for x86-64).", ""]
    head = ("| model | artifact | tool | acc | agree | size KB | ×fp32 size | p50 1t ms | p90 1t ms | int8/fp32 1t "
            "| p50 2t ms | p90 2t ms | int8/fp32 2t | GMAC/s 1t |")
    for res in report["models"]:
        lines += [f"## {res['model']} — {res['what']}", "",
                  f"{res['macs'] / 1e6:.2f} M MACs, {res['params']} params, fp32 torch accuracy "
                  f"{_f(res['fp32_torch_accuracy'], '.4f')}, {res['test_samples']} test / "
                  f"{res['calibration_samples']} calibration samples.", "",
                  *(f"- edgekit's pick at {t} thread(s): **{res['edgekit_recommended'][t]}** — "
                    f"{res['edgekit_reason'][t]}" for t in THREADS), "", head,
                  "|" + "---|" * 14]
        for r in res["rows"]:
            picked = "/".join(f"{t}t" for t in r["edgekit_recommended"])
            name = f"**{r['artifact']}** ({picked})" if picked else r["artifact"]
            fp = r["precision"] == "fp32"
            r1, r2 = ("-" if fp else format(r[f"vs_fp32_{t}t"], ".2f") for t in THREADS)
            lines.append(f"| {r['model']} | {name} | {r['tool']} | {_f(r['accuracy'], '.4f')} | {r['agreement']:.4f} "
                         f"| {r['size_bytes'] / 1024:.1f} | {r['size_vs_fp32']:.2f} | {r['p50_ms_1t']:.3f} "
                         f"| {r['p90_ms_1t']:.3f} | {r1} | {r['p50_ms_2t']:.3f} | {r['p90_ms_2t']:.3f} | {r2} "
                         f"| {r['gmacs_1t']:.2f} |")
        lines.append("")
    lines += ["## Goals", "", "| goal | value | hit |", "|---|---|---|"]
    lines += [f"| {g['goal']} | {g['value']} | {'hit' if g['hit'] else '**miss**'} |" for g in report["goals"]]
    return "\n".join(lines) + "\n"


def _versions() -> dict:
    import ai_edge_litert
    import nncf
    import onnxruntime
    import tensorflow as tf

    return {"onnxruntime": onnxruntime.__version__, "litert": getattr(ai_edge_litert, "__version__", "?"),
            "nncf": nncf.__version__, "tensorflow": tf.__version__, "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--quick", action="store_true", help="2 epochs and short timing (a smoke run)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "edgekit-peers-cache",
                        help="trained weights are kept here between runs")
    args = parser.parse_args(argv)
    quiet.setup()
    torch.set_num_threads(2)
    results = [run_model(m, args.quick) for m in benchmark_models(args.quick, args.cache)]
    from edgekit.runner.runner import environment

    env = environment()
    report = {"command": "python -m benchmarks.peers" + (" --quick" if args.quick else ""),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "versions": _versions(),
              "host": {"cpu": env.get("cpu"), "cores": os.cpu_count(), "machine": platform.machine(),
                       "load_avg_at_end": os.getloadavg()},
              "models": results, "goals": goals(results)}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "peers_quick" if args.quick else "peers"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
