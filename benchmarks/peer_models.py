"""MobileNetV2-style nets for benchmarks/peers.py, kept here so the benchmark needs nothing from edgekit.models.

`mobilenet_v2(width=0.35, num_classes=1000)` is the torchvision MobileNetV2 layout (Sandler et al. 2018):
3x3 stem, inverted residual blocks (expand 1x1, depthwise 3x3, project 1x1, residual Add where shapes
match), ReLU6, a 1x1 to 1280 channels, global average pool and a linear head. `small=True` drops the stem's
and the 24-channel stage's downsampling (the usual CIFAR layout), for 32x32 inputs.
"""

from __future__ import annotations

from torch import nn

# expansion t, channels c, repeats n, stride s of the first repeat
BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
          (6, 320, 1, 1))


def _divisible(v: float, d: int = 8) -> int:
    new = max(d, int(v + d / 2) // d * d)
    return new + d if new < 0.9 * v else new


def _conv_bn(c_in: int, c_out: int, k: int, stride: int, groups: int = 1, act: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(c_out)]
    return layers + [nn.ReLU6(inplace=True)] if act else layers


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        layers = _conv_bn(c_in, hidden, 1, 1) if expand != 1 else []
        layers += _conv_bn(hidden, hidden, 3, stride, groups=hidden) + _conv_bn(hidden, c_out, 1, 1, act=False)
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


def mobilenet_v2(width: float = 0.35, num_classes: int = 1000, in_channels: int = 3, small: bool = False,
                 last_channels: int = 1280) -> nn.Module:
    stem = _divisible(32 * width)
    layers: list[nn.Module] = [*_conv_bn(in_channels, stem, 3, 1 if small else 2)]
    c_in = stem
    for i, (t, c, n, s) in enumerate(BLOCKS):
        c_out = _divisible(c * width)
        for j in range(n):
            stride = s if j == 0 and not (small and i == 1) else 1
            layers.append(InvertedResidual(c_in, c_out, stride, t))
            c_in = c_out
    last = max(last_channels, _divisible(last_channels * width)) if width > 1 else last_channels
    layers += _conv_bn(c_in, last, 1, 1)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(last, num_classes))
