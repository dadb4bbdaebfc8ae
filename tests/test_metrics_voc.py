"""VOCMeanAP against hand-worked cases and an independent loop-by-loop port of the VOC devkit's evaluation
(devkit_reference.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from devkit_reference import devkit_ap
from helpers import two_rank_result

from lightning_det.metrics import VOCMeanAP


def pred(boxes, scores, labels) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


def target(boxes, labels, difficult=None) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.long),
        "difficult": torch.tensor(difficult if difficult is not None else [False] * len(labels), dtype=torch.bool),
    }


def evaluate(preds, targets, num_classes=1, **kwargs) -> dict[str, torch.Tensor]:
    metric = VOCMeanAP(num_classes=num_classes, **kwargs)
    metric.update(preds, targets)
    return metric.compute()


A, B, C = [0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]
FAR = [70, 70, 80, 80]


# --- hand-worked cases ----------------------------------------------------------------------------------------


def test_duplicate_detection_is_a_false_positive():
    # 2 positives (A, B). Ranked: 0.9 on A -> TP (p=1, r=1/2); 0.8 on A again -> duplicate FP (p=1/2, r=1/2).
    # Area: only the TP raises recall: 1/2 * envelope 1 = 0.5.
    # VOC07: recall levels 0..0.5 (6 of 11) reach precision 1, the rest are never reached: 6/11.
    preds = [pred([A, A], [0.9, 0.8], [0, 0])]
    targets = [target([A, B], [0, 0])]
    assert evaluate(preds, targets)["mAP"].item() == pytest.approx(0.5)
    assert evaluate(preds, targets)["AP_per_class"].tolist() == pytest.approx([0.5])  # one class, still a vector
    assert evaluate(preds, targets, use_07_metric=True)["mAP"].item() == pytest.approx(6 / 11)
    assert evaluate(preds, targets)["recall"].item() == pytest.approx(0.5)


def test_difficult_objects_are_ignored_unless_asked_for():
    # A normal, B difficult. Ranked: 0.95 on FAR -> FP; 0.9 on B -> ignored; 0.8 on A -> TP.
    # Default: 1 positive; curve FP (p=0, r=0), TP (p=1/2, r=1) -> area 1/2, VOC07 every level 1/2.
    # use_difficult: 2 positives; FP (0, 0), TP (1/2, 1/2), TP (2/3, 1): envelope 2/3 at both TPs -> 2/3 (both).
    preds = [pred([FAR, B, A], [0.95, 0.9, 0.8], [0, 0, 0])]
    targets = [target([A, B], [0, 0], [False, True])]
    assert evaluate(preds, targets)["mAP"].item() == pytest.approx(0.5)
    assert evaluate(preds, targets, use_07_metric=True)["mAP"].item() == pytest.approx(0.5)
    assert evaluate(preds, targets, use_difficult=True)["mAP"].item() == pytest.approx(2 / 3)
    assert evaluate(preds, targets, use_difficult=True, use_07_metric=True)["mAP"].item() == pytest.approx(2 / 3)


def test_class_with_only_difficult_objects_is_left_out():
    # class 0: TP on A -> AP 1. class 1: only a difficult box, so no positives -> NaN, not in the mean.
    preds = [pred([A, B], [0.9, 0.9], [0, 1])]
    targets = [target([A, B], [0, 1], [False, True])]
    result = evaluate(preds, targets, num_classes=2)
    assert result["AP_per_class"][0].item() == pytest.approx(1.0)
    assert math.isnan(result["AP_per_class"][1].item())
    assert result["mAP"].item() == pytest.approx(1.0)


def test_empty_images_and_a_class_without_ground_truth():
    # image 0: box A of class 0, detected at 0.6. image 1: no boxes, a class-0 detection at 0.9 -> FP, and a
    # class-1 detection (class 1 has no ground truth anywhere). image 2: nothing at all.
    # class 0 ranked: FP (p=0, r=0), TP (p=1/2, r=1) -> area 1/2. class 1 -> NaN and left out: mAP 1/2.
    preds = [pred([A], [0.6], [0]), pred([B, C], [0.9, 0.7], [0, 1]), pred([], [], [])]
    targets = [target([A], [0]), target([], []), target([], [])]
    result = evaluate(preds, targets, num_classes=2)
    assert result["AP_per_class"][0].item() == pytest.approx(0.5)
    assert math.isnan(result["AP_per_class"][1].item())
    assert result["mAP"].item() == pytest.approx(0.5)


def test_score_ties_keep_arrival_order():
    # Equal scores: an FP in one image, a TP in another. Stable ranking keeps update order.
    # FP first: (p=0, r=0), (p=1/2, r=1) -> 1/2.   TP first: (p=1, r=1), (p=1/2, r=1) -> 1.
    fp_image = (pred([FAR], [0.5], [0]), target([], []))
    tp_image = (pred([A], [0.5], [0]), target([A], [0]))
    fp_first = evaluate(*zip(fp_image, tp_image))
    tp_first = evaluate(*zip(tp_image, fp_image))
    assert fp_first["mAP"].item() == pytest.approx(0.5)
    assert tp_first["mAP"].item() == pytest.approx(1.0)


def test_iou_tie_goes_to_the_first_box_and_a_repeat_is_a_duplicate():
    # Boxes [0,0,10,10] and [10,0,20,10] overlap the detection [5,0,15,10] equally (IoU 1/3 each, threshold 0.3).
    # The devkit takes the best box whether or not it is matched, the first on ties: the first detection takes
    # box 1, the second (same box) picks box 1 again and is a duplicate, although box 2 is free.
    # 2 positives: TP (p=1, r=1/2), FP (p=1/2, r=1/2) -> area 1/2.
    # With box 1 difficult, both detections land on it and are ignored: 1 positive, no TP -> AP 0.
    preds = [pred([[5, 0, 15, 10], [5, 0, 15, 10]], [0.9, 0.8], [0, 0])]
    boxes = [[0, 0, 10, 10], [10, 0, 20, 10]]
    assert evaluate(preds, [target(boxes, [0, 0])], iou_threshold=0.3)["mAP"].item() == pytest.approx(0.5)
    first_difficult = [target(boxes, [0, 0], [True, False])]
    assert evaluate(preds, first_difficult, iou_threshold=0.3)["mAP"].item() == pytest.approx(0.0)


def test_eleven_point_and_area_differ_on_a_sawtooth_curve():
    # 3 positives A, B, C. Ranked: TP (p=1, r=1/3), FP (1/2), TP (2/3, r=2/3), FP (1/2), TP (3/5, r=1).
    # Envelope at the TPs: 1, 2/3, 3/5. Area: (1 + 2/3 + 3/5) / 3 = 34/45.
    # VOC07: levels 0, .1, .2, .3 -> 1 (recall 1/3 reaches them); .4, .5, .6 -> 2/3; .7 .. 1.0 -> 3/5:
    # (4 * 1 + 3 * 2/3 + 4 * 3/5) / 11 = 8.4 / 11.
    preds = [pred([A, FAR, B, FAR, C], [0.9, 0.8, 0.7, 0.6, 0.5], [0] * 5)]
    targets = [target([A, B, C], [0, 0, 0])]
    assert evaluate(preds, targets)["mAP"].item() == pytest.approx(34 / 45)
    assert evaluate(preds, targets, use_07_metric=True)["mAP"].item() == pytest.approx(8.4 / 11)


def test_plus_one_convention_and_threshold_is_inclusive():
    # Box [0,0,9,9] vs detection [0,0,9,4]. Plain areas: 9*4 / (9*9) = 0.44 < 0.5 -> FP, AP 0.
    # Devkit +1 pixel: 10*5 / (10*10) = 0.5 exactly, and the devkit accepts IoU >= threshold -> TP, AP 1.
    preds = [pred([[0, 0, 9, 4]], [0.9], [0])]
    targets = [target([[0, 0, 9, 9]], [0])]
    assert evaluate(preds, targets)["mAP"].item() == pytest.approx(0.0)
    assert evaluate(preds, targets, plus_one=True)["mAP"].item() == pytest.approx(1.0)


def test_no_updates_gives_nan_not_an_error():
    metric = VOCMeanAP(num_classes=3)
    with pytest.warns(UserWarning, match="before the ``update``"):
        result = metric.compute()
    assert result["AP_per_class"].isnan().all() and result["mAP"].isnan()


@pytest.mark.parametrize(
    ("preds", "targets", "message"),
    [
        ([pred([A], [0.9], [3])], [target([A], [0])], "prediction label 3 is outside 0..1"),
        ([pred([A], [0.9], [0])], [target([A], [-1])], "target label -1 is outside 0..1"),
        ([pred([A], [0.9], [0])], [target([[10, 0, 5, 10]], [0])], "x2 >= x1"),
        ([pred([A], [float("nan")], [0])], [target([A], [0])], "NaN"),
        ([pred([A], [0.9], [0])], [target([A], [0]), target([], [])], "for 1 images but targets for 2"),
        ([{"boxes": torch.zeros(1, 4), "labels": torch.zeros(1, dtype=torch.long)}], [target([A], [0])], "'scores'"),
    ],
)
def test_bad_input_raises_one_clear_error(preds, targets, message):
    with pytest.raises(ValueError, match=message):
        VOCMeanAP(num_classes=2).update(preds, targets)


# --- against the independent reference (devkit_reference.py) on random images ----------------------------------


def random_images(seed: int, num_images: int, num_classes: int):
    """Jittered copies of boxes (IoU around the thresholds), repeats, strays, difficult boxes, empty images,
    a class that never has ground truth, and scores on a coarse grid so ties are common."""
    g = torch.Generator().manual_seed(seed)
    preds, targets = [], []
    for _ in range(num_images):
        count = int(torch.randint(0, 7, (1,), generator=g))
        xy = torch.rand(count, 2, generator=g) * 80
        wh = 2 + torch.rand(count, 2, generator=g) * 40
        boxes = torch.cat([xy, xy + wh], 1)
        labels = torch.randint(0, num_classes - 1, (count,), generator=g)
        difficult = torch.rand(count, generator=g) < 0.2
        copies = torch.randint(0, 4, (count,), generator=g)
        source = torch.arange(count).repeat_interleave(copies)
        jitter = (torch.rand(len(source), 4, generator=g) - 0.5) * 0.5 * wh[source].repeat(1, 2)
        strays = int(torch.randint(0, 5, (1,), generator=g))
        stray_xy = torch.rand(strays, 2, generator=g) * 80
        det_boxes = torch.cat([boxes[source] + jitter, torch.cat([stray_xy, stray_xy + 20], 1)])
        det_boxes = torch.cat([det_boxes[:, :2], torch.maximum(det_boxes[:, 2:], det_boxes[:, :2] + 1)], 1)
        relabel = torch.rand(len(source), generator=g) < 0.1
        det_labels = torch.cat([
            torch.where(relabel, torch.randint(0, num_classes, (len(source),), generator=g), labels[source]),
            torch.randint(0, num_classes, (strays,), generator=g),
        ])
        scores = torch.randint(0, 10, (len(det_boxes),), generator=g).float() / 10
        preds.append({"boxes": det_boxes, "scores": scores, "labels": det_labels})
        targets.append({"boxes": boxes, "labels": labels, "difficult": difficult})
    return preds, targets


def update_in_batches(metric: VOCMeanAP, preds, targets, seed: int) -> VOCMeanAP:
    g = torch.Generator().manual_seed(seed)
    start = 0
    while start < len(preds):
        size = int(torch.randint(1, 9, (1,), generator=g))
        metric.update(preds[start:start + size], targets[start:start + size])
        start += size
    return metric


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"use_07_metric": True},
        {"use_07_metric": True, "plus_one": True},
        {"use_difficult": True},
        {"iou_threshold": 0.7, "plus_one": True},
        {"iou_threshold": 0.3, "use_07_metric": True, "use_difficult": True},
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_devkit_reference_on_random_images(options, seed):
    num_classes = 5  # the last class only ever appears in detections
    preds, targets = random_images(seed, num_images=150, num_classes=num_classes)
    metric = update_in_batches(VOCMeanAP(num_classes=num_classes, **options), preds, targets, seed)
    result = metric.compute()
    aps, recalls = devkit_ap(preds, targets, num_classes, **options)
    expected = torch.tensor(aps, dtype=torch.float32)
    assert math.isnan(aps[-1]) and not math.isnan(aps[0])
    torch.testing.assert_close(result["AP_per_class"], expected, rtol=0, atol=1e-6, equal_nan=True)
    assert result["mAP"].item() == pytest.approx(np.nanmean(aps), abs=1e-6)
    assert result["recall"].item() == pytest.approx(np.nanmean(recalls), abs=1e-6)


# --- DDP: states gathered from two ranks give the single-process result -------------------------------------------


def test_two_ranks_match_one_process():
    preds, targets = random_images(3, num_images=40, num_classes=4)
    whole = update_in_batches(VOCMeanAP(num_classes=4), preds, targets, 0).compute()
    rank0 = [(preds[:12], targets[:12]), (preds[12:20], targets[12:20])]
    rank1 = [(preds[20:], targets[20:])]
    synced = two_rank_result(lambda **kw: VOCMeanAP(num_classes=4, **kw), rank0, rank1)
    torch.testing.assert_close(synced["AP_per_class"], whole["AP_per_class"], equal_nan=True)
    assert synced["mAP"] == whole["mAP"]


def test_rank_without_batches_or_boxes_does_not_break_sync():
    preds, targets = random_images(4, num_images=10, num_classes=3)
    whole = VOCMeanAP(num_classes=3)
    whole.update(preds, targets)
    expected = whole.compute()
    empty_images = ([pred([], [], [])] * 2, [target([], [])] * 2)
    with pytest.warns(UserWarning, match="before the ``update``"):
        idle = two_rank_result(lambda **kw: VOCMeanAP(num_classes=3, **kw), [(preds, targets)], [])
    without_boxes = two_rank_result(lambda **kw: VOCMeanAP(num_classes=3, **kw), [(preds, targets)], [empty_images])
    for result in (idle, without_boxes):
        torch.testing.assert_close(result["AP_per_class"], expected["AP_per_class"], equal_nan=True)


def test_merge_state_equals_one_instance():
    preds, targets = random_images(5, num_images=30, num_classes=4)
    whole = VOCMeanAP(num_classes=4, use_07_metric=True)
    whole.update(preds, targets)
    first, second = VOCMeanAP(num_classes=4, use_07_metric=True), VOCMeanAP(num_classes=4, use_07_metric=True)
    first.update(preds[:15], targets[:15])
    second.update(preds[15:], targets[15:])
    second.merge_state(first)  # torchmetrics puts the incoming state first: images keep their order for ties
    torch.testing.assert_close(second.compute()["AP_per_class"], whole.compute()["AP_per_class"], equal_nan=True)


def test_pr_counts_at_score_thresholds_by_hand():
    metric = VOCMeanAP(num_classes=2, pr_thresholds=11)
    truth = {"boxes": torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30.0]]), "labels": torch.tensor([0, 0])}
    found = {"boxes": torch.tensor([[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30.0]]),
             "scores": torch.tensor([0.95, 0.65, 0.35]), "labels": torch.tensor([0, 0, 0])}
    metric.update([found], [truth])
    counts = metric.compute()["pr_counts"]
    assert counts.shape == (2, 11, 3)
    # (TP, FP, missed) counting detections scoring >= 0.0, 0.1, ..., 1.0: the hit at 0.95, the miss at 0.65, the
    # hit at 0.35
    expected = [[2, 1, 0]] * 4 + [[1, 1, 1]] * 3 + [[1, 0, 1]] * 3 + [[0, 0, 2]]
    assert counts[0].tolist() == expected
    assert counts[1].abs().sum() == 0  # class 1: no objects, no detections


def test_an_image_repeated_with_its_id_counts_once():
    """Under DDP Lightning's sampler repeats images to even out the ranks; with ids they count once."""
    truth = {"boxes": torch.tensor([[0, 0, 10, 10.0], [20, 20, 30, 30]]), "labels": torch.tensor([0, 0])}
    found = {"boxes": torch.tensor([[0, 0, 10, 10.0], [50, 50, 60, 60]]), "scores": torch.tensor([0.9, 0.8]),
             "labels": torch.tensor([0, 0])}
    other_truth = {"boxes": torch.tensor([[5, 5, 15, 15.0]]), "labels": torch.tensor([0])}
    other_found = {"boxes": torch.tensor([[5, 5, 15, 15.0]]), "scores": torch.tensor([0.85]), "labels": torch.tensor([0])}

    def score(images):
        metric = VOCMeanAP(num_classes=1)
        for preds, targets in images:
            metric.update(preds, targets)
        return metric.compute()["mAP"].item()

    once = score([([found, other_found], [{**truth, "image_id": 0}, {**other_truth, "image_id": 1}])])
    repeated = [([found], [{**truth, "image_id": 0}]), ([other_found, found], [{**other_truth, "image_id": 1},
                                                                               {**truth, "image_id": 0}])]
    assert score(repeated) == pytest.approx(once)
    without_ids = [([p], [{k: v for k, v in t.items() if k != "image_id"}]) for ps, ts in repeated for p, t in zip(ps, ts)]
    assert score(without_ids) != pytest.approx(once)  # the repeat counts twice
    # by hand: ranked 0.9 hit, 0.85 hit, 0.8 miss over 3 objects -> AP = (1 + 1) / 3
    assert once == pytest.approx(2 / 3)
