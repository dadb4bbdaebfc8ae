"""The YOLOv3 and YOLOv3-tiny networks: Darknet backbone plus the multi-scale head of ``yolov3.cfg``.

Both return raw predictions per level, smallest stride first, each ``[B, A, H, W, 5 + C]`` holding
``(tx, ty, tw, th, objectness, class logits...)`` per anchor, in the same channel order as Darknet's output
so the reference weights map one to one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_det.models.backbones.darknet import ConvBNAct, Darknet53, DarknetTiny, scaled_channels

# Prior of the Ultralytics initialisation: about 8 objects in a 640 x 640 image, and an uninformed class guess.
PRIOR_OBJECTS_PER_IMAGE = 8
PRIOR_IMAGE_SIZE = 640
PRIOR_CLASS_PROBABILITY = 0.6


class Prediction(nn.Module):
    """The 1x1 prediction conv (with bias, no BN) reshaped to ``[B, A, H, W, 5 + C]``.

    The bias starts at the Ultralytics priors so a from-scratch run does not spend its first epochs pushing
    ten thousand objectness logits down: ``obj = log(8 / (640 / stride)^2)``, ``cls = log(0.6 / (C - 0.99))``.
    """

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, stride: int) -> None:
        super().__init__()
        self.num_anchors = num_anchors
        self.num_outputs = 5 + num_classes
        self.conv = nn.Conv2d(in_channels, num_anchors * self.num_outputs, 1)
        with torch.no_grad():
            bias = self.conv.bias.view(num_anchors, self.num_outputs)
            bias[:, 4] = math.log(PRIOR_OBJECTS_PER_IMAGE / (PRIOR_IMAGE_SIZE / stride) ** 2)
            bias[:, 5:] = math.log(PRIOR_CLASS_PROBABILITY / (num_classes - 0.99))

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        return self.conv(x).view(b, self.num_anchors, self.num_outputs, h, w).permute(0, 1, 3, 4, 2).contiguous()


def five_conv_set(in_channels: int, channels: int) -> nn.Sequential:
    """The head's alternating 1x1 (``channels``) / 3x3 (``2 * channels``) convs, ending on a 1x1."""
    wide = 2 * channels
    return nn.Sequential(
        ConvBNAct(in_channels, channels, 1),
        ConvBNAct(channels, wide, 3),
        ConvBNAct(wide, channels, 1),
        ConvBNAct(channels, wide, 3),
        ConvBNAct(wide, channels, 1),
    )


def lateral(in_channels: int, out_channels: int) -> nn.Sequential:
    """``[route -4]`` + 1x1 conv + nearest ``[upsample] stride=2``: carries coarse context to the next level."""
    return nn.Sequential(ConvBNAct(in_channels, out_channels, 1), nn.Upsample(scale_factor=2, mode="nearest"))


class YOLOv3Network(nn.Module):
    """Darknet-53 and the three-level head of ``yolov3.cfg`` (75 conv layers at ``width=1``)."""

    strides = (8, 16, 32)

    def __init__(
        self, num_classes: int, num_anchors: int = 3, width: float = 1.0, depth: float = 1.0
    ) -> None:
        super().__init__()
        self.backbone = Darknet53(width, depth)
        c8, c16, c32 = self.backbone.out_channels
        head = [scaled_channels(c, width) for c in (128, 256, 512)]  # 1x1 width of each level's conv set
        # Modules are listed coarse to fine (stride 32 first), the order of the cfg.
        self.conv_sets = nn.ModuleList(
            [
                five_conv_set(c32, head[2]),
                five_conv_set(c16 + head[1], head[1]),
                five_conv_set(c8 + head[0], head[0]),
            ]
        )
        self.laterals = nn.ModuleList([lateral(head[2], head[1]), lateral(head[1], head[0])])
        self.outputs = nn.ModuleList(
            [
                nn.Sequential(ConvBNAct(c, 2 * c, 3), Prediction(2 * c, num_anchors, num_classes, stride))
                for c, stride in zip(reversed(head), reversed(self.strides))
            ]
        )

    def forward(self, images: Tensor) -> list[Tensor]:
        c8, c16, c32 = self.backbone(images)
        x32 = self.conv_sets[0](c32)
        x16 = self.conv_sets[1](torch.cat((self.laterals[0](x32), c16), 1))
        x8 = self.conv_sets[2](torch.cat((self.laterals[1](x16), c8), 1))
        return [self.outputs[2](x8), self.outputs[1](x16), self.outputs[0](x32)]


class YOLOv3TinyNetwork(nn.Module):
    """The two-level network of ``yolov3-tiny.cfg`` (13 conv layers at ``width=1``), or with ``levels=3`` the
    three-level one of ``yolov3-tiny_3l.cfg`` (AlexeyAB's Darknet, 16 conv layers): a stride-8 level for small
    objects, fed from the stride-16 level's 3x3 conv and the backbone's stride-8 map."""

    def __init__(self, num_classes: int, num_anchors: int = 3, width: float = 1.0, levels: int = 2) -> None:
        super().__init__()
        if levels not in (2, 3):
            raise ValueError(f"YOLOv3-tiny has 2 or 3 levels, not {levels}")
        self.strides = (8, 16, 32) if levels == 3 else (16, 32)
        self.backbone = DarknetTiny(width)
        c16, c32 = self.backbone.out_channels
        c128, c256, c512 = (scaled_channels(c, width) for c in (128, 256, 512))
        self.neck32 = ConvBNAct(c32, c256, 1)
        self.output32 = nn.Sequential(ConvBNAct(c256, c512, 3), Prediction(c512, num_anchors, num_classes, 32))
        self.lateral = lateral(c256, c128)
        self.output16 = nn.Sequential(
            ConvBNAct(c128 + c16, c256, 3), Prediction(c256, num_anchors, num_classes, 16)
        )
        if levels == 3:
            self.lateral8 = lateral(c256, c128)
            self.output8 = nn.Sequential(
                ConvBNAct(c128 + self.backbone.stride8_channels, c128, 3), Prediction(c128, num_anchors, num_classes, 8)
            )

    def forward(self, images: Tensor) -> list[Tensor]:
        *c8, c16, c32 = self.backbone(images, stride8=len(self.strides) == 3)
        x32 = self.neck32(c32)
        x16 = self.output16[0](torch.cat((self.lateral(x32), c16), 1))
        outputs = [self.output16[1](x16), self.output32(x32)]
        if c8:
            outputs.insert(0, self.output8(torch.cat((self.lateral8(x16), c8[0]), 1)))
        return outputs


def build_network(
    variant: str, num_classes: int, num_anchors: int = 3, width: float = 1.0, depth: float = 1.0
) -> YOLOv3Network | YOLOv3TinyNetwork:
    """``variant``: ``"yolov3"`` (Darknet-53, strides 8/16/32), ``"tiny"`` (strides 16/32) or ``"tiny3"``
    (strides 8/16/32); ``depth`` is used by ``yolov3`` only."""
    if variant == "yolov3":
        return YOLOv3Network(num_classes, num_anchors, width, depth)
    if variant in ("tiny", "tiny3"):
        if depth != 1.0:
            raise ValueError("YOLOv3-tiny has no residual stages to thin: leave depth at 1.0 (use width)")
        return YOLOv3TinyNetwork(num_classes, num_anchors, width, levels=3 if variant == "tiny3" else 2)
    raise ValueError(f"unknown YOLOv3 variant {variant!r}: use 'yolov3', 'tiny' or 'tiny3'")
