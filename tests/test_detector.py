"""The base detector's mapping from batch pixels back to original-image pixels."""

import torch

from lightning_det.models.detector import labels_to_targets, to_original_pixels


def meta_for(scales, pads, sizes):
    return {
        "scale": torch.tensor(scales, dtype=torch.float32),
        "pad": torch.tensor(pads, dtype=torch.float32),
        "orig_size": torch.tensor(sizes),
    }


def test_letterbox_inverse_by_hand():
    # A 200x100 (w x h) image letterboxed into 320x320: scale 1.6, resized to 320x160, padded 80 px top and bottom.
    meta = meta_for([[1.6, 1.6]], [[0.0, 80.0]], [[100, 200]])
    boxes = torch.tensor([[16.0, 96.0, 160.0, 240.0]])
    # x: 16/1.6=10, 160/1.6=100; y: (96-80)/1.6=10, (240-80)/1.6=100
    assert torch.allclose(to_original_pixels(boxes, torch.tensor([0]), meta), torch.tensor([[10.0, 10.0, 100.0, 100.0]]))


def test_boxes_are_clipped_to_their_own_image():
    meta = meta_for([[1.0, 1.0], [2.0, 0.5]], [[0.0, 0.0], [10.0, 0.0]], [[50, 60], [100, 100]])
    boxes = torch.tensor([[-5.0, 10.0, 70.0, 80.0], [10.0, 0.0, 110.0, 100.0]])
    mapped = to_original_pixels(boxes, torch.tensor([0, 1]), meta)
    # image 0 is 60 wide, 50 high; image 1: x (10-10)/2=0, (110-10)/2=50; y 0/0.5=0, 100/0.5=200 -> clipped to 100
    assert torch.allclose(mapped, torch.tensor([[0.0, 10.0, 60.0, 50.0], [0.0, 0.0, 50.0, 100.0]]))


def test_labels_to_targets_drops_padding_and_keeps_difficult():
    labels = torch.tensor(
        [
            [[2, 0, 0, 10, 10, 0], [1, 5, 5, 20, 20, 1], [-1, 0, 0, 0, 0, 0]],
            [[-1, 0, 0, 0, 0, 0], [-1, 0, 0, 0, 0, 0], [-1, 0, 0, 0, 0, 0]],
        ],
        dtype=torch.float32,
    )
    meta = meta_for([[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]], [[100, 100], [100, 100]])
    first, second = labels_to_targets(labels, meta)
    assert first["labels"].tolist() == [2, 1]
    assert first["difficult"].tolist() == [False, True]
    assert first["boxes"].tolist() == [[0, 0, 10, 10], [5, 5, 20, 20]]
    assert second["boxes"].shape == (0, 4) and second["labels"].numel() == 0
