"""The on-device runner: timing rules, memory, validity flags, schema-valid results, and `edgekit compare`."""

from __future__ import annotations

import csv
import json
import sys
import types

import numpy as np
import pytest

from edgekit import cli
from edgekit.device import measure
from edgekit.errors import BundleError
from edgekit.runner import runner


def test_time_runs_keeps_warmup_out_and_meets_min_runs():
    calls = []
    samples = runner.time_runs(calls.append, 7, warmup=3, min_runs=11, min_s=0.0, max_s=60.0)
    assert len(samples) == 11 and len(calls) == 3 + 11
    assert all(s >= 0 for s in samples)


def test_time_runs_stops_at_max_seconds_even_below_min_runs():
    samples = runner.time_runs(lambda _: None, None, warmup=0, min_runs=10**9, min_s=0.0, max_s=0.0)
    assert len(samples) == 1


def test_time_runs_calls_between_outside_each_timed_run():
    seen = []
    runner.time_runs(lambda _: None, None, 0, 4, 0.0, 60.0, between=seen.append)
    assert len(seen) == 4 and seen == sorted(seen)


def test_latency_stats_order_and_count():
    stats = runner.latency_stats([float(v) for v in range(1, 101)])
    assert stats["min"] <= stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]
    assert stats["runs"] == 100 and stats["p50"] == pytest.approx(50.5) and stats["p90"] == pytest.approx(90.1)


def test_memory_sampler_respects_interval():
    sampler = runner.MemorySampler(interval=1.0)
    for now in (0.0, 0.5, 0.9, 1.0, 1.5, 2.1):
        sampler(sampler.t0 + now)
    assert [s[0] for s in sampler.samples] == [0.0, 1.0, 2.1]
    assert all(s[1] > 0 for s in sampler.samples)


def test_peak_rss_is_this_address_space_not_the_parent():
    rss = runner.rss_mb()  # read first: the process may grow between two reads, and the peak read later holds it
    assert runner.peak_rss_mb() >= rss > 0


@pytest.mark.parametrize(("flags", "temp", "valid"), [
    ("throttled=0x0", 45.0, True),
    ("throttled=0x50000", 45.0, True),  # happened since boot: a warning, not now
    ("throttled=0x4", 45.0, False),  # throttled now
    ("throttled=0x8", 45.0, False),  # soft temperature limit now
    (None, 85.5, False),  # overheating
    (None, None, True),  # nothing to read (x86 VM)
])
def test_validity_marks_throttled_or_hot_runs_invalid(flags, temp, valid):
    state = {"throttled": flags, "temperature_c": temp, "cpu_freq_mhz": None}
    reasons, warnings = runner.validity(state, state, {"emulated": False, "governor": "performance"})
    assert (not reasons) is valid
    if flags == "throttled=0x50000":
        assert "since boot" in warnings[0] and "under-voltage" in warnings[0]


def test_validity_marks_emulated_runs_invalid_and_warns_on_governor():
    cool = {"throttled": None, "temperature_c": 40.0, "cpu_freq_mhz": 1500.0}
    reasons, warnings = runner.validity(cool, cool, {"emulated": True, "governor": "ondemand"})
    assert "emulated" in reasons[0]
    assert "ondemand" in warnings[0]


@pytest.mark.parametrize("machine, arch, valid", [("x86_64", "aarch64", False), ("aarch64", "aarch64", True),
                                                  ("arm64", "aarch64", True), ("AMD64", "x86_64", True)])
def test_a_run_on_another_architecture_than_the_targets_is_invalid(machine, arch, valid):
    """runner.py alone (no edgekit to refuse it): an aarch64 bundle unpacked and run on an x86 machine."""
    cool = {"throttled": None, "temperature_c": 40.0, "cpu_freq_mhz": None}
    reasons, _ = runner.validity(cool, cool, {"emulated": False, "machine": machine}, target_arch=arch)
    assert (not reasons) is valid
    if not valid:
        assert reasons == ["not the target's architecture: an aarch64 bundle run on x86_64; its numbers are not the "
                           "device's (run it on the device)"]


def test_environment_records_what_makes_results_comparable():
    env = runner.environment()
    for key in ("device_model", "os", "kernel", "cpu", "cores", "governor", "cpu_freq_mhz", "temperature_c",
                "throttled", "power_mode", "python", "numpy", "emulated"):
        assert key in env
    assert env["cores"] >= 1 and env["emulated"] is False


