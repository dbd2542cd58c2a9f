#!/usr/bin/env bash
# System packages the test suite uses, installed only when missing (needs root and apt):
# OpenSSH (the SSH tests start their own sshd on 127.0.0.1), Docker's engine (the image tests start their own
# dockerd with the vfs driver on a socket of their own), QEMU user mode (arm64 bundles and images under
# emulation), apt's arm64 keyring + dpkg-deb (the emulated Pi check unpacks a Debian arm64 sysroot), and
# Fashion-MNIST's original IDX files (data.source: fashion-mnist).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
need=()
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
[ -x /usr/bin/qemu-aarch64-static ] || need+=(qemu-user-static)
[ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
command -v dpkg-deb >/dev/null 2>&1 || need+=(dpkg)
[ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] || need+=(dataset-fashion-mnist)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ "${#need[@]}" -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "make test needs these system packages: ${need[*]} (install them as root with apt-get)" >&2
    exit 1
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}"
