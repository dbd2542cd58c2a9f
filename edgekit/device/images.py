"""`edgekit docker`: per-target Docker images, generated from targets/*.yaml so each pin lives in one place.

Per target, docker/<target>/ holds three generated files: `base.Dockerfile` (Debian bookworm + the target's
Python + numpy and the pinned runtime in /opt/edgekit/site; needs an image registry), `Dockerfile` (the runtime
image: base + `edgekit-runner`, non-root) and `edgekit-runner` (runs a bundle's own runner.py). docker/builder/
holds the image with the full edgekit toolchain.

Where no registry is reachable, the base image is made offline instead (`--offline-base`): a private apt root
for the target's Debian architecture downloads python3.X and the few libraries the runtime needs
(--no-install-recommends), each .deb is unpacked with `dpkg-deb --fsys-tarfile | tar -x --keep-directory-symlink`
(plain `dpkg -x` would replace the usr-merge links), the runtime's wheels for that architecture go to
/opt/edgekit/site, and `docker import` makes the image; for arm64 the image config's architecture is then set
(save -> edit -> load), since `docker import --platform` records amd64 whatever it is told.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgekit import formats
from edgekit.device.manifest import bundle_files, read_manifest
from edgekit.errors import DockerError
from edgekit.files import cache_dir
from edgekit.targets import Target, host_arch

DOCKER_DIR = Path(__file__).resolve().parents[2] / "docker"  # the repository's docker/
PLATFORMS = {"x86_64": "linux/amd64", "aarch64": "linux/arm64"}
DEB_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}
SITE = "/opt/edgekit/site"
BUNDLE_IN_IMAGE = "/opt/edgekit/bundle"
USER = "10001:10001"
DEBIAN_LIBS = ["libstdc++6", "libgomp1", "dash", "base-files"]  # besides pythonX.Y: C++ runtime, OpenMP, /bin/sh
STRIP = ["usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian"]
NUMPY_PIN = "1.26.4"  # proven here with onnxruntime 1.23, ai-edge-litert 2.1 and tflite-runtime 2.14 (needs < 2)
GENERATED = "# Generated from targets/{name}.yaml by `edgekit docker --write-dockerfiles`: edit the target, not this."


# --- generated files ---------------------------------------------------------------------------------------

def runtime_pins(target: Target) -> list[str]:
    """The pip requirements of a target's image: each runtime at the version the target pins, and numpy."""
    pins = {f"{formats.runtime(a.runtime).package}=={a.runtime_version}" for a in target.artifacts}
    return sorted(pins) + [f"numpy=={NUMPY_PIN}"]


def base_tag(target: Target) -> str:
    pins = "-".join(f"{p.split('==')[0]}{p.split('==')[1]}" for p in runtime_pins(target))
    return f"edgekit-base-{target.name}:py{target.python}-{pins}"


def is_jetson(target: Target) -> bool:
    return any(a.runtime == "onnxruntime-gpu" for a in target.artifacts)


def runner_script() -> str:
    return "\n".join([
        "#!/bin/sh",
        "# edgekit-runner [BUNDLE] [runner options]: measure a bundle with its own runner.py (sha256-checked).",
        f"# BUNDLE defaults to {BUNDLE_IN_IMAGE}; results go to $EDGEKIT_RESULTS/results.json (default /results).",
        "set -eu",
        'case "${1:-}" in',
        f'    ""|-*) bundle={BUNDLE_IN_IMAGE} ;;',
        '    *) bundle=$1; shift ;;',
        "esac",
        'out="${EDGEKIT_RESULTS:-/results}/results.json"',
        'exec "${EDGEKIT_PYTHON:-python3}" "$bundle/runner.py" "$bundle" --out "$out" "$@"',
        ""])


