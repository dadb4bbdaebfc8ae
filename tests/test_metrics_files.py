"""The metrics on files, against the tools that define them: VOC07 AP from the devkit's own files (the XML and
the comp4 result files evaluate writes) as the devkit scores them (devkit_reference.py), and COCO's size ranges from
each annotation's ``area`` as pycocotools bins them, in evaluate and in validation during training."""

from __future__ import annotations

import contextlib
import io
import json
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from devkit_reference import devkit_ap
from helpers import make_voc, write_image
from hydra.utils import instantiate
from omegaconf import OmegaConf
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from runs import REPO

from lightning_det.data import COCOSource, DetectionDataModule, LoaderOptions, read_coco, read_voc
from lightning_det.metrics import COCOMeanAP, VOCMeanAP
from lightning_det.models.detector import labels_to_targets
from lightning_det.tools.evaluate import record_targets, write_voc_results


def voc_scene(root: Path, seed: int = 0) -> tuple[list[str], dict[str, tuple]]:
    """30 images, 3 classes, some difficult boxes; integer devkit pixels."""
    rng = np.random.default_rng(seed)
    classes = ["cat", "dog", "person"]
    images = {}
    for k in range(30):
        objects = []
        for _ in range(rng.integers(1, 5)):
            xmin, ymin = (int(v) for v in rng.integers(1, 120, 2))
            w, h = (int(v) for v in rng.integers(4, 40, 2))
            objects.append((str(rng.choice(classes)), (xmin, ymin, xmin + w - 1, ymin + h - 1), rng.random() < 0.1))
        images[f"img_{k:03d}"] = (180, 180, objects)
    make_voc(root, {"2007/test": images})
    return classes, images


