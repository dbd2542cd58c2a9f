"""edgekit on-device runner: measures a bundle's artifacts with their runtime.

Copied into every bundle. Imports only the standard library, numpy and one runtime
(onnxruntime, LiteRT or tflite-runtime), so it runs on a bare device.

    python3 runner.py BUNDLE_DIR [--artifact NAME] [--out results.json] [--mode all|latency|accuracy]

Measures the way LiteRT's benchmark_model, onnxruntime_perf_test and MLPerf LoadGen do: load (init) time,
first inference, warm-up runs and seconds, then at least N runs and S seconds (at most M seconds) with the raw
samples kept; p90 is the headline (MLPerf SingleStream). Peak RSS after load and overall as deltas from
before load, plus RSS sampled during the run. Accuracy goes through every bundled sample once with the same
`run` call that the timing loop times. The output follows results.schema.json (shipped beside this file);
a run on a throttled, overheating or emulated device is marked "valid": false with the reasons.
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
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

RESULTS_FILE = "results.json"
EVAL_FILE = "eval.npz"
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"  # what a clone without git-lfs holds instead
SCHEMA_FILE = "results.schema.json"
SCHEMA_VERSION = 1
RUNNER_VERSION = "2"
MAX_TEMP_C = 80.0  # Raspberry Pi firmware starts soft throttling at 80 C; above it timings drift
MEMORY_SAMPLE_S = 0.05  # RSS is sampled between timed runs at most this often
THROTTLE_NOW = {0x1: "under-voltage", 0x2: "ARM frequency capped", 0x4: "throttled", 0x8: "soft temperature limit"}
THROTTLE_SINCE_BOOT = {0x10000: "under-voltage", 0x20000: "frequency capping", 0x40000: "throttling",
                       0x80000: "soft temperature limit"}


# --- runtimes: each opens one artifact. encode() turns a float32 batch (artifact layout) into the runtime's ---
# --- feeds, run(feed) is the inference the timing loop times, output() the float32 logits of the last run. ----

class OnnxModel:
    def __init__(self, path: str, threads: int | None, providers: list[str] | None = None,
                 optimize: bool = True) -> None:
        import onnxruntime as ort

        asked = providers or ["CPUExecutionProvider"]
        available = ort.get_available_providers()
        if asked[0] not in available:
            raise RuntimeError(f"onnxruntime {ort.__version__} has no {asked[0]} here (available: "
                               f"{', '.join(available)}); install the runtime the target pins (onnxruntime-gpu "
                               "for CUDA) instead of running on another provider")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or 0
        opts.inter_op_num_threads = 1
        if not optimize:  # Q/DQ evaluated as written (reference int8 math), not the host CPU's fused kernels
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(path, opts, providers=asked)
        used = self.session.get_providers()
        if used[0] != asked[0]:  # never a silent CPU fallback when a GPU provider was asked for
            raise RuntimeError(f"onnxruntime fell back from {asked[0]} to {used}")
        self.runtime = {"name": "onnxruntime", "version": ort.__version__, "providers": used,
                        "providers_requested": asked, "accelerator": used[0]}
        self.input_name = self.session.get_inputs()[0].name
        self._run, self._y = self.session.run, None

    def encode(self, x: np.ndarray) -> list[dict]:
        return [{self.input_name: x}]  # the whole batch in one run

    def run(self, feed: dict) -> None:
        self._y = self._run(None, feed)

    def output(self) -> np.ndarray:
        return self._y[0].astype(np.float32)


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


def _native_stderr(fn):
    """Call fn() and return (its value, what native code wrote to fd 2 meanwhile); the text is passed on."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            value = fn()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read().decode(errors="replace")
    sys.stderr.write(text)
    return value, text


