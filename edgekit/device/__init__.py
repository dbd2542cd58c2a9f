"""Running bundles the way the devices will: here (measure), with each target's pinned runtime in an isolated venv
(runtime_check), under qemu for aarch64 (emulate), both before a bundle ships (bundle_check), on a device over SSH
(remote) and in a Docker image (images); manifest reads a bundle's manifest and files."""
