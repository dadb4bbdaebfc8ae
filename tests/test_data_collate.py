import pytest
import torch

from lightning_det.data import collate_detection
from lightning_det.data.collate import Labels
from lightning_det.data.transforms import Sample


def sample(boxes, labels, difficult, image_id):
    return Sample(
        image=torch.full((3, 8, 8), float(image_id)),
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        labels=torch.tensor(labels, dtype=torch.int64),
        difficult=torch.tensor(difficult, dtype=torch.bool),
        image_id=image_id,
        path=f"{image_id}.jpg",
        orig_size=(6, 7),
        scale=(1.5, 2.0),
        pad=(0.5, 0.25),
    )


SAMPLES = [
    sample([[1, 2, 3, 4], [5, 6, 7, 8]], [3, 0], [False, True], 10),
    sample([], [], [], 11),
    sample([[0, 0, 1, 1]], [2], [False], 12),
]


def test_pads_to_the_batch_maximum_with_class_minus_one():
    batch = collate_detection(SAMPLES)
    labels = batch["labels"]
    assert labels.shape == (3, 2, 6) and labels.dtype == torch.float32
    assert labels[0].tolist() == [[3, 1, 2, 3, 4, 0], [0, 5, 6, 7, 8, 1]]
    assert labels[1].tolist() == [[-1, 0, 0, 0, 0, 0]] * 2
    assert labels[2].tolist() == [[2, 0, 0, 1, 1, 0], [-1, 0, 0, 0, 0, 0]]
    assert batch["images"].shape == (3, 3, 8, 8) and batch["images"][2].eq(12).all()


def test_meta_is_batched_with_contract_dtypes():
    meta = collate_detection(SAMPLES)["meta"]
    assert meta["image_id"].dtype == torch.long and meta["image_id"].tolist() == [10, 11, 12]
    assert meta["orig_size"].dtype == torch.long and meta["orig_size"].tolist() == [[6, 7]] * 3
    assert meta["scale"].dtype == torch.float32 and meta["scale"].tolist() == [[1.5, 2.0]] * 3
    assert meta["pad"].tolist() == [[0.5, 0.25]] * 3
    assert meta["path"] == ["10.jpg", "11.jpg", "12.jpg"]


def test_fixed_pad_width_and_an_empty_batch_keeps_one_row():
    assert collate_detection(SAMPLES, label_pad_width=5)["labels"].shape == (3, 5, 6)
    empty = collate_detection([SAMPLES[1]])["labels"]
    assert empty.shape == (1, 1, 6) and empty[0, 0, 0] == -1


def test_too_many_objects_for_the_pad_width_names_image_and_setting():
    with pytest.raises(ValueError, match=r"10\.jpg has 2 objects .*label_pad_width=1"):
        collate_detection(SAMPLES, label_pad_width=1)


def test_uint8_images_with_colour_matrices_are_converted_and_coloured_as_one_batch():
    """By hand: doubling every channel sends 50 -> 100 and 200 -> 255 (clipped); swapping red and blue moves a
    pixel's values; an image without a matrix and the zero padding are left as they are."""
    def pixels(value, height, width, colour=None):
        image = torch.tensor(value, dtype=torch.uint8).view(3, 1, 1).repeat(1, height, width)
        return Sample(image=image, boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long),
                      difficult=torch.zeros(0, dtype=torch.bool), image_id=0, path="x.jpg",
                      orig_size=(height, width), colour=colour)

    swap = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    batch = collate_detection([
        pixels((50, 200, 10), 4, 6, colour=2 * torch.eye(3)),
        pixels((50, 200, 10), 4, 6, colour=swap),
        pixels((50, 200, 10), 3, 5),
    ], size_divisor=8)["images"]
    assert batch.dtype == torch.float32 and batch.shape == (3, 3, 8, 8)
    assert batch[0, :, :4, :6].flatten(1).tolist() == [[100.0] * 24, [255.0] * 24, [20.0] * 24]
    assert batch[1, :, :4, :6].flatten(1).tolist() == [[10.0] * 24, [200.0] * 24, [50.0] * 24]
    assert batch[2, :, :3, :5].flatten(1).tolist() == [[50.0] * 15, [200.0] * 15, [10.0] * 15]
    assert batch[0, :, 4:].eq(0).all() and batch[0, :, :, 6:].eq(0).all() and batch[2, :, 3:].eq(0).all()


def test_present_labels_are_the_objects_without_the_padding_rows():
    rows = torch.tensor([[[2.0, 1, 2, 3, 4, 0], [-1, 0, 0, 0, 0, 0]], [[0.0, 5, 6, 7, 8, 1], [1, 9, 9, 10, 10, 0]]])
    present = Labels.present(rows)
    assert present.classes.tolist() == [2.0, 0.0, 1.0]
    assert present.boxes.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 10, 10]]
    assert present.difficult.tolist() == [0.0, 1.0, 0.0]
