"""Every bad input: exit code 2, one line `edgekit: error: ...`, no traceback, and the folder as it was.

Each case runs the real CLI in a fresh working folder; all but a few fail in the checks that run before the
first stage, so the suite is fast. The folder is compared before and after: names, sizes, mtimes.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from edgekit import cli, config, models, pipeline
from edgekit.errors import BuildDirError

# --- helpers ------------------------------------------------------------------------------------------------


def snapshot(root: Path, dir_mtimes: bool = True) -> dict:
    """Every entry under root: kind, size and mtime (a folder's mtime changes when entries come and go)."""
    found = {}
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        is_dir = path.is_dir() and not path.is_symlink()
        found[str(path.relative_to(root))] = ("dir", st.st_mtime_ns if dir_mtimes else 0) if is_dir else (
            "file", st.st_size, st.st_mtime_ns)
    return found


def refused(capsys, argv: list[str], root: Path, needle: str, dir_mtimes: bool = True) -> str:
    """Run the CLI; assert exit 2, one error line holding `needle`, no traceback, root unchanged."""
    before = snapshot(root, dir_mtimes)
    code = cli.main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("edgekit: error: "), err
    assert "Traceback" not in out + err
    assert needle in lines[0], lines[0]
    assert snapshot(root, dir_mtimes) == before, "the command changed the folder"
    return lines[0]


def npz(path: Path, **arrays: np.ndarray) -> None:
    np.savez(path, **arrays)


def good_arrays(n: int = 60, classes: int = 3) -> dict:
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(n, 4)).astype(np.float32), "y": np.arange(n) % classes}


def npy_bytes(array: np.ndarray | None = None, header: dict | None = None, payload: bytes = b"") -> bytes:
    buf = io.BytesIO()
    if header is None:
        np.save(buf, array)
    else:
        np.lib.format.write_array_header_1_0(buf, header)
        buf.write(payload)
    return buf.getvalue()