def test_tflite_runtime_is_taken_when_the_target_pins_it(monkeypatch):
    fake = types.ModuleType("tflite_runtime")
    fake.__version__ = "2.14.0"
    fake_interp = types.ModuleType("tflite_runtime.interpreter")
    fake_interp.Interpreter = object
    fake.interpreter = fake_interp
    monkeypatch.setitem(sys.modules, "tflite_runtime", fake)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", fake_interp)
    cls, info = runner._tflite_interpreter("tflite-runtime")
    assert cls is object and info == {"name": "tflite-runtime", "version": "2.14.0"}
    _, info = runner._tflite_interpreter("litert")
    assert info["name"] == "litert"


def test_dumps_round_trips_and_keeps_number_lists_on_one_line():
    data = {"a": [1.5, 2.0], "b": {"c": [[0.1, 2.0]], "d": [{"e": None}]}, "f": {}, "g": []}
    text = runner.dumps(data)
    assert json.loads(text) == data
    assert '"a": [1.5, 2.0]' in text


def test_schema_rejects_a_result_missing_a_field(e2e_build):
    out, _ = e2e_build
    result = json.loads((out / "bundles" / "x86-64" / "results.json").read_text())
    measure.validate(result)
    broken = {k: v for k, v in result.items() if k != "latency_ms"}
    with pytest.raises(BundleError, match="latency_ms"):
        measure.validate(broken)
    with pytest.raises(BundleError, match="invalid_reasons"):
        measure.validate({**result, "valid": False, "invalid_reasons": []})


# --- real runs on the e2e bundle -------------------------------------------------------------------------------

FAST = {"warmup_runs": 2, "warmup_seconds": 0.0, "min_runs": 20, "min_seconds": 0.0, "max_seconds": 5.0}


def test_local_run_is_schema_valid_with_raw_samples_memory_and_provenance(bundle):
    result = measure.run_bundle(bundle, artifacts=["onnx_int8", "tflite_int8"], overrides=FAST,
                                log=lambda *_: None)
    on_disk = json.loads((bundle / "results.json").read_text())
    measure.validate(on_disk)
    assert on_disk["artifact"] == "onnx_int8" and set(on_disk["artifacts"]) == {"onnx_int8", "tflite_int8"}
    manifest = json.loads((bundle / "manifest.json").read_text())
    for name, r in result["artifacts"].items():
        assert len(r["latency_samples_ms"]) == r["latency_ms"]["runs"] >= 20
        assert r["timing"]["warmup_runs"] == 2 and r["timing"]["stopped_by"] == "min_runs_and_seconds"
        assert r["throughput_per_s"] > 0
        mem = r["memory"]
        assert mem["peak_rss_mb"] >= mem["peak_rss_after_load_mb"] >= mem["rss_before_load_mb"] > 0
        assert mem["samples"] and mem["load_delta_mb"] >= 0
        assert r["artifact_sha256"] == manifest["files"][f"{name}.{'onnx' if 'onnx' in name else 'tflite'}"]
        assert r["valid"] is True and r["edgekit_version"] == manifest["edgekit_version"]
    assert result["artifacts"]["onnx_int8"]["runtime"]["providers"] == ["CPUExecutionProvider"]
    assert result["artifacts"]["tflite_int8"]["runtime"]["delegate"] == "XNNPACK"


def test_accuracy_mode_matches_predict_on_every_sample(bundle):
    result = measure.run_bundle(bundle, artifacts=["tflite_int8"], mode="accuracy", log=lambda *_: None)
    manifest = json.loads((bundle / "manifest.json").read_text())
    spec = next(a for a in manifest["artifacts"] if a["name"] == "tflite_int8")
    with np.load(bundle / "eval.npz") as f:
        x, y = f["x"], f["y"]
    art = runner.Artifact(bundle / spec["file"], spec, 1)
    expected = float((art.predict(x).argmax(1) == y).mean())
    assert result["accuracy"] == pytest.approx(expected, abs=1e-12)
    assert result["eval_samples"] == len(x) and result["mode"] == "accuracy"
    # its one token timed run is no latency: the tables show none and the latency model does not fit it
    assert runner.latency_of(result) is None
    row = measure.compare_table(json.loads((bundle / "results.json").read_text())).splitlines()[1].split()
    assert row[0] == "tflite_int8" and row[-5:-2] == ["-", "-", "-"]


