"""MobileNetV3-Large from ``torchvision.models`` (random init, no download) cut for SSDLite.

As in SSDLite: the first map is the expansion layer of the first stride-32 block (still at stride 16), the
second the backbone's last layer (stride 32). ``torchvision_mapping`` loads torchvision's ImageNet MobileNetV3-Large
into the regrouped layers.
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn
from torchvision.models import mobilenet_v3_large

from lightning_det.models.backbones.pretrained import Mapping, by_module_names

# SSDLite's batch-norm settings (TensorFlow's defaults expressed in PyTorch terms).
SSDLITE_NORM = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)


class MobileNetV3Features(nn.Module):
    """``forward(images) -> [stride-16 expansion map, stride-32 map]``; ``out_channels`` lists their widths."""

    def __init__(self, width_mult: float = 1.0, reduced_tail: bool = False) -> None:
        super().__init__()
        features = mobilenet_v3_large(
            weights=None, width_mult=width_mult, reduced_tail=reduced_tail, norm_layer=SSDLITE_NORM
        ).features
        stride_32 = [i for i, block in enumerate(features) if getattr(block, "_is_cn", False)][-1]
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
