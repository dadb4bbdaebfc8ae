"""COCOMeanAP against pycocotools' COCOeval run on the same boxes, and its DDP state sync.

Values agree to 1e-6: the metric returns float32, COCOeval float64.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings

import pytest
import torch
from helpers import two_rank_result
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_convert

from lightning_det.metrics import COCOMeanAP

SUMMARY_INDEX = {"mAP": 0, "AP50": 1, "AP75": 2, "APs": 3, "APm": 4, "APl": 5, "AR100": 8}


def random_images(seed: int, num_images: int, num_classes: int):
    """Small to large boxes (all three area ranges), jittered detections, crowd regions, images without boxes
    (some also without detections), one image with more than 100 detections, and a class that is only ever
    predicted. Scores are distinct: how two implementations order exact ties is not part of the COCO definition."""
    g = torch.Generator().manual_seed(seed)
    preds, targets = [], []
    for image in range(num_images):
        count = int(torch.randint(0, 6, (1,), generator=g)) if image % 7 else 0
        xy = torch.rand(count, 2, generator=g) * 300
        wh = 4 + torch.rand(count, 2, generator=g) * 150
        boxes = torch.cat([xy, xy + wh], 1)
        labels = torch.randint(0, num_classes - 1, (count,), generator=g)
        crowd = torch.rand(count, generator=g) < 0.15
        copies = torch.randint(0, 4, (count,), generator=g)
        source = torch.arange(count).repeat_interleave(copies)
        jitter = (torch.rand(len(source), 4, generator=g) - 0.5) * 0.4 * wh[source].repeat(1, 2)
        strays = 110 if image == 3 else 0 if image % 14 == 0 else int(torch.randint(0, 4, (1,), generator=g))
        stray_xy = torch.rand(strays, 2, generator=g) * 300
        det_boxes = torch.cat([boxes[source] + jitter, torch.cat([stray_xy, stray_xy + 30], 1)])
        det_boxes = torch.cat([det_boxes[:, :2], torch.maximum(det_boxes[:, 2:], det_boxes[:, :2] + 1)], 1)
        det_labels = torch.cat([labels[source], torch.randint(0, num_classes, (strays,), generator=g)])
        preds.append({"boxes": det_boxes, "scores": torch.rand(len(det_boxes), generator=g), "labels": det_labels})
        targets.append({"boxes": boxes, "labels": labels, "difficult": crowd})
    return preds, targets


def pycocotools_reference(preds, targets, num_classes) -> dict[str, float | list[float]]:
    """COCOeval on a ground-truth json and a result list built from the same boxes (xywh as torchmetrics makes it)."""

    def xywh(boxes):
        return box_convert(boxes, "xyxy", "xywh").tolist()

    boxes = [
        (image, box, label, crowd)
        for image, t in enumerate(targets)
        for box, label, crowd in zip(xywh(t["boxes"]), t["labels"].tolist(), t["difficult"].tolist())
    ]
    annotations = [  # ids from 1: COCOeval reads id 0 as "unmatched"
        {"id": i + 1, "image_id": image, "category_id": label, "bbox": box, "area": box[2] * box[3],
         "iscrowd": int(crowd)}
        for i, (image, box, label, crowd) in enumerate(boxes)
    ]
    ground_truth = COCO()
    ground_truth.dataset = {
        "images": [{"id": image} for image in range(len(targets))],
        "annotations": annotations,
        "categories": [{"id": c, "name": str(c)} for c in range(num_classes)],
    }
    results = [
        {"image_id": image, "category_id": label, "bbox": box, "score": score}
        for image, p in enumerate(preds)
        for box, label, score in zip(xywh(p["boxes"]), p["labels"].tolist(), p["scores"].tolist())
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth.createIndex()
        detections = ground_truth.loadRes(results)
        stats = summary(ground_truth, detections)
        expected = {key: stats[index] for key, index in SUMMARY_INDEX.items()}
        # AP of one class: a separate evaluation restricted to it, as COCOeval users do it.
        expected["AP_per_class"] = [summary(ground_truth, detections, [c])[0] for c in range(num_classes)]
    return {
        k: [math.nan if x < 0 else x for x in v] if isinstance(v, list) else math.nan if v < 0 else v
        for k, v in expected.items()
    }


def summary(ground_truth: COCO, detections: COCO, category_ids: list[int] | None = None) -> list[float]:
    evaluation = COCOeval(ground_truth, detections, "bbox")
    if category_ids is not None:
        evaluation.params.catIds = category_ids
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    return list(evaluation.stats)


def update_quietly(metric: COCOMeanAP, preds, targets) -> COCOMeanAP:
    """Update without torchmetrics' warning about the image with more than 100 detections (tested on purpose)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*more than 100 detections.*")
        metric.update(preds, targets)
    return metric