def test_gpu_provider_without_cuda_is_an_error_not_a_cpu_fallback(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    spec = next(a for a in manifest["artifacts"] if a["name"] == "onnx_int8") | {"runtime": "onnxruntime-gpu"}
    with pytest.raises(RuntimeError, match="CUDAExecutionProvider"):
        runner.Artifact(bundle / spec["file"], spec)


def test_compare_prints_a_table_and_writes_csv(bundle, tmp_path, capsys):
    measure.run_bundle(bundle, artifacts=["onnx_int8", "onnx_fp32"], overrides=FAST, log=lambda *_: None)
    single = tmp_path / "one.json"
    measure.run_bundle(bundle, out=single, artifacts=["tflite_int8"], overrides=FAST, log=lambda *_: None)
    csv_path = tmp_path / "cmp.csv"
    assert cli.main(["compare", str(bundle / "results.json"), str(single), "--csv", str(csv_path)]) == 0
    printed = capsys.readouterr().out
    assert "p90_ms" in printed and "tflite_int8" in printed and "CPUExecutionProvider" in printed  # not cut
    rows = list(csv.DictReader(csv_path.open()))
    assert [(r["run"], r["artifact"]) for r in rows] == [("x86-64", "onnx_int8"), ("x86-64", "onnx_fp32"),
                                                         ("one", "tflite_int8")]
    assert all(float(r["p50_ms"]) <= float(r["p90_ms"]) for r in rows)


def _with_latency(result: dict, scale: float) -> dict:
    out = json.loads(json.dumps(result))
    for r in [out, *out["artifacts"].values()]:
        r["latency_ms"] = {k: (v * scale if k != "runs" else v) for k, v in r["latency_ms"].items()}
    return out


def test_compare_labels_builds_apart_aligns_any_magnitude_and_writes_no_csv_unasked(bundle, tmp_path, capsys,
                                                                                      monkeypatch):
    result = measure.run_bundle(bundle, artifacts=["onnx_int8", "onnx_fp32"], overrides=FAST, log=lambda *_: None)
    paths = []
    for build, scale in (("build-a", 1.0), ("build-b", 5000.0)):  # p99 of build-b far above 10 ms
        path = tmp_path / build / "bundles" / "x86-64" / "results.json"
        path.parent.mkdir(parents=True)
        measure.write_results(path, _with_latency(result, scale))
        paths.append(str(path))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["compare", *paths]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not list(tmp_path.glob("*.csv"))  # CSV only with --csv
    header, rows = lines[0], lines[1:]
    assert [r.split()[:2] for r in rows] == [["build-a/x86-64", "onnx_int8"], ["build-a/x86-64", "onnx_fp32"],
                                            ["build-b/x86-64", "onnx_int8"], ["build-b/x86-64", "onnx_fp32"]]
    for column in ("load_ms", "p50_ms", "p99_ms", "runs"):  # numbers right-aligned: each ends under its header
        end = header.index(column) + len(column)
        assert all(r[end - 1] != " " and r[end] == " " for r in rows), column
    end = header.index("p99_ms") + len("p99_ms")
    p99 = [float(r[:end].split()[-1]) for r in rows]
    true = result["artifacts"]["onnx_int8"]["latency_ms"]["p99"]  # printed with 4 decimals at any magnitude
    assert p99[0] == pytest.approx(true, abs=5e-5) and p99[2] == pytest.approx(5000 * true, abs=5e-5)
    assert p99[2] > 10


@pytest.mark.parametrize("name, content, says", [
    ("report.json", {"stages": [], "bundles": [], "targets": ["rpi5"]},
     "is a build report; pass {d}/bundles/rpi5/results.json"),
    ("manifest.json", {"target": {}, "artifacts": [], "primary": "x"}, "is a bundle manifest"),
    ("results.json", {"hello": 1}, "is not a results file"),
])
def test_compare_names_what_a_wrong_file_looks_like(tmp_path, capsys, name, content, says):
    path = tmp_path / name
    path.write_text(json.dumps(content))
    assert cli.main(["compare", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says.format(d=tmp_path) in err and "schema" not in err


def test_compare_refuses_a_file_that_is_not_a_result(tmp_path):
    bad = tmp_path / "results.json"
    bad.write_text(json.dumps({"hello": 1}))
    assert cli.main(["compare", str(bad), "--csv", str(tmp_path / "c.csv")]) == 2
