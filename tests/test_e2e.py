"""One real build of the default pipeline (small subset), then its report, bundles, runner and resume."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from edgekit import config, pipeline, report, report_html
from edgekit.device import measure
from edgekit.errors import BundleError
from edgekit.runner.runner import sha256
from edgekit.stages import MODEL_STAGES

STAGE_KEYS = {"name", "accuracy", "params", "macs", "size_bytes"}
ARTIFACT_KEYS = {"target", "format", "precision", "path", "size_bytes", "accuracy", "top1_agreement",
                 "max_abs_diff", "sqnr_db"}
RESULT_KEYS = {"latency_ms", "load_ms", "first_inference_ms", "peak_rss_mb", "accuracy", "runtime",
               "artifact_sha256"}


def test_report_has_every_stage_and_artifact(e2e_build):
    out, _ = e2e_build
    report = json.loads((out / "report.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == ["train", "prune", "distill", "quantize"]
    assert all(STAGE_KEYS <= s.keys() for s in stages.values())
    assert stages["prune"]["macs"] < 0.5 * stages["train"]["macs"]
    assert stages["train"]["accuracy"] > 0.8
    got = {(a["target"], a["format"], a["precision"]) for a in report["artifacts"]}
    assert {("x86-64", "onnx", "int8"), ("x86-64", "tflite", "int8"), ("rpi5", "tflite", "int8")} <= got
    for a in report["artifacts"]:
        assert ARTIFACT_KEYS <= a.keys()
        assert (out / a["path"]).is_file()
        assert a["top1_agreement"] >= 0.95, a
        loss = a["vs_unpruned_fp32"]  # the whole recipe's cost, judged against the target's tolerance
        assert loss["pp"] == pytest.approx(100 * (a["accuracy"] - stages["train"]["accuracy"]))
        assert loss["ok"] == (loss["pp"] >= -loss["tolerance_pp"])
        assert (f"{a['target']}/{a['name']}: " in " ".join(report["over_tolerance"])) != loss["ok"]


def test_bundles_have_manifest_with_matching_hashes(e2e_build):
    out, _ = e2e_build
    for target in ("x86-64", "rpi5"):
        bundle = out / "bundles" / target
        manifest = json.loads((bundle / "manifest.json").read_text())
        assert manifest["target"]["name"] == target
        assert {"runner.py", "eval.npz"} <= manifest["files"].keys()
        for rel, digest in manifest["files"].items():
            assert sha256(bundle / rel) == digest
        for art in manifest["artifacts"]:
            assert {"name", "shape", "dtype", "layout"} <= art["input"].keys()
            assert art["sha256"] == manifest["files"][art["file"]]
        assert (out / "bundles" / f"{target}.tar.gz").is_file()
    rpi = json.loads((out / "bundles" / "rpi5" / "manifest.json").read_text())
    assert rpi["artifacts"][0]["input"]["dtype"] == "int8" and rpi["artifacts"][0]["input"]["scale"] > 0


def test_local_run_results(e2e_build):
    out, _ = e2e_build
    results = json.loads((out / "bundles" / "x86-64" / "results.json").read_text())
    assert RESULT_KEYS <= results.keys()
    lat = results["latency_ms"]
    assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert len(results["latency_samples_ms"]) >= 5
    assert results["runtime"]["name"] == "onnxruntime"
    assert set(results["artifacts"]) == {"onnx_int8", "tflite_int8", "onnx_fp32"}
    report = json.loads((out / "report.json").read_text())
    verified = {a["name"]: a["accuracy"] for a in report["artifacts"] if a["target"] == "x86-64"}
    for name, r in results["artifacts"].items():
        assert r["accuracy"] == pytest.approx(verified[name], abs=1e-9)  # same data, same code path


def test_running_one_artifact_again_keeps_the_others_measurements(e2e_build, tmp_path):
    """`edgekit run BUNDLE --artifact X` rewrites X's result in BUNDLE/results.json and keeps the others' (while
    their bytes are still the bundle's), so `edgekit report` still shows every artifact measured."""
    bundle = tmp_path / "x86-64"
    shutil.copytree(e2e_build[0] / "bundles" / "x86-64", bundle)
    before = json.loads((bundle / "results.json").read_text())["artifacts"]
    measure.run_bundle(bundle, None, ["onnx_fp32"], mode="accuracy", log=lambda _: None)
    after = json.loads((bundle / "results.json").read_text())["artifacts"]
    assert list(after) == list(before) and after["onnx_int8"] == before["onnx_int8"]
    # an accuracy-only run keeps the earlier timing of the same bytes (it times nothing itself)
    assert after["onnx_fp32"]["combined"] == {"timing_from": before["onnx_fp32"]["started_utc"]}
    assert after["onnx_fp32"]["latency_ms"] == before["onnx_fp32"]["latency_ms"] and after["onnx_fp32"]["mode"] == "all"
    assert after["onnx_fp32"]["started_utc"] >= before["onnx_fp32"]["started_utc"]
    stale = {**after, "onnx_int8": {**after["onnx_int8"], "artifact_sha256": "0" * 64}}  # another build's file
    (bundle / "results.json").write_text(json.dumps({**after, "artifacts": stale}))
    measure.run_bundle(bundle, None, ["onnx_fp32"], mode="accuracy", log=lambda _: None)
    assert set(json.loads((bundle / "results.json").read_text())["artifacts"]) == {"tflite_int8", "onnx_fp32"}


def test_runner_imports_neither_torch_nor_tensorflow(e2e_build, tmp_path):
    out, _ = e2e_build
    bundle = out / "bundles" / "x86-64"
    probe = (
        "import runpy, sys\n"
        f"sys.argv = ['runner.py', {str(bundle)!r}, '--artifact', 'tflite_int8',"
        f" '--out', {str(tmp_path / 'r.json')!r}]\n"
        "try:\n    runpy.run_path(" + repr(str(bundle / "runner.py")) + ", run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tensorflow', 'keras', 'edgekit'))\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert "HEAVY []" in proc.stdout, proc.stdout + proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["accuracy"] > 0.5


def test_damaged_bundle_is_refused_before_loading(e2e_build, tmp_path):
    out, _ = e2e_build
    bundle = tmp_path / "x86"
    shutil.copytree(out / "bundles" / "x86-64", bundle)
    art = bundle / "tflite_int8.tflite"
    art.write_bytes(art.read_bytes()[: art.stat().st_size // 4])
    with pytest.raises(BundleError, match="does not match its sha256"):
        measure.run_bundle(bundle, artifacts=["tflite_int8"], log=lambda *_: None)


def test_resume_reruns_only_unfinished_stages(e2e_build, tmp_path):
    out, _ = e2e_build
    copy = tmp_path / "build"
    shutil.copytree(out, copy)
    train_metrics = (copy / "stages" / "train" / "metrics.json").read_text()
    (copy / "stages" / "bundle" / "metrics.json").unlink()
    shutil.rmtree(copy / "bundles")
    cfg = config.load(copy / "config.yaml")
    messages = []
    pipeline.build(cfg, copy, resume=True, log=messages.append)
    assert "[train] finished earlier, kept (resume)" in messages
    assert "[bundle] running" in messages
    assert (copy / "stages" / "train" / "metrics.json").read_text() == train_metrics
    assert (copy / "bundles" / "rpi5" / "manifest.json").is_file()


def test_resume_makes_a_damaged_bundle_again(e2e_build, tmp_path):
    """A finished stage is kept by --resume only while what it made is as it left it: a bundle file edited since
    makes the bundle (and what follows) again; an edited file in a stage's folder is found by its recorded sha256."""
    out, _ = e2e_build
    copy = tmp_path / "build"
    shutil.copytree(out, copy)
    art = copy / "bundles" / "x86-64" / "onnx_int8.onnx"
    art.write_bytes(art.read_bytes()[:-1] + bytes([art.read_bytes()[-1] ^ 1]))
    messages = []
    pipeline.build(config.load(copy / "config.yaml"), copy, resume=True, log=messages.append)
    assert "[export] finished earlier, kept (resume)" in messages
    assert "[bundle] finished earlier, running again (what it made is damaged: bundles/x86-64: onnx_int8.onnx does " \
           "not match its sha256 in manifest.json)" in messages
    manifest = json.loads((copy / "bundles" / "x86-64" / "manifest.json").read_text())
    assert sha256(art) == manifest["files"]["onnx_int8.onnx"]
    ctx = pipeline.make_context(config.load(copy / "config.yaml"), copy, None)
    record = ctx.metrics("export")
    assert pipeline.damaged(ctx, pipeline.stage("export"), record) == []
    (copy / "stages" / "export" / next(iter(record["outputs"]))).write_bytes(b"")
    assert pipeline.damaged(ctx, pipeline.stage("export"), record) == [
        f"stages/export/{next(iter(record['outputs']))} changed"]


def test_export_primary_puts_that_artifact_first_in_the_bundle(e2e_build, tmp_path):
    """export.primary: the artifact each bundle leads with (what `edgekit run` and a search time); a target that
    does not ship it is refused before anything runs."""
    import dataclasses

    from edgekit import targets
    from edgekit.errors import ConfigError

    out, _ = e2e_build
    copy = tmp_path / "build"
    shutil.copytree(out, copy)
    cfg = config.load(copy / "config.yaml")
    cfg = dataclasses.replace(cfg, export=dataclasses.replace(cfg.export, primary="onnx_fp32"))
    pipeline.run_stage(pipeline.make_context(cfg, copy, ["x86-64"]), "bundle")
    manifest = json.loads((copy / "bundles" / "x86-64" / "manifest.json").read_text())
    assert manifest["primary"] == manifest["artifacts"][0]["name"] == "onnx_fp32"
    assert sorted(a["name"] for a in manifest["artifacts"]) == sorted(
        a["name"] for a in json.loads((out / "bundles" / "x86-64" / "manifest.json").read_text())["artifacts"])
    ctx = pipeline.make_context(cfg, copy, ["x86-64"])  # the report and its page mark it
    rep = report.build_report(cfg, [ctx.metrics(n) for n in MODEL_STAGES + ("verify", "bundle")], ctx.targets, {},
                              MODEL_STAGES)
    assert [r["name"] for r in rep["artifacts"] if r["primary"]] == ["onnx_fp32"]
    assert re.search(r"^x86-64 +onnx_fp32\+", report.summary_table(rep), re.M)
    (copy / "report.json").write_text(json.dumps(rep))
    report_html.write([copy], copy / "report.html")
    assert "onnx_fp32 <span class=\"muted\"" in (copy / "report.html").read_text()
    with pytest.raises(ConfigError, match="^config: export.primary 'onnx_fp32' is not among what rpi5 ships "
                                          r"\(tflite_int8, tflite_fp32\)"):
        targets.primary(targets.get(["rpi5"])[0], "onnx_fp32")


def test_existing_build_dir_is_not_overwritten(e2e_build):
    out, _ = e2e_build
    before = (out / "report.json").read_text()
    with pytest.raises(Exception, match="already holds a build"):
        pipeline.build(config.from_dict({}), out)
    assert (out / "report.json").read_text() == before
    assert np.load(out / "stages" / "train" / "test_logits.npy").shape[1] == 10
