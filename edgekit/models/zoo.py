"""Edge model zoo (no torchvision): small, well-known architectures for any input size and class count.

Every builder takes (sample_shape, num_classes, *, width, width_mult) and returns an nn.Module whose last
module is the Linear classifier. Downsampling only happens while the feature map is at least 4 wide, so
the same model works on 8x8 digits and on 32x32 or 49x10 spectrograms.

- resnet8:      MLPerf Tiny image classification (3 residual stacks of 16/32/64 channels)
- ds_cnn:       MLPerf Tiny keyword spotting (conv stem, 4 depthwise-separable blocks of 64 channels)
- mobilenet_v1: depthwise-separable stack (Howard et al. 2017), width multiplier
- mobilenet_v2: inverted residuals with linear bottlenecks (Sandler et al. 2018), width multiplier
- small_cnn:    edgekit's default three-block CNN (2-D, 1-D or MLP by input rank)
- conv1d:       1-D conv net for signals (C, L)
- mlp:          feature vectors (F,) or anything flattened
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from edgekit.errors import ModelError

Builder = Callable[..., nn.Module]
REGISTRY: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    def add(fn: Builder) -> Builder:
        if name in REGISTRY:
            raise ValueError(f"model '{name}' is registered twice")
        REGISTRY[name] = fn
        return fn
    return add


def get(name: str) -> Builder:
    if name not in REGISTRY:
        raise ModelError(f"no built-in model '{name}'; valid: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def _ch(c: int, mult: float, divisor: int = 4) -> int:
    """Channels times the width multiplier, rounded to a multiple of `divisor` (at least `divisor`)."""
    return max(divisor, int(c * mult + divisor / 2) // divisor * divisor)


def _need_image(name: str, shape: tuple[int, ...]) -> None:
    if len(shape) != 3:
        raise ModelError(f"model '{name}' takes images (C, H, W); the data has samples of shape {shape}; "
                         f"use conv1d for (C, L), mlp for (F,) or small_cnn")


class _Spatial:
    """Tracks the smallest spatial side to decide whether a stride-2 layer still fits."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.size = min(shape[1:]) if len(shape) > 1 else 1

    def stride(self, wanted: int = 2) -> int:
        if wanted > 1 and self.size >= 4:
            self.size = (self.size + 1) // 2
            return wanted
        return 1


def _cbr(c_in: int, c_out: int, k: int | tuple[int, int] = 3, stride: int = 1, groups: int = 1,
         act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    pad = (k[0] // 2, k[1] // 2) if isinstance(k, tuple) else k // 2
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, pad, groups=groups, bias=False), nn.BatchNorm2d(c_out),
                         act())


class _Head(nn.Sequential):
    def __init__(self, c: int, num_classes: int, pool: type[nn.Module] = nn.AdaptiveAvgPool2d) -> None:
        super().__init__(pool(1), nn.Flatten(), nn.Linear(c, num_classes))


# --- ResNet-8 (MLPerf Tiny) ---------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _cbr(c_in, c_out, 3, stride)
        self.conv2 = nn.Sequential(nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNet8(nn.Module):
    def __init__(self, shape: tuple[int, ...], num_classes: int, mult: float) -> None:
        super().__init__()
        sp = _Spatial(shape)
        c1, c2, c3 = _ch(16, mult), _ch(32, mult), _ch(64, mult)
        self.stem = _cbr(shape[0], c1, 3, 1)
        self.stack1 = BasicBlock(c1, c1, 1)
        self.stack2 = BasicBlock(c1, c2, sp.stride())
        self.stack3 = BasicBlock(c2, c3, sp.stride())
        self.pool, self.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten()
        self.classifier = nn.Linear(c3, num_classes)

    def forward(self, x):
        x = self.stack3(self.stack2(self.stack1(self.stem(x))))
        return self.classifier(self.flatten(self.pool(x)))


@register("resnet8")
def resnet8(shape: tuple[int, ...], num_classes: int, *, width: int = 32, width_mult: float = 1.0) -> nn.Module:
    _need_image("resnet8", shape)
    return ResNet8(shape, num_classes, width_mult)


# --- DS-CNN (MLPerf Tiny keyword spotting) ------------------------------------------------------------------

@register("ds_cnn")
def ds_cnn(shape: tuple[int, ...], num_classes: int, *, width: int = 32, width_mult: float = 1.0) -> nn.Module:
    _need_image("ds_cnn", shape)
    sp, c = _Spatial(shape), _ch(64, width_mult)
    k = (min(10, shape[1]) // 2 * 2 + 1, min(4, shape[2]) // 2 * 2 + 1)  # odd kernel, at most the input
    layers = [_cbr(shape[0], c, k, sp.stride())]
    for _ in range(4):
        layers += [_cbr(c, c, 3, 1, groups=c), _cbr(c, c, 1)]
    return nn.Sequential(*layers, _Head(c, num_classes))


# --- MobileNet V1 / V2 --------------------------------------------------------------------------------------

V1_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)]


