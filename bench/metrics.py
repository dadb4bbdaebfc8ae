"""Time the validation metrics on a VOC-sized epoch: update in batches, then compute.

    python bench/metrics.py [--images 5000] [--detections 100] [--classes 20] [--boxes 5] [--batch 16] [--threads N]
                            [--repeats R]

Synthetic, seeded data: ~``boxes`` ground-truth boxes per image (10% difficult), ``detections`` per image: two
jittered copies of each box (true positives, duplicates and near misses) topped up with lower-scored strays.

Yardsticks: torchmetrics' own ``MeanAveragePrecision(backend="faster_coco_eval")``, and faster_coco_eval alone: the
epoch's ground truth and detections handed to ``COCOeval_faster`` as directly as the library takes them (one dict
per object built from whole-epoch columns, ``COCO(dataset)`` for both sides, default parameters), then evaluate,
accumulate and summarize. The contenders run in turn within each of ``repeats`` rounds; the table shows median
times and the median over rounds of COCOMeanAP's time over faster_coco_eval alone's, so load from other processes
moves both sides of the ratio alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from faster_coco_eval import COCO, COCOeval_faster
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


class FasterCocoEvalAlone:
    """faster_coco_eval fed directly: ``update`` keeps the batches, ``compute`` builds the two COCO datasets of the
    epoch and runs ``COCOeval_faster`` with its default parameters."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.preds: Detections = []
        self.targets: Detections = []

    def update(self, preds: Detections, targets: Detections) -> None:
        self.preds += preds
        self.targets += targets

    def compute(self) -> dict[str, float]:
        def column(items: Detections, key: str) -> list:
            return torch.cat([item[key] for item in items]).tolist()

        def xywh(items: Detections) -> list[list[float]]:
            boxes = torch.cat([item["boxes"] for item in items])
            return torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()

        def image_ids(items: Detections) -> list[int]:
            return torch.arange(len(items)).repeat_interleave(torch.tensor([len(i["labels"]) for i in items])).tolist()

        truth = [
            {"id": i, "image_id": image, "category_id": label, "bbox": box, "area": box[2] * box[3],
             "iscrowd": int(crowd)}
            for i, (image, label, box, crowd) in enumerate(zip(
                image_ids(self.targets), column(self.targets, "labels"), xywh(self.targets),
                column(self.targets, "difficult"),
            ), start=1)
        ]
        found = [
            {"id": i, "image_id": image, "category_id": label, "bbox": box, "area": box[2] * box[3], "score": score}
            for i, (image, label, box, score) in enumerate(zip(
                image_ids(self.preds), column(self.preds, "labels"), xywh(self.preds), column(self.preds, "scores")
            ), start=1)
        ]
        common = {"images": [{"id": i} for i in range(len(self.targets))],
                  "categories": [{"id": c} for c in range(self.num_classes)]}
        evaluation = COCOeval_faster(COCO({**common, "annotations": truth}), COCO({**common, "annotations": found}),
                                     "bbox", print_function=lambda *args, **kwargs: None)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
        return {"AP50": float(evaluation.stats[1])}


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
    parser.add_argument("--repeats", type=int, default=1, help="rounds of all contenders; medians are shown")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    preds, targets = synthetic_epoch(args.images, args.detections, args.classes, args.boxes)
    coco_targets = [{"boxes": t["boxes"], "labels": t["labels"], "iscrowd": t["difficult"].long()} for t in targets]
    n = args.classes
    ours, alone = "COCOMeanAP (ours)", "faster_coco_eval alone"
    contenders = [
        ("VOCMeanAP area (ours)", lambda: VOCMeanAP(num_classes=n), targets, "mAP"),
        ("VOCMeanAP 07 + plus_one (ours)", lambda: VOCMeanAP(num_classes=n, use_07_metric=True, plus_one=True),
         targets, "mAP"),
        ("torchmetrics MeanAveragePrecision fce", lambda: MeanAveragePrecision(backend="faster_coco_eval"),
         coco_targets, "map_50"),
        (alone, lambda: FasterCocoEvalAlone(n), targets, "AP50"),
        (ours, lambda: COCOMeanAP(num_classes=n), targets, "AP50"),
    ]
    print(f"{args.images} images x {args.detections} detections, {n} classes, "
          f"{sum(len(t['labels']) for t in targets)} ground-truth boxes, batches of {args.batch}, "
          f"torch threads: {torch.get_num_threads()}, medians of {args.repeats} rounds")
    times: dict[str, list[tuple[float, float]]] = {name: [] for name, *_ in contenders}
    headline = {}
    for _ in range(args.repeats):
        for name, make, metric_targets, key in contenders:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                update_s, compute_s, result = time_metric(make, preds, metric_targets, args.batch)
            times[name].append((update_s, compute_s))
            headline[name] = float(result[key])
    print(f"{'metric':<40} {'update s':>9} {'compute s':>10} {'total s':>8} {'AP@0.5':>8}")
    for name, rounds in times.items():
        update_s, compute_s = (statistics.median(part) for part in zip(*rounds))
        total = statistics.median(u + c for u, c in rounds)
        print(f"{name:<40} {update_s:>9.2f} {compute_s:>10.2f} {total:>8.2f} {headline[name]:>8.4f}")
    ratios = [sum(a) / sum(b) for a, b in zip(times[ours], times[alone])]
    print(f"{ours} / {alone}, total time: median {statistics.median(ratios):.2f} "
          f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
