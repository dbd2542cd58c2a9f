"""The CLI: one-line errors with exit code 2, listings, and the run command on a real bundle."""

import json

import numpy as np
import pytest
import yaml

from edgekit import cli


def _err(capsys, argv):
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("prune: {ratioo: 0.3}\n", "unknown key 'prune.ratioo'"),
        ("model: {factory: 'missing.py:make'}\ntrain: {epochs: 0}\n", "model.factory file"),
        ("data: {source: npz, path: d.npz}\n", "'x' (float32) and 'y'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, content, needle):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 2), np.float32))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(content)
    code, err = _err(capsys, ["build", str(cfg), "--out", str(tmp_path / "out")])
    assert code == 2
    assert err.startswith("edgekit: error:") and needle in err and "\n" not in err
    assert not (tmp_path / "out" / "report.json").exists()


def test_unknown_target_and_missing_config(tmp_path, capsys):
    code, err = _err(capsys, ["build", "--target", "toaster", "--out", str(tmp_path / "o")])
    assert code == 2 and "unknown target 'toaster'; valid targets:" in err
    code, err = _err(capsys, ["build", str(tmp_path / "none.yaml")])
    assert code == 2 and "not found" in err


def test_targets_list_and_check(tmp_path, capsys):
    assert cli.main(["targets"]) == 0
    listing = capsys.readouterr().out
    for name in ("rpi4", "rpi5", "jetson-orin-nano", "x86-64"):
        assert name in listing
    bad = tmp_path / "t.yaml"
    bad.write_text("name: x\n")
    code, err = _err(capsys, ["targets", "--check", str(bad)])
    assert code == 2 and "missing description, arch" in err


def test_targets_listing_is_an_aligned_table(tmp_path, monkeypatch, capsys):
    """Every column starts where its heading does, on every row, also with a user's target of a long name."""
    from edgekit import targets

    raw = yaml.safe_load((targets.TARGETS_DIR / "x86-64.yaml").read_text())
    (tmp_path / "a-board-with-a-rather-long-name.yaml").write_text(
        yaml.safe_dump(raw | {"name": "a-board-with-a-rather-long-name", "threads": 12}))
    monkeypatch.setenv("EDGEKIT_TARGETS", str(tmp_path))
    assert cli.main(["targets"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    found = targets.available()
    assert len(rows) == len(found) >= 6
    starts = [header.index(h) for h in ("name", "arch", "threads", "artifacts", "description")]
    for row, t in zip(rows, found.values(), strict=True):
        arts = ", ".join(f"{a.key}@{a.runtime}=={a.runtime_version}" for a in t.artifacts)
        cells = [t.name, t.arch, None, arts, t.description]
        for start, cell in zip(starts, cells, strict=True):
            if cell is not None:
                assert row[start:].startswith(cell), row
                assert start == 0 or row[start - 1] == " ", row
        threads_end = starts[2] + len("threads")  # numbers right-aligned under their heading
        assert row[:threads_end].endswith(f" {t.threads}"), row


def test_config_default_prints_every_section(capsys):
    assert cli.main(["config", "--default"]) == 0
    out = capsys.readouterr().out
    assert "prune:" in out and "temperature:" in out


def test_run_command_on_built_bundle(e2e_build, tmp_path, capsys):
    out, _ = e2e_build
    dest = tmp_path / "r.json"
    assert cli.main(["run", str(out / "bundles" / "x86-64"), "--artifact", "onnx_int8", "--out", str(dest)]) == 0
    assert json.loads(dest.read_text())["artifact"] == "onnx_int8"
    code, err = _err(capsys, ["run", str(tmp_path)])
    assert code == 2 and "is not a bundle" in err


def test_a_search_recommendation_says_when_the_accuracy_guard_undid_its_pruning():
    """A trial asked for prune.ratio 0.6, the guard kept the unpruned model: the line must not read as pruned."""
    assert cli._guarded(None) == "" and cli._guarded({"round": 2, "of": 2, "macs_kept": 0.5}) == ""
    assert cli._guarded({"round": 0, "of": 1, "macs_kept": 1.0}) == (
        "; its pruning was undone by the accuracy guard, which kept the unpruned model (100% of the MACs)")
    assert cli._guarded({"round": 1, "of": 3, "macs_kept": 0.8}).endswith("kept round 1 of 3 (80% of the MACs)")
