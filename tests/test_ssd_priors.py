"""SSD default boxes: counts per layer, order and sizes at a location, the linear scale rule, clipping, and\ntorchvision's DefaultBoxGenerator where it describes the same layout."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_convert

from lightning_det.models.ssd.priors import DefaultBoxes, boxes_per_location, default_boxes, linear_scale_sizes

SSD300_MAPS = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
SSD300_RATIOS = [[2], [2, 3], [2, 3], [2, 3], [2], [2]]
SSD300_STEPS = [8, 16, 32, 64, 100, 300]
SSD300_MIN = [30, 60, 111, 162, 213, 264]
SSD300_MAX = [60, 111, 162, 213, 264, 315]


def ssd300_boxes(clip: bool = False) -> torch.Tensor:
    return default_boxes(SSD300_MAPS, (300, 300), SSD300_STEPS, SSD300_MIN, SSD300_MAX, SSD300_RATIOS, clip)


def test_ssd300_has_8732_default_boxes_in_the_published_per_layer_counts():
    per_layer = [rows * cols * a for (rows, cols), a in zip(SSD300_MAPS, boxes_per_location(SSD300_RATIOS))]
    assert per_layer == [5776, 2166, 600, 150, 36, 4]
    assert ssd300_boxes().shape == (8732, 4)


def test_boxes_at_the_first_location_follow_the_reference_order():
    boxes = ssd300_boxes()[:4]  # conv4_3, cell (0, 0): 4 boxes
    root2 = math.sqrt(2)
    expected = torch.tensor([
        [4, 4, 30, 30],
        [4, 4, math.sqrt(30 * 60), math.sqrt(30 * 60)],
        [4, 4, 30 * root2, 30 / root2],
        [4, 4, 30 / root2, 30 * root2],
    ])
    torch.testing.assert_close(boxes, expected)


def test_locations_are_row_major_and_layers_finest_first():
    boxes = ssd300_boxes()
    second_cell, next_row = boxes[4], boxes[4 * 38]
    assert second_cell[:2].tolist() == [12.0, 4.0] and next_row[:2].tolist() == [4.0, 12.0]
    last = boxes[-4:]  # the 1x1 map: centred on the image
    assert torch.all(last[:, :2] == 150.0) and last[0, 2] == 264.0


def test_linear_scale_rule_matches_the_paper():
    min_sizes, max_sizes = linear_scale_sizes(6, 300, 0.2, 0.9)
    scales = [0.2 + (0.9 - 0.2) * k / 5 for k in range(7)]
    assert min_sizes == pytest.approx([s * 300 for s in scales[:6]])
    assert max_sizes == pytest.approx([s * 300 for s in scales[1:]])


def test_clipping_keeps_boxes_inside_the_image():
    clipped = ssd300_boxes(clip=True)
    corners = torch.cat((clipped[:, :2] - clipped[:, 2:] / 2, clipped[:, :2] + clipped[:, 2:] / 2), 1)
    assert corners.min() >= -1e-4 and corners.max() <= 300 + 1e-4
    assert (ssd300_boxes()[:, 2] > clipped[:, 2]).any()


def test_mismatched_layer_lists_are_rejected_with_a_clear_message():
    with pytest.raises(ValueError, match="one step, min size"):
        default_boxes(SSD300_MAPS, (300, 300), SSD300_STEPS[:5], SSD300_MIN, SSD300_MAX, SSD300_RATIOS)


@pytest.mark.parametrize("layout", ["ssd300", "linear scale rule"])
def test_torchvisions_default_box_generator_lays_out_the_same_boxes_where_it_can_describe_them(layout):
    """Square input, each layer's max size the next one's min size, no clipping: torchvision's generator given
    the same scales (fractions of the side) gives the same boxes. See ``priors.py`` for where the two differ."""
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator

    if layout == "ssd300":
        side, maps, steps, ratios = 300, SSD300_MAPS, SSD300_STEPS, SSD300_RATIOS
        min_sizes, max_sizes = SSD300_MIN, SSD300_MAX
    else:
        side, maps, steps, ratios = 320, [(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)], None, [[2, 3]] * 6
        min_sizes, max_sizes = linear_scale_sizes(6, side, 0.2, 0.95)
    ours = DefaultBoxes(ratios, min_sizes, max_sizes, steps=steps)(maps, (side, side))
    generator = DefaultBoxGenerator(ratios, scales=[s / side for s in [*min_sizes, max_sizes[-1]]], steps=steps,
                                    clip=False)
    theirs = generator(ImageList(torch.zeros(1, 3, side, side), [(side, side)]),
                       [torch.zeros(1, 1, rows, cols) for rows, cols in maps])[0]
    torch.testing.assert_close(box_convert(ours, "cxcywh", "xyxy"), theirs, atol=1e-4, rtol=0)
