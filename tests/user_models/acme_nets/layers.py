from torch import nn


class ConvBNReLU(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())