def runtime_dockerfile(target: Target, with_bundle: bool = False) -> str:
    """The runtime image: a base with Python and the pinned runtime, plus edgekit-runner; runs as non-root."""
    pins = " ".join(runtime_pins(target))
    lines = [
        GENERATED.format(name=target.name),
        f"# Runtime image for {target.name} ({PLATFORMS[target.arch]}): Python {target.python}, {pins}.",
        f"# BASE holds python{target.python} and those packages in {SITE}. Make it with base.Dockerfile",
        "# (needs an image registry) or, without one, `edgekit docker TARGET --offline-base` (Debian packages).",
        f"ARG BASE={base_tag(target)}",
        "FROM ${BASE}",
        f'LABEL org.opencontainers.image.title="edgekit-runner-{target.name}" io.edgekit.target="{target.name}" \\',
        f'      io.edgekit.runtime="{pins}"',
        f"ENV PYTHONPATH={SITE} PYTHONDONTWRITEBYTECODE=1 EDGEKIT_PYTHON=/usr/bin/python{target.python} \\",
        "    EDGEKIT_RESULTS=/results",
        "COPY edgekit-runner /usr/local/bin/edgekit-runner",
    ]
    if with_bundle:
        lines.append(f"COPY bundle/ {BUNDLE_IN_IMAGE}/")
    lines += [f"USER {USER}", "WORKDIR /results", 'ENTRYPOINT ["/usr/local/bin/edgekit-runner"]', ""]
    return "\n".join(lines)


def _apt_install(packages: list[str]) -> list[str]:
    return ["# Security updates replace exact package versions in the archive; the distribution release is the pin.",
            "# hadolint ignore=DL3008",
            "RUN apt-get update \\",
            f"    && apt-get install -y --no-install-recommends {' '.join(packages)} \\",
            "    && rm -rf /var/lib/apt/lists/* \\",
            "    && mkdir /results && chmod 1777 /results"]


def base_dockerfile(target: Target) -> str:
    """Base image with a registry: the target's Debian base, its Python, and the pinned wheels."""
    pins = " ".join(runtime_pins(target))
    head = [GENERATED.format(name=target.name),
            f"# Base image for {target.name} ({PLATFORMS[target.arch]}): python{target.python} and {pins} in {SITE}.",
            f"# docker buildx build --platform {PLATFORMS[target.arch]} -f base.Dockerfile -t {base_tag(target)} ."]
    if is_jetson(target):  # JetPack base: CUDA, cuDNN and TensorRT come with it; its Python is the target's
        return "\n".join([*head,
                          "# onnxruntime-gpu for JetPack comes from NVIDIA's Jetson pip index: pass it as PIP_INDEX.",
                          f"FROM {target.docker_base}",
                          "ARG PIP_INDEX",
                          *_apt_install([f"python{target.python}", "python3-pip"]),
                          f"RUN python{target.python} -m pip install --no-cache-dir --target {SITE} \\",
                          f'    --extra-index-url "${{PIP_INDEX}}" {pins}', ""])
    return "\n".join([*head,
                      f"FROM python:{target.python}-slim-bookworm AS wheels",
                      f"RUN pip install --no-cache-dir --target {SITE} {pins}",
                      "",
                      f"FROM {target.docker_base}",
                      *_apt_install([f"python{target.python}", *DEBIAN_LIBS[:2]]),
                      f"COPY --from=wheels {SITE} {SITE}", ""])


def builder_dockerfile() -> str:
    return "\n".join([
        "# The edgekit toolchain (train ... bundle) on the CPU; build from the repository root:",
        "#   docker build -f docker/builder/Dockerfile -t edgekit-builder .",
        "# torch is pinned exactly and installed first: a looser pin pulls a multi-GB CUDA build.",
        "FROM python:3.11-slim-bookworm",
        "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu",
        "RUN useradd --create-home --uid 10001 edgekit && mkdir /work && chown 10001:10001 /work",
        "WORKDIR /opt/edgekit",
        "RUN pip install --no-cache-dir --index-url \"${TORCH_INDEX}\" torch==2.13.0",
        "COPY pyproject.toml README.md ./",
        "COPY edgekit/ edgekit/",
        "COPY targets/ targets/",
        "RUN pip install --no-cache-dir .",
        "USER 10001",
        "WORKDIR /work",
        'ENTRYPOINT ["edgekit"]',
        'CMD ["--help"]',
        ""])


