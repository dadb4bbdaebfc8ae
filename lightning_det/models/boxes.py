"""Box operations every family shares, and the per-image detections type.

Where torchvision computes the same thing (``box_iou``, ``box_convert``, ``BoxCoder``) the families call it;
what is here is what it lacks: IoU over a padded batch, clipping each image's boxes to its own size, and ranks
inside groups of rows written with tensor operations only, so they trace into ONNX.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Per image, ``{"boxes" [N, 4] xyxy, "scores" [N], "labels" [N]}``: what decoding, prediction and the metrics use.
Detections = list[dict[str, Tensor]]

#: Cap on a log-size offset before ``exp`` (torchvision's ``bbox_xform_clip``): a box at most 62.5x its prior.
MAX_LOG_SCALE = math.log(1000.0 / 16)


def pairwise_iou(objects: Tensor, boxes: Tensor) -> Tensor:
    """IoU of each image's ``objects [B, P, 4]`` with the shared ``boxes [N, 4]`` (both xyxy) -> ``[B, P, N]``:
    ``torchvision.ops.box_iou`` for a whole padded batch at once."""
    top_left = torch.maximum(objects[..., None, :2], boxes[:, :2])
    bottom_right = torch.minimum(objects[..., None, 2:], boxes[:, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    area_objects = (objects[..., 2:] - objects[..., :2]).prod(-1)
    area_boxes = (boxes[:, 2:] - boxes[:, :2]).prod(-1)
    return inter / (area_objects[..., None] + area_boxes - inter).clamp(min=1e-9)


def paired_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of the boxes ``a[i]`` and ``b[i]`` (both ``[K, 4]`` xyxy) -> ``[K]``."""
    inter = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0).prod(1)
    union = (a[:, 2:] - a[:, :2]).prod(1) + (b[:, 2:] - b[:, :2]).prod(1) - inter
    return inter / union.clamp(min=1e-9)


def group_sizes(group: Tensor, num_groups: int) -> Tensor:
    """How many rows each group ``0..num_groups-1`` has (``bincount``, in an ONNX-traceable form)."""
    return (group[:, None] == torch.arange(num_groups, device=group.device)).sum(0)


def rank_within_groups(sorted_group: Tensor, sizes: Tensor) -> Tensor:
    """For rows sorted by group, each row's position inside its own group (0, 1, ...): its position in the
    whole list minus where its group starts."""
    return torch.ones_like(sorted_group).cumsum(0) - 1 - (sizes.cumsum(0) - sizes)[sorted_group]


def clip_to_images(boxes: Tensor, image: Tensor, image_sizes: Tensor) -> Tensor:
    """xyxy ``boxes [N, ..., 4]`` of images ``image [N]`` clipped to their image's ``(h, w)`` of ``image_sizes``."""
    height, width = image_sizes[image].to(boxes.dtype).unbind(-1)
    upper = torch.stack((width, height, width, height), -1).view(-1, *[1] * (boxes.dim() - 2), 4)
    return torch.minimum(boxes.clamp(min=0), upper)
