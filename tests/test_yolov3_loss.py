"""YOLOv3 loss terms against hand computations and torchvision's GIoU loss.

A 32 px image with two levels, one anchor each: stride 8 (4 x 4 cells, anchor 10 x 10) and stride 16
(2 x 2 cells, anchor 40 x 40). Flattened indices: level 0 cell (x, y) -> 4y + x, level 1 -> 16 + 2y + x.
"""

import math

import pytest
import torch
from torchvision.ops import box_iou, generalized_box_iou_loss

from lightning_det.models.yolov3 import loss as loss_module
from lightning_det.models.yolov3.grid import anchors_tensor, make_grid
from lightning_det.models.yolov3.loss import YOLOv3Loss, max_iou_with_objects
from lightning_det.models.yolov3.targets import YOLOv3Assigner

GRID = make_grid([(4, 4), (2, 2)], anchors_tensor([[10, 10], [40, 40]]), [8, 16])
NUM_CLASSES = 2
PAD = [-1, 0, 0, 0, 0, 0]
# 12 x 10 box centred at (8, 7): anchor 10 x 10 (shape IoU 100/120), level 0 cell (1, 0) -> index 1
A = [1, 2, 2, 14, 12, 0]
# 26 x 26 centred at (15, 15): anchor 40 x 40 (676/1600 against 100/676), level 1 cell (0, 0) -> index 16
B = [0, 2, 2, 28, 28, 0]
# 12 x 10 centred at (24, 23): level 0 cell (3, 2) -> index 11
C = [1, 18, 18, 30, 28, 0]


def softplus(x):
    return math.log1p(math.exp(x))


def raw(batch=1):
    return torch.zeros(batch, 20, 5 + NUM_CLASSES)


def run(preds, labels, **options):
    labels = torch.tensor(labels, dtype=torch.float32)
    targets = YOLOv3Assigner()(labels, GRID)
    return YOLOv3Loss(**options)(preds, GRID, targets, labels), targets


