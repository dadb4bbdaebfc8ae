"""The reduced VGG16 of SSD: VGG16's convolutions, pool5 3x3 stride 1, atrous fc6 and 1x1 fc7 as convolutions.

Outputs conv4_3 (stride 8, L2-normalised with a learnable per-channel scale) and fc7 (stride 16), the two
feature maps SSD predicts from before its extra layers. ``torchvision_mapping`` loads torchvision's ImageNet VGG16
into it, turning fc6/fc7 into the atrous conv6 and 1x1 conv7 as SSD's authors did; ``torchvision_ssd_mapping``
names the same tensors in torchvision's ``ssd300_vgg16``, whose backbone is this network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_det.models.backbones.pretrained import Mapping

# VGG16's convolution widths; "M" is a 2x2 max pool (ceil mode, so 75 -> 38 at SSD300's third pool).
VGG16_LAYERS: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
POOL4 = VGG16_LAYERS.index("M", VGG16_LAYERS.index(512))  # the pool after conv4_3
#: In torchvision's SSD extractor, the place of fc6 and fc7 (``classifier.0`` and ``.3`` of ImageNet's VGG16) in
#: its block (pool5, fc6, ReLU, fc7, ReLU).
SSD_FC_POSITIONS = {"0": 1, "3": 3}


class L2Norm(nn.Module):
    """Normalise each location's channel vector to unit length, then scale per channel (initially ``scale``).

    conv4_3's activations are much larger than the later layers'; normalising them lets one learning rate suit
    every prediction layer.
    """

    def __init__(self, channels: int, scale: float = 20.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), scale))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1, eps=1e-10) * self.weight.view(1, -1, 1, 1)


def scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded up to a multiple of 8 (``width`` 1.0 is the published network)."""
    return max(8, -(-int(channels * width) // 8) * 8)


def conv_stack(layers: list[int | str], in_channels: int, width: float) -> nn.Sequential:
    modules: list[nn.Module] = []
    for item in layers:
        if item == "M":
            modules.append(nn.MaxPool2d(2, 2, ceil_mode=True))
        else:
            out = scaled(int(item), width)
            modules += [nn.Conv2d(in_channels, out, 3, padding=1), nn.ReLU(inplace=True)]
            in_channels = out
    return nn.Sequential(*modules)


class ReducedVGG16(nn.Module):
    """``forward(images) -> [conv4_3 (L2-normalised), fc7]``; ``out_channels`` = ``[512, 1024]`` x ``width``."""

    def __init__(self, width: float = 1.0, l2_scale: float = 20.0) -> None:
        super().__init__()
        conv4_3, fc = scaled(512, width), scaled(1024, width)
        self.out_channels = [conv4_3, fc]
        self.to_conv4_3 = conv_stack(VGG16_LAYERS[:POOL4], 3, width)
        self.l2_norm = L2Norm(conv4_3, l2_scale)
        self.to_fc7 = nn.Sequential(
            nn.MaxPool2d(2, 2, ceil_mode=True),
            *conv_stack(VGG16_LAYERS[POOL4 + 1 :], conv4_3, width),
            nn.MaxPool2d(3, 1, padding=1),  # pool5: 3x3 stride 1 keeps stride 16
            nn.Conv2d(scaled(512, width), fc, 3, padding=6, dilation=6),  # fc6, atrous
            nn.ReLU(inplace=True),
            nn.Conv2d(fc, fc, 1),  # fc7
            nn.ReLU(inplace=True),
        )

    def forward(self, images: Tensor) -> list[Tensor]:
        conv4_3 = self.to_conv4_3(images)
        return [self.l2_norm(conv4_3), self.to_fc7(conv4_3)]

    def torchvision_mapping(self) -> Mapping:
        """conv1_1 .. conv5_3 take torchvision ``vgg16().features``' convolutions in order; fc6 and fc7 take its
        first two classifier layers, decimated (``fc6_to_conv6``, ``fc7_to_conv7``). The L2 scale keeps its init."""
        ours = [name for name, module in self.named_modules() if isinstance(module, nn.Conv2d)]
        theirs = [f"features.{index}" for index in torchvision_conv_positions(VGG16_LAYERS)]
        theirs += ["classifier.0", "classifier.3"]
        names = {f"{a}.{leaf}": f"{b}.{leaf}" for a, b in zip(ours, theirs, strict=True) for leaf in ("weight", "bias")}
        fc6, fc7 = ours[-2:]
        convert = {
            f"{fc6}.weight": fc6_to_conv6, f"{fc6}.bias": every_fourth_unit,
            f"{fc7}.weight": fc7_to_conv7, f"{fc7}.bias": every_fourth_unit,
        }
        return Mapping(names, convert)

    def torchvision_ssd_mapping(self) -> Mapping:
        """Our tensor names -> those of torchvision's ``SSDFeatureExtractorVGG`` (``ssd300_vgg16().backbone``):
        ``torchvision_mapping``'s ImageNet names moved where that extractor regroups VGG16, and the L2 scale. Its
        fc6 and fc7 are convolutions already, so nothing is converted."""
        names = {ours: ssd_extractor_name(theirs) for ours, theirs in self.torchvision_mapping().names.items()}
        return Mapping({**names, "l2_norm.weight": "scale_weight"})


def torchvision_index(layers: list[int | str], item: int) -> int:
    """Index in torchvision's ``features`` of ``layers[item]``: a convolution and its ReLU take two places, a max
    pool one."""
    return sum(1 if layer == "M" else 2 for layer in layers[:item])


def torchvision_conv_positions(layers: list[int | str]) -> list[int]:
    """Index in torchvision's ``features`` of each convolution."""
    return [torchvision_index(layers, k) for k, item in enumerate(layers) if item != "M"]


def ssd_extractor_name(name: str) -> str:
    """An ImageNet VGG16 tensor name -> its name in torchvision's SSD extractor, which keeps ``features`` up to
    conv4_3 and puts pool4 .. conv5_3's ReLU, then the block (pool5, fc6, ReLU, fc7, ReLU), in ``extra.0``."""
    group, index, leaf = name.split(".")
    pool4 = torchvision_index(VGG16_LAYERS, POOL4)
    if group == "classifier":
        fc_block = torchvision_index(VGG16_LAYERS, len(VGG16_LAYERS)) - pool4
        return f"extra.0.{fc_block}.{SSD_FC_POSITIONS[index]}.{leaf}"
    position = int(index)
    return f"features.{position}.{leaf}" if position < pool4 else f"extra.0.{position - pool4}.{leaf}"


def fc6_to_conv6(weight: Tensor) -> Tensor:
    """VGG16's fc6 ``[4096, 512*7*7]`` -> conv6 ``[1024, 512, 3, 3]``: every 4th output unit, and taps 0, 3, 6
    of the 7x7 window. With pool5 at stride 1 instead of 2, dilation 6 puts those taps where fc6 saw them. Other
    shapes pass through (and are then reported as not fitting)."""
    if weight.shape != (4096, 512 * 7 * 7):
        return weight
    return weight.view(4096, 512, 7, 7)[::4, :, ::3, ::3]


def fc7_to_conv7(weight: Tensor) -> Tensor:
    """VGG16's fc7 ``[4096, 4096]`` -> conv7 ``[1024, 1024, 1, 1]``: every 4th output and every 4th input unit."""
    if weight.shape != (4096, 4096):
        return weight
    return weight[::4, ::4, None, None]


def every_fourth_unit(bias: Tensor) -> Tensor:
    """fc6 / fc7 biases ``[4096]`` -> ``[1024]``, the units the decimated weights keep."""
    return bias[::4] if bias.shape == (4096,) else bias
