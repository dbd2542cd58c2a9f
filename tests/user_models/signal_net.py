"""A 1-D conv net on (C, L) signals, with its own block class."""

from torch import nn


class Conv1dBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, 5, stride, 2, bias=False)
        self.bn = nn.BatchNorm1d(c_out)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class SignalNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(Conv1dBlock(in_channels, 16), Conv1dBlock(16, 32, 2), Conv1dBlock(32, 32))
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.body(x)).flatten(1))


def build(in_channels, num_classes):
    return SignalNet(in_channels, num_classes)
