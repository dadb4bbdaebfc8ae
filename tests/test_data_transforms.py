import math

import pytest
import torch

from lightning_det.data.transforms import LetterboxTransform, Sample, YoloTrainTransform, clip_and_filter
from lightning_det.data.transforms.common import colour_matrix, displayable

SIZE = 416
pytestmark = pytest.mark.usefixtures("one_torch_thread")
NO_AUGMENTATION = dict(mix={"mosaic": 1.0}, scale=0.0, translate=0.0, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0)


def make_sample(height, width, boxes, labels, colour=(0, 0, 0), image_id=0, box_colours=None):
    """A flat image with each box painted in its own colour (so tests can find the box again by colour)."""
    image = torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1).repeat(1, height, width)
    for box, paint in zip(boxes, box_colours or []):
        x1, y1, x2, y2 = (int(v) for v in box)
        image[:, y1:y2, x1:x2] = torch.tensor(paint, dtype=torch.uint8).view(3, 1, 1)
    return Sample(
        image=image,
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        labels=torch.tensor(labels, dtype=torch.int64),
        difficult=torch.zeros(len(labels), dtype=torch.bool),
        image_id=image_id,
        path=f"image{image_id}.jpg",
        orig_size=(height, width),
    )


def test_letterbox_by_hand_and_meta_maps_back_exactly():
    boxes = [[30.0, 40.0, 150.0, 120.0], [0.0, 0.0, 300.0, 200.0]]
    sample = make_sample(200, 300, boxes, [1, 2])
    out = LetterboxTransform(img_size=SIZE)([sample])
    # 300x200 -> 416 x round(200 * 416 / 300) = 416x277, padded by (416 - 277) // 2 = 69 rows on top
    scale_x, scale_y, top = 416 / 300, 277 / 200, 69
    expected = torch.tensor(boxes) * torch.tensor([scale_x, scale_y] * 2) + torch.tensor([0, top] * 2)
    torch.testing.assert_close(out.boxes, expected, atol=1e-4, rtol=0)
    assert out.orig_size == (200, 300)
    torch.testing.assert_close(torch.tensor(out.scale), torch.tensor([scale_x, scale_y]))
    assert out.pad == (0.0, float(top))
    back = (out.boxes - torch.tensor(out.pad).repeat(2)) / torch.tensor(out.scale).repeat(2)
    assert (back - torch.tensor(boxes)).abs().max() < 1e-3
    assert out.image.shape == (3, SIZE, SIZE) and out.image.dtype == torch.float32
    pixels = displayable(out.image)
    assert bool((pixels[:, :top] == 114).all()) and bool((pixels[:, top + 277 :] == 114).all())
    assert bool((pixels[:, top + 1 : top + 276] == 0).all())


