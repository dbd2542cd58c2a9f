"""edgekit search: a real embedded Ray with 2 workers, tiny data, 4 trials (2, then 2 more with --resume)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny

from edgekit import config, targets
from edgekit.errors import ConfigError
from edgekit.search import pareto, run, space

SPACE = {"prune.ratio": [0.25, 0.5], "distill.feature_layers": [["nope:nope"], []]}  # []: the classifier's input


def _onnx_target(folder: Path) -> str:
    raw = yaml.safe_load((targets.TARGETS_DIR / "x86-64.yaml").read_text())
    raw["name"], raw["artifacts"] = "x86-onnx", [{"format": "onnx", "precision": "int8", "runtime": "onnxruntime"}]
    (folder / "x86-onnx.yaml").write_text(yaml.safe_dump(raw))
    return str(folder / "x86-onnx.yaml")


def _raw() -> dict:
    # the config's own recipe (the first trial) puts the feature loss on a layer that does not exist: its distill
    # stage fails, and the search must go on
    return tiny(data={"limit": 200}, train={"epochs": 2}, prune={"finetune_epochs": 1},
                distill={"epochs": 1, "losses": ["soft", "feature"], "feature_layers": ["nope:nope"]},
                quantize={"enabled": False}, search={"space": SPACE, "trials": 4})


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    import os

    tmp = tmp_path_factory.mktemp("search")
    old = os.environ.get("EDGEKIT_STAGE_CACHE")
    os.environ["EDGEKIT_STAGE_CACHE"] = str(tmp / "cache")  # the search turns the cache on (TINY turns it off)
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(_raw()))
    cfg = config.load(tmp / "cfg.yaml")
    target, out, said = _onnx_target(tmp), tmp / "s", []
    real = run.time_trials, run.tune_trials
    try:
        first = run.search(cfg, target, out, trials=2, workers=2, log=said.append)
        # one at a time: two rounds, each timed before the next trial is sampled (search.objective: latency);
        # the phases are recorded as they are called (PHASES), then run for real
        def time_trials(trials, *args, **kw):
            PHASES.append(("time", [t["id"] for t in trials]))
            return real[0](trials, *args, **kw)

        def tune_trials(base, base_dir, search_cfg, target, out, n, known, *args, **kw):
            PHASES.append(("tune", n, [(t["id"], t.get(run.LATENCY)) for t in known]))
            return real[1](base, base_dir, search_cfg, target, out, n, known, *args, **kw)

        run.time_trials, run.tune_trials = time_trials, tune_trials
        second = run.search(cfg, target, out, trials=4, resume=True, workers=1, log=said.append)
    finally:
        run.time_trials, run.tune_trials = real
        os.environ["EDGEKIT_STAGE_CACHE"] = old or ""
    return tmp, out, target, first, second, said


PHASES: list[tuple] = []  # the second search's calls: ("time", trial ids) and ("tune", n, [(id, p90)] known)


def test_trials_ran_in_parallel_and_a_failing_one_is_recorded(searched):
    _, out, _, first, _, _ = searched
    trials = first["trials"]
    assert len(trials) == 2 and first["trials_run_now"] == 2
    a, b = trials
    assert a["pid"] != b["pid"] and a["started"] < b["ended"] and b["started"] < a["ended"], "not in parallel"
    failed = [t for t in trials if t["status"] == "failed"]
    assert failed and failed[0]["overrides"]["distill.feature_layers"] == ["nope:nope"]  # the config's own recipe
    assert "distill" in failed[0]["reason"] and "\n" not in failed[0]["reason"]
    assert failed[0]["feasible"] is None and not failed[0]["pareto"]
    assert a["proposed_by"] == b["proposed_by"] == "sampler"  # nothing finished yet: nothing to refine


def test_trials_timed_here_keep_the_median_of_rotating_rounds(searched):
    import statistics

    _, out, _, _, second, said = searched
    timed = [t for t in second["trials"] if t["status"] == "ok"]
    assert timed
    for t in timed:
        saved = json.loads((out / "trials" / t["id"] / run.TIMING_FILE).read_text())
        rounds = saved["timing_rounds"]
        assert len(rounds) == run.TIMING_ROUNDS
        assert t["latency_p90_ms"] == saved["latency_ms"]["p90"] == statistics.median(r["p90"] for r in rounds)
    assert f"round {run.TIMING_ROUNDS} of {run.TIMING_ROUNDS}" in " ".join(said)


def test_resume_skips_finished_trials(searched):
    _, out, _, first, second, said = searched
    assert second["trials_run_now"] == 2 and len(second["trials"]) == 4
    before = {t["id"]: t for t in first["trials"]}
    after = {t["id"]: t for t in second["trials"]}
    for tid, t in before.items():  # the same records, not built again
        assert after[tid]["started"] == t["started"] and after[tid]["ended"] == t["ended"]
    assert "search: 2 trials finished earlier, 2 to run" in " ".join(said)


def test_the_sampler_learns_each_rounds_measured_p90_before_the_next(searched):
    """search.objective latency (the default), timed here: rounds of --workers trials; the last trial was sampled
    after the one before it had been timed, and the study it was sampled from held measured p90s, not MACs."""
    _, out, _, first, second, said = searched
    assert first["sampler_objectives"] == second["sampler_objectives"] == ["accuracy", run.LATENCY]
    assert "2 to run, 1 at a time, in rounds of 1 each timed before the next is sampled" in " ".join(said)
    third, fourth = second["trials"][2:]
    # time the finished trials, sample and build one, time again (the third now among them), sample the fourth,
    # then the final timing; the fourth was sampled knowing the third and every ok trial's measured p90
    assert [p[0] for p in PHASES] == ["time", "tune", "time", "tune", "time"] and PHASES[1][1] == PHASES[3][1] == 1
    assert third["id"] not in PHASES[0][1] and third["id"] in PHASES[2][1]
    known = dict(PHASES[3][2])
    assert third["id"] in known and fourth["id"] not in known
    assert all(known[t["id"]] is not None for t in second["trials"][:3] if t["status"] == "ok")
    if third["status"] == "ok":  # a failed trial has nothing to time
        timed_at = (out / "trials" / third["id"] / run.TIMING_FILE).stat().st_mtime
        assert timed_at < fourth["started"]
    import optuna

    cfg = config.load(out / "config.yaml")
    storage = run._study(cfg.search, second["trials"][:3], config.to_dict(cfg), run.LATENCY)
    told = [t.values for t in optuna.load_study(study_name="edgekit", storage=storage).trials if t.values]
    ok = [t for t in second["trials"][:3] if t["status"] == "ok"]
    assert ok and sorted(told) == sorted([t["accuracy"], t["latency_p90_ms"]] for t in ok)
    assert run._values({"status": "ok", "accuracy": 0.9, "macs": 5}, run.LATENCY) is None  # not timed yet


def test_outputs_front_and_recommendation(searched):
    _, out, _, _, second, _ = searched
    saved = json.loads((out / "trials.json").read_text())
    assert [t["id"] for t in saved["trials"]] == [t["id"] for t in second["trials"]]
    assert (out / "trials.csv").read_text().count("\n") == 5 and (out / "pareto.png").stat().st_size > 1000
    ok = [t for t in saved["trials"] if t["status"] == "ok"]
    assert ok and all(t["latency_source"] == "measured here" and t["latency_p90_ms"] > 0 for t in ok)
    front = [t for t in ok if t["pareto"]]
    assert front and not any(pareto.dominates(o, f) for f in front for o in ok)
    assert all(any(pareto.dominates(f, t) for f in front) or t["pareto"] for t in ok)  # off the front: beaten
    best = next(t for t in ok if t["id"] == saved["recommended"])
    assert best["feasible"] and best["accuracy"] == max(t["accuracy"] for t in ok if t["feasible"])
    built = [t for t in ok if t.get("repeat_of") is None]
    assert any(t["cached_stages"] for t in built[1:]), "no trial reused a stage from the cache"


def test_best_yaml_rebuilds_the_same_artifact(searched, tmp_path):
    """Trials train on one torch thread each (one CPU per trial); `edgekit build best.yaml` on one thread gives the
    same bytes. Measured here: on 2 threads the trained weights differ in their last bits (float sums in another
    order), so the sha256 differs although stage keys and accuracies match."""
    import os

    _, out, target, _, second, _ = searched
    best = next(t for t in second["trials"] if t["id"] == second["recommended"])
    assert best["torch_threads"] == 1 and "OMP_NUM_THREADS=1 edgekit build best.yaml" in (out / "best.yaml").read_text()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EDGEKIT_STAGE_CACHE": str(tmp_path / "empty")}  # really rebuilt
    proc = subprocess.run([sys.executable, "-m", "edgekit", "build", str(out / "best.yaml"), "--target", target,
                           "--out", str(tmp_path / "b")], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    manifest = json.loads((tmp_path / "b" / "bundles" / "x86-onnx" / "manifest.json").read_text())
    assert not any(s.get("cached_from") for s in report["stages"])
    assert manifest["files"][manifest["artifacts"][0]["file"]] == best["sha256"]


@pytest.mark.parametrize("bad, says", [
    ({"prune.nope": [1]}, "search.space.prune.nope choice 1: unknown key 'prune.nope'"),
    ({"prune.ratio": [0.5, 1.5]}, "search.space.prune.ratio choice 1.5: 'prune.ratio' is out of range"),
    ({"quantize.method": ["int4"]}, "search.space.quantize.method choice 'int4': 'quantize.method' is 'int4'"),
    ({"data.limit": [100]}, "a search does not vary the data section"),
    ({"ratio": [0.5]}, "is not a dotted config key"),
    ({"prune.ratio": []}, "must be a non-empty list of choices"),
])
def test_bad_search_keys_are_one_line_errors(bad, says, tmp_path):
    with pytest.raises(ConfigError, match=None) as err:
        config.from_dict({"search": {"space": bad}})
    assert says in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"search": {"space": bad}}))
    proc = subprocess.run([sys.executable, "-m", "edgekit", "search", str(tmp_path / "c.yaml"), "--target", "x86-64",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and says in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("refine", [-0.1, 1.5])
def test_refine_out_of_range_is_a_one_line_error(refine):
    with pytest.raises(ConfigError) as err:
        config.from_dict({"search": {"refine": refine}})
    assert "'search.refine' is out of range" in str(err.value) and "\n" not in str(err.value)


def test_default_space_is_valid_and_shown():
    cfg = config.from_dict({"search": {}})
    assert cfg.search.space == space.DEFAULT_SPACE
    config.from_dict({"search": {"space": space.DEFAULT_SPACE}})  # every default choice builds
    assert "prune.ratio" in config.default_yaml() and "search:" in config.default_yaml()


def test_no_stage_cache_reaches_every_trial(monkeypatch, tmp_path):
    from edgekit import cli
    from edgekit.search import trial

    assert trial.trial_config({}, {}, "x86-64")["build"]["stage_cache"] is True  # trials share their prefixes
    assert trial.trial_config({}, {}, "x86-64", stage_cache=False)["build"]["stage_cache"] is False
    seen = {}

    def fake_search(cfg, target, out, **kw):  # the CLI's hand-over, not a search
        seen.update(kw)
        raise SystemExit(0)

    monkeypatch.setattr(run, "search", fake_search)
    for argv, want in ((["search", "--target", "x86-64", "--out", str(tmp_path / "a")], True),
                       (["search", "--target", "x86-64", "--out", str(tmp_path / "b"), "--no-stage-cache"], False)):
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert seen["stage_cache"] is want


def test_budget_option():
    assert pareto.parse_budget("latency_ms=5,size_kb=500", {"latency_ms": 10, "memory_mb": 512}) == \
        {"latency_ms": 5.0, "memory_mb": 512, "size_kb": 500.0}
    with pytest.raises(ConfigError, match="KEY=NUMBER"):
        pareto.parse_budget("speed=5", {})
    for bad in ("size_kb=nan", "latency_ms=inf", "memory_mb=-1"):
        with pytest.raises(ConfigError, match=f"^--budget {bad}: give a finite number >= 0"):
            pareto.parse_budget(bad, {})
    with pytest.raises(ConfigError, match="^--budget gives latency_ms twice; give each budget once$"):
        pareto.parse_budget("latency_ms=5,latency_ms=6", {})


# --- the latency estimate of a target this machine cannot run ------------------------------------------------

def _as_device_results(out: Path) -> list[Path]:
    """Each built trial's timing (a real runner result) put where `edgekit run` writes it: in its bundle."""
    import shutil

    written = []
    for folder in sorted((out / "trials").iterdir()):
        record = json.loads((folder / "trial.json").read_text())
        if record["status"] == "ok" and not record.get("repeat_of"):
            dest = Path(record["bundle"]) / "results.json"
            shutil.copy(folder / run.TIMING_FILE, dest)
            written.append(dest)
    return written