@register("mobilenet_v1")
def mobilenet_v1(shape: tuple[int, ...], num_classes: int, *, width: int = 32,
                 width_mult: float = 1.0) -> nn.Module:
    _need_image("mobilenet_v1", shape)
    sp = _Spatial(shape)
    c = _ch(32, width_mult, 8)
    layers = [_cbr(shape[0], c, 3, sp.stride())]
    for out, s in V1_BLOCKS:
        o = _ch(out, width_mult, 8)
        layers += [_cbr(c, c, 3, sp.stride(s), groups=c), _cbr(c, o, 1)]
        c = o
    return nn.Sequential(*layers, _Head(c, num_classes))


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        layers = [_cbr(c_in, hidden, 1, act=nn.ReLU6)] if expand != 1 else []
        layers += [_cbr(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
                   nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


V2_BLOCKS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 2, 2), (6, 96, 1, 1)]  # t, c, n, s


@register("mobilenet_v2")
def mobilenet_v2(shape: tuple[int, ...], num_classes: int, *, width: int = 32,
                 width_mult: float = 1.0) -> nn.Module:
    _need_image("mobilenet_v2", shape)
    sp = _Spatial(shape)
    c = _ch(32, width_mult, 8)
    layers: list[nn.Module] = [_cbr(shape[0], c, 3, sp.stride(), act=nn.ReLU6)]
    for t, out, n, s in V2_BLOCKS:
        o = _ch(out, width_mult, 8)
        for i in range(n):
            layers.append(InvertedResidual(c, o, sp.stride(s) if i == 0 else 1, t))
            c = o
    last = _ch(256, max(1.0, width_mult), 8)
    layers.append(_cbr(c, last, 1, act=nn.ReLU6))
    return nn.Sequential(*layers, _Head(last, num_classes))


# --- small CNN, 1-D conv net, MLP ---------------------------------------------------------------------------

def _conv_block(conv: type[nn.Module], bn: type[nn.Module], c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(conv(c_in, c_out, 3, stride=stride, padding=1, bias=False), bn(c_out), nn.ReLU())


def plain_cnn(sample_shape: tuple[int, ...], num_classes: int, width: int = 32) -> nn.Module:
    """Three conv-BN-ReLU blocks and a linear head; 2-D convs for (C,H,W), 1-D for (C,L), an MLP for (F,)."""
    if len(sample_shape) == 1:
        (f,) = sample_shape
        hidden = width * 2
        return nn.Sequential(nn.Linear(f, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                             nn.Linear(hidden, num_classes))
    if len(sample_shape) not in (2, 3):
        raise ModelError(f"the built-in model takes samples of rank 1-3, got shape {sample_shape}; use model.factory")
    conv, bn, pool = (
        (nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d) if len(sample_shape) == 3
        else (nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d)
    )
    c = sample_shape[0]
    return nn.Sequential(
        _conv_block(conv, bn, c, width, 1),
        _conv_block(conv, bn, width, width * 2, 2),
        _conv_block(conv, bn, width * 2, width * 2, 1),
        pool(1),
        nn.Flatten(),
        nn.Linear(width * 2, num_classes),
    )


@register("small_cnn")
def small_cnn(shape: tuple[int, ...], num_classes: int, *, width: int = 32, width_mult: float = 1.0) -> nn.Module:
    return plain_cnn(shape, num_classes, max(1, round(width * width_mult)))


@register("conv1d")
def conv1d(shape: tuple[int, ...], num_classes: int, *, width: int = 32, width_mult: float = 1.0) -> nn.Module:
    if len(shape) != 2:
        raise ModelError(f"model 'conv1d' takes signals (C, L); the data has samples of shape {shape}")
    sp, c = _Spatial(shape), _ch(width, width_mult)
    chans = [shape[0], c, 2 * c, 2 * c, 4 * c]
    layers = []
    for i, (a, b) in enumerate(zip(chans[:-1], chans[1:], strict=True)):
        s = sp.stride() if i else 1
        layers += [nn.Conv1d(a, b, 5, s, 2, bias=False), nn.BatchNorm1d(b), nn.ReLU()]
    return nn.Sequential(*layers, _Head(chans[-1], num_classes, nn.AdaptiveAvgPool1d))


@register("mlp")
def mlp(shape: tuple[int, ...], num_classes: int, *, width: int = 32, width_mult: float = 1.0) -> nn.Module:
    features = 1
    for d in shape:
        features *= d
    h = _ch(4 * width, width_mult)
    return nn.Sequential(nn.Flatten(), nn.Linear(features, h), nn.BatchNorm1d(h), nn.ReLU(),
                         nn.Linear(h, h // 2), nn.BatchNorm1d(h // 2), nn.ReLU(), nn.Linear(h // 2, num_classes))
