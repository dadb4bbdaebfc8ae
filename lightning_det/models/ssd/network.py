"""SSD networks: a backbone giving two maps, extra layers halving the resolution, and per-map prediction heads.

- ``ssd300`` / ``ssd512``: reduced VGG16 (conv4_3 + fc7) and the paper's extra layers (4 for 300, 5 for 512),
  3x3 convolutional heads (torchvision's ``SSDHead``).
- ``ssdlite``: MobileNetV3-Large (two maps) and four depthwise-separable extra blocks, depthwise-separable heads
  (torchvision's ``SSDLiteHead``).
``width`` multiplies every channel count (rounded up to multiples of 8); 1.0 is the published network. The VGG
body and the extra layers get Xavier-uniform weights and zero biases; the heads keep torchvision's init (Xavier for
``SSDHead``), MobileNetV3 its own. ``backbone_weights`` then loads torchvision's ImageNet VGG16 / MobileNetV3-Large
into the backbone (width 1.0 only); batch norm keeps training either way, as in torchvision's SSDLite.

At width 1.0 ``ssd300`` is torchvision's ``ssd300_vgg16`` and ``ssdlite`` with ``reduced_tail`` its
``ssdlite320_mobilenet_v3_large`` (the COCO weights have the reduced tail), layer for layer:
``torchvision_mapping`` names every tensor of the network in torchvision's detector.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from torch import Tensor, nn
from torchvision.models.detection.ssd import SSDHead
from torchvision.models.detection.ssdlite import SSDLiteHead
from torchvision.ops import Conv2dNormActivation

from lightning_det.models.backbones.mobilenet import SSDLITE_NORM, MobileNetV3Features
from lightning_det.models.backbones.pretrained import Mapping, check_published_width, load_torchvision_weights, renamed
from lightning_det.models.backbones.vgg import ReducedVGG16, scaled

# Extra layers of the VGG variants: (1x1 width, 3x3 width, 3x3 stride, 3x3 padding), then SSD512's 4x4 last layer.
VGG_EXTRAS = {
    "ssd300": [(256, 512, 2, 1), (128, 256, 2, 1), (128, 256, 1, 0), (128, 256, 1, 0)],
    "ssd512": [(256, 512, 2, 1), (128, 256, 2, 1), (128, 256, 2, 1), (128, 256, 2, 1), (128, 256, 1, 1)],
}
SSDLITE_EXTRAS = [512, 256, 256, 128]
VARIANTS = ("ssd300", "ssd512", "ssdlite")


def vgg_extras(variant: str, in_channels: int, width: float) -> nn.ModuleList:
    blocks = []
    for k, (reduce, out, stride, padding) in enumerate(VGG_EXTRAS[variant]):
        reduce, out = scaled(reduce, width), scaled(out, width)
        kernel = 4 if variant == "ssd512" and k == len(VGG_EXTRAS[variant]) - 1 else 3
        blocks.append(
            nn.Sequential(
                nn.Conv2d(in_channels, reduce, 1), nn.ReLU(inplace=True),
                nn.Conv2d(reduce, out, kernel, stride=stride, padding=padding), nn.ReLU(inplace=True),
            )
        )
        in_channels = out
    return nn.ModuleList(blocks)


def separable_extra(in_channels: int, out_channels: int) -> nn.Sequential:
    """1x1 reduce to half, 3x3 depthwise stride 2, 1x1 expand: SSDLite's cheap halving block."""
    middle = out_channels // 2
    return nn.Sequential(
        Conv2dNormActivation(in_channels, middle, 1, norm_layer=SSDLITE_NORM, activation_layer=nn.ReLU6),
        Conv2dNormActivation(middle, middle, 3, stride=2, groups=middle, norm_layer=SSDLITE_NORM,
                             activation_layer=nn.ReLU6),
        Conv2dNormActivation(middle, out_channels, 1, norm_layer=SSDLITE_NORM, activation_layer=nn.ReLU6),
    )


class SSDOutputs(NamedTuple):
    loc: Tensor  # [B, N, 4] box offsets from the default boxes
    conf: Tensor  # [B, N, C + 1] class logits, background first
    feature_sizes: list[tuple[int, int]]  # (h, w) of each prediction map, for laying out the default boxes