def jittered_detections(records, num_classes: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Boxes near the ground truth (many near IoU 0.5, where one pixel decides) plus strays, on a 0.1 px grid and
    with 6-decimal distinct scores, so the comp4 text files hold them exactly."""
    rng = np.random.default_rng(seed)
    scores = iter(rng.permutation(10**6)[:10_000] / 10**6)
    detections = []
    for record in records:
        boxes = [record.boxes[i] + rng.normal(0, 3.0, 4) for i in range(len(record.boxes)) for _ in range(2)]
        labels = [int(record.labels[i]) for i in range(len(record.boxes)) for _ in range(2)]
        stray = rng.uniform(0, 140, 2)
        boxes.append(np.concatenate([stray, stray + 20]))
        labels.append(int(rng.integers(num_classes)))
        boxes = np.round(np.clip(np.stack(boxes), 0, 179), 1)
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        detections.append({"boxes": torch.tensor(boxes, dtype=torch.float64),
                           "scores": torch.tensor([next(scores) for _ in labels], dtype=torch.float64),
                           "labels": torch.tensor(labels)})
    return detections


def devkit_inputs(annotations: Path, result_files: Path, classes: list[str], image_ids: list[str]
                  ) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """What the devkit reads, one entry per image as ``devkit_ap`` takes it: the ground truth of the XML as the
    integer pixels it holds, with its difficult flags, and the detections of the comp4 files as written there
    (``<image> <score> <x1> <y1> <x2> <y2>``, one file per class)."""
    targets = []
    for image_id in image_ids:
        objects = list(ET.parse(annotations / f"{image_id}.xml").getroot().iter("object"))
        boxes = [[float(o.find("bndbox").find(tag).text) for tag in ("xmin", "ymin", "xmax", "ymax")] for o in objects]
        labels = [classes.index(o.find("name").text) for o in objects]
        difficult = [o.find("difficult").text == "1" for o in objects]
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4),
                        "labels": torch.tensor(labels, dtype=torch.long),
                        "difficult": torch.tensor(difficult, dtype=torch.bool)})
    found: dict[str, list[tuple[list[float], float, int]]] = {image_id: [] for image_id in image_ids}
    for label, name in enumerate(classes):
        for line in (result_files / f"comp4_det_test_{name}.txt").read_text().splitlines():
            image_id, score, *box = line.split()
            found[image_id].append(([float(v) for v in box], float(score), label))
    preds = [{"boxes": torch.tensor([box for box, _, _ in rows], dtype=torch.float64).reshape(-1, 4),
              "scores": torch.tensor([score for _, score, _ in rows], dtype=torch.float64),
              "labels": torch.tensor([label for _, _, label in rows], dtype=torch.long)} for rows in found.values()]
    return preds, targets


def test_voc07_metric_matches_the_devkit_rules_on_comp4_files(tmp_path):
    classes, images = voc_scene(tmp_path)
    records = read_voc(tmp_path, ["2007/test"], classes).records[0]
    detections = jittered_detections(records, len(classes), seed=1)
    write_voc_results(tmp_path / "results", classes, list(images), detections)
    files = devkit_inputs(tmp_path / "VOC2007" / "Annotations", tmp_path / "results", classes, list(images))
    expected, _ = devkit_ap(*files, len(classes), use_07_metric=True, plus_one=True)  # the devkit's x2 - x1 + 1

    metric = instantiate(OmegaConf.load(REPO / "conf" / "metric" / "voc07.yaml"))(num_classes=len(classes))
    metric.update(detections, record_targets(records))
    assert metric.compute()["AP_per_class"].tolist() == pytest.approx(expected, abs=1e-6)
    twice = VOCMeanAP(len(classes), use_07_metric=True, plus_one=True)  # the old setting: a pixel counted twice
    twice.update(detections, record_targets(records))
    assert twice.compute()["AP_per_class"].tolist() != pytest.approx(expected, abs=1e-3)


def coco_with_mask_areas(root: Path) -> tuple[Path, Path]:
    """A json whose ``area`` (as for masks) is about half of w*h, moving objects between the small / medium /
    large ranges; some annotations have no ``area``. Returns it and the same json with w*h filled in there, the
    input pycocotools needs."""
    rng = np.random.default_rng(3)
    images, annotations = [], []
    for k in range(12):
        images.append({"id": k + 1, "file_name": f"image {k}.png", "height": 300, "width": 300})
        write_image(root / "images" / f"image {k}.png", 300, 300, seed=k)
        for _ in range(4):
            side = float(rng.choice([28, 40, 60, 90, 120, 150]))
            x, y = (float(v) for v in rng.uniform(0, 300 - side, 2))
            annotation = {"id": len(annotations) + 1, "image_id": k + 1, "category_id": int(rng.integers(1, 3)),
                          "bbox": [x, y, side, side * 0.9], "iscrowd": 0}
            if len(annotations) % 5:
                annotation["area"] = round(side * side * 0.9 * rng.uniform(0.4, 0.7), 1)
            annotations.append(annotation)
    categories = [{"id": 1, "name": "cell"}, {"id": 2, "name": "platelet"}]
    ours = root / "annotations.json"
    ours.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    filled = [{**a, "area": a.get("area", a["bbox"][2] * a["bbox"][3])} for a in annotations]
    reference = root / "reference.json"
    reference.write_text(json.dumps({"images": images, "annotations": filled, "categories": categories}))
    return ours, reference


def test_coco_area_ranges_use_the_annotation_area_like_pycocotools(tmp_path):
    ours, reference = coco_with_mask_areas(tmp_path)
    result = read_coco(tmp_path, ours.name, "images")
    records = result.records[0]
    detections = jittered_detections(records, 2, seed=4)
    metric = COCOMeanAP(2)
    metric.update(detections, record_targets(records))
    values = metric.compute()

    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(reference))
        found = truth.loadRes([
            {"image_id": record.image_id, "category_id": result.label_to_category_id[label], "score": score,
             "bbox": [x1, y1, x2 - x1, y2 - y1]}
            for record, det in zip(records, detections)
            for (x1, y1, x2, y2), score, label in zip(det["boxes"].tolist(), det["scores"].tolist(),
                                                      det["labels"].tolist())
        ])
        evaluation = COCOeval(truth, found, "bbox")
        evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
    expected = dict(zip(("mAP", "AP50", "AP75", "APs", "APm", "APl"), evaluation.stats[:6]))
    for key, value in expected.items():
        assert values[key].item() == pytest.approx(value, abs=1e-6), key

    by_box = COCOMeanAP(2)  # without the area: w*h bins the objects differently here
    by_box.update(detections, [{k: v for k, v in t.items() if k != "area"} for t in record_targets(records)])
    assert any(abs(by_box.compute()[k].item() - expected[k]) > 1e-3 for k in ("APs", "APm", "APl"))


def test_validation_during_training_scores_with_the_annotation_area(tmp_path):
    """The targets validation builds from batches (letterboxed, padded, mapped back) carry each object's own
    ``area`` too, so metric=coco during training bins objects as pycocotools does, as evaluate does above."""
    ours, _ = coco_with_mask_areas(tmp_path)
    source = COCOSource(ours.name, "images")
    datamodule = DetectionDataModule(tmp_path, source, source, classes=None, batch_size=5, img_size=128,
                                     loader=LoaderOptions(num_workers=0))
    datamodule.setup("validate")
    annotations = json.loads(ours.read_text())["annotations"]
    expected = defaultdict(list)
    for annotation in annotations:
        expected[annotation["image_id"]].append(annotation.get("area", 0.0))
    seen = {}
    for batch in datamodule.val_dataloader():
        for target in labels_to_targets(batch["labels"], batch["meta"]):
            seen[int(target["image_id"])] = target["area"].tolist()
    assert seen.keys() == expected.keys()  # COCO image ids are the json's
    for image_id, areas in expected.items():  # json order; 0 where an annotation has no area (the metric uses w*h)
        assert seen[image_id] == pytest.approx(areas, abs=0.05)
