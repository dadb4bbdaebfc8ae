"""Darknet backbones of YOLOv3: Darknet-53 and the max-pool stack of YOLOv3-tiny.

Layer for layer the networks of Darknet's ``yolov3.cfg`` and ``yolov3-tiny.cfg`` (at ``width=1``, ``depth=1``),
so the channel layout matches the reference weights. ``width`` and ``depth`` shrink them for tests and quick runs.
"""

from __future__ import annotations

import math

from torch import Tensor, nn


def scaled_channels(channels: int, width: float) -> int:
    """``channels * width`` rounded up to a multiple of 8 (at least 8), so every width keeps SIMD-friendly sizes."""
    return max(8, math.ceil(channels * width / 8) * 8)


def scaled_depth(blocks: int, depth: float) -> int:
    """``blocks * depth`` rounded, at least one block per stage."""
    return max(1, round(blocks * depth))


class ConvBNAct(nn.Sequential):
    """Darknet's ``[convolutional]`` with ``batch_normalize=1``: bias-free conv, BatchNorm, LeakyReLU(0.1)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False),
            # Darknet keeps a slow running average of the batch statistics (its rolling factor is 0.99).
            nn.BatchNorm2d(out_channels, momentum=0.03),
            nn.LeakyReLU(0.1, inplace=True),
        )


class Residual(nn.Module):
    """Darknet-53's block: 1x1 squeeze to half the channels, 3x3 back, then ``[shortcut]`` (add the input)."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.body = nn.Sequential(ConvBNAct(channels, hidden, 1), ConvBNAct(hidden, channels, 3))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class Darknet53(nn.Module):
    """Darknet-53 without its classifier; returns the feature maps at strides 8, 16 and 32.

    A 32-channel stem, then five stages, each a stride-2 3x3 conv followed by 1, 2, 8, 8 and 4 residual blocks.
    """

    stage_channels = (64, 128, 256, 512, 1024)
    stage_blocks = (1, 2, 8, 8, 4)

    def __init__(self, width: float = 1.0, depth: float = 1.0) -> None:
        super().__init__()
        channels = scaled_channels(32, width)
        self.stem = ConvBNAct(3, channels, 3)
        stages = []
        for base_channels, blocks in zip(self.stage_channels, self.stage_blocks):
            out = scaled_channels(base_channels, width)
            hidden = scaled_channels(base_channels // 2, width)
            layers = [ConvBNAct(channels, out, 3, stride=2)]
            layers += [Residual(out, hidden) for _ in range(scaled_depth(blocks, depth))]
            stages.append(nn.Sequential(*layers))
            channels = out
        self.stages = nn.ModuleList(stages)
        self.out_channels = tuple(scaled_channels(c, width) for c in self.stage_channels[-3:])

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features[-3:]


class DarknetTiny(nn.Module):
    """The backbone of YOLOv3-tiny: seven 3x3 convs with max-pools; returns the maps at strides 16 and 32, and
    with ``stride8=True`` also the one at stride 8 (first), which ``yolov3-tiny_3l.cfg`` routes to its third level.

    The sixth pool keeps the resolution (size 2, stride 1, so the 13x13 map of a 416 input stays 13x13). Darknet
    skips the missing right and bottom neighbours; a one-pixel pad of -inf on those sides does exactly that, so
    Darknet weights give Darknet's outputs (a zero pad, as in many ports, differs where a window is negative).
    """

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        c = [scaled_channels(base, width) for base in (16, 32, 64, 128, 256, 512, 1024)]
        layers: list[nn.Module] = [ConvBNAct(3, c[0], 3)]
        for i in range(1, 5):
            layers += [nn.MaxPool2d(2, 2), ConvBNAct(c[i - 1], c[i], 3)]
        self.to_stride16 = nn.Sequential(*layers)
        self.to_stride32 = nn.Sequential(
            nn.MaxPool2d(2, 2),
            ConvBNAct(c[4], c[5], 3),
            nn.ConstantPad2d((0, 1, 0, 1), float("-inf")),
            nn.MaxPool2d(2, 1),
            ConvBNAct(c[5], c[6], 3),
        )
        self.out_channels = (c[4], c[6])
        self.stride8_channels = c[3]

    def forward(self, x: Tensor, stride8: bool = False) -> list[Tensor]:
        # The stride-8 map is the fourth conv's output, before the fourth pool (modules 0-6 of to_stride16).
        at8 = self.to_stride16[:7](x)
        stride16 = self.to_stride16[7:](at8)
        maps = [stride16, self.to_stride32(stride16)]
        return [at8, *maps] if stride8 else maps
