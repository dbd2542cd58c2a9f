"""QAT never compiles NNCF's C++ extension (it timed out after 60 s on a loaded 2-core machine and left a lock
that hung every later build): NNCF's pure-torch reference kernels fake-quantize on the CPU."""

import os
from pathlib import Path

import numpy as np
import torch

from edgekit import metrics, training
from edgekit.data import Split
from edgekit.models.zoo import small_cnn
from edgekit.stages import quantize


def _extension_dir() -> Path:
    return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "nncf" / "quantized_functions_cpu" / torch.__version__


def test_qat_runs_without_compiling_and_despite_a_stale_lock():
    stale = _extension_dir() / "lock"  # what a killed compile leaves behind; torch would wait on it forever
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.touch()
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 96)
    x = (rng.normal(size=(96, 1, 8, 8)) + y[:, None, None, None]).astype(np.float32)
    model = small_cnn((1, 8, 8), 3, width=8)
    qmodel = quantize.calibrate(model, x, 32)
    split = Split(x, y)
    training.fit(qmodel, split, split, epochs=1, lr=1e-3, batch_size=32, desc="qat")
    assert metrics.logits(qmodel, x).shape == (96, 3)
    assert sorted(p.name for p in stale.parent.iterdir()) == ["lock"]  # nothing compiled, nothing waited on



def test_a_library_failure_in_a_stage_is_one_line_naming_stage_and_library(tmp_path, monkeypatch, capsys):
    """A third-party exception inside a stage: `edgekit: error:` naming the stage and the library, exit 2, the
    traceback in the stage's error.log, never on the terminal."""
    import nncf

    from edgekit import cli
    from tests.conftest import tiny

    inside_nncf: dict = {"nncf": nncf}  # a function whose frame lies in NNCF's own file, as a real failure's would
    exec(compile("def quantize(*a, **k):\n    raise nncf.InternalError('simulated failure inside NNCF')\n",
                 nncf.__file__, "exec"), inside_nncf)
    monkeypatch.setattr(nncf, "quantize", inside_nncf["quantize"])
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny(data={"limit": 200, "calib_samples": 32}, train={"epochs": 1},
                                       prune={"enabled": False}, build={"targets": ["x86-64"]})))
    code = cli.main(["build", str(cfg), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("edgekit: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "stage quantize failed in nncf: InternalError: simulated failure inside NNCF" in lines[0]
    log = tmp_path / "b" / "stages" / "quantize" / "error.log"
    assert "Traceback" in log.read_text() and str(log) in lines[0]


def test_a_user_model_failure_names_the_users_file(tmp_path):
    from edgekit import pipeline

    user = tmp_path / "net.py"
    user.write_text("def forward():\n    raise ValueError('bad shape')\n")
    namespace: dict = {}
    exec(compile(user.read_text(), str(user), "exec"), namespace)
    try:
        namespace["forward"]()
    except ValueError as exc:
        assert pipeline.failing_library(exc) == f"your code ({user}:2)"