def repo_files(targets: list[Target]) -> dict[str, str]:
    """Every file of docker/ as it should be (relative path -> text)."""
    files = {"builder/Dockerfile": builder_dockerfile()}
    for t in targets:
        files |= {f"{t.name}/Dockerfile": runtime_dockerfile(t), f"{t.name}/base.Dockerfile": base_dockerfile(t),
                  f"{t.name}/edgekit-runner": runner_script()}
    return files


def write_repo_files(targets: list[Target], root: Path = DOCKER_DIR) -> list[Path]:
    written = []
    for rel, text in repo_files(targets).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if rel.endswith("edgekit-runner"):
            path.chmod(0o755)
        written.append(path)
    return written


CONTEXT_MARKER = ".edgekit-docker-context"  # written first: a folder with it is a context edgekit made
CONTEXT_FILES = ("Dockerfile", "base.Dockerfile", "edgekit-runner", "bundle", CONTEXT_MARKER)


def clear_context(dest: Path) -> None:
    """Make room for a context in `dest`: a new or empty folder, or a context edgekit wrote there before (its
    marker) holding nothing else. Only edgekit's own files are removed; anything else is refused, never deleted."""
    if not dest.exists():
        return
    if not dest.is_dir():
        raise DockerError(f"'{dest}' is a file, not a folder; pass a new or empty folder to --out")
    names = sorted(p.name for p in dest.iterdir())
    if names and CONTEXT_MARKER not in names:
        raise DockerError(f"'{dest}' is not empty and is not an edgekit docker context; edgekit never deletes what it "
                          "did not write: pass a new or empty folder to --out")
    foreign = [n for n in names if n not in CONTEXT_FILES or (dest / n).is_symlink()]
    if foreign:
        raise DockerError(f"'{dest / foreign[0]}' was not written by edgekit; move it out of the docker context "
                          "or pass another --out")
    for path in (dest / n for n in names if n != CONTEXT_MARKER):  # the marker stays: a crash here is redone
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.write_text(text)
    path.chmod(mode)


def copy_bundle(bundle: Path, dest: Path) -> None:
    """The files a bundle's manifest lists (and the manifest), as regular files: no link is followed or copied."""
    dest.mkdir(mode=0o755)
    for rel, path in bundle_files(bundle, read_manifest(bundle)).items():
        (dest / rel).parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        shutil.copyfile(path, dest / rel, follow_symlinks=False)
        (dest / rel).chmod(0o644)


def write_context(target: Target, dest: Path, bundle: Path | None = None) -> Path:
    """A build context: Dockerfile (+ base.Dockerfile), edgekit-runner and, with a bundle, the bundle."""
    if bundle is not None:
        name = read_manifest(bundle)["target"]["name"]
        if name != target.name:
            raise DockerError(f"'{bundle}' is a {name} bundle, not {target.name}")
    clear_context(dest)
    dest.mkdir(parents=True, exist_ok=True)
    _write(dest / CONTEXT_MARKER, "A Docker build context written by `edgekit docker`; it rewrites this folder.\n")
    _write(dest / "Dockerfile", runtime_dockerfile(target, with_bundle=bundle is not None))
    _write(dest / "base.Dockerfile", base_dockerfile(target))
    _write(dest / "edgekit-runner", runner_script(), 0o755)
    if bundle is not None:
        copy_bundle(bundle, dest / "bundle")
    return dest


# --- docker ------------------------------------------------------------------------------------------------

