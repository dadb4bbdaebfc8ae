"""Anchor targets and proposal targets of Faster R-CNN on hand-made boxes with hand-computed IoUs."""

import pytest
import torch

from lightning_det.models.faster_rcnn.targets import FasterRCNNAssigner


def batch_labels(*images: list[list[float]], pad: int = 3) -> torch.Tensor:
    """Rows (class, x1, y1, x2, y2) per image -> padded ``[B, pad, 6]`` batch labels."""
    labels = torch.zeros(len(images), pad, 6)
    labels[..., 0] = -1
    for b, rows in enumerate(images):
        for p, row in enumerate(rows):
            labels[b, p, :5] = torch.tensor(row)
    return labels


# The anchor rule of the hand-made cases: positive at IoU >= 0.7, negative below 0.3, 10 anchors per image.
ANCHOR_RULE = FasterRCNNAssigner(rpn_positive_iou=0.7, rpn_negative_iou=0.3, rpn_batch_size=10)

# IoUs with the object [0, 0, 10, 10]: 100/200 = 0.5, 100/250 = 0.4, 0, 100/110 = 0.91
HALF, ZERO_POINT_FOUR, FAR, CLOSE = [0, 0, 10, 20], [0, 0, 10, 25], [50, 50, 60, 60], [0, 0, 10, 11]


def test_best_anchor_is_forced_positive_below_the_threshold():
    anchors = torch.tensor([HALF, ZERO_POINT_FOUR, FAR], dtype=torch.float32)
    targets = ANCHOR_RULE.anchors(anchors, batch_labels([[1, 0, 0, 10, 10]]))
    assert targets.labels.tolist() == [[1, -1, 0]]  # forced best, ignored band (0.3 <= 0.4 < 0.7), negative
    assert targets.matched_boxes[0, 0].tolist() == [0, 0, 10, 10]


def test_only_the_best_anchor_is_forced_and_the_band_is_ignored():
    anchors = torch.tensor([HALF, ZERO_POINT_FOUR, FAR, CLOSE], dtype=torch.float32)
    targets = ANCHOR_RULE.anchors(anchors, batch_labels([[1, 0, 0, 10, 10]]))
    assert targets.labels.tolist() == [[-1, -1, 0, 1]]


def test_each_image_matches_only_its_own_objects():
    anchors = torch.tensor([CLOSE, FAR], dtype=torch.float32)
    labels = batch_labels([[0, 0, 0, 10, 10]], [[2, 50, 50, 60, 61]])
    targets = ANCHOR_RULE.anchors(anchors, labels)
    assert targets.labels.tolist() == [[1, 0], [0, 1]]
    assert targets.matched_boxes[1, 1].tolist() == [50, 50, 60, 61]


def test_image_without_objects_has_only_negatives():
    anchors = torch.tensor([CLOSE, FAR], dtype=torch.float32)
    targets = ANCHOR_RULE.anchors(anchors, batch_labels([], [[0, 0, 0, 10, 10]]))
    assert targets.labels[0].tolist() == [0, 0]


@pytest.mark.parametrize("num_positive", [300, 10])
def test_anchor_sampling_caps_positives_and_fills_with_negatives(num_positive):
    torch.manual_seed(0)
    positives = torch.tensor([[0, 0, 10, 10]], dtype=torch.float32).repeat(num_positive, 1)
    negatives = torch.tensor([[100, 100, 110, 110]], dtype=torch.float32).repeat(1000, 1)
    anchors = torch.cat((positives, negatives))
    labels = batch_labels([[0, 0, 0, 10, 10]], [[0, 0, 0, 10, 10]])
    assigner = FasterRCNNAssigner(rpn_positive_iou=0.7, rpn_negative_iou=0.3, rpn_batch_size=256,
                                  rpn_positive_fraction=0.5)
    targets = assigner.anchors(anchors, labels)
    expected_positive = min(num_positive, 128)
    assert ((targets.labels == 1).sum(1) == expected_positive).all()
    assert ((targets.labels == 0).sum(1) == 256 - expected_positive).all()
    assert (targets.labels[:, num_positive:] != 1).all() and (targets.labels[:, :num_positive] != 0).all()


def test_anchor_sampling_is_random_not_the_first_anchors():
    torch.manual_seed(0)
    anchors = torch.tensor([[0, 0, 10, 10]], dtype=torch.float32).repeat(400, 1)
    targets = FasterRCNNAssigner(rpn_batch_size=256).anchors(anchors, batch_labels([[0, 0, 0, 10, 10]]))
    chosen = (targets.labels[0] == 1).nonzero()[:, 0]
    assert len(chosen) == 128 and chosen.max() > 128


def test_proposal_targets_label_foreground_background_and_ignore_band():
    labels = batch_labels([[3, 0, 0, 10, 10]])
    proposals = torch.tensor([CLOSE, HALF, ZERO_POINT_FOUR, FAR], dtype=torch.float32)
    # IoUs: 0.91 (fg), 0.5 (fg, >= 0.5), 0.4 (bg in [0.1, 0.5)), 0 (ignored: below 0.1); the object is added
    assigner = FasterRCNNAssigner(roi_batch_size=16, roi_positive_fraction=0.5, roi_positive_iou=0.5,
                                  roi_negative_iou=(0.1, 0.5))
    rois = assigner.proposals(proposals, torch.zeros(4, dtype=torch.long), labels)
    by_box = {tuple(b.tolist()): int(c) for b, c in zip(rois.rois, rois.labels)}
    assert by_box == {tuple(CLOSE): 4, tuple(HALF): 4, tuple(ZERO_POINT_FOUR): 0, (0, 0, 10, 10): 4}
    foreground = rois.labels > 0
    assert (rois.matched_boxes[foreground] == torch.tensor([0.0, 0, 10, 10])).all()


def test_proposal_overlapping_another_images_object_is_background():
    labels = batch_labels([[1, 0, 0, 10, 10]], [])
    proposals = torch.tensor([CLOSE, CLOSE], dtype=torch.float32)
    rois = FasterRCNNAssigner(roi_batch_size=8).proposals(proposals, torch.tensor([0, 1]), labels)
    image_one = rois.image == 1
    assert image_one.sum() == 1 and rois.labels[image_one].tolist() == [0]
    assert sorted(rois.labels[~image_one].tolist()) == [2, 2]


def test_proposal_sampling_ratio_per_image():
    torch.manual_seed(0)
    labels = batch_labels([[0, 0, 0, 10, 10]], [[5, 0, 0, 10, 10]])
    fg = torch.tensor([CLOSE], dtype=torch.float32).repeat(100, 1)
    bg = torch.tensor([FAR], dtype=torch.float32).repeat(500, 1)
    proposals = torch.cat((fg, bg, fg[:5], bg))
    image = torch.cat((torch.zeros(600), torch.ones(505))).long()
    assigner = FasterRCNNAssigner(roi_batch_size=128, roi_positive_fraction=0.25)
    rois = assigner.proposals(proposals, image, labels)
    for b, expected_fg in ((0, 32), (1, 6)):  # image 1: 5 proposals + its object, all foreground
        mine = rois.image == b
        assert mine.sum() == 128
        assert (rois.labels[mine] > 0).sum() == expected_fg
    assert set(rois.labels[rois.image == 1].tolist()) == {0, 6}
