"""Mixup and copy-paste: pixels and boxes worked by hand, and the dataset's class-balanced choice of objects."""

import numpy as np
import pytest
import torch
from helpers import make_voc, read_voc_train
from hydra.utils import instantiate
from test_data_transforms import make_sample

from lightning_det.data.dataset import DetectionDataset, class_balanced_weights
from lightning_det.data.transforms import EpochAugment, SSDTrainTransform, YoloTrainTransform
from lightning_det.data.transforms.mix import MAX_HIDDEN, Donor, mixup, paste_objects

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_mixup_blends_pixels_about_half_and_half_and_keeps_both_sets_of_boxes():
    torch.manual_seed(0)
    first = make_sample(48, 64, [[1.0, 2.0, 30.0, 40.0]], [0], colour=(100, 100, 100))
    second = make_sample(48, 64, [[10.0, 5.0, 60.0, 45.0], [0.0, 0.0, 8.0, 8.0]], [2, 1], colour=(200, 200, 200))
    mixed = mixup(first, second, fill=114)
    assert mixed.image.dtype == torch.uint8 and mixed.image.shape == (3, 48, 64)
    assert mixed.image.unique().numel() == 1
    ratio = (200 - mixed.image[0, 0, 0].item()) / 100  # pixel = 100 r + 200 (1 - r)
    assert 0.3 < ratio < 0.7
    assert mixed.boxes.tolist() == [[1.0, 2.0, 30.0, 40.0], [10.0, 5.0, 60.0, 45.0], [0.0, 0.0, 8.0, 8.0]]
    assert mixed.labels.tolist() == [0, 2, 1] and len(mixed.difficult) == 3


def test_mixup_fits_a_partner_of_the_other_orientation_into_the_first_canvas():
    """A 64 x 48 portrait into a 48 x 64 landscape canvas: scaled by 48 / 64 to 48 x 36, at the top left."""
    first = make_sample(48, 64, [], [], colour=(0, 0, 0))
    second = make_sample(64, 48, [[0.0, 0.0, 48.0, 64.0], [8.0, 16.0, 24.0, 32.0]], [1, 1], colour=(200, 200, 200))
    mixed = mixup(first, second, fill=0)
    assert mixed.image.shape == (3, 48, 64)
    torch.testing.assert_close(mixed.boxes, torch.tensor([[0.0, 0.0, 36.0, 48.0], [6.0, 12.0, 18.0, 24.0]]))
    assert mixed.image[:, :, 37:].max() == 0 and mixed.image[:, :, :35].min() > 0  # the partner covers x < 36


def test_mixup_of_float_samples_stays_float():
    first = make_sample(30, 30, [], [], colour=(10, 10, 10))
    first.image = first.image.float()
    mixed = mixup(first, make_sample(30, 30, [], [], colour=(20, 20, 20)), fill=(1.0, 2.0, 3.0))
    assert mixed.image.dtype == torch.float32 and 10 < mixed.image.mean() < 20


def test_paste_puts_the_crop_where_it_hides_little_of_what_is_there():
    torch.manual_seed(0)
    target = make_sample(100, 120, [[0.0, 0.0, 60.0, 100.0]], [0], colour=(0, 0, 0), box_colours=[(50, 50, 50)])
    donor = Donor(torch.full((3, 20, 16), 255, dtype=torch.uint8), label=3)
    pasted = paste_objects(target, [donor])
    assert pasted.labels.tolist() == [0, 3] and pasted.difficult.tolist() == [False, False]
    x0, y0, x1, y1 = (int(v) for v in pasted.boxes[1].tolist())
    assert (x1 - x0, y1 - y0) == (16, 20)
    assert bool((pasted.image[:, y0:y1, x0:x1] == 255).all())
    assert int((pasted.image == 255).sum()) == 3 * 16 * 20  # nothing else changed
    hidden = max(0, min(x1, 60) - x0) * (y1 - y0) / (60 * 100)
    assert hidden <= MAX_HIDDEN
    assert target.image.max() == 50  # the input is left as it was


def test_paste_leaves_out_a_donor_with_no_free_place_and_shrinks_a_large_one():
    torch.manual_seed(0)
    grid = [[x, y, x + 2.0, y + 2.0] for x in range(0, 40, 2) for y in range(0, 40, 2)]  # small objects everywhere
    crowded = make_sample(40, 40, grid, [0] * len(grid))
    assert len(paste_objects(crowded, [Donor(torch.ones(3, 5, 5, dtype=torch.uint8), 1)]).labels) == len(grid)
    empty = make_sample(40, 40, [], [])
    pasted = paste_objects(empty, [Donor(torch.ones(3, 80, 40, dtype=torch.uint8), 1)])
    width, height = (pasted.boxes[0, 2:] - pasted.boxes[0, :2]).tolist()
    assert (width, height) == (10, 20)  # half the image's height, the aspect ratio kept