@dataclass
class Docker:
    """The docker CLI, optionally against a daemon socket of its own (`host`)."""

    host: str | None = None
    binary: str = "docker"

    def argv(self, *args: str) -> list[str]:
        return [self.binary, *(["-H", self.host] if self.host else []), *args]

    def available(self) -> bool:
        if shutil.which(self.binary) is None:
            return False
        return subprocess.run(self.argv("version"), capture_output=True).returncode == 0

    def has_buildx(self) -> bool:
        return subprocess.run(self.argv("buildx", "version"), capture_output=True).returncode == 0

    def run(self, *args: str, stdin=None, what: str = "docker") -> str:
        proc = subprocess.run(self.argv(*args), stdin=stdin, capture_output=True, text=True,
                              env=os.environ | {"DOCKER_BUILDKIT": "0"} if args[0] == "build" else None)
        if proc.returncode != 0:
            raise DockerError(f"{what} failed: {(proc.stderr.strip().splitlines() or ['no message'])[-1]}")
        return proc.stdout


def build_command(docker: Docker, target: Target, context: Path, tag: str, base: str | None,
                  buildx: bool) -> list[str]:
    """`docker buildx build --platform ...` where buildx is present, else the classic builder."""
    args = ["--build-arg", f"BASE={base or base_tag(target)}", "-t", tag, str(context)]
    if buildx:
        return docker.argv("buildx", "build", "--platform", PLATFORMS[target.arch], "--load", *args)
    return docker.argv("build", *args)


def build_image(docker: Docker, target: Target, context: Path, tag: str, base: str | None = None) -> str:
    buildx = docker.has_buildx()
    argv = build_command(docker, target, context, tag, base, buildx)
    docker.run(*argv[len(docker.argv()):], what=f"building {tag}")
    return "buildx" if buildx else "classic builder"


def run_command(docker: Docker, target: Target, tag: str, results: Path, emulated: bool,
                args: list[str] | None = None, user: str | None = None) -> list[str]:
    """docker run of a runtime image: no network, results in `results`, as `user` (default: the calling user)."""
    env = ["-e", "EDGEKIT_EMULATED=1"] if emulated else []
    return docker.argv("run", "--rm", "--network", "none", "--platform", PLATFORMS[target.arch], *env,
                       "--user", user or f"{os.getuid()}:{os.getgid()}", "-v", f"{results.resolve()}:/results", tag,
                       *(args or []))


# --- offline base image: Debian packages + wheels -> docker import -----------------------------------------

def cache_root() -> Path:
    return cache_dir() / "images"


def _apt_root(target: Target) -> tuple[Path, list[str]]:
    arch = target.arch
    root = cache_root() / f"apt-{DEB_ARCH[arch]}-py{target.python}"
    opts = [f"Dir={root}", f"Dir::State::status={root}/var/lib/dpkg/status", f"APT::Architecture={DEB_ARCH[arch]}",
            f"APT::Architectures::={DEB_ARCH[arch]}", "Dir::Etc::trusted=/etc/apt/trusted.gpg",
            "Dir::Etc::trustedparts=/etc/apt/trusted.gpg.d", "Debug::NoLocking=1"]
    return root, [a for o in opts for a in ("-o", o)]


def _wheel_dir(target: Target) -> Path:
    key = hashlib.sha256(" ".join(runtime_pins(target)).encode()).hexdigest()[:12]
    return cache_root() / f"wheels-{target.arch}-py{target.python}-{key}"


def _pip_platform(arch: str) -> list[str]:
    """glibc 2.36 (bookworm): every manylinux tag it can run."""
    tags = [f"manylinux_2_{v}_{arch}" for v in range(17, 37)] + [f"manylinux2014_{arch}"]
    return [a for t in tags for a in ("--platform", t)]


