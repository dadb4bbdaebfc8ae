"""torchvision's COCO detectors that a model config here builds exactly: their weights names and configs.

``init_from=torchvision:<weights name>`` loads one whole (``models/weights.py``); the tests in
``tests/test_torchvision_*.py`` show that the config's model then gives torchvision's detections.
"""

from __future__ import annotations

from torchvision.models import detection as torchvision_detection
from torchvision.models import get_model_weights, get_weight, list_models
from torchvision.models._api import WeightsEnum

#: ``init_from=torchvision:<weights name>`` names a torchvision detector's weights, read from torch.hub's cache.
TORCHVISION_PREFIX = "torchvision:"
#: The model config that builds each torchvision COCO detector exactly (docs/recipes.md, "Start from pretrained
#: detectors").
TORCHVISION_CONFIGS = {
    "fasterrcnn_mobilenet_v3_large_fpn": "faster_rcnn_mobilenet_coco",
    "fasterrcnn_mobilenet_v3_large_320_fpn": "faster_rcnn_mobilenet_320_coco",
    "fasterrcnn_resnet50_fpn": "faster_rcnn_r50_fpn_coco",
    "fasterrcnn_resnet50_fpn_v2": "faster_rcnn_r50_fpn_v2_coco",
    "ssd300_vgg16": "ssd300_vgg16_coco",
    "ssdlite320_mobilenet_v3_large": "ssdlite320_coco",
}


def torchvision_weights(name: str) -> tuple[WeightsEnum, str]:
    """``FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1`` -> torchvision's enum member and its builder
    (``fasterrcnn_mobilenet_v3_large_fpn``); anything else is one error listing the names there are."""
    builders = {get_model_weights(b): b for b in list_models(module=torchvision_detection) if b in TORCHVISION_CONFIGS}
    available = ", ".join(f"{TORCHVISION_PREFIX}{enum.__name__}.{member.name}"
                          for enum in builders for member in enum if "COCO" in member.name)
    try:
        weights = get_weight(name)
    except (KeyError, ValueError, AttributeError):
        weights = None
    if weights is None or type(weights) not in builders:
        raise ValueError(f"init_from={TORCHVISION_PREFIX}{name}: not the weights of a torchvision COCO detector this "
                         f"framework builds; use one of {available}")
    return weights, builders[type(weights)]