def test_latency_fitted_to_device_results(searched):
    import copy
    import dataclasses

    from edgekit.search import latency

    _, out, target, _, second, said = searched
    files = _as_device_results(out)
    tgt = targets.get([target])[0]
    points = latency.load([str(out / "trials")], tgt.name)  # a folder: every results*.json under it
    assert len(points) == len(files) >= 2
    built = {t["bundle"]: t for t in second["trials"] if t["status"] == "ok" and not t.get("repeat_of")}
    for p in points:  # each point's MACs are those of the trial that built the bundle
        assert p.macs == built[str(Path(p.path).parent)]["macs"]
    # a least-squares line (or ratio) puts its errors on both sides: the estimates of the points sum to their p90s
    guesses = [latency.estimate(p.macs, p.artifact, "aarch64", points) for p in points]
    # estimates are rounded to 4 decimals (0.1 us): each may be off by half of that
    assert sum(g.p90_ms for g in guesses) == pytest.approx(sum(p.p90_ms for p in points), abs=0.5e-4 * len(points))
    trials = copy.deepcopy(second["trials"])
    far = dataclasses.replace(tgt, arch="aarch64")  # a target this machine does not run: estimated, not measured
    run.time_trials(trials, out, far, said.append, points=points)
    ok = [t for t in trials if t["status"] == "ok"]
    assert all(t["latency_source"] == f"estimated (fitted to {len(points)} device results)" for t in ok)
    assert all(t["memory_source"].startswith("estimated (fitted") and "onnx_int8 results" in t["estimate"] for t in ok)
    run.time_trials(trials, out, far, said.append)  # no results: from MACs, and says so
    assert all(t["latency_source"] == "estimated (MACs)" and t["latency_p90_ms"] > 0 for t in ok)
    # a bundle older than `macs` in manifests: the MACs come from its build's report.json
    manifest_path = files[0].parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for a in manifest["artifacts"]:
        a.pop("macs")
    manifest_path.write_text(json.dumps(manifest))
    assert latency.load([str(files[0])], tgt.name)[0].macs == points[0].macs