def test_letterbox_of_a_tall_image_pads_left_and_right():
    sample = make_sample(500, 250, [[10.0, 20.0, 110.0, 220.0]], [0])
    out = LetterboxTransform(img_size=SIZE)([sample])
    assert out.pad == (float((SIZE - 208) // 2), 0.0)
    back = (out.boxes - torch.tensor(out.pad).repeat(2)) / torch.tensor(out.scale).repeat(2)
    assert (back - sample.boxes).abs().max() < 1e-3


def test_pipelines_hand_over_pixels_the_model_normalises():
    sample = make_sample(8, 8, [], [], colour=(50, 60, 80))
    out = LetterboxTransform(img_size=8)([sample])
    assert out.image.dtype == torch.float32 and torch.equal(displayable(out.image), sample.image)


def test_yolo_training_hands_over_uint8_pixels_and_the_colour_jitter_as_a_matrix():
    """The colour jitter is left to collation (one product for the batch): the pixels stay ``uint8`` and the
    sample carries its draw, the identity when every gain is zero."""
    sample = make_sample(64, 64, [[8.0, 8.0, 40.0, 40.0]], [0], colour=(50, 60, 80))
    plain = YoloTrainTransform(img_size=64, flip=0.0, **NO_AUGMENTATION)([sample])
    assert plain.image.dtype == torch.uint8 and torch.equal(plain.image, sample.image)
    torch.testing.assert_close(plain.colour, torch.eye(3), atol=1e-5, rtol=0)
    torch.manual_seed(0)
    jittered = YoloTrainTransform(img_size=64, scale=0.0, translate=0.0, hsv_v=0.4)([sample])
    brightness = jittered.colour.diagonal()
    assert not torch.allclose(brightness, torch.ones(3), atol=1e-3) and 0.6 <= brightness.mean() <= 1.4


def test_horizontal_flip_mirrors_boxes_and_pixels():
    sample = make_sample(SIZE, SIZE, [[10.0, 50.0, 110.0, 90.0]], [3], box_colours=[(200, 0, 0)])
    torch.manual_seed(0)
    flipped = YoloTrainTransform(img_size=SIZE, flip=1.0, **NO_AUGMENTATION)([sample])
    kept = YoloTrainTransform(img_size=SIZE, flip=0.0, **NO_AUGMENTATION)([sample])
    torch.testing.assert_close(kept.boxes, sample.boxes)
    torch.testing.assert_close(flipped.boxes, torch.tensor([[SIZE - 110.0, 50.0, SIZE - 10.0, 90.0]]))
    assert torch.equal(flipped.image, kept.image.flip(-1))
    assert flipped.labels.tolist() == [3] and not flipped.mosaic


def test_mosaic_tiles_the_canvas_one_quadrant_per_image():
    """Four images each fully covered by one object: the output boxes must be the four quadrants.

    (``min_visible=0``: a small quadrant shows too little of its object for the default keep rule.)
    """
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0)]
    samples = [
        make_sample(300, 400, [[0.0, 0.0, 400.0, 300.0]], [k], box_colours=[colour], image_id=k)
        for k, colour in enumerate(colours)
    ]
    torch.manual_seed(1)
    out = YoloTrainTransform(img_size=SIZE, flip=0.0, min_visible=0.0, **NO_AUGMENTATION)(samples)
    assert out.mosaic and out.image_id == 0 and out.orig_size == (SIZE, SIZE)
    assert sorted(out.labels.tolist()) == [0, 1, 2, 3]
    boxes = {label: box for label, box in zip(out.labels.tolist(), out.boxes)}
    centre_x, centre_y = boxes[0][2:].tolist()
    assert SIZE / 4 <= centre_x <= 3 * SIZE / 4 and SIZE / 4 <= centre_y <= 3 * SIZE / 4
    expected = {
        0: [0, 0, centre_x, centre_y], 1: [centre_x, 0, SIZE, centre_y],
        2: [0, centre_y, centre_x, SIZE], 3: [centre_x, centre_y, SIZE, SIZE],
    }
    pixels = displayable(out.image)
    for label, box in boxes.items():
        torch.testing.assert_close(box, torch.tensor(expected[label], dtype=torch.float32))
        x1, y1, x2, y2 = (int(v) for v in box)
        region = pixels[:, y1:y2, x1:x2].reshape(3, -1).float()
        assert (region - torch.tensor(colours[label]).view(3, 1)).abs().max() <= 1


def test_mosaic_keeps_objects_near_the_centre_with_their_labels():
    """Each object sits in the corner of its image that the mosaic always shows: all survive, unclipped."""
    corners = [[330.0, 330.0, 400.0, 400.0], [10.0, 330.0, 80.0, 400.0], [330.0, 10.0, 400.0, 80.0],
               [10.0, 10.0, 80.0, 80.0]]
    samples = [make_sample(SIZE, SIZE, [box], [k + 5]) for k, box in enumerate(corners)]
    for seed in range(5):
        torch.manual_seed(seed)
        out = YoloTrainTransform(img_size=SIZE, flip=0.0, **NO_AUGMENTATION)(samples)
        assert sorted(out.labels.tolist()) == [5, 6, 7, 8]
        sides = out.boxes[:, 2:] - out.boxes[:, :2]
        torch.testing.assert_close(sides, torch.full((4, 2), 70.0))


