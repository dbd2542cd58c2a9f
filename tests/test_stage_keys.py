"""A stage's input key: what --resume checks before it keeps a finished stage."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from edgekit import config, data, pipeline, targets
from edgekit.stages import ORDER, export, keys, prune, quantize, train
from edgekit.stages.base import Context
from tests.conftest import tiny


def _ctx(tmp_path, target_names=("x86-64",), **sections) -> Context:
    cfg = config.from_dict(tiny(data={"limit": 120}, **sections))
    return Context(cfg, data.load_dataset(cfg), tmp_path / "b", targets.get(list(target_names)))


def _key(ctx: Context, stage, upstream: dict | None = None) -> str:
    return keys.key_of(keys.inputs(ctx, stage, upstream or {}))


def test_key_follows_the_config_sections_a_stage_reads(tmp_path):
    base = _ctx(tmp_path)
    assert _key(base, train) == _key(_ctx(tmp_path), train)  # the same inputs, the same key
    later = _ctx(tmp_path, quantize={"qat_epochs": 3})
    assert _key(later, train) == _key(base, train) and _key(later, prune) == _key(base, prune)
    assert _key(later, quantize) != _key(base, quantize)
    assert _key(_ctx(tmp_path, train={"epochs": 3}), train) != _key(base, train)
    from edgekit.stages import bundle  # export.primary orders the bundle only: quantize and export are reused

    first = _ctx(tmp_path, export={"primary": "onnx_fp32"})
    assert _key(first, quantize) == _key(base, quantize) and _key(first, export) == _key(base, export)
    assert _key(first, bundle) != _key(base, bundle)


def test_key_follows_data_targets_upstream_and_libraries(tmp_path, monkeypatch):
    base = _ctx(tmp_path)
    x = base.data.test.x.copy()
    x[0, 0, 0, 0] += 1.0  # one pixel of one test image
    other = dataclasses.replace(base, data=dataclasses.replace(base.data, test=data.Split(x, base.data.test.y)))
    assert _key(other, train) != _key(base, train)
    rpi = _ctx(tmp_path, target_names=("rpi5",))
    assert _key(rpi, train) == _key(base, train) and _key(rpi, export) != _key(base, export)
    assert _key(base, prune, {"train": "a"}) != _key(base, prune, {"train": "b"})
    before = _key(base, train)
    monkeypatch.setattr(keys, "library_versions", lambda: {"torch": "0.0.1"})
    assert _key(base, train) != before
    assert keys.changed(keys.inputs(_ctx(tmp_path), train, {}), keys.inputs(base, train, {})) == []


def test_key_follows_the_model_code(tmp_path):
    factory = tmp_path / "net.py"
    factory.write_text("from torch import nn\n\ndef make(num_classes):\n"
                       "    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))\n")
    ctx = _ctx(tmp_path, model={"factory": f"{factory}:make"})
    before = keys.inputs(ctx, train, {})
    factory.write_text(factory.read_text() + "# edited\n")
    assert keys.changed(before, keys.inputs(ctx, train, {})) == ["model code and checkpoint"]


def test_key_follows_the_code_the_model_imports_and_only_that(tmp_path):
    """A helper in a subpackage beside the factory counts; an unrelated file beside it does not."""
    (tmp_path / "nets").mkdir()
    (tmp_path / "nets" / "__init__.py").write_text("")
    (tmp_path / "nets" / "blocks.py").write_text("from torch import nn\n\ndef act():\n    return nn.ReLU()\n")
    factory = tmp_path / "net2.py"
    factory.write_text("from torch import nn\nfrom nets.blocks import act\n\ndef make(num_classes):\n"
                       "    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes), act())\n")
    ctx = _ctx(tmp_path, model={"factory": f"{factory}:make"})
    before = keys.inputs(ctx, train, {})
    (tmp_path / "notes.py").write_text("print('not part of the model')\n")
    assert keys.changed(before, keys.inputs(ctx, train, {})) == []
    (tmp_path / "nets" / "blocks.py").write_text("from torch import nn\n\ndef act():\n    return nn.ReLU6()\n")
    assert keys.changed(before, keys.inputs(ctx, train, {})) == ["model code and checkpoint"]


def test_key_follows_the_graph_the_factory_builds_from_a_file_it_reads(tmp_path):
    """Hyper-parameters in a JSON beside the factory are not code, but the model they build is: another build
    (a new dataset object, as every build loads one) after the JSON changed gets another key."""
    (tmp_path / "arch.json").write_text('{"act": "relu", "width": 16}')
    factory = tmp_path / "jnet.py"
    factory.write_text("import json\nfrom pathlib import Path\nimport torch\nfrom torch import nn\n\n\n"
                       "class Net(nn.Module):\n"
                       "    def __init__(self, arch, num_classes):\n"
                       "        super().__init__()\n"
                       "        self.act = arch['act']\n"
                       "        width = arch['width']\n"
                       "        self.fc1, self.fc2 = nn.Linear(64, width), nn.Linear(width, num_classes)\n"
                       "\n"
                       "    def forward(self, x):\n"
                       "        return self.fc2(getattr(torch, self.act)(self.fc1(x.flatten(1))))\n\n\n"
                       "def make(num_classes):\n"
                       "    return Net(json.loads((Path(__file__).parent / 'arch.json').read_text()), num_classes)\n")
    before = keys.inputs(_ctx(tmp_path, model={"factory": f"{factory}:make"}), train, {})
    assert keys.inputs(_ctx(tmp_path, model={"factory": f"{factory}:make"}), train, {}) == before
    for arch in ('{"act": "tanh", "width": 16}', '{"act": "relu", "width": 24}'):  # forward only; a shape
        (tmp_path / "arch.json").write_text(arch)
        now = keys.inputs(_ctx(tmp_path, model={"factory": f"{factory}:make"}), train, {})
        assert keys.changed(before, now) == ["model code and checkpoint"], arch


def test_data_fingerprint_reads_a_memory_mapped_split_in_chunks(tmp_path, monkeypatch):
    """A training split left on disk (data.Rows over a memmap) hashes as the same samples in memory do, in
    pieces of any size."""
    import dataclasses

    import numpy as np

    from edgekit import data

    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.integers(0, 255, (200, 8, 8), dtype=np.uint8))
    np.save(tmp_path / "y.npy", rng.integers(0, 3, 200))
    ds = data.load_dataset(config.from_dict({"data": {"source": "npy", "path": str(tmp_path), "calib_samples": 16}}))
    assert isinstance(ds.train.x, data.Rows)
    whole = keys.data_fingerprint(ds)
    in_memory = dataclasses.replace(ds, train=dataclasses.replace(ds.train, x=np.asarray(ds.train.x)))
    assert keys.data_fingerprint(in_memory) == whole
    monkeypatch.setattr(keys, "CHUNK", 64)  # many small pieces: the same digest
    monkeypatch.setattr(keys, "_FINGERPRINTS", {})
    assert keys.data_fingerprint(ds) == whole
    on_disk = np.load(tmp_path / "x.npy", mmap_mode="r+")
    on_disk[ds.train.x.index[0], 0, 0] ^= 1  # one changed byte of a training sample on disk: another digest
    on_disk.flush()
    changed = data.load_dataset(config.from_dict({"data": {"source": "npy", "path": str(tmp_path),
                                                           "calib_samples": 16}}))
    assert keys.data_fingerprint(changed) != whole


def test_resume_runs_again_a_stage_whose_inputs_changed_and_every_stage_after_it(e2e_build, tmp_path):
    out, _ = e2e_build
    copy = tmp_path / "build"
    shutil.copytree(out, copy)
    record_file = copy / "stages" / "bundle" / "metrics.json"
    record = json.loads(record_file.read_text())
    assert set(record) >= {"key", "inputs", "seconds"} and record["key"] == keys.key_of(record["inputs"])
    record["inputs"]["targets"] = "a profile edited since"
    record["key"] = keys.key_of(record["inputs"])
    record_file.write_text(json.dumps(record))
    verify_record = (copy / "stages" / "verify" / "metrics.json").read_text()
    messages = []
    report = pipeline.build(config.load(copy / "config.yaml"), copy, resume=True, log=messages.append)
    assert "[verify] finished earlier, kept (resume)" in messages
    assert "[bundle] finished earlier, running again (its inputs changed since: targets)" in messages
    for later in ORDER[ORDER.index("bundle") + 1:]:
        assert f"[{later}] finished earlier, running again (an earlier stage ran again)" in messages
    assert (copy / "stages" / "verify" / "metrics.json").read_text() == verify_record
    assert json.loads(record_file.read_text())["inputs"]["targets"] != "a profile edited since"
    assert report == json.loads((copy / "report.json").read_text()) and report["artifacts"]


def test_every_stage_declares_the_contract():
    for module in pipeline.STAGES:
        assert module.name in ORDER and callable(module.run) and callable(module.enabled)
        assert all(n in ORDER[:ORDER.index(module.name)] for n in module.needs), module.name
        assert all(s in {f.name for f in dataclasses.fields(config.Config)} | {"targets"} for s in module.reads)
    assert [m.name for m in pipeline.STAGES] == list(ORDER)
    assert np.all([pipeline.stage(n).name == n for n in ORDER])


def _onnx_only_target(tmp_path) -> str:
    import yaml

    raw = yaml.safe_load((targets.TARGETS_DIR / "x86-64.yaml").read_text())
    raw["name"], raw["artifacts"] = "x86-onnx", [{"format": "onnx", "precision": "int8", "runtime": "onnxruntime"},
                                                 {"format": "onnx", "precision": "fp32", "runtime": "onnxruntime"}]
    (tmp_path / "x86-onnx.yaml").write_text(yaml.safe_dump(raw))
    return str(tmp_path / "x86-onnx.yaml")


def test_stage_cache_reuses_stages_with_the_same_inputs_and_only_those(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKIT_STAGE_CACHE", str(tmp_path / "cache"))

    def build(out: str, ratio: float) -> list[str]:
        cfg = config.from_dict(tiny(data={"limit": 160}, train={"epochs": 1},
                                    prune={"ratio": ratio, "finetune_epochs": 1}, distill={"enabled": False},
                                    quantize={"enabled": False},
                                    build={"targets": [_onnx_only_target(tmp_path)], "run_local": False,
                                           "stage_cache": True}))
        said = []
        pipeline.build(cfg, tmp_path / out, log=said.append)
        return said

    build("a", 0.5)
    said = build("b", 0.5)
    for name in ("train", "prune", "export"):
        assert f"[{name}] reused from the stage cache: the same inputs as in {tmp_path / 'a'} " \
               "(build.stage_cache: false builds it again)" in said
        assert json.loads((tmp_path / "b" / "stages" / name / "metrics.json").read_text())["cached_from"] == \
            str(tmp_path / "a")
    assert "[verify] running" in said and "[bundle] running" in said  # they write outside their folder
    for artifact in ("onnx_int8.onnx", "onnx_fp32.onnx"):
        assert (tmp_path / "a" / "bundles" / "x86-onnx" / artifact).read_bytes() == \
            (tmp_path / "b" / "bundles" / "x86-onnx" / artifact).read_bytes()
    said = build("c", 0.25)  # another pruning ratio: the trained model is the same, the pruned one is not
    assert any(line.startswith("[train] reused from the stage cache") for line in said)
    assert "[prune] running" in said and "[export] running" in said


def test_a_full_disk_while_a_stage_comes_from_the_cache_leaves_it_unfinished(tmp_path, monkeypatch):
    """A copy from the stage cache cut short (a full disk) is one line, and leaves no half-copied stage that
    --resume would take as finished: the stage is copied beside its folder, then renamed, its record written last."""
    import errno

    from edgekit.errors import BuildDirError
    from edgekit.stages import cache

    monkeypatch.setenv("EDGEKIT_STAGE_CACHE", str(tmp_path / "cache"))
    cfg = config.from_dict(tiny(data={"limit": 160}, train={"epochs": 1}, prune={"enabled": False},
                                distill={"enabled": False}, quantize={"enabled": False},
                                build={"targets": [_onnx_only_target(tmp_path)], "run_local": False,
                                       "stage_cache": True}))
    pipeline.build(cfg, tmp_path / "a", log=lambda _: None)
    copied, copy2 = [], shutil.copy2

    def full_after_one(src, dest):
        if copied:
            raise OSError(errno.ENOSPC, "No space left on device", str(dest))
        copied.append(copy2(src, dest))

    monkeypatch.setattr(cache.shutil, "copy2", full_after_one)
    with pytest.raises(BuildDirError, match="No space left on device; free some space, then `edgekit build --resume"):
        pipeline.build(cfg, tmp_path / "b", log=lambda _: None)
    assert not (tmp_path / "b" / "stages" / "train" / "metrics.json").exists()
    assert [p.name for p in (tmp_path / "b" / "stages").iterdir()] in ([], ["train"])  # no half copy beside it
    monkeypatch.undo()
    monkeypatch.setenv("EDGEKIT_STAGE_CACHE", str(tmp_path / "cache"))
    said = []
    pipeline.build(cfg, tmp_path / "b", resume=True, log=said.append)
    assert any(line.startswith("[train] reused from the stage cache") for line in said)


def test_two_builds_at_once_compute_a_shared_stage_once(tmp_path):
    """Build A holds the train stage's "being built" lock (stopped by SIGSTOP while it trains); build B, started
    then with the same inputs, waits for it instead of training too, and reuses A's trained model."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    raw = tiny(data={"limit": 160}, train={"epochs": 1}, prune={"enabled": False}, distill={"enabled": False},
               quantize={"enabled": False}, build={"targets": [_onnx_only_target(tmp_path)], "run_local": False,
                                                   "stage_cache": True})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "EDGEKIT_STAGE_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}

    def start(name: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "edgekit", "build", str(tmp_path / "c.yaml"), "--out",
                                 str(tmp_path / name)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env)

    def read_until(proc: subprocess.Popen, text: str, said: list[str]) -> None:
        for line in proc.stdout:
            said.append(line)
            if text in line:
                return
        raise AssertionError(f"'{text}' never came: {''.join(said)[-2000:]}")

    a, b = start("a"), None
    said_a: list[str] = []
    said_b: list[str] = []
    try:
        read_until(a, "[train] running", said_a)
        os.kill(a.pid, signal.SIGSTOP)  # A holds the lock and cannot finish the stage meanwhile
        b = start("b")
        read_until(b, "[train]", said_b)  # B's first train line: waiting, not running
        assert "[train] waiting for another build that is making this stage" in said_b[-1], said_b[-1]
        time.sleep(0.5)
        assert b.poll() is None
    except BaseException:
        for proc in (a, b):
            if proc is not None:
                proc.kill()
        raise
    finally:
        os.kill(a.pid, signal.SIGCONT)
    said_a += a.stdout.readlines()
    said_b += b.stdout.readlines()
    assert a.wait(timeout=600) == 0 and b.wait(timeout=600) == 0, "".join(said_a + said_b)[-3000:]
    assert sum("[train] running" in line for line in said_b) == 0
    assert any(f"[train] reused from the stage cache: the same inputs as in {tmp_path / 'a'}" in line
               for line in said_b)


def test_key_follows_torch_threads_and_not_the_working_folder(tmp_path, monkeypatch):
    """Training on another thread count gives other weights (search trials train on one thread, and best.yaml's
    rebuild must not reuse a stage trained on two); where the build is started from does not count."""
    import torch

    factory = tmp_path / "net.py"
    factory.write_text("from torch import nn\n\ndef make(num_classes):\n"
                       "    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))\n")
    ctx = _ctx(tmp_path, model={"factory": f"{factory}:make"})
    monkeypatch.chdir(tmp_path)  # torch.ops' module says its file is '_ops.py': relative to here, not a file
    here = keys.inputs(ctx, train, {})
    monkeypatch.chdir(tmp_path / "..")
    assert keys.inputs(ctx, train, {}) == here
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert keys.changed(here, keys.inputs(ctx, train, {})) == ["edgekit and libraries"]
    finally:
        torch.set_num_threads(threads)
