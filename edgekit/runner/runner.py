"""edgekit on-device runner: measures a bundle's artifacts with their runtime.

Copied into every bundle. Imports only the standard library, numpy and one runtime
(onnxruntime, LiteRT or tflite-runtime), so it runs on a bare device.

    python3 runner.py BUNDLE_DIR [--artifact NAME] [--out results.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS_FILE = "results.json"


# --- runtimes: each opens one artifact and maps a float32 batch (manifest layout) to float32 logits ---------

class OnnxModel:
    def __init__(self, path: str, threads: int | None, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or 0
        opts.inter_op_num_threads = 1
        asked = providers or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(path, opts, providers=asked)
        self.runtime = {"name": "onnxruntime", "version": ort.__version__,
                        "providers": self.session.get_providers()}
        if asked[0] not in self.runtime["providers"]:
            raise RuntimeError(f"onnxruntime fell back from {asked[0]} to {self.runtime['providers']}")
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0].astype(np.float32)


def _tflite_interpreter(preferred: str):
    """LiteRT or tflite-runtime, the target's pinned one first; returns (Interpreter class, runtime info)."""
    order = ["litert", "tflite-runtime"] if preferred != "tflite-runtime" else ["tflite-runtime", "litert"]
    for name in order:
        try:
            if name == "litert":
                import ai_edge_litert as pkg
                from ai_edge_litert import interpreter as mod
            else:
                import tflite_runtime as pkg
                from tflite_runtime import interpreter as mod
        except ImportError:
            continue
        return mod.Interpreter, {"name": name, "version": getattr(pkg, "__version__", "unknown")}
    raise RuntimeError("no TFLite runtime installed: pip install ai-edge-litert (or tflite-runtime)")


class TfliteModel:
    def __init__(self, path: str, threads: int | None, preferred: str = "litert") -> None:
        interpreter_cls, self.runtime = _tflite_interpreter(preferred)
        self.interp = interpreter_cls(model_path=path, num_threads=threads)
        self.interp.allocate_tensors()
        self.inp = self.interp.get_input_details()[0]
        self.out = self.interp.get_output_details()[0]

    def _one(self, sample: np.ndarray) -> np.ndarray:
        x = sample[None]
        if self.inp["dtype"] != np.float32:
            scale, zero = self.inp["quantization"]
            info = np.iinfo(self.inp["dtype"])
            x = np.clip(np.round(x / scale + zero), info.min, info.max)
        self.interp.set_tensor(self.inp["index"], x.astype(self.inp["dtype"]))
        self.interp.invoke()
        y = self.interp.get_tensor(self.out["index"])
        if self.out["dtype"] != np.float32:
            scale, zero = self.out["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return y[0].astype(np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.stack([self._one(s) for s in x])


class Artifact:
    """One artifact of a manifest, opened with its runtime; takes inputs in the manifest's layout."""

    def __init__(self, path: str | Path, spec: dict, threads: int | None = None) -> None:
        self.spec = spec
        if spec["format"] == "onnx":
            providers = ["CUDAExecutionProvider"] if spec["runtime"] == "onnxruntime-gpu" else None
            self.model = OnnxModel(str(path), threads, providers)
        else:
            self.model = TfliteModel(str(path), threads, spec["runtime"])
        self.transpose = spec.get("input", {}).get("transpose")

    @property
    def runtime(self) -> dict:
        return self.model.runtime

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x.transpose(self.transpose) if self.transpose else x, dtype=np.float32)
        return self.model(x)


# --- measurement -------------------------------------------------------------------------------------------

def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return kb / 1024.0


def latency_stats(samples_ms: list[float]) -> dict:
    a = np.asarray(samples_ms)
    pct = {f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 99)}
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "max": float(a.max()), **pct,
            "runs": len(a)}


def time_runs(fn, x: np.ndarray, warmup: int, min_runs: int, min_s: float, max_s: float) -> list[float]:
    """Warm-up runs, then at least min_runs and min_s seconds, stopping at max_s (benchmark_model's rules)."""
    for _ in range(warmup):
        fn(x)
    samples: list[float] = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn(x)
        samples.append((time.perf_counter() - t0) * 1000.0)
        elapsed = time.perf_counter() - start
        if (len(samples) >= min_runs and elapsed >= min_s) or elapsed >= max_s:
            return samples


