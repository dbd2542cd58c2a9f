"""aarch64 bundles run by their own runner under qemu user-mode emulation, compared with the x86 run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgekit import cli
from edgekit.device import bundle_check, emulate

pytestmark = pytest.mark.system  # sshd, dockerd, qemu or pinned-runtime venvs: `pytest -m "not system"` skips

INSTALL = "qemu-aarch64-static is missing: install qemu-user-static (apt-get install qemu-user-static); .ci/run does"


def test_wheel_tags_cover_every_glibc_the_sysroot_can_load():
    tags = emulate.platform_tags("3.11")
    assert "manylinux_2_36_aarch64" in tags and "manylinux_2_27_aarch64" in tags and "manylinux2014_aarch64" in tags
    assert not any("x86_64" in t for t in tags)


def test_qemu_cpu_comes_from_the_target_description():
    assert emulate.cpu_for("Raspberry Pi 5 (Cortex-A76, 64-bit OS)") == "cortex-a76"
    assert emulate.cpu_for("Raspberry Pi 4 (Cortex-A72)") == "cortex-a72"
    assert emulate.cpu_for("some board") == emulate.DEFAULT_CPU


def test_outputs_match_within_one_int8_step_and_no_more():
    spec = {"output": {"dtype": "int8", "scale": 0.5}}
    x86 = np.array([[0.5, 1.0], [2.0, -1.0]], dtype=np.float32)
    assert emulate.compare(x86, x86.copy(), spec) == {"identical": True, "max_abs_diff": 0.0,
                                                     "top1_agreement": 1.0, "int8_steps": 0, "ok": True}
    one = emulate.compare(x86, x86 + np.float32(0.5), spec)
    assert (one["int8_steps"], one["ok"]) == (1, True)
    two = emulate.compare(x86, x86 + np.float32(1.0), spec)
    assert (two["int8_steps"], two["ok"]) == (2, False)
    assert not emulate.compare(x86, x86 + np.float32(1e-2), {"output": {"dtype": "float32"}})["ok"]


def test_build_says_plainly_when_emulation_is_skipped(e2e_build, monkeypatch):
    out, _ = e2e_build
    monkeypatch.setattr(emulate, "qemu", lambda: None)
    messages: list[str] = []
    result = bundle_check.verify_bundle(out / "bundles" / "rpi5", None, messages.append)
    assert result["emulation"] == {"ran": False, "message": emulate.SKIP_MESSAGE}
    assert any("emulated check skipped: qemu-aarch64-static not found; install qemu-user-static" in m
               for m in messages)
    assert all(c["emulated"] is False and c["ok"] is True for c in result["artifacts"].values())
    with pytest.raises(emulate.EmulationUnavailable, match="install qemu-user-static"):
        bundle_check.verify_bundle(out / "bundles" / "rpi5", True, messages.append)


def test_emulated_pi_bundle_matches_the_x86_run(e2e_build):
    """The default build ran the rpi5 bundle's runner under qemu: outputs as on x86, accuracy as in the manifest."""
    if emulate.qemu() is None:
        pytest.fail(INSTALL)
    out, report = e2e_build
    assert report["emulated"]["rpi5"]["ran"] is True, report["emulated"]
    manifest = json.loads((out / "bundles" / "rpi5" / "manifest.json").read_text())
    references = {a["name"]: a["reference"]["accuracy"] for a in manifest["artifacts"]}
    rows = [a for a in report["artifacts"] if a["target"] == "rpi5"]
    assert {a["name"] for a in rows} == set(references)
    for row in rows:
        check = row["runtime_check"]
        assert (check["arch"], check["emulated"], check["ok"]) == ("aarch64", True, True), check
        assert check["x86"]["ok"] is True and check["x86"]["arch"] == "x86_64"
        cmp = check["outputs_vs_x86"]
        assert cmp["top1_agreement"] == 1.0
        if row["precision"] == "int8":
            assert cmp["int8_steps"] <= 1, cmp
        else:
            assert cmp["max_abs_diff"] <= 1e-4, cmp
        assert check["accuracy"] == pytest.approx(references[row["name"]], abs=1e-9)
        assert "latency_ms" not in check and "measured" not in row  # emulated timings are not the device's
    assert "rpi5" not in report["runs"]


def test_verify_emulate_runs_an_old_image_bundle_on_its_aarch64_wheels(e2e_build, tmp_path, capsys):
    """`edgekit check --emulate` on an rpi4-legacy-style bundle: tflite-runtime 2.14's aarch64 wheel under qemu."""
    if emulate.qemu() is None:
        pytest.fail(INSTALL)
    out, _ = e2e_build
    bundle = tmp_path / "rpi4-legacy"
    shutil.copytree(out / "bundles" / "rpi5", bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["target"].update(name="rpi4-legacy", description="Raspberry Pi 4 (Cortex-A72), older image")
    for spec in manifest["artifacts"]:
        spec.update(runtime="tflite-runtime", runtime_version="2.14.0")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert cli.main(["check", str(bundle), "--emulate"]) == 0
    printed = capsys.readouterr().out
    assert "p90" not in printed and "not shown for emulated runs" in printed
    result = json.loads((bundle / "check.json").read_text())
    for spec in manifest["artifacts"]:
        check = result["artifacts"][spec["name"]]
        assert (check["runtime"], check["version"], check["cpu"]) == ("tflite-runtime", "2.14.0", "cortex-a72")
        assert (check["runtime_seen"]["name"], check["runtime_seen"]["version"]) == ("tflite-runtime", "2.14.0")
        assert check["ok"] is True and check["emulated"] is True, check
