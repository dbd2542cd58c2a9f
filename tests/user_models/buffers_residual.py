"""Registered buffers (input normalisation) and a custom forward with a residual add."""

import torch
from torch import nn


class Normalize(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.full((1, channels, 1, 1), 0.1))
        self.register_buffer("inv_std", torch.full((1, channels, 1, 1), 1.0 / 0.9))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.inv_std


class ResidualNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int = 24) -> None:
        super().__init__()
        self.norm = Normalize(in_channels)
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv_a = nn.Conv2d(width, width, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(width)
        self.conv_b = nn.Conv2d(width, width, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(self.norm(x))))
        y = torch.relu(self.bn_a(self.conv_a(x)))
        x = torch.relu(x + self.bn_b(self.conv_b(y)))
        return self.fc(x.mean(dim=(2, 3)))


def build(in_channels, num_classes):
    return ResidualNet(in_channels, num_classes)