def accuracy(artifact: Artifact, x: np.ndarray, y: np.ndarray) -> float:
    """Every sample of the evaluation set once, one at a time: the same call the timing loop makes."""
    hits = sum(int(artifact.predict(x[i : i + 1])[0].argmax() == y[i]) for i in range(len(x)))
    return hits / len(x)


def _read(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _file(path: str) -> str | None:
    try:
        return Path(path).read_text().strip().strip("\x00")
    except OSError:
        return None


def environment() -> dict:
    cpu = None
    for line in (_file("/proc/cpuinfo") or "").splitlines():
        if line.lower().startswith(("model name", "hardware")):
            cpu = line.split(":", 1)[1].strip()
            break
    temp = _file("/sys/class/thermal/thermal_zone0/temp")
    freq = _file("/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq")
    return {
        "device_model": _file("/proc/device-tree/model"),
        "os": platform.platform(), "kernel": platform.release(), "machine": platform.machine(),
        "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
        "governor": _file("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        "cpu_freq_mhz": int(freq) / 1000 if freq and freq.isdigit() else None,
        "temperature_c": int(temp) / 1000 if temp and temp.lstrip("-").isdigit() else None,
        "throttled": _read(["vcgencmd", "get_throttled"]),
        "power_mode": _read(["nvpmodel", "-q"]),
        "numpy": np.__version__,
    }


def measure(bundle: Path, spec: dict, run_cfg: dict, threads: int | None) -> dict:
    """Load, check accuracy on the bundled set, then time single-sample inference."""
    path = bundle / spec["file"]
    with np.load(bundle / "eval.npz") as f:
        x, y = f["x"], f["y"]
    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    artifact = Artifact(path, spec, threads)
    load_ms = (time.perf_counter() - t0) * 1000.0
    rss_load = peak_rss_mb()
    t0 = time.perf_counter()
    artifact.predict(x[:1])
    first_ms = (time.perf_counter() - t0) * 1000.0
    acc = accuracy(artifact, x, y)
    samples = time_runs(artifact.predict, x[:1], run_cfg["warmup_runs"], run_cfg["min_runs"],
                        run_cfg["min_seconds"], run_cfg["max_seconds"])
    return {
        "artifact": spec["name"], "format": spec["format"], "precision": spec["precision"],
        "artifact_sha256": sha256(path), "runtime": artifact.runtime, "threads": threads,
        "load_ms": load_ms, "first_inference_ms": first_ms, "latency_ms": latency_stats(samples),
        "latency_samples_ms": samples,
        "peak_rss_mb": peak_rss_mb(), "peak_rss_after_load_mb": rss_load,
        "peak_rss_delta_mb": peak_rss_mb() - rss0, "accuracy": acc, "eval_samples": int(len(x)),
    }


def check_files(bundle: Path, manifest: dict) -> None:
    """Every file listed in the manifest must match its sha256 before anything is loaded."""
    for rel, digest in manifest["files"].items():
        path = bundle / rel
        if not path.is_file():
            raise SystemExit(f"runner: error: {rel} is missing from the bundle; copy the whole bundle again")
        if sha256(path) != digest:
            raise SystemExit(f"runner: error: {rel} does not match its sha256 in manifest.json; the copy is damaged")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure a bundle's artifact on this device.")
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--artifact", help="artifact name (default: the manifest's primary)")
    parser.add_argument("--out", type=Path, help="results file (default: BUNDLE/results.json)")
    parser.add_argument("--threads", type=int, help="override the target's thread count")
    args = parser.parse_args(argv)
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    check_files(args.bundle, manifest)
    name = args.artifact or manifest["primary"]
    specs = {a["name"]: a for a in manifest["artifacts"]}
    if name not in specs:
        raise SystemExit(f"runner: error: no artifact '{name}' in this bundle; valid: {', '.join(specs)}")
    threads = args.threads or manifest["target"]["threads"]
    result = measure(args.bundle, specs[name], manifest["run"], threads)
    result.update(environment=environment(), target=manifest["target"]["name"],
                  edgekit_version=manifest["edgekit_version"], bundle_id=manifest["bundle_id"])
    out = args.out or args.bundle / RESULTS_FILE
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    brief = {k: result[k] for k in ("artifact", "accuracy", "load_ms")} | {"p90_ms": result["latency_ms"]["p90"]}
    print(json.dumps(brief))
    return 0


if __name__ == "__main__":
    sys.exit(main())