def test_fit_recovers_a_line_and_falls_back_to_a_ratio():
    from edgekit.search import latency

    line = [latency.Point("onnx_int8", m, 0.5 + 2e-6 * m, "r.json") for m in (1e5, 2e5, 4e5)]
    a, b, n, how = latency.fit(line, "onnx_int8")
    assert (a, b, n) == (pytest.approx(0.5), pytest.approx(2e-6), 3) and "least squares over 3 onnx_int8" in how
    two = line[:2]  # too few for a line: one ratio, through 0
    a, b, n, how = latency.fit(two, "tflite_int8")  # no tflite_int8 point: the other artifacts' points
    assert a == 0 and b == pytest.approx((0.7 + 0.9) / 3e5) and "ratio" in how and "tflite_int8: none" in how


def test_bad_device_results_are_one_line_errors(searched, tmp_path):
    from edgekit.search import latency

    _, out, target, _, second, _ = searched
    files = _as_device_results(out)
    name = targets.get([target])[0].name
    cases = [(tmp_path / "none.json", "does not exist")]
    (tmp_path / "bad.json").write_text("{not json")
    cases.append((tmp_path / "bad.json", "cannot be read as JSON"))
    alone = tmp_path / "results.json"
    alone.write_text(files[0].read_text())  # out of its bundle folder: its MACs are unknown
    cases.append((alone, "not in its bundle folder"))
    other = files[0].with_name("results-other.json")
    other.write_text(json.dumps({**json.loads(files[0].read_text()), "target": "rpi4"}))
    cases.append((other, "holds results for target 'rpi4', not 'x86-onnx'"))
    moved = files[1].with_name("results-moved.json")
    moved.write_text(json.dumps({**json.loads(files[0].read_text()), "bundle_id": "0123456789abcdef"}))
    cases.append((moved, "measured bundle 0123456789abcdef, not the bundle beside it"))
    (tmp_path / "empty").mkdir()
    cases.append((tmp_path / "empty", "holds no results*.json file"))
    for path, says in cases:
        with pytest.raises(ConfigError) as err:
            latency.load([str(path)], name)
        assert says in str(err.value) and "\n" not in str(err.value), str(err.value)
    other.unlink()
    moved.unlink()
    with pytest.raises(ConfigError, match="no valid results for target 'rpi4'"):
        latency.load([str(out / "trials")], "rpi4")


def test_trials_csv_has_p50_and_reads_back(searched, tmp_path):
    import copy
    import csv

    _, out, _, _, second, _ = searched
    result = copy.deepcopy(second)
    result["space"] = {**result["space"], "prune.method": ["l1", "taylor"]}
    failed = next(t for t in result["trials"] if t["status"] == "failed")
    failed["reason"] = 'distill: "nope:nope", a layer, is not in the model'  # quotes and a comma
    for t in result["trials"]:
        t["overrides"]["prune.method"] = "taylor"
    run.write_outputs(tmp_path, result, {}, str(tmp_path), "x86-64", None)
    rows = list(csv.DictReader((tmp_path / "trials.csv").open(newline="")))
    assert [r["id"] for r in rows] == [t["id"] for t in result["trials"]]
    by_id = {r["id"]: r for r in rows}
    assert by_id[failed["id"]]["reason"] == failed["reason"]
    for t in result["trials"]:
        row = by_id[t["id"]]
        assert row["prune.method"] == "taylor" and json.loads(row["distill.feature_layers"]) == \
            t["overrides"]["distill.feature_layers"] and float(row["prune.ratio"]) == t["overrides"]["prune.ratio"]
        if t["status"] == "ok":
            assert 0 < float(row["latency_p50_ms"]) <= float(row["latency_p90_ms"])


