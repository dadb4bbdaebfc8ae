"""The rules that fit the input size, the epoch length and the loader workers to the data and the machine, on
hand-worked cases."""

from __future__ import annotations

import os

import lightning as L
import numpy as np
import pytest
import torch
from helpers import make_voc

from lightning_det.data import DetectionDataModule, LoaderOptions, SamplerOptions, VOCSource
from lightning_det.data.adapt import choose_img_size, epoch_repeats, loader_workers
from lightning_det.data.records import AnnotationRecord


def records_with_sides(sides: list[float], height: int = 480, width: int = 640) -> list[AnnotationRecord]:
    boxes = np.array([[0, 0, 2 * s, s] for s in sides], dtype=np.float32)  # shorter side s, longer 2 s
    return [AnnotationRecord("x.jpg", 0, height, width, boxes, np.zeros(len(sides), dtype=np.int64),
                             np.zeros(len(sides), dtype=bool))]


def test_img_size_gives_the_small_boxes_their_pixels():
    # 100 boxes: shorter sides 20..119 px in 640-px images. The 5 % quantile (numpy's linear rule) is 24.95 px,
    # 0.03898 of the image; 8 px of it needs 8 / 0.03898 = 205.2 px of input -> 224, raised to the floor 256.
    assert choose_img_size(records_with_sides(list(range(20, 120)))) == 256
    # Boxes of 8..107 px: quantile 12.95 px -> 8 / (12.95 / 640) = 395.4 -> 416.
    assert choose_img_size(records_with_sides(list(range(8, 108)))) == 416
    # Tiny boxes ask for more than the images have: capped at their own longer side (640).
    assert choose_img_size(records_with_sides([2.0] * 50)) == 640


def test_img_size_is_capped_by_the_images_and_the_bounds():
    small_images = records_with_sides([3.0] * 20, height=200, width=300)
    assert choose_img_size(small_images) == 320  # 300 px images: rounded up to the next multiple of 32
    assert choose_img_size(records_with_sides([2.0] * 50), bounds=(256, 512)) == 512
    assert choose_img_size(records_with_sides([])) == 640  # no boxes: the images' size


@pytest.mark.parametrize(("images", "per_step", "min_steps", "repeats"), [
    (205, 16, 50, 4),    # 13 steps a pass -> 4 passes: 820 images, 52 steps
    (69, 16, 50, 12),    # 5 steps a pass -> 12 passes: 828 images, 52 steps
    (5000, 16, 50, 1),   # 313 steps already
    (800, 16, 50, 1),    # exactly 50
    (801, 32, 50, 2),
    (100, 16, 0, 1),     # rule off
])
def test_epoch_repeats(images, per_step, min_steps, repeats):
    assert epoch_repeats(images, per_step, min_steps) == repeats
    if repeats > 1:  # the smallest count that reaches min_steps
        assert (repeats - 1) * images < min_steps * per_step <= repeats * images


def test_datamodule_repeats_the_set_and_resolves_auto_size(tmp_path):
    images = {f"{k:02d}": (480, 640, [("cell", (1, 1, 40, 30), False)]) for k in range(6)}
    root = make_voc(tmp_path, {"train": images})
    datamodule = DetectionDataModule(root, VOCSource(["train"]), VOCSource(["train"]), classes=None, batch_size=2,
                                     loader=LoaderOptions(num_workers=0), img_size="auto",
                                     sampler=SamplerOptions(min_steps_per_epoch=7))
    datamodule.setup("fit")
    # every box's shorter side is 30 px of 640: 8 / (30 / 640) = 170.7 px -> the floor, 256
    assert datamodule.img_size == 256 and datamodule.train_transform.img_size == 256
    assert datamodule.val_transform.img_size == 256
    loader = datamodule.train_dataloader()
    indices = [item[0] for item in loader.sampler]
    assert len(loader) == 9  # 6 images x 3 passes = 18 = 9 steps of 2 (2 passes would give only 6 steps)
    assert sorted(indices) == sorted(list(range(6)) * 3)
    assert all(sorted(indices[k * 6:(k + 1) * 6]) == list(range(6)) for k in range(3))  # each pass whole
    sample = next(iter(loader))
    assert sample["images"].shape[-2:] == (256, 256)


def test_img_size_must_be_a_number_or_auto(tmp_path):
    with pytest.raises(ValueError, match="data.img_size.*auto"):
        DetectionDataModule(tmp_path, VOCSource(["train"]), VOCSource(["train"]), img_size="big")


@pytest.mark.parametrize(("on_cpu", "cores", "threads", "processes", "workers"), [
    (True, 2, 2, 1, 0),  # this machine: the step takes both cores
    (True, 8, 4, 1, 4),  # OMP_NUM_THREADS=4 on 8 cores: the other 4 feed it
    (True, 8, 2, 2, 2),  # two CPU processes of 2 threads: (8 - 4) / 2 each
    (False, 16, 16, 1, 8),  # one GPU: every core but the main process's, capped
    (False, 16, 16, 4, 3),  # four GPUs: 4 cores each, one for the process
    (False, 1, 1, 1, 0),
])
def test_loader_workers_by_hand(on_cpu, cores, threads, processes, workers):
    assert loader_workers(on_cpu, cores, threads, processes) == workers


def test_auto_workers_follow_the_trainer(tmp_path):
    """A CPU trainer whose step uses every core gets no workers (and so no persistent workers)."""
    images = {f"{k:02d}": (48, 64, [("cell", (1, 1, 40, 30), False)]) for k in range(4)}
    root = make_voc(tmp_path, {"train": images})
    datamodule = DetectionDataModule(root, VOCSource(["train"]), VOCSource(["train"]), classes=None, batch_size=2,
                                     img_size=64, loader=LoaderOptions(num_workers="auto", persistent_workers=True))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    datamodule.trainer = trainer
    threads = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    try:
        loader = datamodule.val_dataloader()
    finally:
        torch.set_num_threads(threads)
    assert loader.num_workers == 0 and not loader.persistent_workers
    with pytest.raises(ValueError, match="data.loader.num_workers.*auto"):
        LoaderOptions(num_workers="many")
