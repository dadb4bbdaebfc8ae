"""YOLOv3 target assignment on hand-made cases (416 px input, Darknet's COCO anchors)."""

import pytest
import torch

from lightning_det.models.yolov3.grid import DEFAULT_ANCHORS, anchors_tensor, make_grid
from lightning_det.models.yolov3.targets import YOLOv3Assigner, shape_iou

GRID = make_grid([(52, 52), (26, 26), (13, 13)], anchors_tensor(DEFAULT_ANCHORS["yolov3"]), [8, 16, 32])
LEVEL_SIZE = [3 * 52 * 52, 3 * 26 * 26, 3 * 13 * 13]  # predictions per level


def flat(level, anchor, x, y):
    """Flattened index by hand: earlier levels, then earlier anchors of this level, then row-major cells."""
    side = (52, 26, 13)[level]
    return sum(LEVEL_SIZE[:level]) + anchor * side * side + y * side + x


def labels_of(*images, width=4):
    """Padded [B, P, 6] labels; padding rows carry garbage coordinates to prove they are ignored."""
    rows = [list(objects) + [[-1, 1, 2, 300, 300, 0]] * (width - len(objects)) for objects in images]
    return torch.tensor(rows, dtype=torch.float32)


# A 100 x 100 box centred at (150, 150). Shape IoUs by hand with the nine anchors:
# (116,90): 9000/11440=0.787 (best), (59,119): 5900/11121=0.531, (156,198): 10000/30888=0.324,
# (62,45): 2790/10000=0.279, (30,61): 1830/10000=0.183, everything else below 0.1.
BOX = [100, 100, 200, 200]


def assigned(targets):
    return sorted(zip(targets.image.tolist(), targets.index.tolist()))


def test_shape_iou_by_hand():
    iou = shape_iou(torch.tensor([[100.0, 100.0]]), torch.tensor([[116.0, 90.0], [30.0, 61.0]]))
    assert torch.allclose(iou, torch.tensor([[9000 / 11440, 1830 / 10000]]))


def test_best_anchor_only_takes_the_single_best_anchor_across_levels():
    targets = YOLOv3Assigner(best_anchor_only=True)(labels_of([[3, *BOX, 0]]), GRID)
    # anchor (116, 90) is level 2 anchor 0; cell floor(150 / 32) = 4
    assert assigned(targets) == [(0, flat(2, 0, 4, 4))]
    assert targets.classes.tolist() == [3]
    assert targets.boxes.tolist() == [BOX]


def test_iou_threshold_gives_every_anchor_above_it():
    targets = YOLOv3Assigner(positive_iou=0.2)(labels_of([[3, *BOX, 0]]), GRID)
    # (62,45) and (59,119) on level 1 (cell floor(150/16)=9), (116,90) and (156,198) on level 2 (cell 4)
    expected = [flat(1, 1, 9, 9), flat(1, 2, 9, 9), flat(2, 0, 4, 4), flat(2, 1, 4, 4)]
    assert assigned(targets) == [(0, i) for i in sorted(expected)]
    assert targets.classes.tolist() == [3] * 4

    stricter = YOLOv3Assigner(positive_iou=0.5)(labels_of([[3, *BOX, 0]]), GRID)
    assert assigned(stricter) == [(0, flat(1, 2, 9, 9)), (0, flat(2, 0, 4, 4))]


def test_an_object_below_the_threshold_still_gets_its_best_anchor():
    # A 2 x 100 sliver: its best anchor is (16, 30) with shape IoU 60 / (200 + 480 - 60) = 0.097 < 0.2
    # (next: (10, 13) 26 / 304 = 0.086, (30, 61) 122 / 1908 = 0.064).
    targets = YOLOv3Assigner(positive_iou=0.2)(labels_of([[0, 10, 100, 12, 200, 0]]), GRID)
    assert assigned(targets) == [(0, flat(0, 1, 1, 18))]  # centre (11, 150) at stride 8


def test_padding_rows_and_empty_images_give_nothing():
    targets = YOLOv3Assigner()(labels_of([], []), GRID)
    assert targets.index.numel() == 0 and targets.boxes.shape == (0, 4) and targets.ignore_index.numel() == 0


def test_two_images_keep_their_own_objects():
    labels = labels_of([[1, *BOX, 0]], [[2, 0, 0, 32, 26, 0], [5, *BOX, 0]])
    targets = YOLOv3Assigner(best_anchor_only=True)(labels, GRID)
    # image 1, first object: 32 x 26 matches anchor (33, 23) (level 0 anchor 2), centre (16, 13) -> cell (2, 1)
    assert assigned(targets) == [(0, flat(2, 0, 4, 4)), (1, flat(0, 2, 2, 1)), (1, flat(2, 0, 4, 4))]
    by_image = {(i, c) for i, c in zip(targets.image.tolist(), targets.classes.tolist())}
    assert by_image == {(0, 1), (1, 2), (1, 5)}


def test_a_shared_prediction_goes_to_the_better_shaped_object():
    # Both objects sit in stride-32 cell (4, 4) with best anchor (116, 90); the 110 x 90 box fits it better
    # (9900 / 10440 = 0.948 against 0.787), whichever order the objects are listed in.
    other = [7, 96, 104, 206, 194, 0]
    for objects in ([[3, *BOX, 0], other], [other, [3, *BOX, 0]]):
        targets = YOLOv3Assigner(best_anchor_only=True)(labels_of(objects), GRID)
        assert assigned(targets) == [(0, flat(2, 0, 4, 4))]
        assert targets.classes.tolist() == [7]


def test_an_exact_tie_goes_to_the_object_listed_first():
    targets = YOLOv3Assigner(positive_iou=0.2)(labels_of([[3, *BOX, 0], [4, *BOX, 0]]), GRID)
    assert len(targets.index) == 4 and set(targets.classes.tolist()) == {3}


def test_difficult_objects_are_ignored_not_positive():
    labels = labels_of([[3, *BOX, 1], [2, 0, 0, 32, 26, 0]])
    targets = YOLOv3Assigner(best_anchor_only=True)(labels, GRID)
    assert assigned(targets) == [(0, flat(0, 2, 2, 1))]
    assert list(zip(targets.ignore_image.tolist(), targets.ignore_index.tolist())) == [(0, flat(2, 0, 4, 4))]


@pytest.mark.parametrize("corner", [0.0, 416.0])
def test_centres_on_the_image_edge_stay_on_the_grid(corner):
    box = [0, 0, 0.5, 0.5] if corner == 0 else [415.5, 415.5, 416, 416]
    targets = YOLOv3Assigner(best_anchor_only=True)(labels_of([[0, *box, 0]]), GRID)
    cell = 0 if corner == 0 else 51
    assert assigned(targets) == [(0, flat(0, 0, cell, cell))]