def test_class_balanced_weights_give_each_class_the_same_share():
    labels = np.array([0, 0, 0, 1, 2, 2])
    difficult = np.array([False, False, False, False, False, True])
    weights = class_balanced_weights(labels, difficult)
    assert weights.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0, 1.0, 0.0])


IMAGES = {
    f"{k}": (120, 160, [("common", (10 + k, 10, 50 + k, 50), False), ("common", (90, 60, 130, 100), False)])
    for k in range(6)
} | {"6": (120, 160, [("rare", (20, 30, 60, 80), False)])}


@pytest.fixture()
def records(tmp_path):
    root = make_voc(tmp_path, {"2007/train": IMAGES})
    data = read_voc_train(root)
    return data.records["train"], data.classes.index("rare")


@pytest.mark.parametrize("transform", [
    YoloTrainTransform(img_size=160, mix={"copy_paste": 1.0}, flip=0.0, scale=0.0, translate=0.0),
    SSDTrainTransform(img_size=160, mix={"copy_paste": 1.0}, zoom_out=0.0, crop_min_iou=[], flip=0.0),
])
def test_copy_paste_in_the_dataset_pastes_the_rare_class_about_as_often_as_the_common(records, transform):
    """One rare object against twelve common ones: drawn class-balanced, about half the pasted objects are rare."""
    table, rare = records
    torch.manual_seed(0)
    dataset = DetectionDataset(table, transform)
    pasted = {"rare": 0, "all": 0}
    for index in range(6):  # images without the rare object
        for _ in range(10):
            sample = dataset[index]
            extra = sample.labels[2:]
            pasted["rare"] += int((extra == rare).sum())
            pasted["all"] += len(extra)
    assert pasted["all"] >= 60  # at least one object each time
    assert 0.3 < pasted["rare"] / pasted["all"] < 0.7


def test_mixup_in_the_dataset_and_closed_with_mosaic(records):
    table, _ = records
    torch.manual_seed(0)
    dataset = DetectionDataset(table, YoloTrainTransform(img_size=160, mix={"mixup": 1.0}, rect=True))
    counts = [len(dataset[(index, EpochAugment())].labels) for index in range(7)]
    assert all(count >= 2 for count in counts[:6]) and counts[6] >= 2  # each got a partner's objects too
    closed = EpochAugment(mix=False)
    assert [len(dataset[(index, closed)].labels) for index in range(7)] == [2] * 6 + [1]  # closed: none mixed


def test_the_ssd_pipeline_refuses_mosaic():
    with pytest.raises(ValueError, match="mix.mosaic=0"):
        SSDTrainTransform(mix={"mosaic": 0.5})


def test_the_albumentations_step_keeps_boxes_and_labels_in_step():
    albumentations = pytest.importorskip("albumentations")
    from lightning_det.data.transforms.albumentations_hook import AlbumentationsStep

    sample = make_sample(60, 100, [[10.0, 20.0, 30.0, 40.0], [60.0, 5.0, 90.0, 50.0]], [1, 2],
                         box_colours=[(255, 0, 0), (0, 255, 0)])
    flipped = AlbumentationsStep([albumentations.HorizontalFlip(p=1.0)])(sample)
    assert torch.equal(flipped.image, sample.image.flip(-1))
    torch.testing.assert_close(flipped.boxes, torch.tensor([[70.0, 20.0, 90.0, 40.0], [10.0, 5.0, 40.0, 50.0]]))
    cropped = AlbumentationsStep([albumentations.Crop(x_min=0, y_min=0, x_max=50, y_max=60)])(sample)
    assert cropped.image.shape == (3, 60, 50) and cropped.labels.tolist() == [1] and len(cropped.difficult) == 1
    torch.testing.assert_close(cropped.boxes, torch.tensor([[10.0, 20.0, 30.0, 40.0]]))


def test_the_dataset_applies_its_augment_step_to_every_loaded_image(records):
    table, _ = records
    calls = []
    dataset = DetectionDataset(table, YoloTrainTransform(img_size=160), augment=lambda s: calls.append(s.path) or s)
    dataset[0], dataset[3]
    assert len(calls) == 2 and calls[0] != calls[1]


def test_the_pipeline_config_builds_the_albumentations_step_into_the_training_set(cfg_train, tiny_voc):
    pytest.importorskip("albumentations")
    _, data_overrides = tiny_voc
    cfg = cfg_train(*data_overrides, "data.img_size=64", "data.loader.num_workers=0",
                    "data.pipeline.albumentations=[{_target_:albumentations.ToGray,p:1.0}]")
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    train = datamodule.train_dataloader().dataset
    assert train.augment is not None and datamodule.val_dataloader().dataset.augment is None
    torch.manual_seed(0)
    image = train[0].image.float()  # before the colour jitter, which collation applies
    assert torch.allclose(image[0], image[1], atol=1) and torch.allclose(image[1], image[2], atol=1)
