"""SSD matching on hand-made cases (forced best match, threshold, ties, padding, difficult) and box coding."""

from __future__ import annotations

import torch

from lightning_det.models.boxes import pairwise_iou
from lightning_det.models.ssd.targets import BACKGROUND, IGNORE, DefaultBoxMatcher, decode, encode


def labels(*images: list[tuple[float, ...]], width: int = 3) -> torch.Tensor:
    """Rows (class, x1, y1, x2, y2[, difficult]) per image, padded with class -1 to ``width`` rows."""
    batch = torch.zeros(len(images), width, 6)
    batch[..., 0] = -1
    for b, rows in enumerate(images):
        for p, row in enumerate(rows):
            batch[b, p, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return batch


# Four default boxes (xyxy) on a line, 10 px apart.
PRIORS = torch.tensor([[0.0, 0, 10, 10], [10, 0, 20, 10], [20, 0, 30, 10], [30, 0, 40, 10]])


def test_pairwise_iou_agrees_with_torchvision():
    from torchvision.ops import box_iou

    objects = torch.tensor([[[0.0, 0, 15, 10], [22, 2, 38, 9]]])
    torch.testing.assert_close(pairwise_iou(objects, PRIORS)[0], box_iou(objects[0], PRIORS))


def test_threshold_decides_positive_default_boxes():
    # IoU with prior 0 is 100/140 ~ 0.71 (positive); with prior 1: 40/200 = 0.2 (background at 0.5)
    matches = DefaultBoxMatcher(0.5)(labels([(2, 0, 0, 14, 10)]), PRIORS)
    assert matches.classes[0].tolist() == [3, BACKGROUND, BACKGROUND, BACKGROUND]
    torch.testing.assert_close(matches.boxes[0, 0], torch.tensor([0.0, 0, 14, 10]))
    lower = DefaultBoxMatcher(0.15)(labels([(2, 0, 0, 14, 10)]), PRIORS)
    assert lower.classes[0].tolist() == [3, 3, BACKGROUND, BACKGROUND]


def test_an_object_below_the_threshold_still_takes_its_best_default_box():
    # a small object overlapping prior 2 by IoU 0.16 and nothing else
    matches = DefaultBoxMatcher(0.5)(labels([(0, 22, 2, 26, 6)]), PRIORS)
    assert matches.classes[0].tolist() == [BACKGROUND, BACKGROUND, 1, BACKGROUND]


def test_two_objects_with_the_same_best_box_the_closer_keeps_it():
    # both objects' best box is prior 1; object 1 overlaps it more (IoU 0.8 vs 0.3), object 0 falls back
    matches = DefaultBoxMatcher(0.5)(labels([(0, 13, 0, 23, 10), (4, 10, 0, 22, 10)]), PRIORS)
    assert matches.classes[0, 1].item() == 5
    assert matches.classes[0].tolist() == [BACKGROUND, 5, BACKGROUND, BACKGROUND]


def test_ties_go_to_the_lower_index():
    # identical objects: every matched default box takes object 0
    same = DefaultBoxMatcher(0.5)(labels([(1, 10, 0, 20, 10), (2, 10, 0, 20, 10)]), PRIORS)
    assert same.classes[0].tolist() == [BACKGROUND, 2, BACKGROUND, BACKGROUND]
    # one object spanning priors 1 and 2 equally (IoU 0.5 each): its best box is the lower index, prior 1
    even = DefaultBoxMatcher(0.6)(labels([(0, 15, 0, 25, 10)]), PRIORS)
    assert even.classes[0].tolist() == [BACKGROUND, 1, BACKGROUND, BACKGROUND]


def test_padding_empty_images_and_difficult_objects():
    batch = labels([(0, 0, 0, 10, 10), (3, 30, 0, 40, 10, 1)], [])
    matches = DefaultBoxMatcher(0.5)(batch, PRIORS)
    assert matches.classes[0].tolist() == [1, BACKGROUND, BACKGROUND, IGNORE]
    assert matches.classes[1].tolist() == [BACKGROUND] * 4
    assert matches.boxes[1].abs().sum() == 0


def test_the_batch_gives_the_same_matches_as_one_image_at_a_time():
    generator = torch.Generator().manual_seed(0)
    priors_xyxy = torch.rand(50, 2, generator=generator) * 80
    priors_xyxy = torch.cat((priors_xyxy, priors_xyxy + 5 + 20 * torch.rand(50, 2, generator=generator)), 1)
    corner = torch.rand(4, 5, 2, generator=generator) * 70
    boxes = torch.cat((corner, corner + 5 + 25 * torch.rand(4, 5, 2, generator=generator)), -1)
    batch = torch.cat((torch.randint(0, 3, (4, 5, 1), generator=generator).float(), boxes, torch.zeros(4, 5, 1)), -1)
    batch[1, 3:, 0] = -1
    together = DefaultBoxMatcher()(batch, priors_xyxy)
    for b in range(4):
        alone = DefaultBoxMatcher()(batch[b : b + 1, : 3 if b == 1 else 5], priors_xyxy)
        assert torch.equal(together.classes[b], alone.classes[0])


def test_encoding_a_default_box_itself_gives_zero_offsets_and_decoding_inverts_encoding():
    priors = torch.tensor([[50.0, 40, 20, 30], [10, 10, 8, 4]])  # cx, cy, w, h
    itself = torch.cat((priors[:, :2] - priors[:, 2:] / 2, priors[:, :2] + priors[:, 2:] / 2), 1)
    torch.testing.assert_close(encode(itself, priors), torch.zeros(2, 4))
    boxes = torch.tensor([[[30.0, 20, 75, 60], [3, 2, 25, 19]]])
    torch.testing.assert_close(decode(encode(boxes, priors), priors), boxes)


def test_encoding_by_hand_with_variances():
    priors = torch.tensor([[50.0, 40, 20, 30]])
    box = torch.tensor([[42.0, 27, 62, 87]])  # centre (52, 57), size (20, 60)
    expected = torch.tensor([[2 / (0.1 * 20), 17 / (0.1 * 30), 0.0, torch.log(torch.tensor(2.0)) / 0.2]])
    torch.testing.assert_close(encode(box, priors, (0.1, 0.2)), expected)


def test_a_batch_decodes_as_each_image_alone_and_as_the_closed_form():
    """``decode`` hands the batch to torchvision's BoxCoder as several codes per default box: the result is the
    paper's formula, image by image."""
    generator = torch.Generator().manual_seed(0)
    priors = torch.cat((torch.rand(6, 2, generator=generator) * 100, 5 + torch.rand(6, 2, generator=generator) * 40), 1)
    offsets = torch.randn(3, 6, 4, generator=generator)
    together = decode(offsets, priors, (0.1, 0.2))
    centre = priors[:, :2] + offsets[..., :2] * 0.1 * priors[:, 2:]
    size = priors[:, 2:] * torch.exp(offsets[..., 2:] * 0.2)
    torch.testing.assert_close(together, torch.cat((centre - size / 2, centre + size / 2), -1))
    for b in range(3):
        torch.testing.assert_close(together[b], decode(offsets[b], priors, (0.1, 0.2)))
