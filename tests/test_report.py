"""The results report: the confusion matrix and F1 points by hand and against the VOC metric, results.csv's
append rules, and the images and CSV a real training run writes (read back, and against TensorBoard)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image
from runs import REPORT_IMAGES, scalars, small_sample, train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_det.metrics import VOCMeanAP
from lightning_det.report.confusion import confusion_matrix
from lightning_det.report.curves import best_f1_threshold, f1_by_threshold
from lightning_det.report.drawing import class_colour, draw_predictions
from lightning_det.report.results_csv import append_row, read_rows


def image(boxes, labels, scores=None, difficult=None) -> dict:
    item = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.long)}
    if scores is not None:
        item["scores"] = torch.tensor(scores, dtype=torch.float32)
    if difficult is not None:
        item["difficult"] = torch.tensor(difficult, dtype=torch.bool)
    return item


def test_confusion_matrix_counted_by_hand():
    targets = [
        image([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10]], [0, 1, 0, 1],
              difficult=[False, False, False, True]),
        image([], []),
        image([[0, 0, 10, 10]], [1]),
    ]
    detections = [
        image([[0, 0, 10, 10],     # class 0 on A (class 0): true positive
               [20, 0, 30, 10],    # class 0 on B (class 1): confused
               [1, 0, 11, 10],     # a second class-0 box on A, lower IoU (0.82): background column
               [80, 80, 90, 90],   # class 1 on nothing: background column
               [40, 0, 50, 10],    # on C but below conf: left out, so C is missed (background row)
               [60, 0, 70, 10]],   # on the difficult D: counted nowhere
              [0, 0, 0, 1, 0, 1], [0.9, 0.8, 0.7, 0.6, 0.1, 0.5]),
        image([[0, 0, 5, 5]], [1], [0.4]),          # no objects in the image: background column
        image([[0, 0, 10, 4]], [1], [0.9]),         # IoU 0.4 with the class-1 object: unmatched, object missed
    ]
    matrix = confusion_matrix(detections, targets, num_classes=2, conf=0.25, iou_threshold=0.5)
    #        true: 0  1  background
    expected = [[1, 1, 1],   # predicted 0
                [0, 0, 3],   # predicted 1
                [1, 1, 0]]   # predicted background (missed)
    assert matrix.tolist() == expected


def separated_scene(generator: torch.Generator, classes: int) -> tuple[dict, dict]:
    """Objects in distinct 100 px cells of a 4 x 4 grid; detections stay in their object's cell (jitter < the
    margin), some doubled, plus false ones in empty cells: a detection can only ever overlap one object."""
    cells = torch.randperm(16, generator=generator)
    count = int(torch.randint(1, 8, (1,), generator=generator))
    corner = torch.stack([cells % 4, cells // 4], 1).double() * 100 + 20
    size = torch.randint(20, 61, (16, 2), generator=generator).double()
    boxes = torch.cat([corner, corner + size], 1)
    labels = torch.randint(0, classes, (16,), generator=generator)
    found = torch.rand(count, generator=generator) < 0.8
    doubled = torch.rand(count, generator=generator) < 0.3
    on_objects = torch.cat([torch.nonzero(found)[:, 0], torch.nonzero(found & doubled)[:, 0]])
    jitter = (torch.rand(len(on_objects), 4, generator=generator) - 0.5) * 30
    false = torch.arange(count, min(count + 3, 16))
    det_boxes = torch.cat([boxes[on_objects] + jitter, boxes[false]])
    det_labels = torch.cat([labels[on_objects], labels[false]])
    scores = torch.rand(len(det_boxes), generator=generator)
    return ({"boxes": det_boxes, "labels": det_labels, "scores": scores},
            {"boxes": boxes[:count], "labels": labels[:count]})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_matrix_counts_what_the_voc_metric_counts_when_no_object_is_shared(seed):
    """With no box overlapping two objects, both matchings agree: TP, FP and missed per class at a threshold."""
    generator = torch.Generator().manual_seed(seed)
    scenes = [separated_scene(generator, classes=3) for _ in range(20)]
    detections, targets = [d for d, _ in scenes], [t for _, t in scenes]
    metric = VOCMeanAP(3)
    metric.update(detections, targets)
    counts = metric.compute()["pr_counts"]
    for index in (0, 25, 60):
        matrix = confusion_matrix(detections, targets, num_classes=3, conf=index / 100)
        tp, fp, missed = counts[:, index].long().unbind(-1)
        assert matrix.diagonal()[:3].tolist() == tp.tolist()
        assert matrix[:3, 3].tolist() == fp.tolist()
        assert matrix[3, :3].tolist() == missed.tolist()
        assert matrix[:3, :3].sum() == tp.sum()  # the classes never disagree here
    assert counts[:, 25, 0].sum() > 0 and counts[:, 25, 1].sum() > 0 and counts[:, 25, 2].sum() > 0


def test_f1_points_and_best_threshold_by_hand():
    targets = [image([[0, 0, 10, 10], [20, 0, 30, 10]], [0, 0])]
    detections = [image([[0, 0, 10, 10], [50, 50, 60, 60], [20, 0, 30, 10], [70, 70, 80, 80]],
                        [0, 0, 0, 1], [0.9, 0.6, 0.3, 0.5])]
    metric = VOCMeanAP(2)
    metric.update(detections, targets)
    counts = metric.compute()["pr_counts"]
    f1 = f1_by_threshold(counts)
    # class 0 has two objects: above 0.6 one TP (F1 2/3), above 0.3 one TP one FP one missed (2/4), from 0.3 down
    # two TP one FP (4/5); nothing above 0.9 (F1 0). Class 1 has no objects: no F1.
    assert f1[0, 80].item() == pytest.approx(2 / 3)
    assert f1[0, 50].item() == pytest.approx(0.5)
    assert f1[0, 30].item() == pytest.approx(0.8) and f1[0, 0].item() == pytest.approx(0.8)
    assert f1[0, 95].item() == 0.0
    assert f1[1].isnan().all()
    assert best_f1_threshold(counts) == pytest.approx((0.30, 0.8))


def test_results_csv_keeps_its_header_and_survives_a_cut_off_line(tmp_path):
    path = tmp_path / "results.csv"
    append_row(path, {"epoch": 0, "train/loss": 2.5, "val/mAP": 0.1})
    append_row(path, {"epoch": 1, "train/loss": 2.0, "lr": 0.01})  # no mAP this epoch, a new column
    with open(path, "a") as file:
        file.write("2,1.")  # a kill in the middle of a line
    assert [row["epoch"] for row in read_rows(path)] == ["0", "1"]
    append_row(path, {"epoch": 2, "train/loss": 1.5, "val/mAP": 0.3})
    with open(path, newline="") as file:
        lines = list(csv.reader(file))
    assert lines == [["epoch", "train/loss", "val/mAP"], ["0", "2.5", "0.1"], ["1", "2", ""], ["2", "1.5", "0.3"]]




def test_training_run_writes_the_report_and_results_csv_matches_tensorboard(tmp_path):
    done = train(tmp_path, *small_sample(tmp_path), "trainer.max_epochs=3")
    run_dir = tmp_path / "run"
    for name in REPORT_IMAGES:
        pixels = np.asarray(Image.open(run_dir / f"{name}.png").convert("L"), dtype=np.float64)
        smallest = 128 if name == "val_batch_pred" else 200  # the grid: a batch of 4 validation images at 128 px
        assert min(pixels.shape) >= smallest and max(pixels.shape) >= 2 * smallest, (name, pixels.shape)
        assert pixels.std() > 5 and len(np.unique(pixels)) > 10, f"{name}.png looks blank"
    assert "best F1" in done.stdout + done.stderr

    rows = read_rows(run_dir / "results.csv")
    assert [int(row["epoch"]) for row in rows] == [0, 1, 2]
    assert {"train/loss", "train/box", "val/loss", "val/mAP", "lr"} <= set(rows[0])
    events = scalars(run_dir)
    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    for column, tag in [("val/mAP", "val/mAP"), ("val/loss", "val/loss"), ("train/loss", "train/loss_epoch")]:
        # Lightning logs epoch values one step before the epoch's last optimizer step; the final re-validation of
        # the best checkpoint adds a last val/ point after the epochs.
        logged = [event.value for event in sorted(accumulator.Scalars(tag), key=lambda event: event.step)]
        assert [float(row[column]) for row in rows] == pytest.approx(logged[: len(rows)], rel=1e-5, abs=1e-6), column
    for name in REPORT_IMAGES:
        assert f"report/{name}" in events


def test_predict_draws_each_class_in_its_own_colour_with_captions_sized_to_the_image():
    """Boxes of two classes: each outline in its class's colour; the caption of a 2000 px image is drawn with a
    font four times larger than a 500 px one's, so it has about 16 times the pixels."""
    def caption_pixels(side: int) -> int:
        image = torch.zeros(3, side, side, dtype=torch.uint8)
        box = torch.tensor([[0.1, 0.1, 0.9, 0.9]]) * side
        drawn = draw_predictions(image, box, ["cat"], [0.9])
        inner = drawn[:, int(0.1 * side) + side // 100 + 2 : int(0.5 * side), int(0.1 * side) + side // 100 + 2 :]
        return int(inner.any(0).sum())

    boxes = torch.tensor([[10.0, 10.0, 200.0, 120.0], [250.0, 30.0, 480.0, 300.0]])
    drawn = draw_predictions(torch.zeros(3, 400, 500, dtype=torch.uint8), boxes, ["cat", "dog"], [0.9, 0.6])
    assert class_colour("cat") != class_colour("dog")
    assert tuple(drawn[:, 60, 10].tolist()) == class_colour("cat")  # on the left edge of each box
    assert tuple(drawn[:, 150, 250].tolist()) == class_colour("dog")
    assert caption_pixels(2000) > 8 * caption_pixels(500) > 0
