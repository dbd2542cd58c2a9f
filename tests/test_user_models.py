"""Models written the way users write them (their own classes, local classes, a package on sys.path, buffers
and a residual forward, 1-D signals) go through the whole build to both int8 formats, and every stage's model
file is plain tensors that load with torch.load(weights_only=True)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from edgekit import config, pipeline
from tests.conftest import tiny

HERE = Path(__file__).parent / "user_models"
CASES = {  # id -> (model.factory, sample shape)
    "module-classes": (f"{HERE}/module_classes.py:build", (1, 8, 8)),
    "local-classes": (f"{HERE}/local_classes.py:build", (1, 8, 8)),
    "package-on-sys-path": ("acme_nets.vision:tiny_net", (1, 8, 8)),
    "buffers-residual": (f"{HERE}/buffers_residual.py:build", (2, 8, 8)),
    "signals-CL": (f"{HERE}/signal_net.py:build", (2, 32)),
}


def _data(path: Path, shape: tuple[int, ...]) -> dict:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = rng.normal(size=(300, *shape)).astype(np.float32) + y.reshape(-1, *[1] * len(shape)).astype(np.float32)
    np.savez(path, x=x, y=y)
    return {"source": "npz", "path": str(path), "calib_samples": 32}


@pytest.mark.parametrize("case", list(CASES))
def test_user_model_builds_to_both_int8_formats(case, tmp_path, monkeypatch, no_network):
    factory, shape = CASES[case]
    monkeypatch.syspath_prepend(str(HERE))
    cfg = config.from_dict(tiny(data=_data(tmp_path / "d.npz", shape), model={"factory": factory},
                                train={"epochs": 3}, prune={"finetune_epochs": 1}, distill={"epochs": 1},
                                build={"targets": ["x86-64"], "run_local": False,
                                       "allow_fidelity_miss": True}))  # the gate is tested elsewhere
    out = tmp_path / "build"
    report = pipeline.build(cfg, out)
    assert no_network == []
    shipped = {a["name"]: a for a in report["artifacts"]}
    assert {"onnx_int8", "tflite_int8"} <= set(shipped)
    for name in ("onnx_int8", "tflite_int8"):
        assert shipped[name]["top1_agreement"] >= 0.9, shipped[name]
    pruned = torch.load(out / "stages" / "prune" / "model.pt", weights_only=True)
    assert all(isinstance(t, torch.Tensor) for t in pruned["tensors"].values())
    trained = torch.load(out / "stages" / "train" / "model.pt", weights_only=True)
    assert sum(t.numel() for t in pruned["tensors"].values()) < sum(t.numel() for t in trained["tensors"].values())


def test_pruned_user_model_round_trips_in_a_fresh_process(tmp_path):
    """A pruned model with classes local to its factory is saved as plain tensors and rebuilt, in a new process,
    to the same outputs (what --resume and every later stage do)."""
    import subprocess
    import sys

    from edgekit import models
    from edgekit.stages import prune

    cfg = config.from_dict({"model": {"factory": f"{HERE}/local_classes.py:build"}})
    model = models.build_model(cfg, (1, 8, 8), 3)
    prune.prune_model(model, (1, 8, 8), 3, prune.Plan(method="l1", ratio=0.5))
    models.save_model(model.eval(), tmp_path / "model.pt")
    x = torch.randn(4, 1, 8, 8)
    torch.save(model(x).detach(), tmp_path / "expected.pt")
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import torch; from pathlib import Path; from edgekit import config, models\n"
        f"d = Path({str(tmp_path)!r})\n"
        f"cfg = config.from_dict({{'model': {{'factory': {cfg.model.factory!r}}}}})\n"
        "m = models.load_model(cfg, (1, 8, 8), 3, d / 'model.pt')\n"
        "got = m(torch.load(d / 'x.pt'))\n"
        "torch.testing.assert_close(got, torch.load(d / 'expected.pt'))\n"
        "print(m.features.body[4].out_channels)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) == model.features.body[4].out_channels < 32


def test_a_changed_model_is_refused_on_load(tmp_path):
    from edgekit import models
    from edgekit.errors import ModelError

    cfg = config.from_dict({"model": {"factory": f"{HERE}/module_classes.py:build"}})
    models.save_model(models.build_model(cfg, (1, 8, 8), 3), tmp_path / "model.pt")
    other = config.from_dict({"model": {"factory": f"{HERE}/local_classes.py:build"}})
    with pytest.raises(ModelError, match="does not have; the model code changed"):
        models.load_model(other, (1, 8, 8), 3, tmp_path / "model.pt")
