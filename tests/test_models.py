import pytest
import torch

from edgekit import config, models
from edgekit.errors import ModelError

FACTORY = """
import torch.nn as nn

def make(num_classes, in_channels):
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes))

def broken():
    raise ValueError("no weights here")

def not_a_model():
    return 42
"""


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "net.py"
    path.write_text(FACTORY)
    return path


def test_user_factory_and_checkpoint_round_trip(factory_file, tmp_path):
    cfg = config.from_dict({"model": {"factory": f"{factory_file}:make"}})
    model = models.build_model(cfg, (1, 8, 8), 10)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    cfg2 = config.from_dict({"model": {"factory": f"{factory_file}:make", "checkpoint": str(tmp_path / "w.pt")}})
    loaded = models.build_model(cfg2, (1, 8, 8), 10)
    assert torch.equal(loaded[0].weight, model[0].weight)


def test_safetensors_checkpoint(factory_file, tmp_path):
    from safetensors.torch import save_file

    cfg = config.from_dict({"model": {"factory": f"{factory_file}:make"}})
    model = models.build_model(cfg, (1, 8, 8), 3)
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    ckpt = str(tmp_path / "w.safetensors")
    cfg2 = config.from_dict({"model": {"factory": f"{factory_file}:make", "checkpoint": ckpt}})
    assert torch.equal(models.build_model(cfg2, (1, 8, 8), 3)[3].bias, model[3].bias)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("{f}:broken", "raised ValueError: no weights here"),
        ("{f}:not_a_model", "returned int, not a torch.nn.Module"),
        ("{f}:missing", "has no function 'missing'"),
        ("nofile.py:make", "not found"),
        ("{f}", "must look like path/to/file.py:function"),
        ("no_such_pkg.nets:make", "not found on sys.path"),
    ],
)
def test_factory_errors(factory_file, spec, needle):
    cfg = config.from_dict({"model": {"factory": spec.format(f=factory_file)}})
    with pytest.raises(ModelError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        models.build_model(cfg, (1, 8, 8), 10)


def test_checkpoint_that_does_not_fit(factory_file, tmp_path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "bad.pt")
    cfg = config.from_dict({"model": {"factory": f"{factory_file}:make", "checkpoint": str(tmp_path / "bad.pt")}})
    with pytest.raises(ModelError, match="does not fit the model"):
        models.build_model(cfg, (1, 8, 8), 10)


def test_wrong_input_shape_is_reported():
    cfg = config.from_dict({})
    with pytest.raises(ModelError, match="rank 1-3"):
        models.build_model(cfg, (1, 2, 8, 8), 10)


@pytest.mark.parametrize("shape", [(1, 8, 8), (2, 16), (6,)])
def test_small_cnn_any_rank(shape):
    model = models.build_model(config.from_dict({"model": {"width": 4}}), shape, 5)
    assert model(torch.zeros(3, *shape)).shape == (3, 5)


def test_checkpoint_in_a_training_wrapper_loads(factory_file, tmp_path):
    """{'model': state_dict, 'epoch': 3} and DDP's 'module.' prefix are how people save; both load."""
    cfg = config.from_dict({"model": {"factory": f"{factory_file}:make"}})
    model = models.build_model(cfg, (1, 8, 8), 10)
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "a.pt")
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "b.pt")
    for name in ("a.pt", "b.pt"):
        cfg2 = config.from_dict({"model": {"factory": f"{factory_file}:make", "checkpoint": str(tmp_path / name)}})
        assert torch.equal(models.build_model(cfg2, (1, 8, 8), 10)[0].weight, model[0].weight)