def test_giou_term_is_a_per_level_mean_of_torchvision_giou():
    losses, targets = run(raw(), [[A, B, C]], giou=1.0, obj=0.0, cls=0.0)
    assert sorted(targets.index.tolist()) == [1, 11, 16]
    # zero logits: centre at the middle of the cell, size of the anchor
    predicted = torch.tensor([[7.0, -1, 17, 9], [-12, -12, 28, 28], [23, 15, 33, 25]])
    truth = torch.tensor([A[1:5], B[1:5], C[1:5]], dtype=torch.float32)
    reference = generalized_box_iou_loss(predicted, truth, reduction="none")
    # A by hand: intersection 7 x 7, union 100 + 120 - 49, enclosing box 15 x 13
    assert reference[0].item() == pytest.approx(1 - (49 / 171 - (195 - 171) / 195))
    expected = (reference[0] + reference[2]) / 2 + reference[1]  # two positives on level 0, one on level 1
    assert losses["box"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_xywh_term_by_hand():
    losses, _ = run(raw(), [[A]], box_loss="xywh", xy=2.0, wh=3.0, obj=0.0, cls=0.0)
    # sigmoid(0) = 0.5 against any offset t: -(t log 0.5 + (1 - t) log 0.5) = log 2;
    # tw, th = 0 against log(12 / 10), log(10 / 10)
    expected = 2.0 * math.log(2) + 3.0 * (math.log(1.2) ** 2 + 0.0) / 2
    assert losses["box"].item() == pytest.approx(expected, rel=1e-6)


def test_objectness_by_hand_with_positive_weight():
    preds = raw()
    logits = [0.5, -1.0, 2.0, 0.3] + [0.0] * 12 + [-0.7, 0.0, 0.0, 0.0]
    preds[0, :, 4] = torch.tensor(logits)
    losses, _ = run(preds, [[A]], obj=2.0, obj_pw=3.0, giou=0.0, cls=0.0, ignore_thresh=None)
    level0 = sum(softplus(x) for i, x in enumerate(logits[:16]) if i != 1) + 3.0 * softplus(1.0)
    level1 = sum(softplus(x) for x in logits[16:])
    assert losses["obj"].item() == pytest.approx(2.0 * (level0 / 16 + level1 / 4), rel=1e-6)


def test_classification_by_hand_with_positive_weight():
    preds = raw()
    preds[0, 1, 5:] = torch.tensor([0.3, -0.4])
    losses, _ = run(preds, [[A]], cls=5.0, cls_pw=1.5, giou=0.0, obj=0.0)
    # A is class 1: BCE(0.3, 0) and 1.5 * BCE(-0.4, 1), averaged over the two classes
    assert losses["cls"].item() == pytest.approx(5.0 * (softplus(0.3) + 1.5 * softplus(0.4)) / 2, rel=1e-6)


def test_a_prediction_already_covering_an_object_gets_no_negative_loss():
    preds = raw(batch=2)
    # level 1 cell (1, 1) -> index 19, decoded exactly onto C: centre (24, 23) = ((0.5 + 1) 16, (0.4375 + 1) 16)
    preds[:, 19, :4] = torch.tensor([0.0, math.log(0.4375 / 0.5625), math.log(12 / 40), math.log(10 / 40)])
    preds[:, 19, 4] = 1.5
    labels = [[C, PAD], [PAD, PAD]]  # the same prediction in image 1 overlaps nothing of its own image
    counted, _ = run(preds, labels, ignore_thresh=None, giou=0.0, cls=0.0)
    ignored, _ = run(preds, labels, ignore_thresh=0.7, giou=0.0, cls=0.0)
    # only image 0's copy is dropped: its share of the level-1 mean over 2 images x 4 predictions
    difference = counted["obj"] - ignored["obj"]
    assert difference.item() == pytest.approx(64.3 * softplus(1.5) / 8, rel=1e-5)


def test_difficult_objects_are_neither_learned_nor_penalised():
    preds = raw()
    preds[0, 1, 4] = 3.0  # the prediction the difficult object would take
    losses, targets = run(preds, [[A[:5] + [1]]], obj=1.0, ignore_thresh=None)
    assert targets.index.numel() == 0
    assert losses["box"].item() == 0.0 and losses["cls"].item() == 0.0
    # every other prediction has logit 0 and target 0; index 1 counts as zero in level 0's mean
    assert losses["obj"].item() == pytest.approx(15 * math.log(2) / 16 + math.log(2), rel=1e-6)


def test_gradients_reach_every_term():
    preds = raw().requires_grad_()
    losses, _ = run(preds, [[A, B]], box_loss="xywh")
    losses["loss"].backward()
    grad = preds.grad[0]
    assert grad[1, :4].abs().sum() > 0 and grad[16, :4].abs().sum() > 0  # box, on both positives
    assert grad[:, 4].ne(0).all()  # objectness everywhere
    assert grad[1, 5:].ne(0).all() and grad[0, 5:].eq(0).all()  # classes on positives only


def test_unknown_box_loss_is_rejected():
    with pytest.raises(ValueError, match="giou"):
        YOLOv3Loss(box_loss="iou")


def reference_max_iou(boxes, objects, valid):
    """The straightforward computation: per image, torchvision's full IoU matrix with its valid objects."""
    best = torch.zeros(boxes.shape[:2])
    for image in range(len(boxes)):
        mine = objects[image][valid[image]]
        if len(mine):
            best[image] = box_iou(boxes[image], mine).amax(1)
    return best


def random_boxes(generator, shape, side=64.0):
    corner = torch.rand(*shape, 2, generator=generator) * side
    size = 1 + torch.rand(*shape, 2, generator=generator) * side / 2
    return torch.cat((corner, corner + size), -1)


@pytest.mark.parametrize("objects, chunk", [(5, 1 << 20), (250, 1 << 20), (250, 36_000), (7, 1)])
def test_ignore_rule_iou_equals_the_full_iou_matrix(monkeypatch, objects, chunk):
    """Dense images (250 objects) and chunks far smaller than the object count give the full matrix's result."""
    monkeypatch.setattr(loss_module, "IOU_CHUNK_ELEMENTS", chunk)
    generator = torch.Generator().manual_seed(objects)
    boxes = random_boxes(generator, (3, 400))
    truth = random_boxes(generator, (3, objects))
    boxes[:, :5] = truth[:, :5] + torch.rand(3, 5, 4, generator=generator)  # near copies: IoU above 0.7
    valid = torch.rand(3, objects, generator=generator) < 0.8
    valid[2] = False  # an image without objects
    truth[~valid] = 0.0  # padding rows hold zeros, as collate writes them
    expected = reference_max_iou(boxes, truth, valid)
    assert expected[:2].max() > 0.7  # the threshold is crossed, so the test can tell a wrong mask
    assert torch.allclose(max_iou_with_objects(boxes, truth, valid), expected, atol=1e-6)
