"""int8 with NNCF: calibrate initial ranges, fine-tune with fake quantization (QAT), export QDQ ONNX."""

from __future__ import annotations

import logging

import numpy as np
import torch

from edgekit import metrics, quiet, training
from edgekit.stages.base import LOGITS_FILE, Context

name = "quantize"
ONNX_FILE = "model_int8.onnx"
LOG_FILE = "quantize.log"  # what NNCF printed


def _nncf():
    import nncf

    logging.getLogger("nncf").setLevel(logging.ERROR)  # NNCF logs every step at INFO
    return nncf


class _Root(torch.nn.Module):
    """NNCF adds a hook-storage child to the model it quantizes; a bare nn.Sequential would call it."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def calibrate(model: torch.nn.Module, calib_x: np.ndarray, subset_size: int) -> torch.nn.Module:
    """NNCF post-training quantization: symmetric per-channel int8 weights, calibrated activations."""
    nncf = _nncf()
    model = _Root(model).eval()
    loader = torch.utils.data.DataLoader(torch.from_numpy(calib_x), batch_size=1)
    dataset = nncf.Dataset(loader)
    return nncf.quantize(model, dataset, subset_size=min(subset_size, len(calib_x)),
                         preset=nncf.QuantizationPreset.PERFORMANCE)


def export_qdq(qmodel: torch.nn.Module, example: torch.Tensor, path, opset: int) -> None:
    """Strip NNCF's wrappers to native torch fake-quant ops (onnxruntime cannot load NNCF's FakeQuantize)."""
    nncf = _nncf()
    native = nncf.strip(qmodel, do_copy=True, strip_format=nncf.StripFormat.NATIVE, example_input=example)
    native.eval()
    tmp = path.with_name(f".{path.name}.tmp")
    torch.onnx.export(native, (example,), str(tmp), dynamo=False, opset_version=opset, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    tmp.replace(path)


def run(ctx: Context) -> dict:
    q, data = ctx.cfg.quantize, ctx.data
    source = ctx.latest_model_stage(before=name)
    out_dir = ctx.stage_dir(name)
    with quiet.silenced(out_dir / LOG_FILE):  # NNCF, torchao and torch.onnx print a lot
        qmodel = calibrate(ctx.load_model(source), data.calib.x, q.subset_size)
    ptq_acc = metrics.accuracy(metrics.logits(qmodel, data.test.x), data.test.y)
    best_val = training.fit(qmodel, data.train, data.val, epochs=q.qat_epochs, lr=q.lr,
                            batch_size=ctx.cfg.train.batch_size, seed=ctx.cfg.train.seed, desc="qat")
    test_logits = metrics.logits(qmodel, data.test.x)
    np.save(out_dir / LOGITS_FILE, test_logits)
    with quiet.silenced(out_dir / LOG_FILE):
        export_qdq(qmodel, ctx.example_input(), out_dir / ONNX_FILE, ctx.cfg.export.opset)
    src = ctx.metrics(source)
    return {
        "name": name, "accuracy": metrics.accuracy(test_logits, data.test.y), "ptq_accuracy": ptq_acc,
        "val_accuracy": best_val, "params": src["params"], "macs": src["macs"],
        "size_bytes": src["params"],  # int8 weights: one byte each
        "method": "nncf-qat", "source_stage": source,
        "settings": {"library": "nncf", "preset": "performance", "subset_size": q.subset_size,
                     "qat_epochs": q.qat_epochs, "lr": q.lr},
    }
