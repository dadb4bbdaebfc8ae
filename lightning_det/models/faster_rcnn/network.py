"""The three Faster R-CNN networks: backbone features, anchor layout, and the RoI box head that goes with them.

Built from torchvision parts with random initialisation (nothing is downloaded); ``init_from`` can load weights.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from torch import Tensor, nn
from torchvision.models import mobilenet_v3_large, vgg16
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

VGG_BLOCK_ENDS = (5, 10, 17, 24, 31)  # layer count of torchvision's vgg16().features up to each max-pool


@dataclass
class Network:
    """A backbone returning an ordered dict of feature maps, the names the RoI pooler reads, and the box head
    turning pooled ``[R, C, 7, 7]`` RoIs into ``[R, representation]`` vectors."""

    backbone: nn.Module
    out_channels: int
    roi_feature_names: list[str]
    box_head: nn.Module
    representation: int
    default_anchor_sizes: tuple[tuple[int, ...], ...]


class VGGFeatures(nn.Module):
    """VGG16 conv1_1 .. conv5_3 (stride 16) as the single feature map ``"0"``."""

    def __init__(self, frozen_blocks: int) -> None:
        super().__init__()
        self.body = vgg16(weights=None).features[: VGG_BLOCK_ENDS[-1] - 1]  # drop the last max-pool
        for parameter in self.body[: VGG_BLOCK_ENDS[frozen_blocks - 1] if frozen_blocks else 0].parameters():
            parameter.requires_grad_(False)

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        return OrderedDict([("0", self.body(images))])


def vgg16_fc_head() -> nn.Sequential:
    """fc6 and fc7 of VGG16 (without dropout, as in the reference implementation) as the RoI head."""
    classifier = vgg16(weights=None).classifier
    return nn.Sequential(nn.Flatten(1), classifier[0], nn.ReLU(inplace=True), classifier[3], nn.ReLU(inplace=True))


def mobilenet_v3_fpn(fpn_channels: int) -> BackboneWithFPN:
    """MobileNetV3-Large with an FPN of ``fpn_channels`` on its last two stages (strides 16 and 32) plus a max-pooled
    level (stride 64): torchvision's ``fasterrcnn_mobilenet_v3_large_fpn`` layout with a choosable FPN width."""
    body = mobilenet_v3_large(weights=None, norm_layer=nn.BatchNorm2d).features
    stage_ends = [0] + [i for i, block in enumerate(body) if getattr(block, "_is_cn", False)] + [len(body) - 1]
    return_layers = {str(stage_ends[-2]): "0", str(stage_ends[-1]): "1"}
    in_channels = [body[stage_ends[-2]].out_channels, body[stage_ends[-1]].out_channels]
    return BackboneWithFPN(body, return_layers, in_channels, fpn_channels, extra_blocks=LastLevelMaxPool())


def build_network(name: str, frozen_blocks: int = 2, representation: int = 1024, fpn_channels: int = 256) -> Network:
    """``vgg16`` (conv5_3 + fc6/fc7, ``frozen_blocks`` first conv blocks frozen), ``resnet50_fpn`` (256-channel
    FPN) or ``mobilenet_v3_fpn`` (an FPN of ``fpn_channels``); the FPN ones get a two-layer MLP RoI head of
    width ``representation``."""
    if name == "vgg16":
        return Network(VGGFeatures(frozen_blocks), 512, ["0"], vgg16_fc_head(), 4096, ((128, 256, 512),))
    if name == "resnet50_fpn":
        # Random init trains every stage with ordinary batch norm; frozen BN only makes sense with pretrained weights.
        backbone = resnet_fpn_backbone(
            backbone_name="resnet50", weights=None, trainable_layers=5, norm_layer=nn.BatchNorm2d
        )
        sizes = ((32,), (64,), (128,), (256,), (512,))
        return Network(backbone, 256, ["0", "1", "2", "3"], TwoMLPHead(256 * 49, representation), representation, sizes)
    if name == "mobilenet_v3_fpn":
        sizes = ((32, 64, 128, 256, 512),) * 3
        head = TwoMLPHead(fpn_channels * 49, representation)
        return Network(mobilenet_v3_fpn(fpn_channels), fpn_channels, ["0", "1"], head, representation, sizes)
    raise ValueError(f"unknown Faster R-CNN backbone {name!r}: use vgg16, resnet50_fpn or mobilenet_v3_fpn")
