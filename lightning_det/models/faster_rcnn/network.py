"""The Faster R-CNN networks: backbone features, anchor layout, and the RoI box head that goes with them.

Built from torchvision parts with random initialisation; ``backbone_weights`` loads torchvision's ImageNet VGG16 /
ResNet-50 / MobileNetV3-Large (a file, or a weights name from torch.hub's cache), ``init_from`` any other weights.
With ImageNet weights the FPN backbones take torchvision's fine-tuning layout (``pretrained_layout``): frozen batch
norm (``FrozenBatchNorm2d``: the statistics and affine of ImageNet stay fixed, as small detection batches would
estimate them badly) and the first stages frozen (ResNet-50: conv1 and layer1; MobileNetV3: all but the last three
stages). Without weights every layer trains with ordinary batch norm. ``resnet50_fpn_v2`` (torchvision's
``fasterrcnn_resnet50_fpn_v2``) keeps ordinary batch norm in both layouts, in its FPN and box head too.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from torch import Tensor, nn
from torchvision.models import mobilenet_v3_large, resnet50, vgg16
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor, resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, TwoMLPHead
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from lightning_det.models.backbones.pretrained import check_published_width, load_torchvision_weights, renamed

VGG_BLOCK_ENDS = (5, 10, 17, 24, 31)  # layer count of torchvision's vgg16().features up to each max-pool
TRAINABLE_STAGES = 3  # torchvision's default for fine-tuning an ImageNet ResNet / MobileNet in a detector
RESNET_ANCHOR_SIZES = ((32,), (64,), (128,), (256,), (512,))  # one size per FPN level, strides 4 to 64
# Per backbone: the torchvision network its ImageNet weights come from, and how its tensor names map onto ours
# (the VGG16 box head is fc6/fc7, the classifier's first two layers).
TORCHVISION_SOURCES = {
    "vgg16": ("vgg16", {"backbone.body.": "features.", "box_head.1.": "classifier.0.", "box_head.3.": "classifier.3."}),
    "resnet50_fpn": ("resnet50", {"backbone.body.": ""}),
    "resnet50_fpn_v2": ("resnet50", {"backbone.body.": ""}),
    "mobilenet_v3_fpn": ("mobilenet_v3_large", {"backbone.body.": "features."}),
}


@dataclass
class Network:
    """A backbone returning an ordered dict of feature maps, the names the RoI pooler reads, the box head
    turning pooled ``[R, C, 7, 7]`` RoIs into ``[R, representation]`` vectors, and the number of 3x3 convolutions
    of the RPN head (torchvision's ``conv_depth``)."""

    backbone: nn.Module
    out_channels: int
    roi_feature_names: list[str]
    box_head: nn.Module
    representation: int
    default_anchor_sizes: tuple[tuple[int, ...], ...]
    rpn_conv_depth: int = 1


class VGGFeatures(nn.Module):
    """VGG16 conv1_1 .. conv5_3 (stride 16) as the single feature map ``"0"``."""

    def __init__(self, features: nn.Sequential, frozen_blocks: int) -> None:
        super().__init__()
        self.body = features[: VGG_BLOCK_ENDS[-1] - 1]  # drop the last max-pool
        for parameter in self.body[: VGG_BLOCK_ENDS[frozen_blocks - 1] if frozen_blocks else 0].parameters():
            parameter.requires_grad_(False)

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        return OrderedDict([("0", self.body(images))])


def vgg16_fc_head(classifier: nn.Sequential) -> nn.Sequential:
    """fc6 and fc7 of VGG16 (without dropout, as in the reference implementation) as the RoI head."""
    return nn.Sequential(nn.Flatten(1), classifier[0], nn.ReLU(inplace=True), classifier[3], nn.ReLU(inplace=True))


def mobilenet_v3_fpn(
    fpn_channels: int, pretrained_layout: bool = False, width: float = 1.0, frozen_bn_eps: float = 1e-5
) -> BackboneWithFPN:
    """MobileNetV3-Large (channels times ``width``) with an FPN of ``fpn_channels`` on its last two stages (strides
    16 and 32) plus a max-pooled level (stride 64): torchvision's ``fasterrcnn_mobilenet_v3_large_fpn`` layout with
    a choosable backbone and FPN width."""
    norm = backbone_norm(pretrained_layout, frozen_bn_eps)
    body = mobilenet_v3_large(weights=None, norm_layer=norm, width_mult=width).features
    stage_ends = [0] + [i for i, block in enumerate(body) if getattr(block, "_is_cn", False)] + [len(body) - 1]
    if pretrained_layout:
        body[: stage_ends[-TRAINABLE_STAGES]].requires_grad_(False)
    return_layers = {str(stage_ends[-2]): "0", str(stage_ends[-1]): "1"}
    in_channels = [body[stage_ends[-2]].out_channels, body[stage_ends[-1]].out_channels]
    return BackboneWithFPN(body, return_layers, in_channels, fpn_channels, extra_blocks=LastLevelMaxPool())


def backbone_norm(pretrained_layout: bool, frozen_bn_eps: float) -> Callable[..., nn.Module]:
    """The batch norm of the FPN backbones: frozen with ``frozen_bn_eps`` in the pretrained layout (torchvision's
    COCO ResNet-50 FPN weights, from Detectron, expect 0), else trained."""
    return partial(FrozenBatchNorm2d, eps=frozen_bn_eps) if pretrained_layout else nn.BatchNorm2d


def resnet50_fpn_v2(pretrained_layout: bool, representation: int) -> Network:
    """torchvision's ``fasterrcnn_resnet50_fpn_v2`` network: ResNet-50 and an FPN with ordinary batch norm, a
    two-convolution RPN head, and a box head of four 3x3 convolutions (batch norm) and one fully connected layer
    of width ``representation`` (torchvision: 1024)."""
    trainable = TRAINABLE_STAGES if pretrained_layout else 5
    backbone = _resnet_fpn_extractor(resnet50(weights=None), trainable, norm_layer=nn.BatchNorm2d)
    head = FastRCNNConvFCHead((256, 7, 7), [256, 256, 256, 256], [representation], norm_layer=nn.BatchNorm2d)
    return Network(backbone, 256, ["0", "1", "2", "3"], head, representation, RESNET_ANCHOR_SIZES, rpn_conv_depth=2)


def build_network(
    name: str,
    frozen_blocks: int = 2,
    representation: int = 1024,
    fpn_channels: int = 256,
    backbone_weights: str | None = None,
    pretrained_layout: bool = False,
    width: float = 1.0,
    frozen_bn_eps: float = 1e-5,
) -> Network:
    """``vgg16`` (conv5_3 + fc6/fc7, ``frozen_blocks`` first conv blocks frozen), ``resnet50_fpn`` (256-channel
    FPN), ``resnet50_fpn_v2`` (torchvision's v2: batch norm in the FPN, a convolutional box head) or
    ``mobilenet_v3_fpn`` (an FPN of ``fpn_channels``, the MobileNet's channels times ``width``); the FPN ones get an
    RoI head of width ``representation`` (a two-layer MLP; v2: convolutions and one layer). ``backbone_weights``:
    ImageNet weights; ``pretrained_layout``: the layout that goes with them (see the module docstring), its frozen
    batch norm with ``frozen_bn_eps``."""
    if name not in TORCHVISION_SOURCES:
        raise ValueError(f"unknown Faster R-CNN backbone {name!r}: use one of {', '.join(TORCHVISION_SOURCES)}")
    if width != 1.0 and name != "mobilenet_v3_fpn":
        raise ValueError(f"width={width}: only the mobilenet_v3_fpn backbone has a channel multiplier; set width=1.0")
    check_published_width(width, backbone_weights)
    network = network_of(name, frozen_blocks, representation, fpn_channels, pretrained_layout, width, frozen_bn_eps)
    if backbone_weights is not None:
        architecture, prefixes = TORCHVISION_SOURCES[name]
        parts = nn.ModuleDict({"backbone": network.backbone, "box_head": network.box_head})
        load_torchvision_weights(parts, backbone_weights, architecture, renamed(parts, prefixes))
    return network


def network_of(
    name: str, frozen_blocks: int, representation: int, fpn_channels: int, pretrained_layout: bool, width: float,
    frozen_bn_eps: float,
) -> Network:
    if name == "vgg16":
        vgg = vgg16(weights=None)
        head = vgg16_fc_head(vgg.classifier)
        return Network(VGGFeatures(vgg.features, frozen_blocks), 512, ["0"], head, 4096, ((128, 256, 512),))
    if name == "resnet50_fpn_v2":
        return resnet50_fpn_v2(pretrained_layout, representation)
    if name == "resnet50_fpn":
        backbone = resnet_fpn_backbone(
            backbone_name="resnet50",
            weights=None,
            trainable_layers=TRAINABLE_STAGES if pretrained_layout else 5,
            norm_layer=backbone_norm(pretrained_layout, frozen_bn_eps),
        )
        head = TwoMLPHead(256 * 49, representation)
        return Network(backbone, 256, ["0", "1", "2", "3"], head, representation, RESNET_ANCHOR_SIZES)
    sizes = ((32, 64, 128, 256, 512),) * 3
    head = TwoMLPHead(fpn_channels * 49, representation)
    backbone = mobilenet_v3_fpn(fpn_channels, pretrained_layout, width, frozen_bn_eps)
    return Network(backbone, fpn_channels, ["0", "1"], head, representation, sizes)