@pytest.mark.parametrize("seed", range(8))
def test_augmented_boxes_stay_inside_the_canvas_and_keep_their_labels(seed):
    torch.manual_seed(seed)
    samples = [
        make_sample(240 + 40 * k, 400 - 30 * k, [[5.0, 5.0, 60.0, 90.0], [100.0, 120.0, 230.0, 235.0]],
                    [k, k + 10], colour=(90, 90, 90))
        for k in range(4)
    ]
    transform = YoloTrainTransform(img_size=SIZE)
    for out in (transform(samples), transform(samples[:1])):
        assert out.image.shape == (3, SIZE, SIZE)
        assert len(out.boxes) == len(out.labels) == len(out.difficult)
        assert bool((out.boxes >= 0).all() and (out.boxes <= SIZE).all())
        assert bool(((out.boxes[:, 2:] - out.boxes[:, :2]) >= 2).all())
        assert set(out.labels.tolist()) <= {label for s in samples for label in s.labels.tolist()}


@pytest.mark.parametrize("seed", range(4))
def test_rect_training_letterboxes_into_the_images_own_rectangle(seed):
    """rect: 300 x 400 at 416 is scaled by 1.04 to 312 x 416 and padded to 320 x 416 (the next multiple of 32); a
    portrait image gets the transposed shape; a mosaic stays square. Boxes stay inside their canvas."""
    torch.manual_seed(seed)
    transform = YoloTrainTransform(img_size=SIZE, rect=True)
    wide = make_sample(300, 400, [[10.0, 10.0, 200.0, 150.0]], [0], colour=(90, 90, 90))
    tall = make_sample(400, 300, [[10.0, 10.0, 150.0, 200.0]], [1], colour=(90, 90, 90))
    for sample, shape in ((wide, (320, SIZE)), (tall, (SIZE, 320))):
        out = transform([sample])
        assert tuple(out.image.shape[-2:]) == shape and tuple(out.orig_size) == shape
        height, width = shape
        assert bool((out.boxes[:, 0::2] <= width).all() and (out.boxes[:, 1::2] <= height).all())
        assert bool((out.boxes >= 0).all())
    assert transform([wide, tall, wide, tall]).image.shape[-2:] == (SIZE, SIZE)


