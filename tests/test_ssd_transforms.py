"""The SSD pipeline: training views stay consistent (boxes, labels, difficult, pixels), the zoom-out canvas is the
mean pixel, the crop rule and colour map agree with torchvision's, and evaluation's plain resize maps boxes back
exactly through meta."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision import tv_tensors
from torchvision.ops import box_iou
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from lightning_det.data.transforms import SSDEvalTransform, SSDTrainTransform
from lightning_det.data.transforms.common import Sample
from lightning_det.data.transforms.ssd import iou_crop, photometric_map
from lightning_det.models.detector import to_original_pixels

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    fill = (100.0, 50.0, 200.0)
    transform = SSDTrainTransform(img_size=64, photometric=0.0, zoom_out=1.0, zoom_out_max=4.0,
                                  crop_min_iou=(), flip=0.0, fill=fill)
    source = sample()
    source.image[:] = 255
    # without crop choices the zoomed-out canvas is always kept whole
    images = torch.stack([transform([source]).image for _ in range(8)])
    corners = images[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]  # one corner at least lies outside the pasted image
    assert torch.all((corners == torch.tensor(fill).view(3, 1)).all(1).any(-1))


def test_evaluation_resize_maps_boxes_back_exactly():
    source = sample(120, 200)
    out = SSDEvalTransform(img_size=300)([source])
    assert out.image.shape == (3, 300, 300) and out.scale == (1.5, 2.5) and out.orig_size == (120, 200)
    meta = {"scale": torch.tensor([out.scale]), "pad": torch.tensor([out.pad]), "orig_size": torch.tensor([[120, 200]])}
    back = to_original_pixels(out.boxes, torch.zeros(len(out.boxes), dtype=torch.long), meta)
    torch.testing.assert_close(back, source.boxes)


@pytest.mark.parametrize("seed", range(6))
def test_zoomed_and_cropped_boxes_follow_their_pixels(seed):
    """A painted rectangle after zoom-out, crop, resize and flip: its box holds only its colour (1 px in from the
    edges) and the ring just outside it (1 px out) holds none of it."""
    torch.manual_seed(seed)
    image = torch.full((3, 120, 200), 90, dtype=torch.uint8)
    image[:, 30:90, 50:150] = torch.tensor([250, 20, 20], dtype=torch.uint8).view(3, 1, 1)
    source = Sample(image=image, boxes=torch.tensor([[50.0, 30, 150, 90]]), labels=torch.tensor([0]),
                    difficult=torch.tensor([False]), image_id=0, path="a.jpg", orig_size=(120, 200))
    transform = SSDTrainTransform(img_size=160, photometric=0.0, zoom_out=0.5, crop_min_iou=(0.5, 0.7),
                                  flip=0.5, fill=(90, 90, 90))
    out = transform([source])
    assert len(out.boxes) == 1
    x1, y1, x2, y2 = out.boxes[0].tolist()
    red = out.image[0] > 100
    inner = red[math.ceil(y1) + 1 : math.floor(y2) - 1, math.ceil(x1) + 1 : math.floor(x2) - 1]
    assert inner.numel() > 0 and bool(inner.all())
    ring = torch.ones_like(red)
    ring[max(0, math.floor(y1) - 1) : math.ceil(y2) + 1, max(0, math.floor(x1) - 1) : math.ceil(x2) + 1] = False
    assert not bool((red & ring).any())


def test_iou_crop_draws_the_crops_torchvision_draws():
    """The crop rule against torchvision's RandomIoUCrop on the same boxes: the same share of whole-canvas
    draws and the same mean crop area and IoU with the best kept box, over 600 draws each."""
    boxes = torch.tensor([[20.0, 30, 80, 90], [100, 20, 180, 70], [40, 100, 60, 115]])
    options = [0.0, 0.3, 0.7]
    reference = v2.RandomIoUCrop(sampler_options=[*options, 1.0])
    on_canvas = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(120, 200))

    def summary(crops: list[tuple[float, float, float, float]]) -> tuple[float, float, float]:
        crops = torch.tensor(crops)
        whole = (crops == torch.tensor([0.0, 0, 200, 120])).all(1)
        cut = crops[~whole]
        area = ((cut[:, 2] - cut[:, 0]) * (cut[:, 3] - cut[:, 1]) / (200 * 120)).mean()
        return whole.float().mean().item(), area.item(), box_iou(cut, boxes).amax(1).mean().item()

    torch.manual_seed(0)
    ours = [iou_crop(boxes, 200, 120, [*options, 1.0], 40)[:4] for _ in range(600)]
    theirs = []
    for _ in range(600):
        params = reference.make_params([on_canvas])
        left, top = params.get("left", 0), params.get("top", 0)
        theirs.append((left, top, left + params.get("width", 200), top + params.get("height", 120)))
    for mine, torchvision_value in zip(summary(ours), summary(theirs)):
        assert mine == pytest.approx(torchvision_value, abs=0.05)


def test_iou_crop_keeps_the_minimum_overlap_and_centres():
    torch.manual_seed(3)
    boxes = torch.tensor([[20.0, 30, 80, 90], [100, 20, 180, 70]])
    for _ in range(50):
        x0, y0, x1, y1, kept = iou_crop(boxes, 200, 120, [0.7, 1.0], 40)
        if (x0, y0, x1, y1) == (0, 0, 200, 120):
            continue
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        inside = (centres[:, 0] > x0) & (centres[:, 0] < x1) & (centres[:, 1] > y0) & (centres[:, 1] < y1)
        assert torch.equal(kept, inside) and kept.any()
        assert box_iou(torch.tensor([[x0, y0, x1, y1]], dtype=torch.float32), boxes[kept]).max() >= 0.7


@pytest.mark.parametrize(("step", "reference"), [
    (dict(brightness=1.1), lambda x: F.adjust_brightness(x, 1.1)),
    (dict(contrast=0.6), lambda x: F.adjust_contrast(x, 0.6)),
    (dict(saturation=1.4), lambda x: F.adjust_saturation(x, 1.4)),
    (dict(channels=[2, 0, 1]), lambda x: x[[2, 0, 1]]),
    (dict(brightness=0.9, contrast=1.3), lambda x: F.adjust_contrast(F.adjust_brightness(x, 0.9), 1.3)),
])
def test_photometric_map_matches_torchvision_step_by_step(step, reference):
    """Each step of the affine colour map against torchvision's own functional op on a float image."""
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 16, 24), dtype=torch.uint8)
    arguments = dict(brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0, channels=[0, 1, 2]) | step
    expected = reference(image.float() / 255) * 255
    torch.testing.assert_close(photometric_map(image, **arguments), expected, atol=0.1, rtol=0)
