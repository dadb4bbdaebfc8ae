"""The VOC devkit's evaluation written out again, one detection at a time with plain loops: the independent reference
``VOCMeanAP`` is compared with (tests/test_metrics_voc.py on random images, tests/test_metrics_files.py on the devkit's
own files)."""

from __future__ import annotations

import math

import numpy as np
from torch import Tensor


def devkit_ap(preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]], num_classes: int,
              iou_threshold: float = 0.5, use_07_metric: bool = False, use_difficult: bool = False,
              plus_one: bool = False) -> tuple[list[float], list[float]]:
    """AP and final recall per class of ``preds`` against ``targets`` (one dict per image, as ``VOCMeanAP.update``
    takes them), after VOCevaldet.m / py-faster-rcnn's voc_eval: a detection takes the best-overlapping box of its
    image (matched or not, the first on ties), difficult boxes are ignored unless ``use_difficult``, ``plus_one``
    measures widths ``x2 - x1 + 1`` (the devkit's, on its 1-based inclusive pixels), ``use_07_metric`` gives the
    11-point AP."""
    extra = 1.0 if plus_one else 0.0
    aps, recalls = [], []
    for cls in range(num_classes):
        ground_truth, npos = {}, 0
        for image, t in enumerate(targets):
            boxes = [
                (box, bool(diff) and not use_difficult)
                for box, label, diff in zip(t["boxes"].tolist(), t["labels"].tolist(), t["difficult"].tolist())
                if label == cls
            ]
            ground_truth[image] = {"boxes": boxes, "taken": [False] * len(boxes)}
            npos += sum(not diff for _, diff in boxes)
        detections = [
            (score, image, box)
            for image, p in enumerate(preds)
            for box, score, label in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist())
            if label == cls
        ]
        detections.sort(key=lambda d: -d[0])  # Python's sort is stable, like MATLAB's
        tp, fp = [], []
        for _, image, box in detections:
            ovmax, jmax = -math.inf, -1
            for j, (gt, _) in enumerate(ground_truth[image]["boxes"]):
                iw = min(box[2], gt[2]) - max(box[0], gt[0]) + extra
                ih = min(box[3], gt[3]) - max(box[1], gt[1]) + extra
                if iw > 0 and ih > 0:
                    union = ((box[2] - box[0] + extra) * (box[3] - box[1] + extra)
                             + (gt[2] - gt[0] + extra) * (gt[3] - gt[1] + extra) - iw * ih)
                    if iw * ih / union > ovmax:
                        ovmax, jmax = iw * ih / union, j
            is_tp = is_fp = 0
            if ovmax >= iou_threshold:
                if not ground_truth[image]["boxes"][jmax][1]:
                    if not ground_truth[image]["taken"][jmax]:
                        is_tp = 1
                        ground_truth[image]["taken"][jmax] = True
                    else:
                        is_fp = 1
            else:
                is_fp = 1
            tp.append(is_tp)
            fp.append(is_fp)
        if npos == 0:
            aps.append(math.nan)
            recalls.append(math.nan)
            continue
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        rec = tp / npos
        prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        recalls.append(float(rec[-1]) if len(rec) else 0.0)
        if use_07_metric:
            ap = 0.0
            for t in np.arange(0.0, 1.1, 0.1):
                ap += (np.max(prec[rec >= t]) if np.sum(rec >= t) > 0 else 0.0) / 11
        else:
            mrec = np.concatenate(([0.0], rec, [1.0]))
            mpre = np.concatenate(([0.0], prec, [0.0]))
            for i in range(len(mpre) - 2, -1, -1):
                mpre[i] = max(mpre[i], mpre[i + 1])
            i = np.where(mrec[1:] != mrec[:-1])[0]
            ap = np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])
        aps.append(float(ap))
    return aps, recalls
