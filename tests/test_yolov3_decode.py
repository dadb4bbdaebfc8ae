"""YOLOv3 decoding on hand-built raw outputs: box geometry, scores, thresholds and batched NMS.

One level of 2 x 2 cells at stride 8 (a 16 x 16 image) with one 10 x 10 anchor; indices 0..3 are cells
(0, 0), (1, 0), (0, 1), (1, 1). Two classes.
"""

import math

import pytest
import torch

from lightning_det.models.yolov3.decode import YOLOv3Decoder, decode_boxes
from lightning_det.models.yolov3.grid import anchors_tensor, make_grid

GRID = make_grid([(2, 2)], anchors_tensor([[10, 10]]), [8])
IMAGE = (16, 16)


def logit(p):
    return math.log(p / (1 - p))


def silent(batch=1):
    """Raw outputs whose every score is far below any threshold."""
    preds = torch.zeros(batch, 4, 7)
    preds[..., 4:] = -20.0
    return preds


def put(preds, image, index, box, obj, classes):
    preds[image, index] = torch.tensor([*box, logit(obj), *(logit(c) for c in classes)])


def test_box_by_hand_with_clipping():
    preds = silent()
    # cell (1, 0): centre ((0.5 + 1) 8, (0.25 + 0) 8) = (12, 2); size (10 * 2, 10 * 1) -> (2, -3, 22, 7)
    put(preds, 0, 1, [0.0, logit(0.25), math.log(2), 0.0], obj=0.9, classes=[0.8, 0.3])
    unclipped = decode_boxes(preds[0, 1:2, :4], GRID.cell_xy[1:2], GRID.anchor_wh[1:2], GRID.stride[1:2])
    assert torch.allclose(unclipped, torch.tensor([[2.0, -3.0, 22.0, 7.0]]), atol=1e-5)

    (det,) = YOLOv3Decoder(multi_label=True)(preds, GRID, IMAGE)
    assert det["labels"].tolist() == [0, 1]
    assert torch.allclose(det["scores"], torch.tensor([0.9 * 0.8, 0.9 * 0.3]))
    assert torch.allclose(det["boxes"], torch.tensor([[2.0, 0.0, 16.0, 7.0]] * 2), atol=1e-5)

    (best,) = YOLOv3Decoder(multi_label=False)(preds, GRID, IMAGE)
    assert best["labels"].tolist() == [0] and best["scores"].item() == pytest.approx(0.72)
    assert best["labels"].dtype == torch.long


def test_huge_size_logits_stay_finite():
    preds = silent()
    put(preds, 0, 0, [0.0, 0.0, 500.0, 500.0], obj=0.9, classes=[0.9, 0.01])
    (det,) = YOLOv3Decoder()(preds, GRID, IMAGE)
    assert torch.isfinite(det["boxes"]).all()
    assert torch.allclose(det["boxes"][0], torch.tensor([0.0, 0.0, 16.0, 16.0]))


def overlapping_pair(first_classes, second_classes, batch=1):
    """Cells (0, 0) and (1, 0) shifted to centres x = 7 and 9: boxes (2, 0, 12, 9), (4, 0, 14, 9), IoU 72 / 108."""
    preds = silent(batch)
    for image in range(batch):
        put(preds, image, 0, [logit(7 / 8), 0.0, 0.0, 0.0], obj=0.9, classes=first_classes)
        put(preds, image, 1, [logit(1 / 8), 0.0, 0.0, 0.0], obj=0.8, classes=second_classes)
    return preds


def test_nms_suppresses_within_a_class_only():
    decoder = YOLOv3Decoder(multi_label=False, score_thresh=0.01)
    (same,) = decoder(overlapping_pair([0.9, 0.001], [0.9, 0.001]), GRID, IMAGE)
    assert same["labels"].tolist() == [0] and same["scores"].item() == pytest.approx(0.81)
    assert torch.allclose(same["boxes"], torch.tensor([[2.0, 0.0, 12.0, 9.0]]), atol=1e-4)

    (different,) = decoder(overlapping_pair([0.9, 0.001], [0.001, 0.9]), GRID, IMAGE)
    assert different["labels"].tolist() == [0, 1]

    agnostic = YOLOv3Decoder(multi_label=False, score_thresh=0.01, class_agnostic=True)
    (forced,) = agnostic(overlapping_pair([0.9, 0.001], [0.001, 0.9]), GRID, IMAGE)
    assert forced["labels"].tolist() == [0]

    loose = YOLOv3Decoder(multi_label=False, score_thresh=0.01, nms_thresh=0.7)  # IoU 0.667 survives 0.7
    assert len(loose(overlapping_pair([0.9, 0.001], [0.9, 0.001]), GRID, IMAGE)[0]["boxes"]) == 2


def test_images_of_a_batch_do_not_suppress_each_other():
    preds = overlapping_pair([0.9, 0.001], [0.9, 0.001], batch=3)
    preds[1] = silent()[0]  # the middle image has nothing
    detections = YOLOv3Decoder(multi_label=False, score_thresh=0.01)(preds, GRID, IMAGE)
    assert [len(d["boxes"]) for d in detections] == [1, 0, 1]
    assert detections[1]["boxes"].shape == (0, 4)
    assert torch.equal(detections[0]["boxes"], detections[2]["boxes"])


def four_separate_objects(batch=2):
    preds = silent(batch)
    for image in range(batch):
        for index, obj in enumerate([0.5, 0.9, 0.6, 0.8]):
            put(preds, image, index, [0.0, 0.0, logit(0.2), logit(0.2)], obj=obj, classes=[0.99, 0.001])
    return preds


def test_topk_limits_apply_per_image():
    preds = four_separate_objects()  # four 2 x 2 boxes in separate cells: no suppression
    assert [len(d["scores"]) for d in YOLOv3Decoder(multi_label=False)(preds, GRID, IMAGE)] == [4, 4]
    for limit in ({"max_detections": 2}, {"pre_nms_topk": 2}):
        decoder = YOLOv3Decoder(multi_label=False, **limit)
        detections = decoder(preds, GRID, IMAGE)
        for det in detections:
            assert torch.allclose(det["scores"], torch.tensor([0.9, 0.8]) * 0.99)


def test_score_threshold():
    detections = YOLOv3Decoder(multi_label=False, score_thresh=0.65)(four_separate_objects(1), GRID, IMAGE)
    assert torch.allclose(detections[0]["scores"], torch.tensor([0.9, 0.8]) * 0.99)
