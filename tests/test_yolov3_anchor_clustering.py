"""Anchor k-means: recovers well-separated shape clusters; fitness by hand; the command runs on sample data."""

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from lightning_det.data.records import AnnotationRecord
from lightning_det.models import YOLOv3
from lightning_det.models.yolov3.anchor_clustering import anchor_fitness, kmeans_anchors, letterboxed_sizes
from lightning_det.models.yolov3.grid import DEFAULT_ANCHORS


def test_three_shape_clusters_are_recovered():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 20.0], [60.0, 40.0], [200.0, 300.0]])
    wh = torch.cat([c * (1 + 0.05 * torch.randn(50, 2, generator=generator)) for c in centres])
    anchors = kmeans_anchors(wh, 3)
    assert torch.allclose(anchors, centres, rtol=0.05)
    assert anchor_fitness(wh, anchors, positive_iou=0.5)["best_possible_recall"] == 1.0


def test_fitness_by_hand():
    wh = torch.tensor([[10.0, 10.0], [20.0, 10.0]])
    anchors = torch.tensor([[10.0, 10.0]])
    # IoUs: 1.0 and 100 / 200 = 0.5
    fit = anchor_fitness(wh, anchors, positive_iou=0.6)
    assert abs(fit["mean_iou"] - 0.75) < 1e-6 and fit["best_possible_recall"] == 0.5


def test_letterbox_scaling_uses_the_long_side():
    records = [AnnotationRecord("a.jpg", 0, 200, 400, np.array([[0.0, 0.0, 100.0, 50.0]], np.float32),
                                np.zeros(1, np.int64), np.zeros(1, bool)),
               AnnotationRecord("b.jpg", 1, 416, 208, np.array([[10.0, 10.0, 30.0, 50.0]], np.float32),
                                np.zeros(1, np.int64), np.zeros(1, bool))]
    wh = letterboxed_sizes(records, img_size=416)
    assert torch.allclose(wh, torch.tensor([[104.0, 52.0], [20.0, 40.0]]))


def test_command_prints_anchors_for_the_sample_data(tmp_path):
    args = [sys.executable, "-m", "lightning_det.tools.anchors", f"data.root={tmp_path / 'sample'}",
            "data.reading.prepare.num_train=16", "data.reading.prepare.num_val=4", f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(args, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "best possible recall" in done.stdout and done.stdout.count("    - [") == 2  # two levels for tiny


def flat_records(sizes: list[tuple[float, float]], height: int = 416, width: int = 416) -> list[AnnotationRecord]:
    boxes = np.array([[10, 10, 10 + w, 10 + h] for w, h in sizes], dtype=np.float32)
    return [AnnotationRecord("x.jpg", 0, height, width, boxes, np.zeros(len(boxes), dtype=np.int64),
                             np.zeros(len(boxes), dtype=bool))]


def test_auto_anchors_are_refitted_when_darknets_miss_the_boxes(caplog):
    # 300 x 12 boxes: the best Darknet tiny anchor (135, 169) overlaps one by 135*12 / (135*169 + 300*12 - 135*12)
    # = 0.065 < positive_iou 0.2, so the best possible recall is 0 and k-means takes over.
    records = flat_records([(300, 12)] * 40 + [(30, 30)] * 40 + [(100, 60)] * 40)
    with caplog.at_level(logging.INFO):
        arguments = YOLOv3.fit_to_data({"variant": "tiny", "anchors": "auto", "assigner": {"positive_iou": 0.2}},
                                       records, 416)
    anchors = torch.tensor(arguments["anchors"]).view(-1, 2)
    assert anchors.shape == (6, 2) and torch.isclose(anchors, torch.tensor([300.0, 12.0])).all(1).any()
    assert "best possible recall 0.667" in caplog.text and "refitted by k-means to recall 1.000" in caplog.text
    model = YOLOv3(variant="tiny", width=0.125, num_classes=1, **{k: v for k, v in arguments.items() if k != "variant"})
    assert model.hparams.anchors == arguments["anchors"]  # what the checkpoint stores


def test_auto_keeps_darknets_anchors_where_they_fit_and_default_is_never_refitted():
    records = flat_records([(10, 14), (23, 27), (37, 58), (81, 82), (135, 169), (344, 319)] * 5)
    kept = YOLOv3.fit_to_data({"variant": "tiny", "anchors": "auto"}, records, 416)
    assert kept["anchors"] == DEFAULT_ANCHORS["tiny"]
    missing = flat_records([(300, 12)] * 30)
    assert YOLOv3.fit_to_data({"variant": "tiny", "anchors": "default"}, missing, 416)["anchors"] == "default"


def test_auto_anchors_see_boxes_at_the_training_size():
    # 40 x 40 boxes in 832-px images are 20 x 20 at 416: the fitted anchor is their letterboxed size.
    records = flat_records([(40, 40)] * 12 + [(600, 30)] * 12, height=832, width=832)
    anchors = torch.tensor(YOLOv3.fit_to_data({"variant": "tiny"}, records, 416)["anchors"]).view(-1, 2)
    assert torch.isclose(anchors, torch.tensor([20.0, 20.0])).all(1).any()