@pytest.mark.parametrize("rect", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_zoomed_and_shifted_boxes_follow_their_pixels(seed, rect):
    """A painted rectangle after the random zoom (0.5x to 1.5x) and shift: its box holds only its colour (1 px in
    from the edges) and the ring just outside it (1 px out) holds none of it."""
    torch.manual_seed(seed)
    box = [120.0, 90.0, 250.0, 180.0]
    sample = make_sample(300, 400, [box], [1], colour=(90, 90, 90), box_colours=[(250, 20, 20)])
    colourless = dict(hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, fill=90)
    out = YoloTrainTransform(img_size=SIZE, scale=0.5, translate=0.1, rect=rect, **colourless)([sample])
    assert out.image.shape[-2:] == ((320, SIZE) if rect else (SIZE, SIZE))
    x1, y1, x2, y2 = out.boxes[0].tolist()
    red = out.image[0] > 170
    inner = red[math.ceil(y1) + 1 : math.floor(y2) - 1, math.ceil(x1) + 1 : math.floor(x2) - 1]
    assert inner.numel() > 0 and bool(inner.all())
    ring = torch.ones_like(red)
    ring[max(0, math.floor(y1) - 1) : math.ceil(y2) + 1, max(0, math.floor(x1) - 1) : math.ceil(x2) + 1] = False
    assert not bool((red & ring).any())
    assert (x2 - x1) / (y2 - y1) == pytest.approx(130 / 90, rel=0.03)  # zoomed alike in x and y


@pytest.mark.parametrize("seed", range(4))
def test_strength_zero_is_the_letterbox_and_a_share_narrows_zoom_shift_and_colour(seed):
    """``with_strength(0)``: no zoom, no shift, no colour change, so exactly the evaluation letterbox's boxes and
    pixels and an identity colour matrix; 0.5 of ``scale`` 0.8 keeps every zoom within 1 +- 0.4 (a 100 px wide
    box stays 60 to 140 px wide), 0.5 of ``hsv_v`` 0.6 every brightness within 1 +- 0.3, and the configured
    transform stays as it was."""
    torch.manual_seed(seed)
    sample = make_sample(300, 400, [[100.0, 50.0, 200.0, 150.0]], [0], colour=(90, 90, 90),
                         box_colours=[(250, 20, 20)])
    transform = YoloTrainTransform(img_size=SIZE, scale=0.8, translate=0.2, hsv_h=0.1, hsv_s=0.7, hsv_v=0.6, flip=0.0)
    plain = transform.with_strength(0.0)([sample])
    letterboxed = LetterboxTransform(img_size=SIZE)([sample])
    torch.testing.assert_close(plain.boxes, letterboxed.boxes)
    assert torch.equal(plain.image, letterboxed.image.to(torch.uint8))
    torch.testing.assert_close(plain.colour, torch.eye(3), atol=1e-5, rtol=0)
    assert transform.with_strength(1.0) is transform
    half = transform.with_strength(0.5)
    assert (transform.scale, transform.translate, transform.hsv_v) == (0.8, 0.2, 0.6)
    assert type(half) is YoloTrainTransform and half.flip == transform.flip
    samples = [half([sample]) for _ in range(20)]
    widths = torch.tensor([float(s.boxes[0, 2] - s.boxes[0, 0]) for s in samples])
    letterbox_width = float(letterboxed.boxes[0, 2] - letterboxed.boxes[0, 0])
    assert bool((widths >= 0.6 * letterbox_width - 1).all() and (widths <= 1.4 * letterbox_width + 1).all())
    assert float(widths.std()) > 0  # still zooming
    grey = torch.full((3,), 100.0)
    brightness = torch.stack([(s.colour @ grey)[0] / 100 for s in samples])
    assert bool((brightness >= 0.7 - 1e-3).all() and (brightness <= 1.3 + 1e-3).all())
    assert float(brightness.std()) > 0  # still jittering


def test_colour_matrix_by_hand():
    grey, red = torch.tensor([100.0, 100.0, 100.0]), torch.tensor([200.0, 0.0, 0.0])
    torch.testing.assert_close(colour_matrix(1.0, 1.0, 0.0), torch.eye(3), atol=1e-5, rtol=0)
    # greys only get brighter (torchvision's grey weights sum to 0.9999)
    torch.testing.assert_close(colour_matrix(1.2, 0.3, 0.01) @ grey, 1.2 * grey, atol=0.02, rtol=0)
    torch.testing.assert_close(colour_matrix(1.0, 0.0, 0.0) @ red, torch.full((3,), 0.2989 * 200))  # grey of red
    turned = colour_matrix(1.0, 1.0, 1 / 3) @ red
    luma = torch.tensor([0.299, 0.587, 0.114])
    assert (luma @ turned).item() == pytest.approx((luma @ red).item(), abs=1e-3)  # a hue turn keeps the luma
    assert turned[1] > turned[0] and turned[1] > turned[2]  # a third of the circle from red is green
    torch.testing.assert_close(colour_matrix(1.0, 1.0, 1.0) @ red, red, atol=1e-3, rtol=0)  # a full turn


def test_clip_and_filter_rule_by_hand():
    canvas = torch.tensor([0.0, 0.0, 100.0, 100.0])
    boxes = torch.tensor([
        [-10.0, 0.0, 10.0, 10.0],   # half inside: kept, clipped to x1 = 0
        [-18.0, 0.0, 2.0, 10.0],    # 10% inside: dropped (< 20%)
        [95.0, 50.0, 101.0, 60.0],  # 5/6 inside: kept
        [10.0, 99.0, 40.0, 101.5],  # 1 px high after clipping: dropped (< 2 px)
        [20.0, 20.0, 30.0, 30.0],   # inside the canvas but outside its visible region: dropped
    ])
    regions = torch.stack([canvas] * 4 + [torch.tensor([50.0, 50.0, 100.0, 100.0])])
    clipped, keep = clip_and_filter(boxes, regions, min_size=2.0, min_visible=0.2)
    assert keep.tolist() == [True, False, True, False, False]
    torch.testing.assert_close(clipped[keep], torch.tensor([[0.0, 0.0, 10.0, 10.0], [95.0, 50.0, 100.0, 60.0]]))

