"""QAT epoch time with NNCF's pure-torch reference fake-quantize (what edgekit uses) against NNCF's compiled C++
extension, on the default model and data, timed alternately in one process.

    python benchmarks/qat_kernels.py     # needs the extension built once (it compiles it, no time limit)

Writes benchmarks/results/qat_kernels.json|md.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")  # the compile may take minutes; wait for it here

import torch  # noqa: E402

from edgekit import config, data, models, training  # noqa: E402
from edgekit.stages import quantize  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ROUNDS = 3


def _kernels():
    from nncf.torch.quantization import extensions
    from nncf.torch.quantization.extensions import QuantizedFunctionsCPULoader

    reference = extensions.QuantizedFunctionsCPU._loaded_namespace  # set by quantize.load_nncf()
    return {"reference (edgekit)": reference, "compiled extension": QuantizedFunctionsCPULoader.load()}


def _epoch_seconds(qmodel, ds, namespace) -> float:
    from nncf.torch.quantization import extensions

    extensions.QuantizedFunctionsCPU._loaded_namespace = namespace
    t0 = time.perf_counter()
    training.fit(qmodel, ds.train, ds.val, epochs=1, lr=1e-4, batch_size=64, desc="qat")
    return time.perf_counter() - t0


def main() -> None:
    torch.set_num_threads(1)
    cfg = config.from_dict({})
    ds = data.load_dataset(cfg)
    model = models.build_model(cfg, ds.sample_shape, ds.num_classes)
    qmodel = quantize.calibrate(model, ds.calib.x, 256)
    kernels = _kernels()
    times: dict[str, list[float]] = {k: [] for k in kernels}
    for _ in range(ROUNDS):
        for name, ns in kernels.items():
            times[name].append(_epoch_seconds(qmodel, ds, ns))
    best = {k: min(v) for k, v in times.items()}
    ratio = best["reference (edgekit)"] / best["compiled extension"]
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    flags = sorted({f for f in Path("/proc/cpuinfo").read_text().split() if f in ("avx2", "avx512f", "avx512_vnni")})
    result = {"cpu": cpu, "flags": flags, "threads": 1, "samples_per_epoch": len(ds.train.x), "seconds": times,
              "best_seconds": best, "reference_over_compiled": ratio}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "qat_kernels.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| fake-quantize kernels | best QAT epoch (s) | runs (s) |", "|---|---|---|"]
    lines += [f"| {k} | {best[k]:.2f} | {', '.join(f'{t:.2f}' for t in v)} |" for k, v in times.items()]
    lines.append(f"\nreference / compiled: {ratio:.2f}x — {cpu} ({', '.join(flags)}), 1 thread, "
                 f"small_cnn on digits, {len(ds.train.x)} samples per epoch, best of {ROUNDS} alternating rounds")
    (RESULTS / "qat_kernels.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