def fetch(target: Target, log=print) -> None:
    """Download (with network) the .debs and wheels the offline base image needs into the cache."""
    if is_jetson(target):
        raise DockerError("the Jetson base is NVIDIA's L4T image (CUDA, TensorRT): build it with base.Dockerfile "
                          "on a machine that reaches NVIDIA's registry")
    root, opts = _apt_root(target)
    for old in (root / "var/cache/apt/archives").glob("*.deb"):  # one consistent set per download
        old.unlink()
    for sub in ("etc/apt/sources.list.d", "etc/apt/preferences.d", "var/lib/apt/lists/partial",
                "var/cache/apt/archives/partial", "var/lib/dpkg"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "var/lib/dpkg/status").touch()
    for src in Path("/etc/apt/sources.list.d").glob("debian.sources"):
        shutil.copy2(src, root / "etc/apt/sources.list.d" / src.name)
    if Path("/etc/apt/sources.list").is_file():
        shutil.copy2("/etc/apt/sources.list", root / "etc/apt/sources.list")
    log(f"  [base] Debian packages for {DEB_ARCH[target.arch]} -> {root} ...")
    _check(["apt-get", *opts, "update", "-qq"], "apt-get update (private apt root)")
    _check(["apt-get", *opts, "install", "-y", "-qq", "--download-only", "--no-install-recommends",
            f"python{target.python}", *DEBIAN_LIBS], "apt-get install --download-only")
    wheels = _wheel_dir(target)
    log(f"  [base] wheels {' '.join(runtime_pins(target))} for {target.arch} -> {wheels} ...")
    _check([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", *_pip_platform(target.arch),
            "--python-version", target.python, "--implementation", "cp", "-d", str(wheels), *runtime_pins(target)],
           "pip download")


def _check(argv: list[str], what: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, env=os.environ | {"PIP_CONSTRAINT": ""})
    if proc.returncode != 0:
        raise DockerError(f"{what} failed: {(proc.stderr.strip().splitlines() or ['no message'])[-1]}")


def assemble_rootfs(target: Target, dest: Path) -> Path:
    """The root filesystem from the cached .debs and wheels (no network)."""
    root, _ = _apt_root(target)
    debs = sorted((root / "var/cache/apt/archives").glob("*.deb"))
    wheels = sorted(_wheel_dir(target).glob("*.whl"))
    if not debs or not wheels:
        raise DockerError(f"no cached Debian packages or wheels for {target.name}; download them once with "
                          f"`python -m edgekit.device.images fetch {target.name}` (or `edgekit docker {target.name} "
                          "--offline-base`, which fetches when needed)")
    for d in ("usr/bin", "usr/sbin", "usr/lib", "tmp", "results"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    for link in ("bin", "sbin", "lib") + (("lib64",) if target.arch == "x86_64" else ()):
        (dest / f"usr/{link}").mkdir(exist_ok=True)
        (dest / link).symlink_to(f"usr/{link}")
    for deb in debs:  # dpkg -x would replace the usr-merge links with directories
        unpack = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "--keep-directory-symlink", "-C", str(dest)], stdin=unpack.stdout, check=True)
        if unpack.wait() != 0:
            raise DockerError(f"cannot unpack {deb.name}")
    _check([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile",
            "--target", str(dest / SITE.lstrip("/")), "--only-binary=:all:", *_pip_platform(target.arch),
            "--python-version", target.python, "--implementation", "cp", *map(str, wheels)], "pip install --target")
    for rel in STRIP:
        shutil.rmtree(dest / rel, ignore_errors=True)
    (dest / "tmp").chmod(0o1777)
    (dest / "results").chmod(0o1777)
    return dest


def set_architecture(docker: Docker, tag: str, arch: str, variant: str | None) -> None:
    """docker save -> set architecture/variant in the image config -> docker load."""
    with tempfile.TemporaryDirectory() as tmp:
        saved, fixed = Path(tmp) / "saved.tar", Path(tmp) / "fixed.tar"
        imported = docker.run("image", "inspect", "--format", "{{.Id}}", tag, what="docker image inspect").strip()
        docker.run("save", "-o", str(saved), tag, what="docker save")
        with tarfile.open(saved) as src, tarfile.open(fixed, "w") as out:
            manifest = json.load(src.extractfile("manifest.json"))
            config = json.load(src.extractfile(manifest[0]["Config"]))
            config.update(architecture=arch, **({"variant": variant} if variant else {}))
            payload = json.dumps(config).encode()
            old, manifest[0]["Config"] = manifest[0]["Config"], hashlib.sha256(payload).hexdigest() + ".json"
            for member in src.getmembers():
                if member.name not in (old, "manifest.json"):
                    out.addfile(member, src.extractfile(member) if member.isfile() else None)
            for name, data in ((manifest[0]["Config"], payload), ("manifest.json", json.dumps(manifest).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))
        docker.run("load", "-i", str(fixed), what="docker load")
    docker.run("image", "rm", imported, what="removing the imported amd64-labelled image")


