import pytest
import yaml

from edgekit import config
from edgekit.errors import ConfigError


def test_default_config_round_trips():
    text = config.default_yaml()
    assert config.from_dict(yaml.safe_load(text)) == config.Config()
    for section in ("data", "model", "train", "prune", "distill", "quantize", "export", "run", "build"):
        assert f"{section}:" in text
    assert "  method: l1  # l1 | slimming | taylor | random | magnitude\n" in text  # the choices, listed
    assert "  targets:  # " in text and "x86-64" in text.split("  targets:  # ")[1].splitlines()[0]


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"prune": {"metod": "l1"}}, "unknown key 'prune.metod'; valid keys: enabled, method"),
        ({"pruning": {}}, "unknown section 'pruning'; valid sections: data, model"),
        ({"train": {"epochs": "ten"}}, "'train.epochs' is 'ten'; expected int"),
        ({"prune": {"method": "magic"}}, "expected one of 'l1'"),
        ({"train": {"epochs": True}}, "'train.epochs' is True"),
        ({"prune": {"ratio": 1.5}}, "'prune.ratio' is out of range"),
        ({"prune": {"ratio": 0.95}}, "'prune.ratio' is 0.95, over 0.9: channel pruning keeps at least 10%"),
        ({"data": {"source": "npz"}}, "needs data.path"),
        ({"data": {"source": "fashion-mnist", "image_size": 64}}, "config: data.image_size is set but data.source "
         "'fashion-mnist' ignores it: only imagefolder resizes images; the other sources keep their samples' size; "
         "remove data.image_size"),
        ({"data": {"source": "digits", "image_size": 16}}, "data.source 'digits' ignores it"),
        ({"data": {"source": "npy", "path": "d", "grayscale": True}}, "only imagefolder converts images"),
        ({"data": {"source": "digits", "copies": 2}}, "only digits32 makes augmented copies"),
        ({"train": {"lr": float("inf")}}, "config: 'train.lr' is inf; give a finite number"),  # passed '> 0'
        ({"prune": {"ratio": float("-inf")}}, "config: 'prune.ratio' is -inf; give a finite number"),
        ({"search": {"refine": float("nan")}}, "config: 'search.refine' is nan; give a finite number"),
    ],
)
def test_bad_config_names_key_and_valid_choices(raw, needle):
    with pytest.raises(ConfigError) as err:
        config.from_dict(raw)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("source", ["digits", "digits32", "fashion-mnist", "imagefolder", "npy"])
def test_source_keys_shown_as_the_source_reads_them(source):
    """A key the source reads shows its value (the default when not set), one it ignores null; either way the
    dumped config (a build folder's config.yaml, which --resume loads) loads back to the same config."""
    cfg = config.from_dict({"data": {"source": source, **({"path": "d"} if source in ("imagefolder", "npy") else {})}})
    shown = yaml.safe_load(config.dump(cfg))["data"]
    assert (shown["image_size"], shown["grayscale"]) == ((32, False) if source == "imagefolder" else (None, None))
    assert shown["copies"] == (3 if source == "digits32" else None)
    assert config.from_dict(yaml.safe_load(config.dump(cfg))) == cfg
    assert "  image_size: null  # imagefolder only (32 when not set); N or [height, width]\n" in config.default_yaml()


def test_int_accepted_for_float_and_paths_resolved(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("distill: {temperature: 2}\ndata: {source: npz, path: d.npz}\n")
    cfg = config.load(path)
    assert cfg.distill.temperature == 2
    assert config.absolute(cfg).data.path == str(tmp_path / "d.npz")


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [epochs: 1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(bad)
