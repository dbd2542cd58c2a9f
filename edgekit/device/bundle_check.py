"""A bundle checked before it ships: each artifact with the runtime version its target pins (isolated venv, on
this machine), and an aarch64 bundle also under qemu (edgekit.device.emulate). `edgekit check` and the build's check
stage run it."""

from __future__ import annotations

import json
from pathlib import Path

from edgekit.device import emulate as emu
from edgekit.device import runtime_check as rc


def _merge(native: dict, emulated: dict | None) -> dict:
    """The emulated aarch64 check leads when there is one; the x86 check of the same version rides along."""
    if emulated is None:
        return native
    if emulated["ok"] is None:  # nothing ran under qemu for this artifact: the x86 check stands, and says why
        return native | {"emulation_skipped": emulated["skipped"]}
    ok = emulated["ok"] if native["ok"] is not False else False
    return emulated | {"ok": ok, "x86": native}


def verify_bundle(bundle: Path, emulate: bool | None = None, log=print) -> dict:
    """Runtime checks of every artifact of a bundle; for aarch64, also under emulation.

    emulate: True runs the emulated check or raises EmulationUnavailable; None runs it when qemu is here and
    says plainly when it is skipped; False never runs it.
    """
    manifest = json.loads((bundle / "manifest.json").read_text())
    native = rc.check_bundle(bundle, log)
    result = {"target": manifest["target"]["name"], "arch": manifest["target"]["arch"], "emulation": None}
    emulated: dict = {}
    if manifest["target"]["arch"] == "aarch64" and emulate is not False:
        try:
            emulated = emu.verify_bundle(bundle, log)
            ran = any(c["ok"] is not None for c in emulated.values())
            result["emulation"] = {"ran": ran, "qemu": emu.qemu()} if ran else {
                "ran": False, "message": "emulated check skipped: no artifact of this bundle can run on the CPU"}
        except emu.EmulationUnavailable as exc:
            if emulate:
                raise
            said = str(exc) if str(exc).startswith("emulated check skipped") else f"emulated check skipped: {exc}"
            log(f"  [emulate] {result['target']}: {said}")
            result["emulation"] = {"ran": False, "message": said}
    elif emulate:
        result["emulation"] = {"ran": False, "message": f"{result['arch']} bundle: checked natively; emulation "
                                                        f"is for aarch64 bundles"}
    result["artifacts"] = {name: _merge(check, emulated.get(name)) for name, check in native.items()}
    return result
