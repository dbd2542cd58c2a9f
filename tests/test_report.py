"""report.json's budgets and real sizes, report.html in a real browser (headless Chromium, network off), the
console summary, and the progress lines of the long silent phases."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from edgekit import browser, cli, quiet, report, report_html, report_plots

needs_chromium = pytest.mark.skipif(browser.find() is None, reason="chromium not installed (tests/system_deps.sh)")


# --- unit: budgets, Pareto front, progress ----------------------------------------------------------------

def test_budget_check_passes_fails_and_says_why():
    ok = report.budget_check({"latency_ms": 10, "memory_mb": 512}, 2.5, 100.0)
    assert ok["ok"] is True and ok["over"] == [] and report.budget_cell(ok) == "ok"
    over = report.budget_check({"latency_ms": 10, "memory_mb": 512}, 12.5, 600.0)
    assert over["ok"] is False and over["latency_ok"] is False and over["memory_ok"] is False
    assert over["over"] == ["p90 12.5 ms > 10 ms", "peak RSS 600.0 MB > 512 MB"]
    unmeasured = report.budget_check({"latency_ms": 5, "memory_mb": 256}, None, None)
    assert unmeasured["ok"] is None and report.budget_cell(unmeasured) == "-"


def test_pareto_front_keeps_what_nothing_beats():
    points = [{"id": "fast", "x": 1.0, "y": 0.90, "kind": "local"}, {"id": "slow-good", "x": 5.0, "y": 0.99,
              "kind": "local"}, {"id": "dominated", "x": 6.0, "y": 0.95, "kind": "local"},
              {"id": "invalid", "x": 0.1, "y": 1.0, "kind": "invalid"}]
    assert report_plots.pareto_front(points) == ["fast", "slow-good"]


@pytest.mark.parametrize("log_x", [False, True])
def test_the_tradeoff_legend_covers_no_point_and_every_label_stays_inside_the_plot(log_x):
    """The trial's accuracy-vs-size plot: fp32 points in the lower right, once under the legend box, their labels
    cut at the right edge; int8 points at the top left."""
    sizes = {"onnx_int8": 24.0, "tflite_int8": 26.0, "onnx_fp32": 96.0 * (10 if log_x else 1),
             "tflite_fp32": 98.0 * (10 if log_x else 1)}
    acc = {"onnx_int8": 0.67, "tflite_int8": 0.66, "onnx_fp32": 0.133, "tflite_fp32": 0.14}
    points = [{"id": f"{t}/{a}", "short": f"{t}/{a}", "x": sizes[a] + i, "y": acc[a], "kind": "local"}
              for i, t in enumerate(("x86-64", "rpi4-aarch64")) for a in sizes]
    fig = report_plots.tradeoff_figure(points, "file size, KB", "accuracy vs size", log_x=log_x)
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    for p in points:
        x, y = ax.transData.transform((p["x"], p["y"]))
        assert not legend.padded(7).contains(x, y), f"the legend covers {p['id']}"  # 7: a marker's radius
    inside = ax.get_window_extent()
    for text in ax.texts:
        box = text.get_window_extent()
        assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1, \
            f"label {text.get_text()} runs off the plot"
    report_plots._pyplot().close(fig)


def test_phase_prints_around_a_silenced_phase(tmp_path, capfd):
    log = tmp_path / "stage.log"
    with quiet.phase("quantize", "calibrating (NNCF minmax, 64 samples)", "calibrated"), quiet.silenced(log):
        os.write(1, b"library noise from C\n")  # what native code writes
    out = capfd.readouterr().out
    assert out.startswith("[quantize] calibrating (NNCF minmax, 64 samples) ...\n")
    assert re.search(r"^\[quantize\] calibrated in \d+\.\d s$", out, re.M) and "noise" not in out
    assert "library noise" in log.read_text()


# --- what a build writes --------------------------------------------------------------------------------------

def test_stage_sizes_are_the_saved_files(e2e_build):
    out, _ = e2e_build
    saved = json.loads((out / "report.json").read_text())
    for stage in saved["stages"]:
        folder = out / "stages" / stage["name"]
        assert stage["size_bytes"] == (folder / stage["size_file"]).stat().st_size
        assert stage["files"] == {name: (folder / name).stat().st_size for name in stage["files"]}
    quantize = next(s for s in saved["stages"] if s["name"] == "quantize")
    assert "model_int8.onnx" in quantize["files"]


def test_report_json_has_budgets_and_the_console_says_over_budget(e2e_build):
    out, _ = e2e_build
    saved = json.loads((out / "report.json").read_text())
    for row in saved["artifacts"]:
        check = row["budget"]
        assert check["latency_ms"] and check["memory_mb"]
        if row["target"] == "x86-64":  # measured here
            assert check["peak_rss_mb"] == row["measured"]["peak_rss_mb"] and check["ok"] is not None
            assert check["latency_ok"] == (check["p90_ms"] <= check["latency_ms"])
        else:
            assert check["ok"] is None  # aarch64: not measured here
    tight = copy.deepcopy(saved)
    row = next(r for r in tight["artifacts"] if r["target"] == "x86-64")
    row["budget"] = report.budget_check({"latency_ms": 1e-6, "memory_mb": 1}, row["budget"]["p90_ms"],
                                        row["budget"]["peak_rss_mb"])
    tight["over_budget"] = [f"x86-64/{row['name']}: {'; '.join(row['budget']['over'])}"]
    table = report.summary_table(tight)
    line = next(x for x in table.splitlines() if x.startswith("x86-64") and f" {row['name']}" in x)
    assert line.rstrip().endswith("OVER")
    assert f"OVER BUDGET x86-64/{row['name']}: p90" in table and "peak RSS" in table


# --- the page in a browser -----------------------------------------------------------------------------------

class Cells(HTMLParser):
    """Every element with data-* attributes, its text, and the data-* of the rows and tables around it."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[dict] = []
        self.found: list[dict] = []
        self.refs: list[str] = []  # src/href values
        self.svg_ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.refs += [v for k, v in a.items() if k in ("src", "href", "xlink:href") and v]
        if a.get("id"):
            self.svg_ids.add(a["id"])
        ctx = {**(self.stack[-1]["ctx"] if self.stack else {}), **{k: v for k, v in a.items() if k.startswith("data-")
                                                                     and k not in ("data-key", "data-value")}}
        entry = {"tag": tag, "attrs": a, "ctx": ctx, "text": ""}
        self.stack.append(entry)
        if "data-key" in a:
            self.found.append(entry)

    def handle_endtag(self, tag):
        while self.stack:
            entry = self.stack.pop()
            if self.stack:
                self.stack[-1]["text"] += entry["text"]
            if entry["tag"] == tag:
                break

    def handle_data(self, data):
        if self.stack:
            self.stack[-1]["text"] += data

    def value(self, key: str, **where: str) -> str:
        hits = [e for e in self.found if e["attrs"]["data-key"] == key
                and all(e["ctx"].get(f"data-{k}") == v for k, v in where.items())]
        assert len(hits) == 1, (key, where, len(hits))
        return hits[0]["attrs"]["data-value"]