HUGE = {"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6)}  # 3.6 TiB if allocated


def huge_npz(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", npy_bytes(header=HUGE, payload=b"\0" * 64))
        zf.writestr("y.npy", npy_bytes(np.zeros(10, np.int64)))


def images(root: Path, per_class: int = 2, classes: tuple[str, ...] = ("cat", "dog")) -> None:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (40 * c, i, 0)).save(root / name / f"{i}.png")


def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def manifest(**changes: object) -> dict:
    base = {"bundle_id": "0123456789abcdef", "primary": "onnx_fp32", "files": {},
            "target": {"name": "x86-64", "arch": "x86_64"}, "artifacts": [{"name": "onnx_fp32", "file": "m.onnx"}]}
    return {k: v for k, v in {**base, **changes}.items() if v is not None}


def write(root: Path, files: dict) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content(path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, dict | list):
            path.write_text(json.dumps(content))
        else:
            path.write_text(content)


def saved_build(root: Path, cfg: str = "train: {epochs: 1}\n") -> None:
    """A build folder as a build that ran a stage leaves it (config.yaml, lock file, a stage)."""
    (root / "c.yaml").write_text(cfg)
    (root / "b" / "stages" / "train").mkdir(parents=True)
    (root / "b" / "config.yaml").write_text(config.dump(config.absolute(config.load(root / "c.yaml"))))
    (root / "b" / pipeline.LOCK_FILE).touch()


BUILD = ["build", "c.yaml", "--out", "out"]
GROUPNORM_NET = """from torch import nn


def make(num_classes, in_channels):
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
"""
BN_AFTER_POOL_NET = """from torch import nn


def make(num_classes):  # a BatchNorm1d between the pooling and the classifier: nothing folds it
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.BatchNorm1d(8), nn.Linear(8, num_classes))
"""

NUMPY_NET = """import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.fc = nn.Linear(64, k)

    def forward(self, x):  # through numpy: the trace records the input as a constant
        return self.fc(torch.from_numpy(x.flatten(1).numpy() * 2.0))


def make(num_classes):
    return Net(num_classes)
"""
BRANCH_NET = """from torch import nn


class Net(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.a, self.b = nn.Linear(64, k), nn.Linear(64, k)

    def forward(self, x):  # a Python branch on the data: the trace keeps the one its example took
        return self.a(x.flatten(1)) if x.shape[0] == 1 else self.b(x.flatten(1))


def make(num_classes):
    return Net(num_classes)
"""
GELU_NET = """from torch import nn


def make(num_classes):  # exact GELU exports Erf, which TFLite has no builtin op for
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.GELU(), nn.Linear(16, num_classes))
"""
POOL_NET = """import torch
from torch import nn


class Pool(nn.Module):  # the same pooling as a functional call: no layer to name
    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x, (3, 3))


def make(num_classes, in_channels):  # the digits' 8x8 pooled to 3x3: torch.onnx exports divisors only
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.AdaptiveAvgPool2d((3, 3)), nn.Flatten(),
                         nn.Linear(36, num_classes))
"""
TARGET_OK = yaml.safe_load((Path(__file__).parents[1] / "targets" / "x86-64.yaml").read_text())


def target(**changes: object) -> str:
    raw = json.loads(json.dumps(TARGET_OK))
    for key, value in changes.items():
        section, _, sub = key.partition(".")
        if sub:
            raw[section][sub] = value
        else:
            raw[section] = value
    return yaml.safe_dump(raw)


# --- the cases: (id, files to write, argv, what the error line says) -------------------------------------

CONFIG_CASES = [
    ("unknown-key", {"c.yaml": "prune: {ratioo: 0.3}\n"}, BUILD, "unknown key 'prune.ratioo'; valid keys:"),
    ("unknown-section", {"c.yaml": "pruning: {}\n"}, BUILD, "unknown section 'pruning'; valid sections:"),
    ("wrong-type", {"c.yaml": "train: {epochs: ten}\n"}, BUILD, "'train.epochs' is 'ten'; expected int"),
    ("epochs-negative", {"c.yaml": "train: {epochs: -1}\n"}, BUILD, "'train.epochs' is out of range (got -1)"),
    ("finetune-negative", {"c.yaml": "prune: {finetune_epochs: -1}\n"}, BUILD, "'prune.finetune_epochs' is out"),
    ("distill-epochs-negative", {"c.yaml": "distill: {epochs: -2}\n"}, BUILD, "'distill.epochs' is out of range"),
    ("qat-epochs-negative", {"c.yaml": "quantize: {qat_epochs: -1}\n"}, BUILD, "'quantize.qat_epochs' is out"),
    ("lr-zero", {"c.yaml": "train: {lr: 0}\n"}, BUILD, "'train.lr' is out of range (got 0)"),
    ("lr-inf", {"c.yaml": "train: {lr: .inf}\n"}, BUILD, "'train.lr' is inf; give a finite number"),
    ("ratio-too-big", {"c.yaml": "prune: {ratio: 1.5}\n"}, BUILD, "'prune.ratio' is out of range"),
    ("limit-zero", {"c.yaml": "data: {limit: 0}\n"}, BUILD, "'data.limit' is out of range (got 0)"),
    ("width-zero", {"c.yaml": "model: {width: 0}\n"}, BUILD, "'model.width' is out of range"),
    ("image-size-negative", {"c.yaml": "data: {image_size: -8}\n"}, BUILD, "'data.image_size' is out of range"),
    # once blamed on the first image ("'imgs/cat/0.png' is not a readable image (height and width must be > 0)")
    ("image-size-zero", {"c.yaml": "data: {path: imgs, image_size: 0}\n", "imgs": lambda p: images(p, 30)}, BUILD,
     "config: 'data.image_size' is out of range (got 0); give 1..4096 pixels a side"),
    ("image-size-huge", {"c.yaml": "data: {path: imgs, image_size: 100000}\n"}, BUILD,
     "config: 'data.image_size' is out of range (got 100000); give 1..4096 pixels a side"),
    ("export-primary-not-shipped", {"c.yaml": "export: {primary: onnx_fp32}\n"}, BUILD + ["--target", "rpi5"],
     "config: export.primary 'onnx_fp32' is not among what rpi5 ships (tflite_int8, tflite_fp32); pick one of those"),
    ("image-size-three-numbers", {"c.yaml": "data: {source: imagefolder, path: imgs, image_size: [8, 8, 8]}\n"},
     BUILD, "'data.image_size' is out of range (got [8, 8, 8])"),
    ("image-size-one-number-listed", {"c.yaml": "data: {source: imagefolder, path: imgs, image_size: [24]}\n"},
     BUILD, "'data.image_size' is out of range (got [24])"),
    ("val-fraction", {"c.yaml": "data: {val_fraction: 0.7}\n"}, BUILD, "'data.val_fraction' is out of range"),
    ("max-below-min-seconds", {"c.yaml": "run: {min_seconds: 5, max_seconds: 1}\n"}, BUILD,
     "'run.max_seconds' is out of range"),
    ("model-name", {"c.yaml": "model: {name: resnet999}\n"}, BUILD, "'model.name' is 'resnet999'; expected one of"),
    ("file-is-a-list", {"c.yaml": "- train\n- prune\n"}, BUILD, "must hold a mapping of sections"),
    ("section-not-mapping", {"c.yaml": "train: 5\n"}, BUILD, "'train' must be a mapping of keys"),
    ("invalid-yaml", {"c.yaml": "train: [epochs: 1\n"}, BUILD, "is not valid YAML at line"),
    ("yaml-python-tag", {"c.yaml": "train: !!python/object/apply:os.system [echo hi]\n"}, BUILD,
     "config file 'c.yaml' holds a Python object tag (!!python/object/apply:os.system) at line 1, which edgekit "
     "never loads (it would run code); write plain values"),
    ("yaml-section-twice", {"c.yaml": "data: {path: d.npz}\ntrain: {epochs: 1}\ntrain: {epochs: 2}\n"}, BUILD,
     "config file 'c.yaml' gives 'train' twice in one mapping (lines 2 and 3)"),
    ("config-missing", {}, BUILD, "config file 'c.yaml' not found"),
    ("config-is-folder", {"c.yaml/x": "a"}, BUILD, "config file 'c.yaml' is a folder"),
    ("config-binary", {"c.yaml": b"\xff\xfe\x00\x01"}, BUILD, "cannot be read (UnicodeDecodeError)"),
    ("targets-empty", {"c.yaml": "build: {targets: []}\n"}, BUILD, "build.targets is empty"),
    ("target-unknown-in-config", {"c.yaml": "build: {targets: [toaster]}\n"}, BUILD, "unknown target 'toaster'"),
    ("target-unknown-option", {"c.yaml": "{}\n"}, [*BUILD, "--target", "toaster"], "unknown target 'toaster'"),
    ("int8-unknown-key", {"c.yaml": "export: {int8: {actvation_type: int8}}\n"}, BUILD,
     "unknown int8 key 'actvation_type'"),
    ("int8-bad-value", {"c.yaml": "export: {int8: {activation_type: int4}}\n"}, BUILD,
     "int8.activation_type is 'int4'; valid: uint8, int8"),
    ("int8-unknown-target", {"c.yaml": "export: {int8: {rpi9: {reduce_range: false}}}\n"}, BUILD,
     "export.int8.rpi9 names no known target; valid targets:"),
    ("int8-bad-preset", {"c.yaml": "export: {int8: {preset: avx9}}\n"}, BUILD, "int8 preset 'avx9' unknown"),
]

DATA_CASES = [
    ("path-without-source-is-users-file", {"c.yaml": "data: {path: d.npz}\n"}, BUILD, "data file"),
    ("path-not-npz-nor-folder", {"c.yaml": "data: {path: d.csv}\n", "d.csv": "1,2\n"}, BUILD,
     "data.path 'd.csv' is neither a .npz file nor a folder"),
    ("digits-with-path", {"c.yaml": "data: {source: digits, path: d.npz}\n"}, BUILD,
     "data.source 'digits' is built in and would ignore it"),
    ("npz-without-path", {"c.yaml": "data: {source: npz}\n"}, BUILD, "needs data.path"),
    ("npz-no-y", {"c.yaml": "data: {path: d.npz}\n", "d.npz": lambda p: npz(p, x=np.zeros((40, 2), np.float32))},
     BUILD, "it needs 'x' (float32) and 'y'"),
    ("npz-unequal-n", {"c.yaml": "data: {path: d.npz}\n",
                       "d.npz": lambda p: npz(p, x=np.zeros((40, 2), np.float32), y=np.zeros(30, int))},
     BUILD, "d.npz': x has 40 samples, y has 30 labels"),
    ("npz-empty", {"c.yaml": "data: {path: d.npz}\n",
                   "d.npz": lambda p: npz(p, x=np.zeros((0, 2), np.float32), y=np.zeros(0, int))},
     BUILD, "d.npz': x and y hold no samples"),
    ("npz-float-labels", {"c.yaml": "data: {path: d.npz}\n",
                          "d.npz": lambda p: npz(p, x=np.zeros((40, 2), np.float32), y=np.full(40, 0.5))},
     BUILD, "integer class ids"),
    ("npz-nan", {"c.yaml": "data: {path: d.npz}\n",
                 "d.npz": lambda p: npz(p, x=np.full((40, 2), np.nan, np.float32), y=np.arange(40) % 2)},
     BUILD, "d.npz': x holds NaN or infinite values in 40 of 40 rows (the first is row 0)"),
    ("labels-with-gap", {"c.yaml": "data: {path: d.npz}\n",
                         "d.npz": lambda p: npz(p, x=np.zeros((80, 2), np.float32), y=np.array([0, 1, 2, 999] * 20))},
     BUILD, "the class ids jump from 2 to 999: no sample has class 3, 4, 5, 6, 7 and 991 more; 4 classes are used"),
    ("labels-skip-one", {"c.yaml": "data: {path: d.npz}\n",
                         "d.npz": lambda p: npz(p, x=np.zeros((110, 2), np.float32),
                                                y=np.r_[np.arange(100) % 10, [11] * 10])},
     BUILD, "the class ids jump from 9 to 11: no sample has class 10"),
    ("labels-negative", {"c.yaml": "data: {path: d.npz}\n",
                         "d.npz": lambda p: npz(p, x=np.zeros((60, 2), np.float32),
                                                y=np.r_[0, 1, 2, -1, np.arange(56) % 3])},
     BUILD, "d.npz': y holds negative class ids in 1 of 60 rows (the first is row 3: -1); class ids run 0..K-1"),
    ("npz-channels-last", {"c.yaml": "data: {path: d.npz}\n",
                           "d.npz": lambda p: npz(p, x=np.zeros((60, 8, 8, 3), np.uint8), y=np.arange(60) % 3)},
     BUILD, "d.npz': x has shape (60, 8, 8, 3), channels last; samples are (C, H, W): save x.transpose(0, 3, 1, 2)"),
    ("single-class", {"c.yaml": "data: {path: d.npz}\n",
                      "d.npz": lambda p: npz(p, x=np.zeros((80, 2), np.float32), y=np.zeros(80, int))},
     BUILD, "every sample is of class 0; a classifier needs samples of at least two classes"),
    ("labels-unused", {"c.yaml": "data: {path: d.npz}\n",
                       "d.npz": lambda p: npz(p, **good_arrays(classes=2), labels=np.array(["a", "b", "c"]))},
     BUILD, "no sample has class c"),
    ("npz-huge-shape", {"c.yaml": "data: {path: d.npz}\n", "d.npz": huge_npz}, BUILD,
     "array 'x' declares shape (1000000, 1000000) (4000000000000 bytes) but holds 192"),
    ("npy-huge-as-npz", {"c.yaml": "data: {source: npz, path: d.npy}\n", "d.npy": npy_bytes(header=HUGE)}, BUILD,
     "is not a .npz archive"),
    ("npy-without-source", {"c.yaml": "data: {path: d.npy}\n", "d.npy": npy_bytes(np.zeros(3))}, BUILD,
     "neither a .npz file nor a folder"),
    ("npz-truncated", {"c.yaml": "data: {path: d.npz}\n",
                       "d.npz": lambda p: (npz(p, **good_arrays()), p.write_bytes(p.read_bytes()[:300]))},
     BUILD, "d.npz' looks truncated or corrupt: it starts as a zip archive but cannot be read to the end"),
    ("npz-pickled-objects", {"c.yaml": "data: {path: d.npz}\n",
                             "d.npz": lambda p: np.savez(p, x=np.array([{"a": 1}] * 40, dtype=object),
                                                         y=np.arange(40) % 2)},
     BUILD, "is not a readable .npz file"),
    ("limit-too-small", {"c.yaml": "data: {limit: 5}\n"}, BUILD,
     "data.limit 5 leaves 5 samples: 3 train, 1 validation, 1 test; each split needs at least 10 train"),
    ("dataset-too-small", {"c.yaml": "data: {path: d.npz}\n", "d.npz": lambda p: npz(p, **good_arrays(n=20))},
     BUILD, "the dataset gives 20 samples"),
    ("imagefolder-missing", {"c.yaml": "data: {source: imagefolder, path: imgs}\n"}, BUILD,
     "image folder"),
    ("npy-folder-without-source", {"c.yaml": "data: {path: d}\n", "d/x.npy": npy_bytes(np.zeros((40, 2), np.float32)),
                                   "d/y.npy": npy_bytes(np.arange(40) % 2)}, BUILD,
     "d' holds .npy files (x.npy, y.npy), not one subfolder of images per class; set data.source: npy"),
    ("idx-folder-without-source", {"c.yaml": "data: {path: d}\n", "d/train-images-idx3-ubyte.gz": b"x"}, BUILD,
     "d' holds IDX files, not one subfolder of images per class; set data.source: idx"),
    ("image-size-for-fashion-mnist", {"c.yaml": "data: {source: fashion-mnist, image_size: 64}\n"}, BUILD,
     "data.image_size is set but data.source 'fashion-mnist' ignores it: only imagefolder resizes images"),
    ("imagefolder-one-class", {"c.yaml": "data: {path: imgs}\n", "imgs": lambda p: images(p, classes=("cat",))},
     BUILD, "has 1 class folder; an ImageFolder needs at least two"),
    ("imagefolder-hidden-folder-is-no-class", {"c.yaml": "data: {path: imgs}\n",
                                               "imgs": lambda p: (images(p, classes=("cat",)),
                                                                  (p / ".ipynb_checkpoints").mkdir())},
     BUILD, "has 1 class folder; an ImageFolder needs at least two"),
    ("npy-folder-missing", {"c.yaml": "data: {source: npy, path: gone}\n"}, BUILD,
     "gone' is not a folder; set it to the folder that holds x.npy and y.npy"),
    ("imagefolder-empty-class", {"c.yaml": "data: {path: imgs}\n",
                                 "imgs": lambda p: (images(p, 30), (p / "empty").mkdir())},
     BUILD, "imgs/empty' holds no images (.bmp, .gif, .jpeg, .jpg, .png, .webp); add images of that class or remove"),
    ("jpeg-corrupt", {"c.yaml": "data: {path: imgs}\n", "imgs": images, "imgs/dog/bad.jpg": os.urandom(300)},
     BUILD, "bad.jpg' is not a readable image"),
    ("jpeg-truncated", {"c.yaml": "data: {path: imgs}\n", "imgs": images, "imgs/cat/cut.jpg": jpeg_bytes()[:700]},
     BUILD, "cut.jpg' is not a readable image (image file is truncated"),
]

MODEL_CASES = [
    ("factory-missing", {"c.yaml": "model: {factory: 'missing.py:make'}\n"}, BUILD, "model.factory file"),
    ("factory-malformed", {"c.yaml": "model: {factory: 'net.py'}\n"}, BUILD, "must look like path/to/file.py:function"),
    ("factory-raises", {"c.yaml": "model: {factory: 'net.py:make'}\n",
                        "net.py": "def make():\n    raise ValueError('no')\n"}, BUILD, "raised ValueError: no"),
    ("factory-not-module", {"c.yaml": "model: {factory: 'net.py:make'}\n", "net.py": "def make():\n    return 3\n"},
     BUILD, "returned int, not a torch.nn.Module"),
    ("factory-signature", {"c.yaml": "model: {factory: 'net.py:make'}\n", "net.py": "def make(n_classes):\n    pass\n"},
     BUILD, "edgekit passes only the arguments it names among num_classes, input_shape, in_channels"),
    ("checkpoint-missing", {"c.yaml": "model: {checkpoint: w.pt}\n"}, BUILD, "w.pt' not found"),
    ("checkpoint-garbage", {"c.yaml": "model: {checkpoint: w.pt}\n", "w.pt": b"not a checkpoint"}, BUILD,
     "w.pt' cannot be read as a torch or safetensors file"),
    ("checkpoint-whole-model", {"c.yaml": "model: {checkpoint: w.pt}\n",
                                "w.pt": lambda p: torch.save(torch.nn.Linear(2, 2), p)}, BUILD,
     "w.pt' holds pickled Python objects (a whole model saved with torch.save(model)?), which edgekit does not "
     "unpickle, as that can run any code; save torch.save(model.state_dict(), path) instead"),
    ("checkpoint-does-not-fit", {"c.yaml": "model: {checkpoint: w.pt}\n",
                                 "w.pt": lambda p: torch.save({"w": torch.zeros(1)}, p)},
     BUILD, "does not fit the model"),
    ("checkpoint-other-class-count", {"c.yaml": "model: {checkpoint: w.pt}\n", "w.pt": lambda p: torch.save(
        models.build_model(config.from_dict({}), (1, 8, 8), 4).state_dict(), p)}, BUILD,
     "weight is shaped for 4 classes, the data has 10: give a checkpoint of a 10-class model, or load these weights "
     "in your model.factory and give it a new classifier for num_classes there"),
    ("teacher-missing", {"c.yaml": "distill: {teachers: [teacher.pt]}\n"}, BUILD, "teacher.pt' not found"),
    ("prune-ignore-unknown", {"c.yaml": "prune: {ignore: [head]}\n"}, BUILD,
     "prune.ignore names 'head', which is not a module of the model; valid:"),
    ("feature-layers-malformed", {"c.yaml": "distill: {losses: [feature], feature_layers: [conv1]}\n"}, BUILD,
     "distill.feature_layers entry 'conv1' must look like teacher_module:student_module"),
    # refused before training (the folder stays as it was), torch's reason cut at its sentence, not in its URL
    ("model-not-exportable", {"c.yaml": "model: {factory: 'net.py:make'}\n", "net.py": POOL_NET}, BUILD,
     "model.factory 'net.py:make' cannot be exported to ONNX (torch.onnx, opset 17), which every artifact starts "
     "from: Unsupported: ONNX export of operator adaptive_avg_pool2d, output size that are not factor of input "
     "size; layer '1' (AdaptiveAvgPool2d) pools 8x8 to 3x3: use an output size that divides 8x8, or "
     "nn.AdaptiveAvgPool2d(1)"),
    ("model-conv2d-on-signals", {"c.yaml": "data: {path: d.npz}\nmodel: {factory: 'net.py:make'}\n",
                                 "net.py": GROUPNORM_NET, "d.npz": lambda p: npz(p, x=np.zeros((80, 2, 64), np.float32),
                                                                                  y=np.arange(80) % 2)},
     BUILD, "samples of shape (2, 64) are read as (channels, length) signals, which need Conv1d layers: for "
            "one-channel images save x as (N, 1, H, W)"),
    ("model-forward-through-numpy", {"c.yaml": "model: {factory: 'net.py:make'}\n", "net.py": NUMPY_NET}, BUILD,
     "model.factory 'net.py:make': the ONNX export does not read its input: forward turns the input into numpy"),
    ("model-forward-branches-on-data", {"c.yaml": "model: {factory: 'net.py:make'}\n", "net.py": BRANCH_NET}, BUILD,
     "model.factory 'net.py:make': the ONNX export computes other outputs than the torch model on the same samples"),
    ("model-batchnorm-after-pooling", {"c.yaml": "model: {factory: 'net.py:make'}\n", "net.py": BN_AFTER_POOL_NET},
     BUILD + ["--target", "x86-64"], "model.factory 'net.py:make' has a BatchNorm (5) that follows no conv or linear "
     "layer (after a pooling or a flatten), so it cannot fold into int8 weights for the ONNX int8 artifacts of "
     "x86-64: move it after a Linear or conv, or remove it"),
    ("model-gelu-for-tflite", {"c.yaml": "model: {factory: 'net.py:make'}\n", "net.py": GELU_NET},
     BUILD + ["--target", "rpi5"], "model.factory 'net.py:make' cannot be converted to TFLite, which rpi5 ships: the "
     "TFLite converter failed: TFLite has no builtin op for TensorFlow's Erf (nn.GELU() exports Erf: use "
     "nn.GELU(approximate='tanh'))"),
    ("model-groupnorm-for-tflite", {"c.yaml": "model: {factory: 'net.py:make'}\n", "net.py": GROUPNORM_NET},
     BUILD + ["--target", "rpi5"], "model.factory 'net.py:make' has layer '1' (GroupNorm), which the TFLite export "
     "(onnx2tf) cannot convert for the TFLite artifacts of rpi5: use BatchNorm2d there, or build for a target whose "
     "profile ships ONNX only"),
    ("search-primary-the-target-lacks", {"c.yaml": "search: {space: {export.primary: [null, tflite_fp32]}}\n"},
     ["search", "c.yaml", "--target", "x86-64", "--out", "s"],
     "config: export.primary 'tflite_fp32' is not among what x86-64 ships"),
    ("model-not-exportable-functional", {"c.yaml": "model: {factory: 'net.py:make'}\n",
                                         "net.py": POOL_NET.replace("nn.AdaptiveAvgPool2d((3, 3))", "Pool()")},
     BUILD, "input size; rewrite that part of the model with ops torch.onnx exports (or try another export.opset)"),
]

OUT_CASES = [
    ("out-is-file", {"c.yaml": "{}\n", "out": "x"}, BUILD, "'out' is a file, not a folder; pick another --out"),
    ("out-under-file", {"c.yaml": "{}\n", "f": "x"}, ["build", "c.yaml", "--out", "f/b"],
     "'f' is a file, not a folder"),
    ("out-not-empty", {"c.yaml": "{}\n", "out/notes.txt": "mine"}, BUILD, "'out' is not empty"),
    ("out-holds-build", {"c.yaml": "{}\n", "out/config.yaml": "{}\n"}, BUILD, "'out' already holds a build"),
    ("resume-missing", {}, ["build", "--resume", "gone"], "--resume 'gone': the folder does not exist; pass the --out"),
    ("resume-file", {"gone": "x"}, ["build", "--resume", "gone"], "--resume 'gone' is a file, not a build folder"),
    ("resume-not-a-build", {"gone/x": "1"}, ["build", "--resume", "gone"], "'gone' has no config.yaml"),
    ("resume-a-search", {"s/config.yaml": "{}\n", "s/trials/x/trial.json": "{}"}, ["build", "--resume", "s"],
     "'s' holds a search, not a build; continue it with `edgekit search --target TARGET --resume --out s`"),
    ("out-holds-search", {"c.yaml": "{}\n", "out/config.yaml": "{}\n", "out/trials/x/trial.json": "{}"}, BUILD,
     "'out' holds a search (edgekit search), not a build; pick another --out"),
    ("resume-changed-config", {"b": lambda p: saved_build(p.parent),
                               "new.yaml": "train: {epochs: 2}\nprune: {ratio: 0.3}\n"},
     ["build", "new.yaml", "--resume", "b"], "the config differs from the one 'b' was built with in train, prune"),
    ("resume-with-other-out", {"b": lambda p: saved_build(p.parent)}, ["build", "--resume", "b", "--out", "c"],
     "--out 'c' and --resume 'b' name different folders"),
    ("sensitivity-out-is-file", {"s": "x"}, ["sensitivity", "--out", "s"], "--out 's' is a file"),
    ("resume-saved-config-broken", {"b/config.yaml": "train: [\n", "b/stages/train/x": "1"},
     ["build", "--resume", "b"], "is not valid YAML"),
]

TARGET_CASES = [
    ("memory-lots", {"t.yaml": target(**{"budgets.memory_mb": "lots"})}, ["targets", "--check", "t.yaml"],
     "budgets.memory_mb is 'lots'; give a number >= 0"),
    ("threads-negative", {"t.yaml": target(threads=-4)}, ["targets", "--check", "t.yaml"],
     "threads is -4; give a whole number of at least 1"),
    ("threads-bool", {"t.yaml": target(threads=True)}, ["targets", "--check", "t.yaml"],
     "wrong type: threads (give a whole number)"),
    ("budget-unknown", {"t.yaml": target(**{"budgets.ram": 3})}, ["targets", "--check", "t.yaml"],
     "unknown budget 'ram'"),
    ("latency-negative", {"t.yaml": target(**{"budgets.latency_ms": -1})}, ["targets", "--check", "t.yaml"],
     "budgets.latency_ms is -1"),
    ("tolerance-negative", {"t.yaml": target(accuracy_tolerance_pp=-1)}, ["targets", "--check", "t.yaml"],
     "accuracy_tolerance_pp is -1"),
    ("tolerance-nan", {"t.yaml": target(accuracy_tolerance_pp=float("nan"))}, ["targets", "--check", "t.yaml"],
     "accuracy_tolerance_pp is nan"),
    ("latency-inf", {"t.yaml": target(**{"budgets.latency_ms": float("inf")})}, ["targets", "--check", "t.yaml"],
     "budgets.latency_ms is inf"),
    ("arch-unknown", {"t.yaml": target(arch="riscv")}, ["targets", "--check", "t.yaml"], "arch 'riscv' unknown"),
    ("target-missing-key", {"t.yaml": "name: x\n"}, ["targets", "--check", "t.yaml"],
     "missing description, arch, python"),
    ("target-not-mapping", {"t.yaml": "[1, 2]\n"}, ["targets", "--check", "t.yaml"], "must hold a mapping"),
    ("target-file-missing", {}, ["targets", "--check", "t.yaml"], "cannot be read as YAML"),
    ("target-file-is-folder", {"t.yaml/x": "1"}, ["targets", "--check", "t.yaml"], "cannot be read as YAML"),
    ("target-file-binary", {"t.yaml": b"\xff\xfe\x00"}, ["targets", "--check", "t.yaml"], "cannot be read as YAML"),
    ("target-key-twice", {"t.yaml": target() + "arch: x86_64\n"}, ["targets", "--check", "t.yaml"],
     "gives 'arch' twice in one mapping"),
    ("target-python-tag", {"t.yaml": "name: !!python/object/apply:os.getcwd []\n"}, ["targets", "--check", "t.yaml"],
     "holds a Python object tag (!!python/object/apply:os.getcwd) at line 1, which edgekit never loads"),
]

BUNDLE_CASES = [
    ("run-missing", {}, ["run", "gone"], "bundle folder 'gone' not found"),
    ("run-tar-gz", {"b.tar.gz": b"\x1f\x8b"}, ["run", "b.tar.gz"], "unpack it (tar xzf b.tar.gz) and pass the folder"),
    ("run-no-manifest", {"b/x": "1"}, ["run", "b"], "'b' is not a bundle (no manifest.json)"),
    ("run-manifest-list", {"b/manifest.json": [1, 2]}, ["run", "b"], "it holds a JSON list, not an object"),
    ("run-manifest-no-artifacts", {"b/manifest.json": manifest(artifacts=None)}, ["run", "b"],
     "'artifacts' is missing or not a JSON list"),
    ("run-manifest-bad-artifact", {"b/manifest.json": manifest(artifacts=[{"x": 1}])}, ["run", "b"],
     "'artifacts' must list objects with a name and a file"),
    ("run-manifest-invalid-json", {"b/manifest.json": "{"}, ["run", "b"], "cannot be read as JSON (JSONDecodeError)"),
    ("run-manifest-binary", {"b/manifest.json": b"\xff\xfe"}, ["run", "b"], "cannot be read as JSON"),
    ("run-threads-negative", {"b/manifest.json": manifest()}, ["run", "b", "--threads", "-4"],
     "--threads is -4; give at least 1"),
    ("run-max-below-min", {"b/manifest.json": manifest()}, ["run", "b", "--min-seconds", "1", "--max-seconds", "0.2"],
     "--max-seconds 0.2 is below --min-seconds 1; the timing stops at --max-seconds"),
    ("run-min-runs-zero", {"b/manifest.json": manifest()}, ["run", "b", "--min-runs", "0"], "--min-runs is 0"),
    ("run-max-seconds-inf", {"b/manifest.json": manifest()}, ["run", "b", "--max-seconds", "inf"],
     "--max-seconds is inf; give a finite number, at least 0"),
    ("run-out-is-folder", {"b/manifest.json": manifest(), "r/x": "1"}, ["run", "b", "--out", "r"],
     "--out 'r' is a folder"),
    ("check-manifest-list", {"b/manifest.json": []}, ["check", "b"], "it holds a JSON list"),
    ("check-missing", {}, ["check", "gone"], "bundle folder 'gone' not found"),
    ("docker-bundle-missing", {}, ["docker", "rpi5", "--bundle", "gone"], "bundle folder 'gone' not found"),
    ("docker-bundle-bad-manifest", {"b/manifest.json": "nope"}, ["docker", "rpi5", "--bundle", "b"],
     "cannot be read as JSON"),
    ("docker-bundle-no-target", {"b/manifest.json": manifest(target=None)}, ["docker", "rpi5", "--bundle", "b"],
     "'target' is missing"),
    ("docker-bundle-tar-gz", {"b.tar.gz": b"\x1f\x8b"}, ["docker", "rpi5", "--bundle", "b.tar.gz"],
     "unpack it (tar xzf b.tar.gz)"),
    ("check-damaged", {"b/manifest.json": manifest(files={"m.onnx": "0" * 64}), "b/m.onnx": "x"}, ["check", "b"],
     "'b': m.onnx does not match its sha256 in manifest.json; the copy is damaged: copy the bundle again"),
    ("docker-bundle-damaged", {"b/manifest.json": manifest(files={"m.onnx": "0" * 64}), "b/m.onnx": "x"},
     ["docker", "x86-64", "--bundle", "b"], "'b': m.onnx does not match its sha256 in manifest.json"),
    ("run-file-missing", {"b/manifest.json": manifest(files={"m.onnx": "0" * 64})}, ["run", "b"],
     "'b': m.onnx is missing from the bundle; copy the whole bundle again"),
    ("report-unfinished-build", {"b/config.yaml": "{}\n", "b/stages/train/model.pt": b"x"}, ["report", "b"],
     "'b' is a build that did not finish (no report.json yet): continue it with `edgekit build --resume b`"),
    ("report-results-not-utf8", {"b/manifest.json": manifest(), "b/results-pi.json": b"\xff\xfe garbage"},
     ["report", "b", "--out", "r.html"], "'b/results-pi.json' cannot be read as JSON (UnicodeDecodeError); write it "
     "again with `edgekit run`, or move it out of the bundle"),
    ("report-results-file-not-utf8", {"r.json": b"\xff\xfe garbage"}, ["report", "r.json", "--out", "r.html"],
     "'r.json' cannot be read as JSON (UnicodeDecodeError); pass a results.json written by `edgekit run`"),
    ("docker-unknown-target", {}, ["docker", "toaster"], "unknown target 'toaster'"),
    ("docker-no-target", {}, ["docker"], "name a target"),
    ("compare-csv-folder", {"r.json": {}, "cmp/x": "1"}, ["compare", "r.json", "--csv", "cmp"],
     "--csv 'cmp' is a folder"),
    ("compare-results-missing", {}, ["compare", "r.json", "--csv", "c.csv"], "'r.json' cannot be read as JSON"),
    ("compare-results-list", {"r.json": []}, ["compare", "r.json", "--csv", "c.csv"], "'r.json' is not a results file"),
    ("compare-results-schema", {"r.json": {"a": 1}}, ["compare", "r.json", "--csv", "c.csv"],
     "'r.json' is not a results file (no latency_ms)"),
    ("debug-not-a-build", {"d/x": "1"}, ["debug", "d", "--artifact", "tflite_int8"], "is not a build directory"),
    ("config-command-bad-key", {"c.yaml": "train: {epoks: 1}\n"}, ["config", "c.yaml"], "unknown key 'train.epoks'"),
]

USAGE_CASES = [
    ("unknown-option", {}, ["build", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    ("missing-argument", {}, ["run"], "the following arguments are required: bundle"),
    ("not-an-int", {}, ["run", "b", "--threads", "four"], "argument --threads: invalid int value: 'four'"),
    ("unknown-command", {}, ["deploy"], "invalid choice: 'deploy'"),
    ("search-two-targets", {}, ["search", "--target", "x86-64", "--target", "rpi5"],
     "edgekit search takes one --target (got x86-64, rpi5); run one search per target"),
    ("search-budget-nan", {}, ["search", "--target", "x86-64", "--budget", "size_kb=nan"],
     "--budget size_kb=nan: give a finite number >= 0"),
]

CASES = CONFIG_CASES + DATA_CASES + MODEL_CASES + OUT_CASES + TARGET_CASES + BUNDLE_CASES + USAGE_CASES


def test_at_least_sixty_cases():
    ids = [c[0] for c in CASES]
    assert len(ids) >= 60 and len(set(ids)) == len(ids)


@pytest.mark.parametrize(("files", "argv", "needle"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(tmp_path, monkeypatch, capsys, files, argv, needle):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, files)
    refused(capsys, argv, tmp_path, needle)


# --- the build folder: locked, left as it was when no stage ran ---------------------------------------------

@pytest.fixture()
def held_lock(tmp_path):
    """Another build holding the lock of tmp_path/b."""
    (tmp_path / "b").mkdir()
    with open(tmp_path / "b" / pipeline.LOCK_FILE, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield tmp_path / "b"


def test_second_build_into_a_locked_folder(tmp_path, monkeypatch, capsys, held_lock):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("{}\n")
    refused(capsys, ["build", "c.yaml", "--out", "b"], tmp_path, "another edgekit build or search is writing into 'b'")


def test_resume_of_a_locked_folder(tmp_path, monkeypatch, capsys, held_lock):
    monkeypatch.chdir(tmp_path)
    saved_build(tmp_path)
    refused(capsys, ["build", "--resume", "b"], tmp_path, "another edgekit build or search is writing into 'b'")


def test_second_build_into_a_folder_a_build_is_writing(tmp_path, monkeypatch, capsys, held_lock):
    """Not "already holds a build; use --resume", which the running build's lock then refuses too."""
    monkeypatch.chdir(tmp_path)
    saved_build(tmp_path)
    line = refused(capsys, ["build", "c.yaml", "--out", "b"], tmp_path,
                   "another edgekit build or search is writing into 'b' (it holds b/.edgekit.lock); wait for it to end "
                   "or pick another --out")
    assert "--resume" not in line


def test_report_of_a_folder_a_build_is_writing(tmp_path, monkeypatch, capsys, held_lock):
    """Not "continue it with edgekit build --resume", which the running build's lock refuses."""
    monkeypatch.chdir(tmp_path)
    saved_build(tmp_path)
    line = refused(capsys, ["report", "b"], tmp_path, "'b' is a build still running (it holds its lock, no "
                   "report.json yet): report it when it has finished")
    assert "--resume" not in line


def test_racing_builds_one_wins(tmp_path):
    """Both pass the checks; the claim (mkdir + flock, then the emptiness check again) lets one through."""
    out = tmp_path / "b"
    with pipeline.claim(out, resume=False) as first:
        with pytest.raises(BuildDirError, match="another edgekit build or search is writing into"):
            with pipeline.claim(out, resume=False):
                pass
        first.started = True
    (out / "config.yaml").write_text("{}\n")
    with pytest.raises(BuildDirError, match="already holds a build"):
        with pipeline.claim(out, resume=False):
            pass
    assert sorted(p.name for p in out.iterdir()) == [pipeline.LOCK_FILE, "config.yaml"]


def test_full_disk_before_the_first_stage_leaves_nothing(tmp_path, monkeypatch, capsys):
    def full(path, payload):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline, "write_bytes", full)
    (tmp_path / "c.yaml").write_text("{}\n")
    line = refused(capsys, [*BUILD], tmp_path, "No space left on device; free some space and build again",
                   dir_mtimes=False)
    assert "out/config.yaml" in line
    assert not (tmp_path / "out").exists()


@pytest.fixture()
def mounted(tmp_path):
    """A tmpfs of our own (root only): mount(options) -> its path."""
    made = []

    def mount(options: str) -> Path:
        path = tmp_path / f"mnt{len(made)}"
        path.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        made.append(path)
        return path

    yield mount
    for path in made:
        subprocess.run(["umount", "--lazy", str(path)], check=False)  # lazy: a failed build may still hold a file


def test_out_on_a_read_only_filesystem(tmp_path, monkeypatch, capsys, mounted):
    ro = mounted("ro,size=64k")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("{}\n")
    refused(capsys, ["build", "c.yaml", "--out", str(ro / "b")], tmp_path, "Read-only file system; pick a writable")
    # the other commands that write a file say so before their work (a measurement, a training), not after it
    for argv in (["run", "b", "--out", str(ro / "r.json")], ["report", "b", "--out", str(ro / "x.html")],
                 ["sensitivity", "c.yaml", "--out", str(ro / "s")], ["compare", "r.json", "--csv", str(ro / "c.csv")],
                 ["check", "b", "--out", str(ro / "check.json")]):
        refused(capsys, argv, tmp_path, f"'{ro}' is not writable (read-only, or no permission); pick a writable path")


def test_out_on_a_full_filesystem(tmp_path, monkeypatch, capsys, mounted):
    full = mounted("size=4k")
    (full / "filler").write_bytes(b"\0" * 4096)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("{}\n")
    refused(capsys, ["build", "c.yaml", "--out", str(full / "b")], tmp_path,
            "No space left on device; free some space and build again", dir_mtimes=False)
    assert sorted(p.name for p in full.iterdir()) == ["filler"]


def test_corrected_rerun_into_the_same_out(tmp_path, monkeypatch, capsys):
    """A build refused before its first stage leaves no config.yaml; the corrected one starts its stages."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("train: {epochs: -1}\n")
    refused(capsys, BUILD, tmp_path, "'train.epochs' is out of range")
    started = []

    def first_stage(ctx, log=print):
        started.append(sorted(p.name for p in ctx.out.iterdir()))
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_stages", first_stage)
    (tmp_path / "c.yaml").write_text("train: {epochs: 1}\n")
    assert cli.main(BUILD) == 130
    assert started == [[pipeline.LOCK_FILE, "config.yaml"]]
    err = capsys.readouterr().err.strip()
    assert err == "edgekit: interrupted; continue with `edgekit build --resume out`"


def test_resume_continues_the_targets_the_build_was_given(tmp_path, monkeypatch, capsys):
    """`--target x86-64` over a config listing two targets, interrupted: `--resume` builds x86-64 only (it built
    every target of the config file)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("build: {targets: [x86-64, rpi5]}\n")
    built_for = []

    def first_stage(ctx, log=print):
        built_for.append([t.name for t in ctx.targets])
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_stages", first_stage)
    assert cli.main(BUILD + ["--target", "x86-64"]) == 130
    assert cli.main(["build", "--resume", "out"]) == 130
    assert built_for == [["x86-64"], ["x86-64"]]
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["build"]["targets"] == ["x86-64"]


def test_an_interrupt_a_library_swallows_still_stops_the_build(tmp_path, monkeypatch, capsys):
    """onnx2tf wraps steps in bare `except:`, which swallowed the KeyboardInterrupt of a SIGTERM and the build ran
    to the end (exit 0): the stop is remembered, and the stage ends unfinished."""
    import signal
    import time

    from edgekit.stages import train

    def swallowing(ctx):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(2)
        except:  # noqa: E722 -- as the library does
            pass
        return {"name": "train"}

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train, "run", swallowing)
    (tmp_path / "c.yaml").write_text("{}\n")
    assert cli.main(BUILD) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "edgekit: interrupted; continue with `edgekit build --resume out`"
    assert (tmp_path / "out" / "stages" / "train").is_dir()
    assert not (tmp_path / "out" / "stages" / "train" / "metrics.json").exists()  # unfinished: resume runs it


def test_sigterm_ends_a_build_as_ctrl_c_does(tmp_path):
    """SIGTERM (timeout, kill, a cancelled CI job) while a stage runs: one line with the resume command, exit 130,
    not a silent exit 143."""
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "c.yaml").write_text("train: {epochs: 50}\n")
    proc = subprocess.Popen([sys.executable, "-m", "edgekit", *BUILD], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "out" / "stages" / "train").is_dir() and time.time() < deadline:
        time.sleep(0.2)  # until the train stage has started
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    # 130, or killed by SIGINT (-2; a shell's $? is 130 either way): once, in CI under load, the process printed
    # this line and then ended by SIGINT; not reproduced, cause not found (CPython ends itself so after a
    # KeyboardInterrupt it counts as unhandled)
    assert proc.returncode in (130, -2) and err.strip().splitlines()[-1] == \
        "edgekit: interrupted; continue with `edgekit build --resume out`", err[-2000:]


def test_interrupt_before_the_build_started_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("{}\n")
    monkeypatch.setattr(pipeline, "_build_in", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    before = snapshot(tmp_path, dir_mtimes=False)
    assert cli.main(BUILD) == 130
    assert capsys.readouterr().err.strip() == "edgekit: interrupted before the build started; nothing was written"
    assert snapshot(tmp_path, dir_mtimes=False) == before


def test_empty_config_says_it_builds_the_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("\n# nothing here\n")
    (tmp_path / "out").write_text("x")
    refused(capsys, BUILD, tmp_path, "'out' is a file")
    cli.main(BUILD)
    out = capsys.readouterr().out
    assert "note: 'c.yaml' holds no settings; building the built-in digits demo" in out


def test_source_follows_from_the_path(tmp_path):
    from edgekit import config, data

    npz(tmp_path / "d.npz", **good_arrays())
    images(tmp_path / "imgs", per_class=30)
    cfg = config.from_dict({"data": {"path": "d.npz"}}, base_dir=tmp_path)
    assert cfg.data.source == "npz" and data.load_dataset(cfg).sample_shape == (4,)
    cfg = config.from_dict({"data": {"path": "imgs", "image_size": 8}}, base_dir=tmp_path)
    assert cfg.data.source == "imagefolder" and data.load_dataset(cfg).labels == ["cat", "dog"]


# --- a few through a real process: nothing but the one line reaches the terminal -----------------------------

SUBPROCESS_CASES = [c for c in CASES if c[0] in ("run-manifest-list", "memory-lots", "npz-huge-shape",
                                                  "compare-csv-folder", "model-not-exportable")]


@pytest.mark.parametrize(("files", "argv", "needle"), [c[1:] for c in SUBPROCESS_CASES],
                         ids=[c[0] for c in SUBPROCESS_CASES])
def test_bad_input_in_a_process(tmp_path, files, argv, needle):
    write(tmp_path, files)
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "edgekit", *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("edgekit: error: ") and needle in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert snapshot(tmp_path) == before


# --- faults while writing and in the runtime ------------------------------------------------------------------

TORCH_ONNX_ERROR = ("Unsupported: ONNX export of operator adaptive_avg_pool2d, output size that are not factor of "
                    "input size. Please feel free to request support or submit a pull request on PyTorch GitHub: "
                    "https://github.com/pytorch/pytorch/issues  [Caused by the value '25 defined in (%25 : Long(2, "
                    "strides=[1], device=cpu) = onnx::Constant[value= 5  5 [ CPULongType{2} ]]()\n)' (type 'Tensor')")


def test_a_library_error_is_cut_at_a_sentence_not_inside_a_url(tmp_path):
    """A stage's one line holds the start of the library's message up to a sentence end, not 200 characters that
    stop in the middle of a URL."""
    from types import SimpleNamespace

    from edgekit.errors import StageFailed, first_line

    def run(ctx):
        raise RuntimeError(TORCH_ONNX_ERROR)

    ctx = SimpleNamespace(stage_dir=lambda name: tmp_path, out=tmp_path)
    with pytest.raises(StageFailed) as err:
        pipeline.run_guarded(SimpleNamespace(name="quantize", run=run), ctx)
    assert ("RuntimeError: Unsupported: ONNX export of operator adaptive_avg_pool2d, output size that are not factor "
            "of input size; traceback in") in str(err.value)
    assert "https" not in str(err.value) and "\n" not in str(err.value)
    long_url = RuntimeError("see https://example.com/" + "a" * 300)  # no sentence end: cut at the last space
    assert first_line(long_url) == "see ..."

def test_full_disk_in_a_stage_says_free_space_and_resume(tmp_path, monkeypatch, capsys, mounted):
    full = mounted("size=16k")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("data: {limit: 200}\ntrain: {epochs: 1}\nbuild: {targets: [x86-64]}\n")
    code = cli.main(["build", "c.yaml", "--out", str(full / "b")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "No space left on device" in err and f"edgekit build --resume {full / 'b'}" in err
    assert not list((full / "b").rglob(".model.pt.*")), "a half-written model file was left behind"


def _reseal(bundle: Path, name: str) -> None:
    """Make the manifest's sha256 match the (damaged) file again: what a damaged original would show."""
    from edgekit.runner import runner

    data = json.loads((bundle / "manifest.json").read_text())
    data["files"][name] = runner.sha256(bundle / name)
    (bundle / "manifest.json").write_text(json.dumps(data))


@pytest.mark.e2e
def test_git_lfs_pointer_is_named(bundle, capsys):
    (bundle / "tflite_int8.tflite").write_text("version https://git-lfs.github.com/spec/v1\n"
                                               "oid sha256:" + "0" * 64 + "\nsize 25000\n")
    code = cli.main(["run", str(bundle), "--artifact", "tflite_int8", "--out", str(bundle / "r.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Git LFS pointer" in err and "git lfs pull" in err


@pytest.mark.e2e
def test_runtime_crash_on_a_matching_file_says_damaged(bundle, capsys):
    path = bundle / "tflite_int8.tflite"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 4])
    _reseal(bundle, path.name)
    code = cli.main(["run", str(bundle), "--artifact", "tflite_int8", "--out", str(bundle / "r.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "crashed" in err and "damaged" in err
