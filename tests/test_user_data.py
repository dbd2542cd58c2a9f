"""A user's own data of other shapes goes through the whole build, offline (3-channel images included:
the input shape that makes onnx2tf reach for the internet)."""

import json

import numpy as np
import pytest
from PIL import Image

from edgekit import config, pipeline
from tests.conftest import tiny


def _images(root, size=12):
    rng = np.random.default_rng(0)
    for label, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        (root / label).mkdir(parents=True)
        for i in range(40):
            noise = rng.integers(0, 40, (size, size, 3))
            Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(root / label / f"{i}.png")
    return {"source": "imagefolder", "path": str(root), "image_size": size}


def _signals(root):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 240)
    x = (rng.normal(size=(240, 2, 32)) + y[:, None, None]).astype(np.float32)
    np.savez(root / "sig.npz", x=x, y=y)
    return {"source": "npz", "path": str(root / "sig.npz")}


def _features(root):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 240)
    x = (rng.normal(size=(240, 12)) + np.eye(4, 12)[y] * 3).astype(np.float32)
    np.savez(root / "feat.npz", x=x, y=y)
    return {"source": "npz", "path": str(root / "feat.npz")}


@pytest.mark.parametrize("make_data", [_images, _signals, _features], ids=["rgb-images", "signals-CL", "features-F"])
def test_user_data_builds_offline(tmp_path, no_network, make_data):
    data = make_data(tmp_path) | {"calib_samples": 32}
    cfg = config.from_dict(tiny(data=data, build={"targets": ["x86-64", "rpi5"]}))
    report = pipeline.build(cfg, tmp_path / "build")
    assert no_network == []
    for a in report["artifacts"]:
        assert a["top1_agreement"] >= 0.99, a
    results = json.loads((tmp_path / "build" / "bundles" / "x86-64" / "results.json").read_text())
    assert results["accuracy"] > 0.5
