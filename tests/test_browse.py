"""The dataset browser draws batches as the model sees them, each label where its annotation says."""

from pathlib import Path

import pytest
import torch
from helpers import make_voc
from omegaconf import DictConfig
from runs import compose_config
from torchvision.io import read_image

from lightning_det.tools.browse import browse, label_summary

LIME = torch.tensor([0, 255, 0], dtype=torch.uint8)


@pytest.fixture
def voc_root(tmp_path) -> Path:
    images = {
        "a": (60, 80, [("dog", (11, 21, 50, 40), False)]),  # VOC 1-based corners
        "b": (80, 80, [("cat", (5, 5, 30, 60), True), ("dog", (40, 40, 70, 70), False)]),
    }
    return make_voc(tmp_path / "voc", {"2007/trainval": images, "2007/test": images})


def config(tmp_path: Path, root: Path, *overrides: str) -> DictConfig:
    """``python -m lightning_det.tools.browse`` on ``root`` (one 64 px image per batch and row), run in
    ``tmp_path / "out"``."""
    return compose_config(
        "browse", "data=voc", f"data.root={root}", "data.classes=[cat,dog]", "data.train.splits=[2007/trainval]",
        "data.loader.num_workers=0", "data.sampler.min_steps_per_epoch=0", "data.loader.persistent_workers=false",
        "data.img_size=64",
        "data.batch_size=1", "images_per_row=1", *overrides, run_dir=tmp_path / "out",
    )


def test_val_batches_show_each_box_on_its_letterboxed_position(tmp_path, voc_root):
    written = browse(config(tmp_path, voc_root, "split=val", "batches=2"))
    assert [p.name for p in written] == ["val_batch0.png", "val_batch1.png"]
    grid = read_image(str(written[0]))  # image "a": 60 x 80 -> scale 0.8 -> 48 x 64, 8 px grey above and below
    assert tuple(grid.shape) == (3, 64, 64)  # one image per batch: no grid border
    x1, y1, x2 = (10 * 0.8, 20 * 0.8 + 8, 50 * 0.8)  # 0-based box corner in network-input pixels
    top_edge = grid[:, round(y1), round(x1) + 2 : round(x2) - 2]
    assert (top_edge.T == LIME).all(dim=1).float().mean() > 0.9
    assert not (grid[:, 4].T == LIME).all(dim=1).any()  # the grey band above the image has no box


def test_training_batches_are_drawn_and_summarised(tmp_path, voc_root):
    written = browse(config(tmp_path, voc_root, "batches=3", "data.batch_size=2"))
    assert len(written) == 1  # two images make one training batch
    assert tuple(read_image(str(written[0])).shape[-2:]) == (2 * 64 + 6, 64 + 4)  # one per row, 2 px borders


def test_label_summary_counts_classes_and_sizes():
    rows = torch.tensor([[[0, 0, 0, 10, 20, 0], [1, 5, 5, 9, 30, 1], [-1, 0, 0, 0, 0, 0]]], dtype=torch.float32)
    summary = label_summary(rows, ["cat", "dog"])
    assert summary.startswith("2 objects (1 difficult): cat 1, dog 1")
    assert "median 7.0" in summary  # shorter sides 10 and 4
