"""MobileNetV3-Large from ``torchvision.models`` (random init, no download) cut for SSDLite.

As in SSDLite: the first map is the expansion layer of the first stride-32 block (still at stride 16), the
second the backbone's last layer (stride 32). ``torchvision_mapping`` loads torchvision's ImageNet MobileNetV3-Large
into the regrouped layers; ``torchvision_ssdlite_mapping`` names the same tensors in torchvision's
``ssdlite320_mobilenet_v3_large``, whose feature extractor regroups them alike.
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn
from torchvision.models import mobilenet_v3_large

from lightning_det.models.backbones.pretrained import Mapping, by_module_names

# SSDLite's batch-norm settings (TensorFlow's defaults expressed in PyTorch terms).
SSDLITE_NORM = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)


class MobileNetV3Features(nn.Module):
    """``forward(images) -> [stride-16 expansion map, stride-32 map]``; ``out_channels`` lists their widths.

    ``reduced_tail`` halves the channels of the last stage (torchvision's option; its COCO SSDLite has it).
    """

    def __init__(self, width_mult: float = 1.0, reduced_tail: bool = False) -> None:
        super().__init__()
        features = mobilenet_v3_large(
            weights=None, width_mult=width_mult, reduced_tail=reduced_tail, norm_layer=SSDLITE_NORM
        ).features
        stride_32 = [i for i, block in enumerate(features) if getattr(block, "_is_cn", False)][-1]
        self.stride_32_block = stride_32
        expansion, rest = features[stride_32].block[0], features[stride_32].block[1:]
        self.to_stride_16 = nn.Sequential(*features[:stride_32], expansion)
        self.to_stride_32 = nn.Sequential(*rest, *features[stride_32 + 1 :])
        self.out_channels = [expansion.out_channels, features[-1].out_channels]
        # torchvision's name of each regrouped module, so torchvision-format state dicts can be loaded
        source = {id(module): f"features.{name}" for name, module in features.named_modules()}
        self.torchvision_names = {
            name: source[id(module)] for name, module in self.named_modules() if id(module) in source
        }

    def forward(self, images: Tensor) -> list[Tensor]:
        first = self.to_stride_16(images)
        return [first, self.to_stride_32(first)]

    def torchvision_mapping(self) -> Mapping:
        """Each tensor takes the one of torchvision ``mobilenet_v3_large().features`` it was built from."""
        return by_module_names(self, self.torchvision_names)

    def torchvision_ssdlite_mapping(self) -> Mapping:
        """Our tensor names -> those of torchvision's ``SSDLiteFeatureExtractorMobileNet`` (the backbone of
        ``ssdlite320_mobilenet_v3_large``): ``torchvision_mapping``'s ImageNet names regrouped as that extractor
        regroups them."""
        names = self.torchvision_mapping().names
        return Mapping({ours: ssdlite_extractor_name(theirs, self.stride_32_block) for ours, theirs in names.items()})


def ssdlite_extractor_name(name: str, stride_32_block: int) -> str:
    """An ImageNet MobileNetV3 tensor name (``features.<block>.<rest>``) -> its name in torchvision's SSDLite
    extractor: ``features.0`` holds the blocks before the first stride-32 block and that block's expansion layer,
    ``features.1`` the rest of that block (one module, a slice that keeps its layers' names) and the blocks after
    it."""
    _, block, rest = name.split(".", 2)
    offset = int(block) - stride_32_block
    if offset < 0:
        return f"features.0.{block}.{rest}"
    if offset > 0:
        return f"features.1.{offset}.{rest}"
    _, layer, leaf = rest.split(".", 2)  # block.<layer>.<leaf>
    return f"features.0.{block}.{leaf}" if layer == "0" else f"features.1.0.{layer}.{leaf}"