def _rendered(html: Path) -> Cells:
    page = browser.load(html)
    assert page.console == [], page.console  # rendered without console errors (or any console message)
    assert "<svg" in page.dom and "</html>" in page.dom
    cells = Cells()
    cells.feed(page.dom)
    assert all(r.startswith(("#", "data:")) for r in cells.refs), cells.refs  # nothing to fetch: self-contained
    assert "<script" not in page.dom and "<link" not in page.dom and "url(http" not in page.dom
    return cells


def _same(cell: str, value: float | int | None) -> bool:
    return cell == "" if value is None else float(cell) == pytest.approx(value, rel=1e-12, abs=0)


def _check_build(cells: Cells, build: Path, source: str) -> None:
    """Tables and plot data of one build's section equal its report.json and results files."""
    saved = json.loads((build / "report.json").read_text())
    for s in saved["stages"]:
        for key in ("accuracy", "params", "macs", "size_bytes"):
            assert _same(cells.value(key, source=source, stage=s["name"]), s[key]), (s["name"], key)
    for row in saved["artifacts"]:
        where = {"source": source, "target": row["target"], "artifact": row["name"]}
        for key in ("accuracy", "top1_agreement", "sqnr_db"):
            assert _same(cells.value(key, **where), row[key])
        assert _same(cells.value("size_bytes", **where), row["size_bytes"] / 1024)
        lat = report._latency(row)[0] or {}
        assert _same(cells.value("p50_ms", **where), lat.get("p50"))
        assert _same(cells.value("p90_ms", **where), lat.get("p90"))
        assert cells.value("budget", **where) == report.budget_cell(row["budget"])


def _check_results(cells: Cells, build: Path, source: str) -> None:
    for path in sorted((build / "bundles").glob("*/results*.json")):
        if path.name == "results.schema.json":
            continue
        data = json.loads(path.read_text())
        for name, r in data["artifacts"].items():
            run = f"{source}/{path.parent.name}/{path.stem}/{name}"
            assert _same(cells.value("p90", source=source, run=run), r["latency_ms"]["p90"])
            assert cells.value("valid", source=source, run=run) == ("true" if r["valid"] else "false")


