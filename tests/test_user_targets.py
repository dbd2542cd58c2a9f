"""A user's own target profiles: by path, from $EDGEKIT_TARGETS or ~/.config/edgekit/targets; the built-in ones
ship inside the package."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from edgekit import config, pipeline, targets
from edgekit.errors import TargetError

ROOT = Path(__file__).resolve().parent.parent


def _board(folder: Path, name: str = "my-board") -> Path:
    raw = yaml.safe_load((ROOT / "targets" / "x86-64.yaml").read_text()) | {"name": name, "threads": 1}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(autouse=True)
def _no_user_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("EDGEKIT_TARGETS", raising=False)


def test_a_target_file_given_by_path(tmp_path, monkeypatch):
    _board(tmp_path / "boards")
    monkeypatch.chdir(tmp_path)
    (board,) = targets.get(["boards/my-board.yaml"])
    assert board.name == "my-board" and board.threads == 1


def test_a_config_names_a_target_file_relative_to_itself_and_resume_finds_it(tmp_path):
    _board(tmp_path / "project" / "boards")
    (tmp_path / "project" / "c.yaml").write_text(yaml.safe_dump({"build": {"targets": ["boards/my-board.yaml"]}}))
    cfg = config.load(tmp_path / "project" / "c.yaml")
    assert [t.name for t in pipeline.make_context(cfg, tmp_path / "b", None).targets] == ["my-board"]
    saved = tmp_path / "elsewhere" / "config.yaml"  # what a build keeps for --resume
    saved.parent.mkdir()
    saved.write_text(config.dump(config.absolute(cfg)))
    assert [t.name for t in pipeline.make_context(config.load(saved), tmp_path / "b", None).targets] == ["my-board"]


def test_user_folders_are_searched_by_name(tmp_path, monkeypatch):
    _board(tmp_path / "xdg" / "edgekit" / "targets", "desk-box")
    _board(tmp_path / "lab", "lab-pi")
    monkeypatch.setenv("EDGEKIT_TARGETS", str(tmp_path / "lab"))
    found = targets.available()
    assert {"desk-box", "lab-pi", "x86-64", "rpi5"} <= set(found)
    assert [t.name for t in targets.get(["lab-pi", "desk-box"])] == ["lab-pi", "desk-box"]


def test_a_duplicate_name_and_an_unknown_target_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(TargetError, match="unknown target 'nope'; valid targets: .*x86-64.*or the path of a target"):
        targets.get(["nope"])
    with pytest.raises(TargetError, match="target file .*missing.yaml' not found"):
        targets.get(["missing.yaml"])
    _board(tmp_path / "lab", "x86-64")
    monkeypatch.setenv("EDGEKIT_TARGETS", str(tmp_path / "lab"))
    with pytest.raises(TargetError, match="target 'x86-64' is defined twice: .*; rename one"):
        targets.available()


def test_the_built_in_profiles_ship_inside_the_package(tmp_path):
    """`pip install .` (a wheel) holds every targets/*.yaml, byte for byte."""
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("edgekit-*.whl")
    with zipfile.ZipFile(wheel) as z:
        shipped = {Path(n).name: z.read(n) for n in z.namelist() if n.startswith("edgekit/profiles/")}
    expected = {p.name: p.read_bytes() for p in (ROOT / "targets").glob("*.yaml")}
    assert shipped == expected and len(expected) >= 5


def test_a_profile_with_several_key_problems_is_told_them_all_at_once(tmp_path):
    """A user's copy of a profile with a typo, two keys left out and a list for a mapping: one line with every
    problem and the key a typo likely means, not one problem per run."""
    raw = yaml.safe_load((ROOT / "targets" / "x86-64.yaml").read_text())
    raw["thread"] = raw.pop("threads")
    del raw["description"], raw["python"]
    raw["budgets"] = [1, 2]
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(TargetError) as caught:
        targets.get([str(path)])
    assert str(caught.value) == (f"{path}: unknown key 'thread' (did you mean 'threads'?); missing description, "
                                 "python, threads; wrong type: budgets (give a mapping) (every key: "
                                 "targets/x86-64.yaml, or `edgekit targets --check FILE`)")