def coco_result(preds, targets, num_classes):
    return update_quietly(COCOMeanAP(num_classes=num_classes), preds, targets).compute()


def assert_same(result, expected):
    for key in SUMMARY_INDEX:
        assert result[key].item() == pytest.approx(expected[key], abs=1e-6, nan_ok=True), key
    torch.testing.assert_close(
        result["AP_per_class"], torch.tensor(expected["AP_per_class"], dtype=torch.float32),
        rtol=0, atol=1e-6, equal_nan=True,
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_pycocotools_on_random_images(seed):
    num_classes = 4
    preds, targets = random_images(seed, num_images=40, num_classes=num_classes)
    result = coco_result(preds, targets, num_classes)
    expected = pycocotools_reference(preds, targets, num_classes)
    assert math.isnan(expected["AP_per_class"][-1]) and expected["mAP"] > 0
    assert_same(result, expected)


def test_crowd_region_absorbs_detections():
    # One normal box and one crowd region (VOC "difficult") of class 0; three detections inside the crowd region
    # would be false positives without it. With it they are ignored: one TP at the top score -> AP 1 at IoU .5.
    boxes = torch.tensor([[0.0, 0, 50, 50], [100, 100, 200, 200]])
    targets = [{"boxes": boxes, "labels": torch.tensor([0, 0]), "difficult": torch.tensor([False, True])}]
    inside = torch.tensor([[100.0, 100, 140, 140], [150, 150, 190, 190], [110, 160, 150, 195]])
    preds = [{
        "boxes": torch.cat([boxes[:1], inside]),
        "scores": torch.tensor([0.5, 0.9, 0.8, 0.7]),
        "labels": torch.zeros(4, dtype=torch.long),
    }]
    result = coco_result(preds, targets, num_classes=1)
    assert result["AP50"].item() == pytest.approx(1.0)
    assert_same(result, pycocotools_reference(preds, targets, 1))
    without_crowd = coco_result(preds, [{**targets[0], "difficult": torch.tensor([False, False])}], num_classes=1)
    assert without_crowd["AP50"].item() < 0.5


def test_iou_thresholds_are_exactly_cocoeval_s():
    # The detection covers 55 of the box's 100 rows: IoU = 5500 / 10000 = 0.55 exactly. COCOeval matches at
    # IoU >= threshold, so it is a TP at 0.5 and 0.55 and missed at the 8 higher thresholds: mAP = 2/10.
    # (A float32 threshold 0.550000011920929 would miss it at 0.55 too.)
    preds = [{"boxes": torch.tensor([[0.0, 0, 100, 55]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}]
    targets = [{"boxes": torch.tensor([[0.0, 0, 100, 100]]), "labels": torch.tensor([0]),
                "difficult": torch.tensor([False])}]
    result = coco_result(preds, targets, num_classes=1)
    assert result["mAP"].item() == pytest.approx(0.2)
    assert_same(result, pycocotools_reference(preds, targets, 1))


def test_per_class_is_aligned_to_all_classes():
    # Only class 2 of 5 appears: it sits at index 2, every other class is NaN.
    boxes = torch.tensor([[10.0, 10, 60, 60]])
    preds = [{"boxes": boxes, "scores": torch.tensor([0.9]), "labels": torch.tensor([2])}]
    targets = [{"boxes": boxes, "labels": torch.tensor([2]), "difficult": torch.tensor([False])}]
    per_class = coco_result(preds, targets, num_classes=5)["AP_per_class"]
    assert per_class.shape == (5,)
    assert per_class[2].item() == pytest.approx(1.0)
    assert per_class[[0, 1, 3, 4]].isnan().all()


def test_no_updates_gives_nan_for_every_key():
    metric = COCOMeanAP(num_classes=3)
    with pytest.warns(UserWarning, match="before the ``update``"):
        result = metric.compute()
    assert result["AP_per_class"].shape == (3,)
    assert all(value.isnan().all() for value in result.values())


def test_unknown_class_is_a_clear_error():
    boxes = torch.tensor([[10.0, 10, 60, 60]])
    preds = [{"boxes": boxes, "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}]
    targets = [{"boxes": boxes, "labels": torch.tensor([7]), "difficult": torch.tensor([False])}]
    with pytest.raises(ValueError, match="target label 7 is outside 0..2"):
        COCOMeanAP(num_classes=3).update(preds, targets)


def test_only_the_best_100_detections_of_an_image_and_class_count():
    # 150 detections of class 0 in one image, the best-scored ones mostly strays: COCOeval keeps the top 100 of the
    # image and class (maxDets), so a true positive ranked below them is not counted. Class 1 shares the image.
    preds, targets = random_images(3, num_images=6, num_classes=2)
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(150, 2, generator=g) * 300
    strays = torch.cat([xy, xy + 20], 1)
    scores = torch.linspace(0.99, 0.2, 150)
    truth = torch.tensor([[10.0, 10, 110, 110]])
    preds[1] = {
        "boxes": torch.cat([strays, truth, truth + 200]),
        "scores": torch.cat([scores, torch.tensor([0.1, 0.95])]),
        "labels": torch.cat([torch.zeros(151, dtype=torch.long), torch.tensor([1])]),
    }
    targets[1] = {"boxes": torch.cat([truth, truth + 200]), "labels": torch.tensor([0, 1]),
                  "difficult": torch.tensor([False, False])}
    result = coco_result(preds, targets, 2)
    assert_same(result, pycocotools_reference(preds, targets, 2))


@pytest.mark.parametrize("split", [10, 7, 0])
def test_ranks_with_unequal_image_counts_match_one_process(split):
    # The states are flat tensors gathered with "cat": ranks may hold different numbers of images, or none at all
    # (torchmetrics then sends an empty tensor), and rank 0's images come first, as in the single-process run.
    preds, targets = random_images(6, num_images=20, num_classes=3)
    whole = coco_result(preds, targets, 3)
    rank0 = [(preds[:split], targets[:split])] if split else []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*before the ``update``.*")  # rank 0 saw no batch
        synced = two_rank_result(lambda **kw: COCOMeanAP(num_classes=3, **kw), rank0, [(preds[split:], targets[split:])])
    for key in SUMMARY_INDEX:
        assert synced[key].item() == pytest.approx(whole[key].item(), abs=1e-6, nan_ok=True), key
    torch.testing.assert_close(synced["AP_per_class"], whole["AP_per_class"], equal_nan=True)


def test_an_image_repeated_with_its_id_counts_once():
    """Under DDP Lightning's sampler repeats images to even out the ranks; with ids they count once, as pycocotools
    scores the images without the repeats."""
    preds, targets = random_images(3, num_images=12, num_classes=3)
    targets = [{**t, "image_id": i} for i, t in enumerate(targets)]
    repeated = COCOMeanAP(num_classes=3)
    update_quietly(repeated, preds[:8], targets[:8])
    update_quietly(repeated, preds[8:] + preds[:3], targets[8:] + targets[:3])
    assert_same(repeated.compute(), pycocotools_reference(preds, targets, 3))

    without_ids = [{k: v for k, v in t.items() if k != "image_id"} for t in targets]
    counted_twice = coco_result(preds + preds[:3], without_ids + without_ids[:3], 3)
    assert counted_twice["mAP"].item() != pytest.approx(repeated.compute()["mAP"].item(), abs=1e-6)