class TfliteModel:
    """One sample per invoke (batch 1, as the artifact was exported): encode() gives one feed per sample."""

    def __init__(self, path: str, threads: int | None, preferred: str = "litert") -> None:
        interpreter_cls, runtime = _tflite_interpreter(preferred)

        def load():
            interp = interpreter_cls(model_path=path, num_threads=threads)
            interp.allocate_tensors()
            return interp

        self.interp, log = _native_stderr(load)
        # the runtime says on stderr when it applies its default XNNPACK delegate; otherwise builtin CPU kernels ran
        delegate = "XNNPACK" if "XNNPACK" in log else "none (builtin CPU kernels)"
        self.runtime = runtime | {"delegate": delegate, "accelerator": f"CPU ({delegate})"}
        self.inp = self.interp.get_input_details()[0]
        self.out = self.interp.get_output_details()[0]
        self._set, self._invoke, self._get = self.interp.set_tensor, self.interp.invoke, self.interp.get_tensor
        self._in_index, self._out_index, self._bound = self.inp["index"], self.out["index"], None

    def encode(self, x: np.ndarray) -> list[np.ndarray]:
        if self.inp["dtype"] != np.float32:
            scale, zero = self.inp["quantization"]
            info = np.iinfo(self.inp["dtype"])
            x = np.clip(np.round(x / scale + zero), info.min, info.max)
        x = x.astype(self.inp["dtype"])
        return [np.ascontiguousarray(s[None]) for s in x]

    def run(self, feed: np.ndarray) -> None:
        if feed is not self._bound:  # a new sample is copied in; the timing loop re-runs the bound one, as
            self._set(self._in_index, feed)  # benchmark_model does (inputs filled once, Invoke() timed)
            self._bound = feed
        self._invoke()

    def output(self) -> np.ndarray:
        y = self._get(self._out_index)
        if self.out["dtype"] != np.float32:
            scale, zero = self.out["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return y.astype(np.float32)


class Artifact:
    """One artifact of a manifest, opened with its runtime; takes inputs in the manifest's layout."""

    def __init__(self, path: str | Path, spec: dict, threads: int | None = None, optimize: bool = True) -> None:
        self.spec = spec
        engine = spec.get("engine") or ("onnxruntime" if spec["format"] == "onnx" else "tflite")  # older bundles
        if engine == "onnxruntime":
            providers = ["CUDAExecutionProvider"] if spec["runtime"] == "onnxruntime-gpu" else None
            self.model = OnnxModel(str(path), threads, providers, optimize)
        else:
            self.model = TfliteModel(str(path), threads, spec["runtime"])
        self.transpose = spec.get("input", {}).get("transpose")

    @property
    def runtime(self) -> dict:
        return self.model.runtime

    def encode(self, x: np.ndarray) -> list:
        """Manifest layout float32 -> the runtime's feeds (layout, dtype, quantization): done outside timing."""
        x = np.ascontiguousarray(x.transpose(self.transpose) if self.transpose else x, dtype=np.float32)
        return self.model.encode(x)

    def run(self, feed) -> None:
        """The inference itself: what the timing loop times and what accuracy mode calls for every sample."""
        self.model.run(feed)

    def predict(self, x: np.ndarray) -> np.ndarray:
        outs = []
        for feed in self.encode(x):
            self.model.run(feed)
            outs.append(self.model.output())
        return np.concatenate(outs)


# --- memory ------------------------------------------------------------------------------------------------

def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _status_mb(field: str) -> float | None:
    """A kB field of /proc/self/status (VmHWM, VmRSS) in MB; None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_mb() -> float:
    """Peak RSS of this process's own address space. VmHWM starts afresh at exec; ru_maxrss (the fallback
    where there is no /proc) keeps the parent's RSS at fork, which would count the caller's memory."""
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kilobytes on Linux


def rss_mb() -> float | None:
    """Current resident set size; None where there is no /proc."""
    return _status_mb("VmRSS")


class MemorySampler:
    """RSS sampled between timed runs (never inside one), at most every `interval` seconds."""

    def __init__(self, interval: float = MEMORY_SAMPLE_S) -> None:
        self.interval, self.t0, self.next = interval, time.perf_counter(), 0.0
        self.samples: list[list[float]] = []

    def __call__(self, now: float) -> None:
        if now >= self.next:
            rss = rss_mb()
            if rss is not None:
                self.samples.append([round(now - self.t0, 4), round(rss, 3)])
            self.next = now + self.interval


# --- timing ------------------------------------------------------------------------------------------------

def latency_stats(samples_ms: list[float]) -> dict:
    a = np.asarray(samples_ms)
    pct = {f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 99)}
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "max": float(a.max()), **pct,
            "runs": len(a)}


def time_runs(fn, x, warmup: int, min_runs: int, min_s: float, max_s: float, *, warmup_s: float = 0.0,
              between=None) -> list[float]:
    """Warm-up (at least `warmup` runs and `warmup_s` seconds), then at least min_runs and min_s seconds,
    stopping at max_s (benchmark_model's rules). `between(now)` runs after each timed run, outside its time."""
    start = time.perf_counter()
    done = 0
    while done < warmup or time.perf_counter() - start < warmup_s:
        fn(x)
        done += 1
    samples: list[float] = []
    clock = time.perf_counter
    start = clock()
    while True:
        t0 = clock()
        fn(x)
        t1 = clock()
        samples.append((t1 - t0) * 1000.0)
        if between is not None:
            between(t1)
        elapsed = t1 - start
        if (len(samples) >= min_runs and elapsed >= min_s) or elapsed >= max_s:
            return samples


def accuracy(artifact: Artifact, x: np.ndarray, y: np.ndarray) -> float:
    """Every sample of the evaluation set once, one at a time, through the same `run` the timing loop times."""
    hits = 0
    run, output = artifact.model.run, artifact.model.output
    for i in range(len(x)):
        run(artifact.encode(x[i : i + 1])[0])
        hits += int(output()[0].argmax() == y[i])
    return hits / len(x)


# --- the record that makes a result comparable -------------------------------------------------------------

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


def _cpuinfo() -> dict:
    info: dict = {}
    for line in (_file("/proc/cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip().lower(), value.strip())
    return info


def _emulated(cpuinfo: dict) -> bool:
    """An aarch64 userland under qemu-user on an x86 host (edgekit's Docker/qemu checks set EDGEKIT_EMULATED)."""
    if os.environ.get("EDGEKIT_EMULATED"):
        return True
    return platform.machine() in ("aarch64", "arm64") and cpuinfo.get("vendor_id") in ("GenuineIntel",
                                                                                         "AuthenticAMD")


def _os_name() -> str:
    for line in (_file("/etc/os-release") or "").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    return platform.platform()


def thermal() -> dict:
    """Temperature, frequency and throttling now: read before and after the timed runs."""
    temp = _file("/sys/class/thermal/thermal_zone0/temp")
    freq = _file("/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq")
    return {
        "temperature_c": int(temp) / 1000 if temp and temp.lstrip("-").isdigit() else None,
        "cpu_freq_mhz": int(freq) / 1000 if freq and freq.isdigit() else None,
        "throttled": _read(["vcgencmd", "get_throttled"]),
    }


def environment() -> dict:
    cpuinfo = _cpuinfo()
    cpu = cpuinfo.get("model name") or cpuinfo.get("hardware") or cpuinfo.get("cpu part") or platform.processor()
    return {
        "device_model": _file("/proc/device-tree/model"),
        "os": _os_name(), "platform": platform.platform(), "kernel": platform.release(),
        "machine": platform.machine(), "cpu": cpu or None, "cores": os.cpu_count(),
        "python": platform.python_version(), "numpy": np.__version__,
        "governor": _file("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        "max_freq_mhz": _mhz(_file("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")),
        "power_mode": _read(["nvpmodel", "-q"]),
        "emulated": _emulated(cpuinfo),
        **thermal(),
    }


def _mhz(khz: str | None) -> float | None:
    return int(khz) / 1000 if khz and khz.isdigit() else None


def throttle_flags(text: str | None) -> int | None:
    """`vcgencmd get_throttled` prints throttled=0x50000."""
    if not text or "=" not in text:
        return None
    try:
        return int(text.split("=", 1)[1], 16)
    except ValueError:
        return None


ARCH_NAMES = {"arm64": "aarch64", "amd64": "x86_64"}  # what some systems call them


def validity(before: dict, after: dict, env: dict, max_temp_c: float = MAX_TEMP_C,
             target_arch: str | None = None) -> tuple[list[str], list[str]]:
    """Reasons that make the timings untrustworthy (-> valid: false), and warnings that do not."""
    reasons, warnings = [], []
    machine = str(env.get("machine") or "").lower()
    if target_arch and machine and ARCH_NAMES.get(machine, machine) != target_arch:
        reasons.append(f"not the target's architecture: an {target_arch} bundle run on {env['machine']}; its numbers "
                       "are not the device's (run it on the device)")
    for when, state in (("before", before), ("after", after)):
        flags = throttle_flags(state.get("throttled"))
        now = [name for bit, name in THROTTLE_NOW.items() if flags and flags & bit]
        if now:
            reasons.append(f"throttled {when} the run: {', '.join(now)} (vcgencmd get_throttled: {flags:#x})")
        temp = state.get("temperature_c")
        if temp is not None and temp >= max_temp_c:
            reasons.append(f"overheating {when} the run: {temp:.1f} C >= {max_temp_c:.0f} C")
    flags = throttle_flags(after.get("throttled"))
    past = [name for bit, name in THROTTLE_SINCE_BOOT.items() if flags and flags & bit]
    if past:
        warnings.append(f"since boot this device had: {', '.join(past)}; check the power supply and cooling")
    if env.get("emulated"):
        reasons.append("emulated (qemu user mode): outputs are real, timings and memory are not the device's")
    if env.get("governor") not in (None, "performance"):
        warnings.append(f"CPU governor is '{env['governor']}', not 'performance': frequency may vary")
    return reasons, warnings


# --- one artifact ------------------------------------------------------------------------------------------

RUN_DEFAULTS = {"warmup_runs": 10, "warmup_seconds": 0.0, "min_runs": 100, "min_seconds": 1.0, "max_seconds": 60.0}


def _settings(run_cfg: dict) -> dict:
    return {k: type(v)(run_cfg.get(k, v)) for k, v in RUN_DEFAULTS.items()}


def _load(bundle: Path, spec: dict, threads: int | None) -> tuple[Artifact, dict]:
    rss0, peak0 = rss_mb(), peak_rss_mb()
    t0 = time.perf_counter()
    artifact = Artifact(bundle / spec["file"], spec, threads)
    load_ms = (time.perf_counter() - t0) * 1000.0
    return artifact, {"load_ms": load_ms, "rss_before_load_mb": rss0 if rss0 is not None else peak0,
                      "peak_rss_before_load_mb": peak0, "peak_rss_after_load_mb": peak_rss_mb(),
                      "rss_after_load_mb": rss_mb()}


def _first(artifact: Artifact, x: np.ndarray) -> float:
    """The first inference after load (lazy initialisation, caches), timed on its own."""
    feed = artifact.encode(x[:1])[0]
    t0 = time.perf_counter()
    artifact.model.run(feed)
    return (time.perf_counter() - t0) * 1000.0


def _timing(artifact: Artifact, x: np.ndarray, settings: dict, sampler: MemorySampler) -> dict:
    feed = artifact.encode(x[:1])[0]
    wall0 = time.perf_counter()
    samples = time_runs(artifact.model.run, feed, settings["warmup_runs"], settings["min_runs"],
                        settings["min_seconds"], settings["max_seconds"], warmup_s=settings["warmup_seconds"],
                        between=sampler)
    wall = time.perf_counter() - wall0
    total_s = sum(samples) / 1000.0
    return {"latency_ms": latency_stats(samples), "latency_samples_ms": [round(v, 6) for v in samples],
            "throughput_per_s": len(samples) / total_s if total_s > 0 else None,
            "timing": {**settings, "batch": 1, "wall_s": wall, "timed_s": total_s,
                       "stopped_by": "max_seconds" if len(samples) < settings["min_runs"] else "min_runs_and_seconds"}}


def _memory(load: dict, sampler: MemorySampler) -> dict:
    base, peak = load["rss_before_load_mb"], peak_rss_mb()
    sampled = [s[1] for s in sampler.samples]
    return {"rss_before_load_mb": base, "rss_after_load_mb": load["rss_after_load_mb"],
            "peak_rss_after_load_mb": load["peak_rss_after_load_mb"], "peak_rss_mb": peak,
            "load_delta_mb": load["peak_rss_after_load_mb"] - base, "peak_delta_mb": peak - base,
            "sampled_max_mb": max(sampled) if sampled else None, "sample_interval_s": sampler.interval,
            "samples": sampler.samples}


def latency_of(result: dict) -> dict | None:
    """One artifact's latency_ms; None after `--mode accuracy`, whose one token run (kept for the record's shape)
    times nothing."""
    return None if result.get("mode") == "accuracy" else result["latency_ms"]


def measure(bundle: Path, spec: dict, run_cfg: dict, threads: int | None, mode: str = "all") -> dict:
    """Load, then accuracy on every bundled sample and/or the timed runs, with memory sampled throughout."""
    path = bundle / spec["file"]
    with np.load(bundle / EVAL_FILE) as f:
        x, y = f["x"], f["y"]
    settings = _settings(run_cfg)
    sampler = MemorySampler()
    artifact, load = _load(bundle, spec, threads)
    sampler(time.perf_counter())
    result = {"artifact": spec["name"], "format": spec["format"], "precision": spec["precision"],
              "artifact_sha256": sha256(path), "runtime": artifact.runtime, "threads": threads, "mode": mode,
              "load_ms": load["load_ms"], "first_inference_ms": _first(artifact, x), "accuracy": None,
              "eval_samples": int(len(x))}
    if mode in ("all", "accuracy"):
        result["accuracy"] = accuracy(artifact, x, y)
    if mode in ("all", "latency"):
        result.update(_timing(artifact, x, settings, sampler))
    else:  # accuracy only: a token timed run keeps the record's shape (latency_of reads it as none)
        result.update(_timing(artifact, x, settings | {"warmup_runs": 0, "warmup_seconds": 0.0, "min_runs": 1,
                                                       "min_seconds": 0.0, "max_seconds": 0.0}, sampler))
    sampler(time.perf_counter() + sampler.interval)
    mem = _memory(load, sampler)
    result.update(memory=mem, peak_rss_mb=mem["peak_rss_mb"], peak_rss_after_load_mb=mem["peak_rss_after_load_mb"],
                  peak_rss_delta_mb=mem["peak_delta_mb"])
    return result


class UnsafePath(ValueError):
    """A manifest names a file that is not a regular file inside the bundle."""


def bundle_path(bundle: Path, rel: str) -> Path:
    """The bundle's file `rel`: a relative path without '..' that stays inside the bundle, with no link on the way.
    A bundle may come from anyone; its manifest must not point this code (or edgekit) at other files."""
    parts = Path(rel).parts if isinstance(rel, str) else ()
    if not parts or Path(rel).is_absolute() or ".." in parts or "\\" in rel:
        raise UnsafePath(f"manifest.json names '{rel}', which is not a path inside the bundle (absolute paths, "
                         "'..' and links are refused); rebuild the bundle or get it from a source you trust")
    path = bundle
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise UnsafePath(f"'{rel}' in the bundle is a link; only regular files inside the bundle are used: "
                             "rebuild the bundle or get it from a source you trust")
    return path


def damage(path: Path, rel: str) -> str:
    with open(path, "rb") as f:
        if f.read(len(LFS_POINTER)) == LFS_POINTER:
            return (f"{rel} is a Git LFS pointer, not the file itself; run `git lfs pull` where the bundle came from, "
                    "or copy the real file")
    return f"{rel} does not match its sha256 in manifest.json; the copy is damaged: copy the bundle again"


def file_problem(bundle: Path, manifest: dict) -> str | None:
    """What is wrong with the files the manifest lists (outside the bundle, missing, not their sha256, loaded but
    not listed), or None: checked before anything is loaded or copied."""
    for rel, digest in manifest["files"].items():
        try:
            path = bundle_path(bundle, rel)
        except UnsafePath as exc:
            return str(exc)
        if not path.is_file():
            return f"{rel} is missing from the bundle; copy the whole bundle again"
        if sha256(path) != digest:
            return damage(path, rel)
    for rel in {EVAL_FILE, *(spec["file"] for spec in manifest["artifacts"])}:  # what is loaded is what was checked
        if rel not in manifest["files"]:
            return f"{rel} is not listed in manifest.json with a sha256; rebuild the bundle"
    return None


def check_files(bundle: Path, manifest: dict) -> None:
    problem = file_problem(bundle, manifest)
    if problem:
        raise SystemExit(f"runner: error: {problem}")


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Measure a bundle's artifact on this device.")
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--artifact", help="artifact name (default: the manifest's primary)")
    parser.add_argument("--out", type=Path, help="results file (default: BUNDLE/results.json)")
    parser.add_argument("--threads", type=int, help="override the target's thread count")
    parser.add_argument("--mode", choices=("all", "latency", "accuracy"), default="all",
                        help="accuracy on every bundled sample, the timed runs, or both (default)")
    for key, default in RUN_DEFAULTS.items():
        parser.add_argument("--" + key.replace("_", "-"), type=type(default), help=f"override the manifest's run.{key}")
    parser.add_argument("--max-temp", type=float, default=MAX_TEMP_C, help="mark the run invalid at or above (C)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    try:
        manifest = json.loads(bundle_path(args.bundle, "manifest.json").read_text())
    except UnsafePath as exc:
        raise SystemExit(f"runner: error: {exc}") from exc
    check_files(args.bundle, manifest)
    name = args.artifact or manifest["primary"]
    specs = {a["name"]: a for a in manifest["artifacts"]}
    if name not in specs:
        raise SystemExit(f"runner: error: no artifact '{name}' in this bundle; valid: {', '.join(specs)}")
    threads = args.threads or manifest["target"]["threads"]
    overrides = {k: v for k, v in vars(args).items() if k in RUN_DEFAULTS and v is not None}
    run_cfg = {**manifest.get("run", {}), **overrides}
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")  # noqa: UP017 (runs on Python 3.8+ devices)
    env = environment()
    before = thermal()
    try:
        result = measure(args.bundle, specs[name], run_cfg, threads, args.mode)
    except RuntimeError as exc:  # a runtime that is missing, or one that would silently fall back
        raise SystemExit(f"runner: error: {exc}") from exc
    after = thermal()
    reasons, warnings = validity(before, after, env, args.max_temp, manifest["target"].get("arch"))
    result.update(schema_version=SCHEMA_VERSION, runner_version=RUNNER_VERSION, started_utc=started,
                  valid=not reasons, invalid_reasons=reasons, warnings=warnings,
                  environment=env | {"before": before, "after": after}, target=manifest["target"]["name"],
                  target_arch=manifest["target"].get("arch"), edgekit_version=manifest["edgekit_version"],
                  bundle_version=manifest.get("bundle_version"), bundle_id=manifest["bundle_id"])
    return result


def dumps(obj: object, indent: int = 0) -> str:
    """JSON indented like json.dumps(indent=2), except that lists without objects stay on one line."""
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(str(k))}: {dumps(v, indent + 2)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(obj, list) and any(isinstance(v, dict) for v in obj):
        return "[\n" + ",\n".join(inner + dumps(v, indent + 2) for v in obj) + f"\n{pad}]"
    return json.dumps(obj)


def write_text(path: Path, text: str) -> None:
    """Atomic, mode 0644, through a fresh temporary file (never through a link planted at a fixed name)."""
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    result = run(args)
    write_text(args.out or args.bundle / RESULTS_FILE, dumps(result) + "\n")
    brief = {k: result[k] for k in ("artifact", "accuracy", "load_ms", "valid")}
    print(json.dumps(brief | {"p90_ms": result["latency_ms"]["p90"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