def import_rootfs(docker: Docker, rootfs: Path, tag: str, target: Target) -> None:
    changes = [f"ENV PYTHONPATH={SITE}", "ENV PATH=/usr/local/bin:/usr/bin:/bin",
               f"LABEL io.edgekit.base={shlex.quote(' '.join(runtime_pins(target)))}"]
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "--owner=0", "--group=0", "-c", "."],
                           stdout=subprocess.PIPE)
    docker.run("import", *[a for c in changes for a in ("-c", c)], "-", tag, stdin=tar.stdout, what="docker import")
    if tar.wait() != 0:
        raise DockerError("packing the root filesystem failed")
    if target.arch == "aarch64":  # import records the daemon's architecture whatever --platform says
        set_architecture(docker, tag, "arm64", "v8")


def offline_base(docker: Docker, target: Target, tag: str | None = None, fetch_missing: bool = True,
                 log=print) -> str:
    """Make the base image from Debian packages and wheels; returns its tag."""
    tag = tag or base_tag(target)
    root, _ = _apt_root(target)
    if fetch_missing and not (any((root / "var/cache/apt/archives").glob("*.deb"))
                              and any(_wheel_dir(target).glob("*.whl"))):
        fetch(target, log)
    with tempfile.TemporaryDirectory(prefix="edgekit-rootfs-") as tmp:
        log(f"  [base] root filesystem for {target.name} ({DEB_ARCH[target.arch]}) ...")
        rootfs = assemble_rootfs(target, Path(tmp) / "rootfs")
        log(f"  [base] docker import -> {tag}")
        import_rootfs(docker, rootfs, tag, target)
    return tag


# --- `edgekit docker` --------------------------------------------------------------------------------------

def default_tag(target: Target, bundle: Path | None) -> str:
    if bundle is None:
        return f"edgekit-runner-{target.name}:latest"
    return f"edgekit-runner-{target.name}:{json.loads((bundle / 'manifest.json').read_text())['bundle_id']}"


def make(target: Target, out: Path, *, bundle: Path | None = None, tag: str | None = None, base: str | None = None,
         build: bool = False, offline: bool = False, docker: Docker | None = None, log=print) -> dict:
    """Write the build context; with build/offline, make the image(s). Returns what was done and the commands."""
    docker = docker or Docker(host=os.environ.get("EDGEKIT_DOCKER_HOST"))
    context = write_context(target, out, bundle)
    tag = tag or default_tag(target, bundle)
    done = {"context": str(context), "tag": tag, "built": False, "emulated": target.arch != host_arch()}
    if not (build or offline):
        done["command"] = shlex.join(build_command(docker, target, context, tag, base, buildx=True))
        return done
    if not docker.available():
        done["command"] = shlex.join(build_command(docker, target, context, tag, base, buildx=True))
        done["message"] = f"docker is not available here: on a machine with docker, run: {done['command']}"
        return done
    if offline:
        base = offline_base(docker, target, log=log)
    buildx = docker.has_buildx()
    if not buildx:
        log("  docker buildx is not installed here: building with the classic builder (`docker build`)")
    done["command"] = shlex.join(build_command(docker, target, context, tag, base, buildx))
    done["builder"] = build_image(docker, target, context, tag, base)
    done["built"] = True
    return done


def main(argv: list[str] | None = None) -> int:
    """python -m edgekit.device.images fetch TARGET...: download the offline base image's inputs into the cache."""
    import argparse

    from edgekit import targets

    p = argparse.ArgumentParser(prog="python -m edgekit.device.images")
    p.add_argument("action", choices=["fetch"])
    p.add_argument("targets", nargs="+")
    args = p.parse_args(argv)
    for target in targets.get(args.targets):
        fetch(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