class SSDNetwork(nn.Module):
    """``forward(images) -> SSDOutputs``: predictions for every default box, in ``priors.py``'s order."""

    def __init__(self, variant: str, num_classes: int, boxes_per_location: Sequence[int], width: float = 1.0,
                 l2_scale: float = 20.0, backbone_weights: str | None = None, reduced_tail: bool = False) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown SSD variant {variant!r}: use one of {', '.join(VARIANTS)}")
        check_published_width(width, backbone_weights)
        check_reduced_tail(variant, reduced_tail, backbone_weights)
        lite = variant == "ssdlite"
        if lite:
            self.backbone: nn.Module = MobileNetV3Features(width, reduced_tail)
            extra_channels = [scaled(out, width) for out in SSDLITE_EXTRAS]
            self.extras = nn.ModuleList(
                separable_extra(c_in, c_out)
                for c_in, c_out in zip([self.backbone.out_channels[-1], *extra_channels], extra_channels)
            )
        else:
            self.backbone = ReducedVGG16(width, l2_scale)
            self.extras = vgg_extras(variant, self.backbone.out_channels[-1], width)
            extra_channels = [scaled(out, width) for _, out, _, _ in VGG_EXTRAS[variant]]
            xavier_init(self.backbone)  # no batch norm in VGG: Xavier keeps a from-scratch start trainable
        xavier_init(self.extras)
        if backbone_weights is not None:
            architecture = "mobilenet_v3_large" if lite else "vgg16"
            mapping = self.backbone.torchvision_mapping()
            load_torchvision_weights(self.backbone, backbone_weights, architecture, mapping)
        channels = [*self.backbone.out_channels, *extra_channels]
        if len(boxes_per_location) != len(channels):
            raise ValueError(
                f"{variant} predicts from {len(channels)} feature maps but the default-box config describes "
                f"{len(boxes_per_location)}: give one aspect-ratio list per map"
            )
        boxes, outputs = list(boxes_per_location), num_classes + 1
        self.head: nn.Module = (
            SSDLiteHead(channels, boxes, outputs, SSDLITE_NORM) if lite else SSDHead(channels, boxes, outputs)
        )

    def torchvision_mapping(self) -> Mapping:
        """Our tensor names -> those of torchvision's ``ssd300_vgg16`` / ``ssdlite320_mobilenet_v3_large``: the
        backbone's own mapping under ``backbone.``, the extra layers in its ``backbone.extra`` (after the VGG
        extractor's conv5 block, which is its first), the heads under the same names."""
        lite = isinstance(self.backbone, MobileNetV3Features)
        backbone = self.backbone.torchvision_ssdlite_mapping() if lite else self.backbone.torchvision_ssd_mapping()
        first_extra = 0 if lite else 1
        prefixes = {f"extras.{k}.": f"backbone.extra.{k + first_extra}." for k in range(len(self.extras))}
        names = {f"backbone.{ours}": f"backbone.{theirs}" for ours, theirs in backbone.names.items()}
        return Mapping(names | renamed(self, {**prefixes, "head.": "head."}).names)

    def forward(self, images: Tensor) -> SSDOutputs:
        features = self.backbone(images)
        for block in self.extras:
            features.append(block(features[-1]))
        outputs = self.head(features)
        sizes = [tuple(f.shape[-2:]) for f in features]
        return SSDOutputs(outputs["bbox_regression"], outputs["cls_logits"], sizes)


def check_reduced_tail(variant: str, reduced_tail: bool, backbone_weights: str | None) -> None:
    """The reduced tail is a MobileNetV3 option, and ImageNet's MobileNetV3 weights have the full one."""
    if reduced_tail and variant != "ssdlite":
        raise ValueError(f"reduced_tail halves MobileNetV3's last stage; {variant} has a VGG backbone: drop it")
    if reduced_tail and backbone_weights is not None:
        raise ValueError("backbone_weights: ImageNet's MobileNetV3-Large has the full tail, but reduced_tail=true; "
                         "set model.reduced_tail=false or drop backbone_weights")


def xavier_init(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