def _check_plots(cells: Cells, html: str) -> None:
    """Every point and curve of the plot tables is drawn: its id is an element of the inline SVG."""
    points = [e for e in cells.found if e["ctx"].get("data-point")]
    curves = {e["ctx"]["data-curve"] for e in cells.found if e["ctx"].get("data-curve")}
    assert points and curves
    assert {e["ctx"]["data-point"] for e in points} <= cells.svg_ids and curves <= cells.svg_ids
    assert "pareto-front" in cells.svg_ids


@needs_chromium
def test_build_writes_a_report_html_that_holds_the_reports_numbers(e2e_build, tmp_path):
    out, _ = e2e_build
    html = out / "report.html"
    assert html.is_file()
    cells = _rendered(html)
    _check_build(cells, out, out.name)
    _check_results(cells, out, out.name)
    _check_plots(cells, html.read_text())
    saved = json.loads((out / "report.json").read_text())
    page = html.read_text()
    for b in saved["bundles"]:
        rec = b.get("recommended") or {}
        if rec.get("artifact"):
            assert f'data-recommended="{rec["artifact"]}"' in page and rec["reason"].split(" (")[0] in page
    png = browser.screenshot(html, tmp_path / "report.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def _device_run(bundle: Path, host: str) -> Path:
    """A throttled run 'on a device': the local results with a remote host, marked invalid."""
    data = json.loads((bundle / "results.json").read_text())
    data["remote"] = {"host": host, "kept": False}
    for r in [data, *data["artifacts"].values()]:
        r.update(valid=False, invalid_reasons=["throttled (vcgencmd get_throttled 0x50005)"])
    path = bundle / f"results-{host}.json"
    path.write_text(json.dumps(data))
    return path


@needs_chromium
def test_two_builds_side_by_side_with_a_device_run_and_layer_fidelity(e2e_build, tmp_path, capsys):
    out, _ = e2e_build
    a, b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    for dest in (a, b):
        shutil.copytree(out, dest)
    _device_run(b / "bundles" / "x86-64", "pi.local")
    (a / "fidelity").mkdir(exist_ok=True)
    layers = [{"layer": "conv1 (CONV_2D)", "tensor": "t1", "sqnr_db": 21.5, "tensor_sqnr_db": 25.0,
               "max_abs_diff": 0.25, "ref_range": [-1.0, 3.0], "drop_db": 28.4}]
    (a / "fidelity" / "tflite_int8.json").write_text(json.dumps(
        {"artifact": "tflite_int8", "misses": ["agreement 0.97 < 0.99"], "layers": layers}))
    sensitivity = {"baseline": 0.97, "ratios": [0.25, 0.5], "tolerance": 0.01,
                   "layers": {"features.0": {"0.25": 0.004, "0.5": 0.031}, "features.3": {"0.25": 0.0, "0.5": 0.002}}}
    (a / "sensitivity.json").write_text(json.dumps(sensitivity))
    html, png = tmp_path / "both.html", tmp_path / "both.png"
    assert cli.main(["report", str(a), str(b), "--out", str(html), "--screenshot", str(png)]) == 0
    assert f"report: {html}" in capsys.readouterr().out
    cells = _rendered(html)
    for build in (a, b):
        _check_build(cells, build, build.name)
        _check_results(cells, build, build.name)
    _check_plots(cells, html.read_text())
    run = "b/x86-64/results-pi.local/tflite_int8"
    assert cells.value("valid", source="b", run=run) == "false"
    page = html.read_text()
    assert "valid: false — throttled" in page and "@pi.local" in page
    fid = [e for e in cells.found if e["ctx"].get("data-artifact") == "tflite_int8" and e["attrs"]["data-key"]
           == "drop_db"]
    assert [float(e["attrs"]["data-value"]) for e in fid] == [28.4]  # the fidelity table of build a
    drops = {e["ctx"]["data-layer"]: float(e["attrs"]["data-value"]) for e in cells.found
             if e["attrs"]["data-key"] == "drop_0.5" and e["ctx"].get("data-source") == "a"}
    assert drops == {"features.0": 0.031, "features.3": 0.002}  # the sensitivity curves of build a
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a results file or a bundle folder beside (or without) a build: no build report of its own (it crashed)
    for inputs in ([a, b / "bundles" / "x86-64" / "results-pi.local.json"], [b / "bundles" / "x86-64"]):
        assert cli.main(["report", *map(str, inputs), "--out", str(tmp_path / "r.html")]) == 0, capsys.readouterr()
        assert "@pi.local" in (tmp_path / "r.html").read_text()


def test_report_refuses_what_it_cannot_show(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "neither a build folder" in capsys.readouterr().err


# --- progress lines, third-party noise kept in the stage logs -------------------------------------------------

def test_long_phases_print_progress_and_keep_library_noise_in_the_logs(e2e_build, tmp_path):
    out, _ = e2e_build
    build = tmp_path / "build"
    shutil.copytree(out, build)
    for stage in ("quantize", "export", "verify", "bundle"):
        (build / "stages" / stage / "metrics.json").unlink()
    shutil.rmtree(build / "bundles")
    (build / "report.html").unlink()
    proc = subprocess.run([sys.executable, "-m", "edgekit", "build", "--resume", str(build)], capture_output=True,
                          text=True)  # the CLI as a user runs it: what reaches the terminal
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = proc.stdout + proc.stderr
    assert re.search(r"^\[quantize\] calibrating \(NNCF minmax, \d+ samples\) \.\.\.$", printed, re.M)
    assert re.search(r"^\[quantize\] calibrated in \d+\.\d s$", printed, re.M)
    assert re.search(r"^\[export\] onnx2tf: ONNX -> float SavedModel \.\.\.$", printed, re.M)
    assert re.search(r"^\[export\] SavedModel written in \d+\.\d s$", printed, re.M)
    assert re.search(r"^\[export\] TFLite converter: tflite_int8 \(full integer, \d+ calibration samples\)",
                     printed, re.M)
    for noise in ("tensorflow", "absl", "INFO:nncf", "Saved artifact", "WARNING"):
        assert noise not in printed, noise
    assert (build / "stages" / "quantize" / "quantize.log").stat().st_size > 0
    assert (build / "report.html").is_file() and f"report: {build / 'report.html'}" in proc.stdout


def test_accuracy_lost_against_the_unpruned_model_is_flagged_beyond_the_targets_tolerance():
    from edgekit import report

    assert report.accuracy_loss(0.851, 0.878, 1.0) == pytest.approx(
        {"unpruned_fp32_accuracy": 0.878, "pp": -2.7, "tolerance_pp": 1.0, "ok": False})
    assert report.accuracy_loss(0.872, 0.878, 1.0)["ok"] and report.accuracy_loss(0.9, 0.878, 1.0)["ok"]
    row = {"target": "x86-64", "name": "onnx_int8", "vs_unpruned_fp32": report.accuracy_loss(0.851, 0.878, 1.0)}
    table = report.summary_table({"stages": [], "artifacts": [], "bundles": [],
                                  "over_tolerance": [f"{row['target']}/{row['name']}: -2.7 pp"]})
    assert "ACCURACY LOSS OVER TOLERANCE x86-64/onnx_int8: -2.7 pp" in table


def test_the_page_says_what_came_from_the_caches(e2e_build, tmp_path):
    """A stage reused from the stage cache and a check passed from the check cache read as such, not as runs."""
    out, _ = e2e_build
    build = tmp_path / "build"
    shutil.copytree(out, build)
    saved = json.loads((build / "report.json").read_text())
    saved["stages"][0]["cached_from"] = "/elsewhere/earlier-build"
    saved["cached_stages"] = {saved["stages"][0]["name"]: "/elsewhere/earlier-build", "export": "/elsewhere/b2"}
    checked = saved["artifacts"][0]
    checked["runtime_check"] = {**checked["runtime_check"], "cached": {"key": "k", "checked_utc": "2026-12-01T10:00"}}
    (build / "report.json").write_text(json.dumps(saved))
    report_html.write([build], build / "again.html")
    page = (build / "again.html").read_text()
    row = re.search(r'<tr data-stage="train">.*?</tr>', page, re.S).group(0)
    assert 'title="/elsewhere/earlier-build">cached</td>' in row
    assert "From the stage cache" in page and "(made by /elsewhere/b2)" in page
    cells = re.findall(r'<td class="check">([^<]*)</td>', page)
    assert len(cells) == len(saved["artifacts"]) and "cached: passed 2026-12-01T10:00" in cells[0]
    assert all(c.startswith("ok (") for c in cells)


@pytest.mark.parametrize("model", [{"factory": "nets/mine.py:build", "checkpoint": "mine.pt"}, {"name": "resnet8"}])
def test_the_page_names_the_model_that_was_built(tmp_path, model):
    """A factory's build shows the factory, not model.name (the unused built-in default); a zoo build its name."""
    from edgekit import config

    cfg = config.to_dict(config.from_dict({"model": model}))
    (tmp_path / "report.json").write_text(json.dumps({"config": cfg, "stages": [], "artifacts": [], "bundles": []}))
    page = report_html.render([tmp_path])
    shown = re.search(r'<p class="model">Model: <code>([^<]*)</code></p>', page).group(1)
    if "factory" in model:
        assert shown == "factory nets/mine.py:build, checkpoint mine.pt"
        assert "small_cnn" not in page and "nets/mine.py:build" in page  # nor in the config shown
    else:
        assert shown == "built-in resnet8 (width 32, width_mult 1)" and "name: resnet8" in page
