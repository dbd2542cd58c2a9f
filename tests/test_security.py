"""Hostile inputs do no harm: edgekit deletes only what it made, sends and copies only a bundle's own files, never
runs a bundle's code on the build host, and writes bundles that another user (the image's USER 10001) can read.

One test per item of "Security first" (issue #11); each failed before its fix."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from edgekit import cli
from edgekit.device import emulate, measure, remote, runtime_check
from edgekit.errors import BundleError
from edgekit.runner import runner

FAST = {"warmup_runs": 1, "warmup_seconds": 0.0, "min_runs": 5, "min_seconds": 0.0, "max_seconds": 2.0}


def _one_error(capsys) -> str:
    """The CLI said exactly one line, `edgekit: error: ...`, and no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgekit: error: "), err
    return lines[0]


def _rewrite_manifest(bundle: Path, change) -> dict:
    manifest = json.loads((bundle / "manifest.json").read_text())
    change(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# 1. `edgekit docker --out DIR` deleted DIR (shutil.rmtree): `--out .` emptied the current folder.
def test_docker_out_never_deletes_what_edgekit_did_not_make(tmp_path, monkeypatch, capsys):
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    monkeypatch.chdir(mine)
    for out in (".", str(mine)):
        assert cli.main(["docker", "x86-64", "--out", out]) == 2
        assert "not an edgekit docker context" in _one_error(capsys)
        assert os.listdir(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    context = tmp_path / "ctx"
    context.mkdir()  # an empty folder is fine, and edgekit's own context (its marker) is rewritten
    for _ in range(2):
        assert cli.main(["docker", "x86-64", "--out", str(context)]) == 0
        (context / "Dockerfile").write_text("stale")
    assert cli.main(["docker", "x86-64", "--out", str(context)]) == 0
    assert (context / "Dockerfile").read_text() != "stale"
    (context / "mine.txt").write_text("a file edgekit did not write")  # ... but not what someone added to it
    assert cli.main(["docker", "x86-64", "--out", str(context)]) == 2
    assert "mine.txt" in _one_error(capsys) and (context / "mine.txt").is_file()


# 2. `edgekit docker --bundle B` followed links (copytree): a link to ~/.ssh put the keys into the image.
def test_docker_bundle_copies_only_the_manifest_files_and_refuses_links(bundle, tmp_path, capsys):
    keys = tmp_path / "home" / ".ssh"
    keys.mkdir(parents=True)
    (keys / "id_rsa").write_text("PRIVATE KEY")
    (bundle / "ssh").symlink_to(keys)
    (bundle / "notes.txt").write_text("not in the manifest")
    context = tmp_path / "ctx"
    assert cli.main(["docker", "x86-64", "--bundle", str(bundle), "--out", str(context)]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    copied = {p.relative_to(context / "bundle").as_posix() for p in (context / "bundle").rglob("*")}
    assert copied == {*manifest["files"], "manifest.json"}
    assert not any(p.is_symlink() for p in context.rglob("*"))
    real = tmp_path / "eval.npz"  # a listed file that is a link (same bytes, so its sha256 matches)
    shutil.move(bundle / "eval.npz", real)
    (bundle / "eval.npz").symlink_to(real)
    assert cli.main(["docker", "x86-64", "--bundle", str(bundle), "--out", str(tmp_path / "ctx2")]) == 2
    assert "eval.npz" in _one_error(capsys) and not (tmp_path / "ctx2" / "bundle" / "eval.npz").exists()


# 3. `edgekit run` / `verify` executed the bundle's runner.py, which also did the sha256 check of itself.
def test_run_and_verify_never_execute_the_bundles_own_code(bundle, tmp_path):
    marker = tmp_path / "pwned"
    evil = f"open({str(marker)!r}, 'w').write('the bundle ran code on the build host')\n"
    head = "from __future__ import annotations\n"
    (bundle / "runner.py").write_text((bundle / "runner.py").read_text().replace(head, head + evil, 1))
    _rewrite_manifest(bundle, lambda m: m["files"].update({"runner.py": runner.sha256(bundle / "runner.py")}))
    data = measure.run_bundle(bundle, artifacts=["onnx_int8"], overrides=FAST, log=lambda *_: None)
    assert data["artifact"] == "onnx_int8" and data["accuracy"] is not None
    results, error = runtime_check.run_runner(sys.executable, bundle, "onnx_int8", env=runtime_check.clean_env())
    assert error is None and results["artifact"] == "onnx_int8"  # what verify (and qemu, with a prefix) runs
    error = emulate.dump_outputs([sys.executable], bundle, "onnx_int8", tmp_path / "out.npy", runtime_check.clean_env())
    assert error is None and (tmp_path / "out.npy").is_file()  # verify --emulate's output comparison
    assert not marker.exists()


# 4. `edgekit run --host` packed whatever manifest["files"] named: an absolute path or ../ went to the device.
@pytest.mark.parametrize("where", ["parent", "absolute", "link"])
def test_manifest_paths_outside_the_bundle_are_refused(bundle, tmp_path, capsys, where):
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    rel = {"parent": "../id_rsa", "absolute": str(secret), "link": "key"}[where]
    if where == "link":
        (bundle / "key").symlink_to(secret)
    manifest = _rewrite_manifest(bundle, lambda m: m["files"].update({rel: runner.sha256(secret)}))
    argv = ["run", str(bundle), "--host", "nobody@127.0.0.1", "--port", str(_free_port())]
    assert cli.main(argv) == 2  # refused before any connection is tried
    line = _one_error(capsys)
    assert rel in line and "cannot connect" not in line
    assert cli.main(["run", str(bundle)]) == 2 and rel in _one_error(capsys)
    with pytest.raises(BundleError, match="inside the bundle"):
        remote.pack(bundle, manifest, tmp_path)
    with pytest.raises(SystemExit, match="inside the bundle"):  # the runner refuses too: it runs on the device
        runner.main([str(bundle), "--out", str(tmp_path / "r.json"), "--min-runs", "1"])
    assert not (tmp_path / "r.json").exists()


# 5. A pickle planted in a build folder is refused, never executed (stage models load with weights_only=True)

class _Planted:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("command", ["resume", "debug"])
def test_a_pickle_planted_in_a_build_folder_is_never_executed(command, e2e_build, tmp_path, capsys):
    import torch

    out = tmp_path / "build"
    shutil.copytree(e2e_build[0], out)
    marker = tmp_path / "pwned"
    for planted in (out / "stages").glob("*/model.pt"):
        torch.save({"format": "edgekit-model/1", "tensors": _Planted(marker)}, planted)
        # whoever can write model.pt can write the stage's record too: --resume then keeps the stage as intact
        record = json.loads((planted.parent / "metrics.json").read_text())
        record["outputs"]["model.pt"] = runner.sha256(planted)
        (planted.parent / "metrics.json").write_text(json.dumps(record))
    if command == "resume":  # export, verify and bundle run again: export loads the stage models
        for stage in ("export", "verify", "bundle"):
            (out / "stages" / stage / "metrics.json").unlink(missing_ok=True)
        (out / "fidelity").mkdir(exist_ok=True)
        argv = ["build", "--resume", str(out)]
    else:  # the layer-wise debug reads the exported artifacts and their float twins, no stage model at all
        shutil.rmtree(out / "fidelity", ignore_errors=True)
        argv = ["debug", str(out), "--artifact", "tflite_int8"]
    code = cli.main(argv)
    err = capsys.readouterr().err  # export's progress lines may come before the error
    errors = [ln for ln in err.splitlines() if ln.startswith("edgekit: error: ")]
    assert not marker.exists() and "Traceback" not in err, err
    if command == "resume":
        assert code == 2 and len(errors) == 1, err
        assert "is not a model file edgekit wrote" in errors[0], errors[0]
    else:
        assert code == 0 and errors == [], err


# 6. Bundle files were written 0600 (mkstemp): the image's USER 10001 could not read manifest.json.
def test_bundles_are_readable_by_another_user(e2e_build, tmp_path):
    out, _ = e2e_build
    for bundle in sorted((out / "bundles").iterdir()):
        mode = 0o755 if bundle.is_dir() else 0o644
        assert stat.S_IMODE(bundle.stat().st_mode) == mode, bundle
        for path in bundle.iterdir() if bundle.is_dir() else ():
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
        if bundle.name.endswith(".tar.gz"):
            with tarfile.open(bundle) as tar:
                assert {m.mode for m in tar.getmembers()} == {0o755, 0o644}
    if os.geteuid() != 0:
        pytest.skip("running the runner as another user needs root")
    shared = Path(tempfile.mkdtemp(prefix="edgekit-shared-"))  # tmp_path is private to root
    try:
        shared.chmod(0o755)
        copy = shared / "x86-64"
        shutil.copytree(out / "bundles" / "x86-64", copy)  # keeps the modes edgekit wrote
        (shared / "results").mkdir(mode=0o777)
        (shared / "results").chmod(0o777)
        argv = ["setpriv", "--reuid=10001", "--regid=10001", "--clear-groups", sys.executable, "-B",
                str(copy / "runner.py"), str(copy), "--artifact", "onnx_int8", "--out", str(shared / "results/r.json"),
                "--min-runs", "3", "--min-seconds", "0", "--warmup-runs", "1"]
        proc = subprocess.run(argv, capture_output=True, text=True, env=runtime_check.clean_env({"HOME": "/tmp"}))
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads((shared / "results/r.json").read_text())["artifact"] == "onnx_int8"
    finally:
        shutil.rmtree(shared)
