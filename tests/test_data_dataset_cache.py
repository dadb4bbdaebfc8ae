"""The dataset's decoded-image cache: a YOLO training pipeline gets each image decoded once, already reduced to
its longer side, and augments it exactly as it would the full-size image."""

import pytest
import torch
from helpers import make_voc, read_voc_train

from lightning_det.data import dataset as dataset_module
from lightning_det.data.dataset import DetectionDataset
from lightning_det.data.transforms import EpochAugment, LetterboxTransform, YoloTrainTransform

IMAGES = {"wide": (300, 400, [("a", (41, 31, 200, 150), False)]), "tall": (350, 210, [("b", (11, 21, 150, 300), False)])}


@pytest.fixture()
def records(tmp_path):
    root = make_voc(tmp_path, {"2007/train": IMAGES})
    data = read_voc_train(root)
    return data.records["train"]


def test_reduced_decoding_gives_the_same_augmented_samples(records):
    transform = YoloTrainTransform(img_size=160)
    reduced = DetectionDataset(records, transform)
    full = DetectionDataset(records, LetterboxTransform())  # no decode_size: full-size images
    full.transform = transform
    image, boxes = reduced.image_and_boxes(0)
    assert image.shape == (3, 120, 160)  # 300 x 400 -> longer side 160
    torch.testing.assert_close(boxes, torch.tensor([[40.0, 30.0, 200.0, 150.0]]) * 0.4)
    mixed, single = EpochAugment(), EpochAugment(mix=False)
    for item in [(0, mixed), (1, mixed), (0, single), (1, single)]:
        torch.manual_seed(7)
        expected = full[item]
        torch.manual_seed(7)
        actual = reduced[item]
        torch.testing.assert_close(actual.image, expected.image)
        torch.testing.assert_close(actual.boxes, expected.boxes)
        assert torch.equal(actual.labels, expected.labels)


def test_small_sets_are_decoded_once_larger_ones_every_time(records, monkeypatch):
    decoded = []
    original = dataset_module.load_image
    monkeypatch.setattr(dataset_module, "load_image", lambda record: decoded.append(record) or original(record))
    cached = DetectionDataset(records, YoloTrainTransform(img_size=160))
    for _ in range(3):
        cached.load(0), cached.load(1)
    assert len(decoded) == 2
    reduced_bytes = 3 * (120 * 160 + 160 * 96)
    uncached = DetectionDataset(records, YoloTrainTransform(img_size=160), cache_bytes=reduced_bytes - 1)
    for _ in range(3):
        uncached.load(0)
    assert uncached.cache is None and len(decoded) == 5
