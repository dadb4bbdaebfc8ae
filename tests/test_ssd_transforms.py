"""The SSD pipeline: training views stay consistent (boxes, labels, difficult), the zoom-out canvas is the mean
pixel, and evaluation's plain resize maps boxes back exactly through meta."""

from __future__ import annotations

import pytest
import torch
from helpers import one_torch_thread

from lightning_det.data.transforms import SSDEvalTransform, SSDTrainTransform
from lightning_det.data.transforms.common import Sample
from lightning_det.models.detector import to_original_pixels

pytestmark = pytest.mark.usefixtures(one_torch_thread.__name__)


def sample(height: int = 120, width: int = 200) -> Sample:
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8)
    boxes = torch.tensor([[10.0, 20, 90, 100], [120, 10, 190, 60], [40, 70, 60, 90]])
    return Sample(image=image, boxes=boxes, labels=torch.tensor([0, 1, 2]),
                  difficult=torch.tensor([False, True, False]), image_id=7, path="a.jpg", orig_size=(height, width))


def test_training_views_are_square_with_boxes_inside_and_labels_in_step():
    torch.manual_seed(0)
    transform = SSDTrainTransform(img_size=96)
    source = sample()
    pairs = {(int(c), bool(d)) for c, d in zip(source.labels, source.difficult)}
    for _ in range(20):
        out = transform([source])
        assert out.image.shape == (3, 96, 96) and out.image.dtype == torch.float32
        assert len(out.boxes) == len(out.labels) == len(out.difficult)
        if len(out.boxes):
            assert out.boxes.min() >= 0 and out.boxes.max() <= 96
            assert torch.all(out.boxes[:, 2:] > out.boxes[:, :2])
        assert {(int(c), bool(d)) for c, d in zip(out.labels, out.difficult)} <= pairs
        assert out.orig_size == (96, 96) and out.scale == (1.0, 1.0)


def test_zoom_out_fills_the_canvas_with_the_mean_pixel():
    torch.manual_seed(1)
    mean = (100.0, 50.0, 200.0)
    transform = SSDTrainTransform(img_size=64, photometric=0.0, zoom_out=1.0, zoom_out_max=4.0,
                                  crop_min_iou=(), flip=0.0, mean=mean, std=(1.0, 1.0, 1.0))
    source = sample()
    source.image[:] = 255
    # without crop choices the zoomed-out canvas is always kept whole
    images = torch.stack([transform([source]).image for _ in range(8)])
    corners = images[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]  # one corner at least lies outside the pasted image
    assert torch.all((corners == 0).all(1).any(-1))  # mean pixel minus mean


def test_evaluation_resize_maps_boxes_back_exactly():
    source = sample(120, 200)
    out = SSDEvalTransform(img_size=300, mean=(0, 0, 0), std=(1, 1, 1))([source])
    assert out.image.shape == (3, 300, 300) and out.scale == (1.5, 2.5) and out.orig_size == (120, 200)
    meta = {"scale": torch.tensor([out.scale]), "pad": torch.tensor([out.pad]), "orig_size": torch.tensor([[120, 200]])}
    back = to_original_pixels(out.boxes, torch.zeros(len(out.boxes), dtype=torch.long), meta)
    torch.testing.assert_close(back, source.boxes)
