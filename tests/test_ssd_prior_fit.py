"""SSD's default-box scales checked against the training boxes, refitted only where they miss them."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import box_convert, box_iou

from lightning_det.data.records import AnnotationRecord
from lightning_det.models.ssd import SSD
from lightning_det.models.ssd.prior_fit import class_recalls, square_resized_boxes
from lightning_det.models.ssd.priors import DefaultBoxes

PRIOR = {"aspect_ratios": [[2, 3]] * 6, "s_min": 0.2, "s_max": 0.95, "fit_scales": True}
ARGUMENTS = {"variant": "ssdlite", "prior": PRIOR}


def grid_records(side: float, image: int = 320, count: int = 8) -> list[AnnotationRecord]:
    """Square boxes of ``side`` px laid on a regular grid of an ``image`` px square image."""
    step = image / count
    boxes = np.array([[i * step, j * step, i * step + side, j * step + side]
                      for i in range(count) for j in range(count)], dtype=np.float32)
    return [AnnotationRecord("x.jpg", 0, image, image, boxes, np.zeros(len(boxes), dtype=np.int64),
                             np.zeros(len(boxes), dtype=bool))]


def layout_priors(feature_sizes, image_size, aspect_ratios, s_min, s_max):
    return DefaultBoxes(aspect_ratios, s_min=s_min, s_max=s_max)(feature_sizes, image_size)


def recall_by_torchvision(boxes: torch.Tensor, priors: torch.Tensor, threshold: float = 0.5) -> float:
    return (box_iou(boxes, box_convert(priors, "cxcywh", "xyxy")).amax(1) >= threshold).float().mean().item()


def test_small_objects_get_smaller_default_boxes():
    records = grid_records(12.0)
    fitted = SSD.fit_to_data(dict(ARGUMENTS), records, 320)
    assert fitted["prior"]["s_min"] < 0.2
    feature_sizes = [(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]  # ssdlite at 320 px
    boxes, _ = square_resized_boxes(records, 320)

    def recall(s_min, s_max):
        return recall_by_torchvision(boxes, layout_priors(feature_sizes, (320, 320), PRIOR["aspect_ratios"],
                                                          s_min, s_max))

    # a 12 px square overlaps the smallest 64 px default box by at most 144 / 4096: nothing matches
    assert recall(0.2, 0.95) == 0.0
    assert recall(fitted["prior"]["s_min"], fitted["prior"]["s_max"]) > 0.2  # boxes off the 16 px grid of centres miss some


def test_scales_that_fit_are_kept_and_explicit_sizes_never_change():
    records = grid_records(100.0)
    assert SSD.fit_to_data(dict(ARGUMENTS), records, 320) == ARGUMENTS
    explicit = {**ARGUMENTS, "prior": {**PRIOR, "min_sizes": [30, 60, 111, 162, 213, 264],
                                      "max_sizes": [60, 111, 162, 213, 264, 315]}}
    assert SSD.fit_to_data(explicit, grid_records(5.0), 320) == explicit
    unfitted = {**ARGUMENTS, "prior": {**PRIOR, "fit_scales": False}}
    assert SSD.fit_to_data(unfitted, grid_records(5.0), 320)["prior"]["s_min"] == 0.2


def test_match_recall_of_one_class_agrees_with_torchvision():
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(50, 2, generator=generator) * 250
    boxes = torch.cat((corners, corners + 10 + torch.rand(50, 2, generator=generator) * 60), 1)
    priors = layout_priors([(20, 20), (10, 10)], (320, 320), [[2], [2]], 0.1, 0.3)
    one_class = torch.zeros(len(boxes), dtype=torch.long)
    for threshold in (0.3, 0.5):
        recall = class_recalls(boxes, one_class, priors, threshold).item()
        assert recall == recall_by_torchvision(boxes, priors, threshold)


def test_a_small_class_among_many_large_boxes_gets_default_boxes_of_its_own():
    """BCCD's case: the share over all boxes passes (64 large of 70) while the small class matches nothing; the
    check goes by class, so the scales are refitted until the small class matches too."""
    large = grid_records(100.0)[0]
    small = np.array([[20.0 + 45 * i, 290, 32.0 + 45 * i, 302] for i in range(6)], dtype=np.float32)
    boxes = np.concatenate((large.boxes, small))
    labels = np.array([0] * len(large.boxes) + [1] * len(small))
    records = [AnnotationRecord("x.jpg", 0, 320, 320, boxes, labels, np.zeros(len(boxes), dtype=bool))]
    feature_sizes = [(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]

    def recall(s_min, s_max, which):
        priors = layout_priors(feature_sizes, (320, 320), PRIOR["aspect_ratios"], s_min, s_max)
        return recall_by_torchvision(torch.as_tensor(boxes[labels == which]), priors)

    assert (64 * recall(0.2, 0.95, 0) + 6 * recall(0.2, 0.95, 1)) / 70 >= 0.9  # the overall share passes ...
    assert recall(0.2, 0.95, 1) == 0.0  # ... with no small box matched
    fitted = SSD.fit_to_data(dict(ARGUMENTS), records, 320)
    assert recall(fitted["prior"]["s_min"], fitted["prior"]["s_max"], 1) > 0.0
    assert recall(fitted["prior"]["s_min"], fitted["prior"]["s_max"], 0) > 0.5  # the large boxes still match
