"""Sensitivity analysis: each layer pruned alone; ratios for prune.use_sensitivity; the CLI writes JSON + PNG."""

import json

import torch

from edgekit import cli, config, data, models, sensitivity
from tests.conftest import tiny


def test_analyse_and_ratios():
    cfg = config.from_dict(tiny(data={"limit": 200}))
    ds = data.load_dataset(cfg)
    model = models.build_model(cfg, ds.sample_shape, ds.num_classes)
    with torch.no_grad():
        model[1][0].weight *= 5  # a layer that dominates: pruning it should hurt most
    result = sensitivity.analyse(model, ds, ratios=(0.5, 0.9))
    assert set(result["layers"]) == {"1.0", "2.0"}  # stem and classifier are protected
    ratios = sensitivity.to_ratios({"layers": {"a": {"0.5": 0.0, "0.9": 0.1}, "b": {"0.5": 0.5, "0.9": 0.6}}})
    assert ratios == {"a": 0.5, "b": 0.0}


def test_cli_writes_json_and_plot(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(tiny(data={"limit": 200}, train={"epochs": 1})))
    assert cli.main(["sensitivity", str(cfg), "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "sensitivity.json").read_text())
    assert saved["layers"] and "layer_ratios" in saved
    assert (tmp_path / "sensitivity.png").stat().st_size > 1000