def test_nothing_feasible_exits_2_with_outputs_and_ray_stays_quiet(searched, tmp_path):
    """Resumed with one more trial (Ray starts) and a budget no trial meets: the outputs are written, one line
    says so, the exit code is a failed goal's (2), and nothing of Ray's banner or warnings shows."""
    import shutil

    _, out, target, _, _, _ = searched
    copy_ = tmp_path / "s"
    shutil.copytree(out, copy_, ignore=shutil.ignore_patterns(".ray"))
    (copy_ / "trials.json").unlink()
    env = {**__import__("os").environ, "EDGEKIT_STAGE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "edgekit", "search", "--target", target, "--out", str(copy_),
                           "--resume", "--trials", "5", "--workers", "1", "--budget", "latency_ms=0.000001"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "no trial fits the budgets, nothing recommended" in proc.stderr
    saved = json.loads((copy_ / "trials.json").read_text())
    assert len(saved["trials"]) == 5 and saved["recommended"] is None and not (copy_ / "best.yaml").exists()
    assert (copy_ / "pareto.png").is_file() and "trial " in proc.stdout
    said = proc.stdout + proc.stderr
    for noise in ("Token authentication", "Started a local Ray instance", "Configuration for experiment",
                  "View detailed results", "TensorBoard"):
        assert noise not in said, said[-3000:]


def test_a_second_search_into_a_folder_a_search_is_running_in_stops_at_once(searched, tmp_path):
    """Two searches in one folder would each remove the other's unfinished trials: the second stops in one line."""
    import fcntl
    import os
    import shutil

    from edgekit.errors import BuildDirError
    from edgekit.pipeline import LOCK_FILE

    _, out, target, _, _, _ = searched
    copy_ = tmp_path / "s"
    shutil.copytree(out, copy_, ignore=shutil.ignore_patterns(".ray"))
    held = os.open(copy_ / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the running search holds it
    try:
        for resume in (True, False):  # without --resume too: the running search is named, not "not empty"
            with pytest.raises(BuildDirError, match=f"^another edgekit build or search is writing into '{copy_}'"):
                run.search(config.load(copy_ / "config.yaml"), target, copy_, trials=5, resume=resume, workers=1,
                           log=lambda _: None)
    finally:
        os.close(held)


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_ctrl_c_ends_the_search_with_the_command_that_resumes_it(searched, tmp_path, stop):
    """Ctrl-C (or SIGTERM: timeout, kill, a cancelled job) while a trial trains: the search stops (exit 130, as a
    build does) and says how to continue, instead of Ray Tune swallowing the interrupt and the search presenting
    the trials so far as its answer, or Ray dumping a C++ stack on SIGTERM."""
    import os
    import shutil
    import signal
    import time

    _, out, target, _, _, _ = searched
    copy_ = tmp_path / "s"
    shutil.copytree(out, copy_, ignore=shutil.ignore_patterns(".ray"))
    (copy_ / "trials.json").unlink()
    before = {d.name for d in (copy_ / run.TRIALS_DIR).iterdir()}
    env = {**os.environ, "EDGEKIT_STAGE_CACHE": str(tmp_path / "cache")}
    argv = ["search", "--target", target, "--out", str(copy_), "--resume", "--trials", "6", "--workers", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "edgekit", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while not {d.name for d in (copy_ / run.TRIALS_DIR).iterdir()} - before and time.time() < deadline:
        time.sleep(0.5)  # until a new trial has started
    proc.send_signal(getattr(signal, stop))
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode in (130, -2), stderr[-2000:]  # -2: see test_sigterm_ends_a_build_as_ctrl_c_does
    assert stderr.strip().splitlines()[-1] == (f"edgekit: interrupted; the finished trials are kept in {copy_}, "
                                               f"continue with `edgekit {' '.join(argv)}`")
    assert "recommended:" not in stdout and not (copy_ / "trials.json").exists() and "SIGTERM received" not in stderr
    kept = {t["id"] for t in run.load_trials(copy_)}  # the finished ones (a repeat ends at once): stopped before 6
    assert before <= kept and len(kept) < 6


@pytest.mark.system  # sshd (tests/conftest.py's loopback device)
def test_host_times_each_trial_on_the_device_over_ssh(searched, sshd, pinned):
    """`--host`: each built trial's primary artifact timed on the device with `edgekit run --host`'s code; the
    result is kept per device and reused; a device of another architecture is refused before any trial."""
    import copy
    import dataclasses

    from edgekit.device import measure
    from edgekit.errors import RemoteError

    _, out, target, _, second, said = searched
    tgt = targets.get([target])[0]
    device = run.Device(sshd.connection(pinned), python=sys.executable)
    device.check(tgt)
    with pytest.raises(RemoteError, match="is x86_64 and target x86-onnx is aarch64"):
        device.check(dataclasses.replace(tgt, arch="aarch64"))
    trials = copy.deepcopy(second["trials"])
    said.clear()
    run.time_trials(trials, out, tgt, said.append, device)
    ok = [t for t in trials if t["status"] == "ok"]
    assert ok and all(t["latency_source"] == f"measured on {sshd.user}@127.0.0.1" for t in ok)
    for t in ok:
        saved = out / "trials" / t["id"] / "results-127.0.0.1.json"
        result = json.loads(saved.read_text())
        measure.validate(result)
        assert result["remote"]["host"] == device.conn.host and result["artifact"] == t["artifact"]
        assert result["artifact_sha256"] == t["sha256"] and t["latency_p90_ms"] == result["latency_ms"]["p90"]
    # one timing per distinct artifact: a trial with the same bytes as one timed takes its result
    assert sum("on " + device.conn.host in line for line in said) == len({(t["sha256"], t["artifact"]) for t in ok})
    said.clear()
    run.time_trials(copy.deepcopy(second["trials"]), out, tgt, said.append, device)  # kept: not timed again
    assert not said


# --- the peak-memory estimate of a target this machine cannot run ---------------------------------------------

def test_memory_fitted_to_device_results_and_checked_against_the_budget(searched):
    import copy
    import dataclasses

    from edgekit.search import latency, memory

    _, out, target, _, second, said = searched
    files = _as_device_results(out)
    tgt = targets.get([target])[0]
    points = latency.load([str(f) for f in files], tgt.name)
    for p in points:  # what the runner measured, and the manifest's file size and runtime
        result = json.loads(Path(p.path).read_text())
        manifest = json.loads((Path(p.path).parent / "manifest.json").read_text())
        entry = next(a for a in manifest["artifacts"] if a["name"] == p.artifact)
        assert p.peak_rss_mb == result["peak_rss_mb"] > 0 and p.runtime == "onnxruntime"
        assert p.size_bytes == (Path(p.path).parent / entry["file"]).stat().st_size
    trials = copy.deepcopy(second["trials"])
    far = dataclasses.replace(tgt, arch="aarch64")
    run.time_trials(trials, out, far, said.append, points=points)
    ok = [t for t in trials if t["status"] == "ok" and not t.get("repeat_of")]
    assert ok and all(t["memory_source"] == f"estimated (fitted to {len(points)} device results)" for t in ok)
    assert all("onnxruntime results" in t["memory_estimate"] for t in ok)
    # a least-squares line or a mean offset: the estimates of the measured trials sum to their measured peaks
    # (rounded to 0.1 MB each)
    assert sum(t["peak_rss_mb"] for t in ok) == pytest.approx(sum(p.peak_rss_mb for p in points), abs=0.05 * len(ok))
    # the budget check uses the estimate, and says it is one
    peaks = sorted(t["peak_rss_mb"] for t in ok)
    pareto.mark(trials, {"memory_mb": peaks[0] - 0.5})
    assert all(t["feasible"] is False and not t["budgets_unchecked"] for t in ok)
    assert all(any(r.startswith("peak RSS") and r.endswith("MB (estimated)") for r in t["infeasible_because"])
               for t in ok)
    assert pareto.mark(trials, {"memory_mb": peaks[-1] + 0.5}) is not None and all(t["feasible"] for t in ok)
    assert memory.fit(points, "litert") is None  # no results of that runtime: the rule


def test_memory_rule_without_device_results(searched, tmp_path):
    import copy
    import csv
    import dataclasses

    from edgekit.search import memory

    _, out, target, _, second, said = searched
    trials = copy.deepcopy(second["trials"])
    far = dataclasses.replace(targets.get([target])[0], arch="aarch64")
    run.time_trials(trials, out, far, said.append)
    ok = [t for t in trials if t["status"] == "ok"]
    base = memory.BASELINE_MB["onnxruntime"][0]
    for t in ok:
        artifact = Path(t["bundle"]) / f"{t['artifact']}.onnx"
        expected = base + artifact.stat().st_size / memory.MB + memory.largest_activation_bytes(artifact) / memory.MB
        assert t["memory_source"] == "estimated (rule)" and t["peak_rss_mb"] == round(expected, 1)
        assert "onnxruntime baseline 56.8 MB (benchmarks/runtime_memory.py" in t["memory_estimate"]
    result = {**copy.deepcopy(second), "trials": trials, "budgets": {"memory_mb": base - 0.1}}
    best = pareto.mark(trials, result["budgets"])  # every estimate is over the bare runtime's baseline
    assert best is None and all("(estimated)" in t["infeasible_because"][0] for t in ok)
    run.write_outputs(tmp_path, result, {}, str(tmp_path), "x86-64", best)
    rows = [r for r in csv.DictReader((tmp_path / "trials.csv").open(newline="")) if r["status"] == "ok"]
    peaks = {t["id"]: t["peak_rss_mb"] for t in ok}
    assert rows and all(r["memory_source"] == "estimated (rule)" and float(r["peak_rss_mb"]) == peaks[r["id"]]
                        for r in rows)


def _weight(units: int):
    """W of x[1,4] @ W[4,units] -> relu -> sum: the largest activation is the [1,units] float32 in the middle
    (4 * units bytes), smaller than W (16 * units bytes), a constant."""
    import numpy as np

    return np.arange(4 * units, dtype=np.float32).reshape(4, units) / (4 * units)


def test_largest_activation_of_onnx_and_tflite(tmp_path):
    import onnx
    import tensorflow as tf
    from onnx import TensorProto, helper, numpy_helper

    from edgekit.search import memory

    w = _weight(1000)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("ReduceSum", ["r"], ["y"], keepdims=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "m.onnx")
    assert memory.largest_activation_bytes(tmp_path / "m.onnx") == 4000  # the [1,1000] float32, found by inference

    fn = tf.function(lambda x: tf.reduce_sum(tf.nn.relu(tf.matmul(x, tf.constant(w))), axis=1, keepdims=True),
                     input_signature=[tf.TensorSpec([1, 4], tf.float32)])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
    (tmp_path / "m.tflite").write_bytes(converter.convert())
    assert memory.largest_activation_bytes(tmp_path / "m.tflite") == 4000


def test_the_default_recipe_is_a_point_of_the_default_space():
    """base_first has its reference trial with the defaults; a value outside the space is named."""
    base = config.to_dict(config.from_dict({}))
    assert space.base_point(space.DEFAULT_SPACE, base) is not None
    assert space.outside(space.DEFAULT_SPACE, base) == []
    narrow = {**space.DEFAULT_SPACE, "quantize.method": ["ptq", "qat"]}
    assert space.base_point(narrow, base) is None
    assert space.outside(narrow, base) == ["quantize.method auto not in [ptq, qat]"]


def test_trials_with_the_same_bytes_are_timed_once_and_share_it(tmp_path, monkeypatch):
    """Timing noise must not put one copy of an artifact on the front and another off it."""
    from edgekit.device import measure

    timed = []

    def fake_run(bundle, path, names, log):  # the grouping is under test here; real timing: the test above
        timed.append(bundle.name)
        ms = {"p50": len(timed) * 0.1, "p90": len(timed) * 0.2}
        return {"latency_ms": ms, "peak_rss_mb": 50.0, "artifacts": {names[0]: {"latency_ms": ms}}}

    monkeypatch.setattr(measure, "run_bundle", fake_run)
    trials = [{"id": i, "bundle": str(tmp_path / i), "artifact": "onnx_int8", "sha256": sha}
              for i, sha in (("a", "s1"), ("b", "s2"), ("c", "s1"))]
    run.time_here(trials, tmp_path, log=lambda _: None)
    assert sorted(timed) == sorted(["a", "b"] * run.TIMING_ROUNDS)
    saved = {i: json.loads((tmp_path / "trials" / i / run.TIMING_FILE).read_text()) for i in "abc"}
    assert saved["c"]["latency_ms"] == saved["a"]["latency_ms"] and saved["c"]["same_bytes_as"] == "a"
    assert "same_bytes_as" not in saved["a"] and saved["b"]["latency_ms"] != saved["a"]["latency_ms"]
    # a copy built in a later round (or after --resume) takes the timing of the one timed already
    later = [{**t, "status": "ok"} for t in trials] + [{"id": "d", "bundle": str(tmp_path / "d"),
                                                        "artifact": "onnx_int8", "sha256": "s2", "status": "ok"}]
    run.time_trials(later, tmp_path, targets.get(["x86-64"])[0], lambda _: None)
    assert sorted(timed) == sorted(["a", "b"] * run.TIMING_ROUNDS)  # nothing timed again
    d = json.loads((tmp_path / "trials" / "d" / run.TIMING_FILE).read_text())
    assert d["latency_ms"] == saved["b"]["latency_ms"] and d["same_bytes_as"] == "b"
    assert later[3][run.LATENCY] == later[1][run.LATENCY] == saved["b"]["latency_ms"]["p90"]


def test_trials_near_the_budget_are_timed_more_before_feasibility(tmp_path, monkeypatch):
    """A p90 within EDGE of the latency budget is timed EDGE_ROUNDS more times (it and its same-bytes copy once),
    the median taken over every round; one far from the budget is not, and nothing is timed more twice."""
    import statistics

    from edgekit.device import measure

    timed, noise = [], {"near": [0.30, 0.36, 0.38], "far": [1.0, 1.1, 1.2]}

    def fake_run(bundle, path, names, log):  # the near trial's first three timings were slow, the rest fast
        timed.append(bundle.name)
        seq = noise.get(bundle.name, [])
        ms = seq.pop(0) if seq else 0.25
        return {"latency_ms": {"p50": ms / 2, "p90": ms}, "peak_rss_mb": 50.0 + len(timed),
                "artifacts": {names[0]: {"latency_ms": {"p50": ms / 2, "p90": ms}}}}

    monkeypatch.setattr(measure, "run_bundle", fake_run)
    trials = [{"id": i, "bundle": str(tmp_path / b), "artifact": "onnx_int8", "sha256": sha, "status": "ok"}
              for i, b, sha in (("a", "near", "s1"), ("b", "far", "s2"), ("c", "near", "s1"))]
    tgt = targets.get(["x86-64"])[0]
    said = []
    run.time_trials(trials, tmp_path, tgt, said.append, budget_ms=0.33)
    assert timed.count("near") == run.TIMING_ROUNDS + run.EDGE_ROUNDS and timed.count("far") == run.TIMING_ROUNDS
    saved = {i: json.loads((tmp_path / "trials" / i / run.TIMING_FILE).read_text()) for i in "abc"}
    p90s = [r["p90"] for r in saved["a"]["timing_rounds"]]
    assert len(p90s) == run.TIMING_ROUNDS + run.EDGE_ROUNDS
    assert saved["a"]["latency_ms"]["p90"] == statistics.median(p90s)
    assert trials[0]["latency_p90_ms"] == trials[2]["latency_p90_ms"] == 0.25 < 0.33  # fits: 3 timings said 0.36
    assert trials[0]["timed_rounds"] == 9 and trials[1]["timed_rounds"] == run.TIMING_ROUNDS
    assert saved["c"]["same_bytes_as"] == "a" and saved["a"]["peak_rss_mb"] == 50.0 + len(timed)
    assert any("within 30% of the 0.33 ms budget" in s for s in said)
    run.time_trials(trials, tmp_path, tgt, said.append, budget_ms=0.33)  # again: nothing more
    assert len(timed) == 2 * run.TIMING_ROUNDS + run.EDGE_ROUNDS


@pytest.mark.filterwarnings("ignore:PartialFixedSampler is experimental")
def test_a_sampler_that_keeps_proposing_one_recipe_gets_others_until_every_one_is_built():
    """TPE proposes the best of its candidates, so a peaked model proposed one recipe 65 times in a row and two
    workers built it side by side (the proof of 2026-12-02). Here a sampler that always proposes one recipe: each
    trial still gets a recipe not yet built or building, until there is none, then a repeat goes through."""
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    small = {"prune.ratio": [0.25, 0.5], "distill.enabled": [True, False]}
    built = {"prune.ratio": 0.25, "distill.enabled": False}
    finished = [{"digest": space.digest(built), "overrides": built, "status": "ok", "accuracy": 0.8, run.LATENCY: 1.0}]
    stubborn = optuna.samplers.PartialFixedSampler({"prune.ratio": 0, "distill.enabled": 0},
                                                   optuna.samplers.RandomSampler(seed=0))
    algo = run._searcher(OptunaSearch, small, finished, run.LATENCY)(
        metric=["accuracy", "macs"], mode=["max", "min"], sampler=stubborn)
    algo.set_search_properties(None, None, {k: tune.choice(list(range(len(c)))) for k, c in small.items()})
    got = [space.digest(space.overrides_of(small, algo.suggest(f"t{i}"))) for i in range(4)]
    assert len(set(got[:3]) | {finished[0]["digest"]}) == 4  # the other three recipes, each once
    assert got[3] in got[:3] + [finished[0]["digest"]]  # none left: a repeat
    big = {f"k{i}": list(range(10)) for i in range(6)}  # 10^6 recipes: drawn, not listed
    import random

    point = run.unseen_point(big, set(), random.Random(0))
    assert set(point) == set(big) and all(0 <= v < 10 for v in point.values())


def test_every_other_trial_refines_the_best_trial_over_and_within_the_budget_in_turn():
    """search.refine 0.5: every other proposal changes one key of a trial, the rest are the sampler's. The
    refinements alternate: the most accurate trial over the budget (a user squeezing it), then the most accurate
    whose measured p90 is within it. Without a budget, the trial refined is one of the Pareto front, never a
    dominated one."""
    import random

    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    small = {"prune.ratio": [0.25, 0.5, 0.7], "distill.enabled": [True, False], "quantize.method": ["ptq", "qat"]}

    def done(ratio, kd, method, acc, p90):
        o = {"prune.ratio": ratio, "distill.enabled": kd, "quantize.method": method}
        return {"digest": space.digest(o), "overrides": o, "status": "ok", "accuracy": acc, run.LATENCY: p90}

    finished = [done(0.25, True, "ptq", 0.9, 2.0), done(0.5, False, "qat", 0.8, 0.9), done(0.7, False, "qat", 0.7, 0.5)]
    algo = run._searcher(OptunaSearch, small, finished, run.LATENCY, 0, refine=0.5, budgets={"latency_ms": 1.0})(
        metric=["accuracy", "macs"], mode=["max", "min"], sampler=optuna.samplers.RandomSampler(seed=0))
    algo.set_search_properties(None, None, {k: tune.choice(list(range(len(c)))) for k, c in small.items()})
    got = [algo.suggest(f"t{i}") for i in range(4)]
    assert [g[run.PROPOSED_BY] for g in got] == ["refine", "sampler", "refine", "sampler"]
    for g, best in zip(got[::2], (finished[0], finished[1]), strict=True):  # the 4th trial of the search: over
        assert sum(v != best["overrides"][k] for k, v in space.overrides_of(small, g).items()) == 1
    assert len({space.digest(space.overrides_of(small, g)) for g in got} | {t["digest"] for t in finished}) == 7

    a, b, c = ({"k": i} for i in range(3))
    known = [(a, [0.9, 2.0]), (b, [0.8, 0.9]), (c, [0.7, 3.0])]  # c: less accurate and slower than both
    picked = [run.incumbent(known, budget, random.Random(s)) for s in range(40) for budget in (None, 0.1)]
    assert c not in picked and a in picked and b in picked
    assert run.incumbent(known, 1.0, random.Random(0)) == b and run.incumbent(known, 1.0, None, over=True) == a
    assert run.incumbent(known, 5.0, None, over=True) == a  # nothing over the budget: the best within it
    assert run.neighbour({"k": [1, 2]}, {"k": 0}, {space.digest({"k": 2})}, random.Random(0)) is None


@pytest.mark.filterwarnings("ignore:PartialFixedSampler is experimental")
def test_with_a_budget_the_sampler_ranks_the_most_accurate_trial_within_it_first():
    """The user's question under a budget is the most accurate model that fits it: a p90 within the budget is told
    to Optuna as the budget itself (nothing gained by being faster than asked), a trial over a budget carries its
    relative excess as an Optuna constraint. TPE's good group (the trials it samples near) is then the most
    accurate trial within the budget, not the fastest one, and not the more accurate one over it."""
    import optuna
    from optuna.samplers._tpe.sampler import _split_trials

    small = {"prune.ratio": [0.25, 0.5, 0.7], "distill.enabled": [True, False]}

    def done(ratio, kd, acc, p90, size_kb):
        o = {"prune.ratio": ratio, "distill.enabled": kd}
        return {"digest": space.digest(o), "overrides": o, "status": "ok", "accuracy": acc, run.LATENCY: p90,
                "size_bytes": size_kb * 1024}

    finished = [done(0.25, True, 0.9, 2.0, 10), done(0.5, True, 0.8, 0.9, 10), done(0.7, True, 0.6, 0.2, 10),
                done(0.5, False, 0.85, 0.5, 30)]  # the last: within the latency budget, over the size budget
    cfg = config.from_dict({"search": {"space": small, "base_first": False}})
    budgets = {"latency_ms": 1.0, "memory_mb": 512, "size_kb": 20}  # no trial has a peak memory: not checked
    study = optuna.load_study(study_name="edgekit", storage=run._study(cfg.search, finished, {}, run.LATENCY, budgets))
    told = {t.params["prune.ratio"] + 3 * t.params["distill.enabled"]: t for t in study.trials}
    assert [told[i].values for i in (0, 1, 2, 4)] == [[0.9, 2.0], [0.8, 1.0], [0.6, 1.0], [0.85, 1.0]]
    assert [told[i].constraints for i in (0, 1, 2, 4)] == [pytest.approx(c) for c in (
        {"latency_ms": 1.0, "size_kb": -0.5}, {"latency_ms": -0.1, "size_kb": -0.5},
        {"latency_ms": -0.8, "size_kb": -0.5}, {"latency_ms": -0.5, "size_kb": 0.5})]
    good, _ = _split_trials(study, study.trials, 1)
    assert [t.number for t in good] == [told[1].number]  # 80 % within every budget; not 90 % at 2 ms, nor 60 %
    unbudgeted = optuna.load_study(study_name="edgekit", storage=run._study(cfg.search, finished, {}, run.LATENCY))
    assert sorted(t.values for t in unbudgeted.trials) == sorted([t["accuracy"], t[run.LATENCY]] for t in finished)
    # a repeat proposal is told with the earlier result and its constraints too
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    stubborn = optuna.samplers.PartialFixedSampler({"prune.ratio": 0, "distill.enabled": 0},
                                                   optuna.samplers.RandomSampler(seed=0))
    algo = run._searcher(OptunaSearch, small, finished[:1], run.LATENCY, budgets=budgets)(
        metric=["accuracy", "macs"], mode=["max", "min"], sampler=stubborn)
    algo.set_search_properties(None, None, {k: tune.choice(list(range(len(c)))) for k, c in small.items()})
    algo.suggest("t0")
    repeat = next(t for t in algo._ot_study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    assert repeat.values == [0.9, 2.0] and repeat.constraints == pytest.approx({"latency_ms": 1.0, "size_kb": -0.5})


def test_a_recipes_macs_are_counted_before_it_is_built(searched):
    """squeeze.recipe_macs prunes the recipe's untrained model by its plan: the count its build reached when every
    pruning round was kept (a local plan removes the same channels whatever the ranking); with the accuracy guard
    on, the build lies between that and the unpruned model's count; nothing for a count that depends on trained
    weights."""
    from edgekit.search import squeeze, trial

    tmp, out, target, *_ = searched
    base = yaml.safe_load((out / run.CONFIG_FILE).read_text())
    counted = 0
    for t in run.load_trials(out):
        if t["status"] != "ok" or t.get("repeat_of"):
            continue
        raw = trial.trial_config(base, t["overrides"], target)
        kept = json.loads((out / run.TRIALS_DIR / t["id"] / "build/stages/prune/metrics.json").read_text())["kept"]
        train = json.loads((out / run.TRIALS_DIR / t["id"] / "build/stages/train/metrics.json").read_text())
        fewest, most = squeeze.recipe_macs(config.from_dict(raw, str(tmp)))  # the guard is on (TINY)
        assert fewest <= t["macs"] <= most == train["macs"] and fewest < most
        assert fewest == t["macs"] if kept["round"] == kept["of"] else fewest < t["macs"]
        counted += kept["round"] == kept["of"]
        unguarded = config.from_dict(space.apply(raw, {"prune.accuracy_guard": False}), str(tmp))
        assert squeeze.recipe_macs(unguarded) == (fewest, fewest)
        for other in ({"prune.scope": "global"}, {"distill.student": "mlp"}):
            assert squeeze.recipe_macs(config.from_dict(space.apply(raw, other), str(tmp))) is None
    assert counted >= 1


@pytest.mark.filterwarnings("ignore:PartialFixedSampler is experimental")
def test_a_proposal_predicted_over_the_budget_is_squeezed_to_the_nearest_recipe_that_fits():
    """A proposal predicted more than SLACK over the latency budget is replaced by the recipe fewest keys from it,
    not yet built or building, predicted to fit; of those, the one predicted slowest (the most compute that
    fits). A proposal that may fit, or has no prediction, is built as proposed. In the searcher, the swapped
    trial says so (proposed_by sampler+squeeze)."""
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from edgekit.search import squeeze

    small = {"model.width": [8, 16, 32], "prune.ratio": [0.25, 0.5, 0.7], "distill.enabled": [True, False]}
    ms = {8: 1.0, 16: 2.0, 32: 4.0}  # ms per unit of channels kept

    def predict(p):  # width 8 has an accuracy guard: it may stay unpruned
        o = space.overrides_of(small, p)
        unpruned = ms[o["model.width"]] if o["model.width"] == 8 else None
        return ms[o["model.width"]] * (1 - o["prune.ratio"]), unpruned or ms[o["model.width"]] * (1 - o["prune.ratio"])

    def digest(**o):
        return space.digest({**{"model.width": 32, "prune.ratio": 0.25, "distill.enabled": True}, **o})

    top = {"model.width": 2, "prune.ratio": 0, "distill.enabled": 0}  # 3 ms
    assert squeeze.within(top, small, set(), predict, 3.0 / (1 + squeeze.SLACK)) is None  # may fit: as proposed
    assert squeeze.within(top, small, set(), lambda p: None, 0.1) is None  # no prediction: as proposed
    # one key away, 0.7 at width 32 (1.2 ms) fits; 0.5 (2 ms) and width 16 (1.5 ms) do not, and width 8 (0.75 ms)
    # may stay unpruned (1 ms), which fits too, but is faster than 0.7 at width 32
    assert squeeze.within(top, small, set(), predict, 1.4) == {**top, "prune.ratio": 2}
    # that one built: the slowest of the rest one key away (width 8); both built: two keys away, the slowest that
    # fits (0.7 at width 32 without distillation, 1.2 ms; width 16 at 0.5 is 1.0 ms)
    seen = {digest(**{"prune.ratio": 0.7})}
    assert squeeze.within(top, small, seen, predict, 1.4) == {**top, "model.width": 0}
    seen.add(digest(**{"model.width": 8}))
    assert squeeze.within(top, small, seen, predict, 1.4) == {**top, "prune.ratio": 2, "distill.enabled": 1}
    # under 1 ms, width 8 fits once pruned (0.75 ms) but its guard may keep it unpruned (1 ms): width 16 at 0.7
    # (0.6 ms) is the answer, two keys away
    assert squeeze.within(top, small, set(), predict, 0.9) == {**top, "model.width": 1, "prune.ratio": 2}
    assert squeeze.within(top, small, set(), predict, 0.1) is None  # nothing fits

    stubborn = optuna.samplers.PartialFixedSampler(top, optuna.samplers.RandomSampler(seed=0))
    algo = run._searcher(OptunaSearch, small, [], run.LATENCY, budgets={"latency_ms": 1.4}, predict=predict)(
        metric=["accuracy", "macs"], mode=["max", "min"], sampler=stubborn)
    algo.set_search_properties(None, None, {k: tune.choice(list(range(len(c)))) for k, c in small.items()})
    got = [algo.suggest(f"t{i}") for i in range(2)]
    assert got[0] == {**top, "prune.ratio": 2, run.PROPOSED_BY: "sampler+squeeze"}
    assert got[1] == {**top, "model.width": 0, run.PROPOSED_BY: "sampler+squeeze"}  # the first is building


def test_the_most_accurate_trial_over_the_budget_is_pruned_harder_into_it():
    """The refinement of the most accurate trial over the latency budget prunes its own trained model harder: only
    its prune.* keys change, to the slowest recipe of known cost (no accuracy guard) predicted to fit, at a count
    that model has not been built at yet, fewest keys changed among equals, down the counts until one loses
    accuracy; one key changed when none fits."""
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from edgekit.search import squeeze

    small = {"model.width": [16, 32], "prune.ratio": [0.25, 0.5, 0.7, 0.8], "prune.method": ["l1", "taylor"],
             "prune.accuracy_guard": [True, False], "distill.enabled": [True, False]}

    def predict(p):  # ms per channel kept; a guard may keep the model unpruned
        o = space.overrides_of(small, p)
        ms = o["model.width"] / 8
        return ms * (1 - o["prune.ratio"]), ms if o["prune.accuracy_guard"] else ms * (1 - o["prune.ratio"])

    def at(**o):
        return {**{k: 0 for k in small}, "model.width": 1, **o}

    def built(*ps):
        return {space.digest(space.overrides_of(small, p)): p for p in ps}

    top = at()  # width 32, ratio 0.25, guarded, with KD: 3 to 4 ms
    # ratio 0.5 without the guard (2 ms) is the slowest that fits 2 ms; width 16 (1.5 ms) is not a pruning
    unguarded = {"prune.accuracy_guard": 1}
    assert squeeze.harder(top, small, built(top), {}, predict, 2.0) == at(**{"prune.ratio": 1, **unguarded})
    # that count built (with taylor) from this model: the next, 0.7 (1.2 ms), keeping l1; another model's builds
    # (without KD) do not count
    done = built(top, at(**{"prune.ratio": 1, "prune.accuracy_guard": 1, "prune.method": 1}),
                 at(**{"prune.ratio": 2, "prune.accuracy_guard": 1, "distill.enabled": 1}))
    assert squeeze.harder(top, small, done, {}, predict, 2.0) == at(**{"prune.ratio": 2, **unguarded})
    assert squeeze.harder(top, small, built(top), {}, predict, 0.5) is None  # no pruning of this model fits
    # down the counts while accuracy holds: 0.5 built within the budget at 0.8, 0.7 at 0.85 (more accurate): on to
    # 0.8 (0.8 ms); 0.7 at 0.75 (it lost accuracy): stop
    done = built(top, at(**{"prune.ratio": 1, **unguarded}), at(**{"prune.ratio": 2, **unguarded}))
    scores = dict(zip(done, (None, [0.8, 2.0], [0.85, 2.0]), strict=True))
    assert squeeze.harder(top, small, done, scores, predict, 2.0) == at(**{"prune.ratio": 3, **unguarded})
    scores = dict(zip(done, (None, [0.8, 2.0], [0.75, 2.0]), strict=True))
    assert squeeze.harder(top, small, done, scores, predict, 2.0) is None
    # a guarded build counts at the count it reached: 0.5 guarded, its guard keeping every round (2 ms), is that
    # count built, so 0.5 is not built again unguarded; one whose guard undid its rounds (4 ms) is not
    guarded = at(**{"prune.ratio": 1})
    done = built(top, guarded)
    kept_all = {space.digest(space.overrides_of(small, guarded)): 2.0}
    assert squeeze.harder(top, small, done, {}, predict, 2.0, kept_all) == at(**{"prune.ratio": 2, **unguarded})
    undone = {space.digest(space.overrides_of(small, guarded)): 4.0}
    assert squeeze.harder(top, small, done, {}, predict, 2.0, undone) == at(**{"prune.ratio": 1, **unguarded})
    assert squeeze.harder(top, small, done, {}, predict, 2.0) == at(**{"prune.ratio": 1, **unguarded})  # building

    def done_trial(p, acc, p90):
        o = space.overrides_of(small, p)
        return {"digest": space.digest(o), "overrides": o, "status": "ok", "accuracy": acc, run.LATENCY: p90}

    finished = [done_trial(top, 0.9, 3.5), done_trial(at(**{"model.width": 0}), 0.8, 1.9),
                done_trial(at(**{"model.width": 0, "distill.enabled": 1}), 0.7, 1.5)]
    algo = run._searcher(OptunaSearch, small, finished, run.LATENCY, 0, refine=0.5, budgets={"latency_ms": 2.0},
                         predict=predict)(metric=["accuracy", "macs"], mode=["max", "min"],
                                          sampler=optuna.samplers.RandomSampler(seed=0))
    algo.set_search_properties(None, None, {k: tune.choice(list(range(len(c)))) for k, c in small.items()})
    got = algo.suggest("t0")  # the 4th trial of the search: a refinement of the best over the budget
    assert got == {**at(**{"prune.ratio": 1, "prune.accuracy_guard": 1}), run.PROPOSED_BY: "refine+squeeze"}


@pytest.mark.filterwarnings("ignore:PartialFixedSampler is experimental")
def test_a_target_only_estimated_squeezes_proposals_by_its_estimate(tmp_path, monkeypatch):
    """For a target this machine does not run and no device times (rpi5 here), the search's own latency estimate
    (MACs over the target's rate, or the line fitted to --device-results) is what the squeeze predicts with; the
    sampler then minimises MACs and is told each result as it ends: the squeezed recipe's, not its proposal's."""
    import contextlib

    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from edgekit.search import latency

    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(_raw()))
    handed = {}
    monkeypatch.setattr(run, "ray_session", lambda *a: contextlib.nullcontext())
    monkeypatch.setattr(run, "tune_trials", lambda *a, **kw: handed.update(args=a))
    run.search(config.load(tmp_path / "cfg.yaml"), "rpi5", tmp_path / "s", trials=1, workers=1, log=lambda m: None)
    line, rpi5 = handed["args"][-1], targets.get(["rpi5"])[0]
    assert line(3 * 10**6) == latency.estimate(3 * 10**6, rpi5.artifacts[0].key, rpi5.arch, None).p90_ms > 0

    small = {"model.width": [8, 16, 32], "prune.ratio": [0.25, 0.5]}
    top = {"model.width": 2, "prune.ratio": 0}

    def predict(p):  # 1 ms per width-8 unit, ratio ignored
        ms = small["model.width"][p["model.width"]] / 8
        return ms, ms

    stubborn = optuna.samplers.PartialFixedSampler(top, optuna.samplers.RandomSampler(seed=0))
    algo = run._searcher(OptunaSearch, small, [], "macs", budgets={"latency_ms": 2.0}, predict=predict)(
        metric=["accuracy", "macs"], mode=["max", "min"], sampler=stubborn)
    algo.set_search_properties(None, None, {k: tune.choice(list(range(len(c)))) for k, c in small.items()})
    got = algo.suggest("t0")
    assert got == {"model.width": 1, "prune.ratio": 0, run.PROPOSED_BY: "sampler+squeeze"}
    algo.on_trial_complete("t0", {"status": "ok", "accuracy": 0.7, "macs": 1000})
    states = {t.state: (t.params, t.values) for t in algo._ot_study.trials}
    assert states[optuna.trial.TrialState.FAIL][0] == top
    assert states[optuna.trial.TrialState.COMPLETE] == ({"model.width": 1, "prune.ratio": 0}, [0.7, 1000])
