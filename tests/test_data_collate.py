import pytest
import torch

from lightning_det.data import collate_detection
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