def test_a_checkpoint_that_does_not_fit_names_the_keys(factory_file, tmp_path):
    cfg = config.from_dict({"model": {"factory": f"{factory_file}:make"}})
    state = models.build_model(cfg, (1, 8, 8), 10).state_dict()
    torch.save({("head." + k if k.startswith("0.") else k): v for k, v in state.items()}, tmp_path / "c.pt")
    cfg2 = config.from_dict({"model": {"factory": f"{factory_file}:make", "checkpoint": str(tmp_path / "c.pt")}})
    with pytest.raises(ModelError, match=r"2 of the model's keys missing \(0.bias, 0.weight\); 2 keys the model "
                                         r"does not have \(head.0.bias, head.0.weight\)") as err:
        models.build_model(cfg2, (1, 8, 8), 10)
    assert "\n" not in str(err.value)


BUFFERED = """
import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self, num_classes, channels=4):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, channels, 3), nn.BatchNorm2d(channels)
        self.register_buffer("scale", torch.ones(1), persistent=False)  # not in a state_dict, in edgekit's model.pt
        self.fc = nn.Linear(channels, num_classes)
        self.head = self.fc  # one module under two names: edgekit's model.pt holds it once, a state_dict twice

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean((2, 3)) * self.scale)


def make(num_classes):
    return Net(num_classes)


def pruned(num_classes):
    return Net(num_classes, channels=3)
"""


def test_a_model_pt_an_edgekit_build_saved_is_a_checkpoint(tmp_path):
    """A build's stages/train/model.pt (edgekit's own format) restarts a build from its trained weights; a pruned
    stage's model.pt cannot (the factory builds the unpruned shapes): one line naming the file to use."""
    (tmp_path / "net.py").write_text(BUFFERED)
    trained = models.build_model(config.from_dict({"model": {"factory": f"{tmp_path}/net.py:make"}}), (1, 8, 8), 4)
    with torch.no_grad():
        trained.conv.weight.add_(1.0)
        trained.bn.running_mean.fill_(0.5)
    models.save_model(trained, tmp_path / "train" / "model.pt")
    cfg = config.from_dict({"model": {"factory": f"{tmp_path}/net.py:make",
                                      "checkpoint": str(tmp_path / "train" / "model.pt")}})
    loaded = models.build_model(cfg, (1, 8, 8), 4)
    for name, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    pruned = models.build_model(config.from_dict({"model": {"factory": f"{tmp_path}/net.py:pruned"}}), (1, 8, 8), 4)
    models.save_model(pruned, tmp_path / "prune" / "model.pt")
    cfg = config.from_dict({"model": {"factory": f"{tmp_path}/net.py:make",
                                      "checkpoint": str(tmp_path / "prune" / "model.pt")}})
    with pytest.raises(ModelError) as err:
        models.build_model(cfg, (1, 8, 8), 4)
    assert str(err.value) == (
        f"checkpoint '{tmp_path}/prune/model.pt' does not fit the model: an edgekit build saved it for other shapes "
        "(conv.weight is (3, 1, 3, 3), the model's (4, 1, 3, 3)): a pruned stage's model.pt, or a build of another "
        "model config; model.checkpoint gives weights to the unpruned model this config builds: use "
        "stages/train/model.pt of a build with this model config")


def test_a_checkpoint_for_another_number_of_classes_says_so(factory_file, tmp_path):
    """A 10-class checkpoint on 4-class data: not torch's 'size mismatch for 3.weight ...'."""
    cfg = config.from_dict({"model": {"factory": f"{factory_file}:make"}})
    torch.save(models.build_model(cfg, (1, 8, 8), 10).state_dict(), tmp_path / "w10.pt")
    cfg = config.from_dict({"model": {"factory": f"{factory_file}:make", "checkpoint": str(tmp_path / "w10.pt")}})
    with pytest.raises(ModelError) as err:
        models.build_model(cfg, (1, 8, 8), 4)
    assert str(err.value) == (
        f"checkpoint '{tmp_path}/w10.pt' does not fit the model: its 3.weight is shaped for 10 classes, the data has "
        "4: give a checkpoint of a 4-class model, or load these weights in your model.factory and give it a new "
        "classifier for num_classes there")
