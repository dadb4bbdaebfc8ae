"""Time the validation metrics on a VOC-sized epoch: update in batches, then compute.

    python bench/metrics.py [--images 5000] [--detections 100] [--classes 20] [--boxes 5] [--batch 16] [--threads N]

Synthetic, seeded data: ~``boxes`` ground-truth boxes per image (10% difficult), ``detections`` per image: two
jittered copies of each box (true positives, duplicates and near misses) topped up with lower-scored strays.
torchmetrics' own ``MeanAveragePrecision(backend="faster_coco_eval")`` is the yardstick.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable

import torch
from torchmetrics.detection import MeanAveragePrecision

from lightning_det.metrics import COCOMeanAP, VOCMeanAP

Detections = list[dict[str, torch.Tensor]]


def synthetic_epoch(images: int, detections: int, classes: int, boxes: int, seed: int = 0):
    """Per-image predictions and targets in the metric contract, generated as whole-epoch tensors."""
    g = torch.Generator().manual_seed(seed)
    gt_counts = torch.randint(max(boxes - 3, 1), boxes + 4, (images,), generator=g)
    total_gt = int(gt_counts.sum())
    xy = torch.rand(total_gt, 2, generator=g) * 400
    wh = 8 + torch.rand(total_gt, 2, generator=g) * 200
    gt_boxes = torch.cat([xy, xy + wh], 1)
    gt_labels = torch.randint(0, classes, (total_gt,), generator=g)
    difficult = torch.rand(total_gt, generator=g) < 0.1

    # Detection j of image i copies box j mod (boxes of i), jittered; beyond twice the box count it is a stray.
    gt_start = torch.cumsum(gt_counts, 0) - gt_counts
    slot = torch.arange(detections).expand(images, detections)
    copies = slot < 2 * gt_counts[:, None]
    source = (gt_start[:, None] + slot % gt_counts[:, None]).flatten()
    jitter = (torch.rand(images * detections, 4, generator=g) - 0.5) * 0.3 * wh[source].repeat(1, 2)
    stray_xy = torch.rand(images * detections, 2, generator=g) * 400
    strays = torch.cat([stray_xy, stray_xy + 8 + torch.rand(images * detections, 2, generator=g) * 100], 1)
    det_boxes = torch.where(copies.flatten()[:, None], gt_boxes[source] + jitter, strays)
    det_boxes[:, 2:] = torch.maximum(det_boxes[:, 2:], det_boxes[:, :2] + 1)
    stray_labels = torch.randint(0, classes, (images * detections,), generator=g)
    det_labels = torch.where(copies.flatten(), gt_labels[source], stray_labels)
    # Copies score higher on average than strays, as a trained detector's would.
    scores = torch.rand(images * detections, generator=g) * torch.where(copies.flatten(), 1.0, 0.6)

    preds = [
        {"boxes": b, "scores": s, "labels": l}
        for b, s, l in zip(det_boxes.split(detections), scores.split(detections), det_labels.split(detections))
    ]
    split = gt_counts.tolist()
    targets = [
        {"boxes": b, "labels": l, "difficult": d}
        for b, l, d in zip(gt_boxes.split(split), gt_labels.split(split), difficult.split(split))
    ]
    return preds, targets


def time_metric(make: Callable[[], object], preds: Detections, targets: Detections, batch: int):
    """Seconds spent in update (all batches) and in compute, and the mAP-like headline value."""
    metric = make()
    start = time.perf_counter()
    for i in range(0, len(preds), batch):
        metric.update(preds[i : i + batch], targets[i : i + batch])
    updated = time.perf_counter()
    result = metric.compute()
    done = time.perf_counter()
    return updated - start, done - updated, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--detections", type=int, default=100)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--boxes", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    preds, targets = synthetic_epoch(args.images, args.detections, args.classes, args.boxes)
    coco_targets = [{"boxes": t["boxes"], "labels": t["labels"], "iscrowd": t["difficult"].long()} for t in targets]
    n = args.classes
    contenders = [
        ("VOCMeanAP area (ours)", lambda: VOCMeanAP(num_classes=n), targets, "mAP"),
        ("VOCMeanAP 07 + plus_one (ours)", lambda: VOCMeanAP(num_classes=n, use_07_metric=True, plus_one=True),
         targets, "mAP"),
        ("torchmetrics MeanAveragePrecision fce", lambda: MeanAveragePrecision(backend="faster_coco_eval"),
         coco_targets, "map_50"),
        ("COCOMeanAP (ours, fce + per class)", lambda: COCOMeanAP(num_classes=n), targets, "AP50"),
    ]
    print(f"{args.images} images x {args.detections} detections, {n} classes, "
          f"{sum(len(t['labels']) for t in targets)} ground-truth boxes, batches of {args.batch}, "
          f"torch threads: {torch.get_num_threads()}")
    print(f"{'metric':<40} {'update s':>9} {'compute s':>10} {'total s':>8} {'AP@0.5':>8}")
    for name, make, metric_targets, key in contenders:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            update_s, compute_s, result = time_metric(make, preds, metric_targets, args.batch)
        total = update_s + compute_s
        print(f"{name:<40} {update_s:>9.2f} {compute_s:>10.2f} {total:>8.2f} {float(result[key]):>8.4f}")


if __name__ == "__main__":
    main()
