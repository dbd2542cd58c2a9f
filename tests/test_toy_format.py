"""A format added in one file: this one. It registers a toy format, ONNX that onnxruntime optimized offline
(basic graph optimizations: constant folding and the like, portable across CPUs), and shows it exported, verified,
bundled, measured and checked by the build, with nothing in edgekit changed."""

from __future__ import annotations

import json

import pytest
import yaml

from edgekit import config, formats, pipeline
from edgekit.formats import onnx
from tests.conftest import tiny

TOY = formats.Format(name="ortopt", suffix="onnx", precisions=("fp32",), host_runtime="onnxruntime",
                     exporter="tests.test_toy_format:export",
                     runtimes=(formats.Runtime("onnxruntime", "onnxruntime", "onnxruntime"),))


def export(job: formats.ExportJob, specs: list) -> list[tuple[dict, bytes]]:
    """The toy exporter: the checked fp32 ONNX, saved by onnxruntime after its basic graph optimizations."""
    import onnxruntime as ort

    built = []
    for spec in specs:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(job.work / f"{spec.key}.onnx")
        ort.InferenceSession(str(job.fp32_onnx), opts, providers=["CPUExecutionProvider"])
        built.append(onnx.artifact(spec, (job.work / f"{spec.key}.onnx").read_bytes(), job.source))
    return built


@pytest.fixture()
def toy_format():
    formats.formats()  # the built-in ones first
    formats.register(TOY)
    yield TOY
    formats.unregister(TOY.name)


def _target(tmp_path) -> str:
    raw = yaml.safe_load((pipeline.targets.TARGETS_DIR / "x86-64.yaml").read_text())
    raw["name"] = "x86-toy"
    raw["artifacts"] = [{"format": "ortopt", "precision": "fp32", "runtime": "onnxruntime"},
                        {"format": "onnx", "precision": "fp32", "runtime": "onnxruntime"}]
    path = tmp_path / "x86-toy.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_a_format_in_one_file_is_exported_verified_bundled_measured_and_checked(toy_format, tmp_path):
    cfg = config.from_dict(tiny(data={"limit": 200}, train={"epochs": 1}, prune={"enabled": False},
                                distill={"enabled": False}, quantize={"enabled": False},
                                build={"targets": [_target(tmp_path)], "run_local": True}))
    out = tmp_path / "b"
    report = pipeline.build(cfg, out, log=lambda *_: None)
    exported = {a["name"]: a for a in json.loads((out / "stages" / "export" / "artifacts.json").read_text())}
    assert exported["ortopt_fp32"]["format"] == "ortopt" and (out / "stages" / "export" / "ortopt_fp32.onnx").is_file()
    row = next(r for r in report["artifacts"] if r["name"] == "ortopt_fp32")
    assert row["top1_agreement"] == 1.0 and row["fidelity_miss"] is False  # verified against the torch model
    manifest = json.loads((out / "bundles" / "x86-toy" / "manifest.json").read_text())
    entry = next(a for a in manifest["artifacts"] if a["name"] == "ortopt_fp32")
    assert manifest["primary"] == "ortopt_fp32" and entry["engine"] == "onnxruntime"
    assert entry["sha256"] == manifest["files"]["ortopt_fp32.onnx"]
    assert row["measured"]["latency_ms"]["p50"] > 0 and row["measured"]["accuracy"] == row["accuracy"]
    assert row["runtime_check"]["ok"] is True  # the pinned onnxruntime in its own venv ran it


def test_an_unregistered_format_is_refused_with_the_valid_ones(tmp_path):
    from edgekit.errors import TargetError

    with pytest.raises(TargetError, match="artifact ortopt/fp32 unknown; valid: onnx/fp32, .*tflite/int8"):
        pipeline.targets.load_file(_target(tmp_path))
