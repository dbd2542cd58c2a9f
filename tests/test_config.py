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
        # upper bounds, with the range in the error: 100 000 took 5.8 GB in PIL's resize; 1e20 epochs ran forever
        ({"data": {"source": "imagefolder", "path": "d", "image_size": 100000}},
         "config: 'data.image_size' is out of range (got 100000); give 1..4096 pixels a side (N, or [height, width])"),
        ({"data": {"source": "imagefolder", "path": "d", "image_size": [64, 5000]}}, "(got [64, 5000]); give 1..4096"),
        ({"data": {"source": "imagefolder", "path": "d", "image_size": 0}},
         "'data.image_size' is out of range (got 0)"),
        ({"data": {"source": "imagefolder", "path": "d", "image_size": [0, 8]}}, "'data.image_size' is out of range"),
        ({"train": {"epochs": 10**20}}, "'train.epochs' is out of range (got 100000000000000000000); give 0..10000"),
        ({"quantize": {"qat_epochs": 10001}}, "'quantize.qat_epochs' is out of range (got 10001); give 0..10000"),
        ({"export": {"opset": 5}}, "config: 'export.opset' is out of range (got 5); give 13..21 (per-channel int8 "
         "needs opset 13"),
        ({"export": {"opset": 22}}, "'export.opset' is out of range (got 22); give 13..21"),
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


def test_the_ends_of_each_range_are_accepted():
    for raw in ({"export": {"opset": 13}}, {"export": {"opset": 21}}, {"train": {"epochs": 10_000}},
                {"data": {"source": "imagefolder", "path": "d", "image_size": [1, 4096]}}):
        config.from_dict(raw)


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


@pytest.mark.parametrize(("text", "needle"), [
    # refused by the safe loader, which is right, but was called a syntax error
    ("train: {epochs: 1}\nprune: !!python/object/apply:os.system [echo hi]\n",
     "holds a Python object tag (!!python/object/apply:os.system) at line 2, which edgekit never loads (it would run "
     "code); write plain values (numbers, text, lists, mappings)"),
    ("train: !!python/name:os.system\n", "holds a Python object tag (!!python/name:os.system) at line 1"),
    ("train: !epochs 3\n", "holds a YAML tag (!epochs) at line 1, which edgekit does not load"),
    # PyYAML keeps the last of a key given twice, silently: the first section was dropped
    ("train: {epochs: 1}\nprune: {ratio: 0.3}\ntrain:\n  lr: 0.1\n",
     "gives 'train' twice in one mapping (lines 1 and 3); YAML would keep the last silently: give it once"),
    ("train:\n  lr: 0.1\n  epochs: 3\n  lr: 0.2\n", "gives 'lr' twice in one mapping (lines 2 and 4)"),
])
def test_tags_and_duplicate_keys_are_named(tmp_path, text, needle):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError) as err:
        config.load(tmp_path / "c.yaml")
    assert str(err.value).startswith(f"config file '{tmp_path / 'c.yaml'}' ") and needle in str(err.value)
    assert "\n" not in str(err.value)


def test_a_merge_key_may_be_overridden(tmp_path):
    """`<<: *base` and a key beside it is YAML's way to override, not a key given twice."""
    (tmp_path / "c.yaml").write_text("train: &t {lr: 0.01, epochs: 2}\ndistill: {<<: *t, lr: 0.002}\n")
    cfg = config.load(tmp_path / "c.yaml")
    assert (cfg.distill.epochs, cfg.distill.lr, cfg.train.lr) == (2, 0.002, 0.01)
