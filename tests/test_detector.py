"""The base detector's mapping from batch pixels back to original-image pixels."""

import functools
import logging

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_det.models.detector import Detector, labels_to_targets, to_original_pixels


def meta_for(scales, pads, sizes):
    return {
        "scale": torch.tensor(scales, dtype=torch.float32),
        "pad": torch.tensor(pads, dtype=torch.float32),
        "orig_size": torch.tensor(sizes),
        "image_id": torch.arange(len(sizes)) + 7,
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
    assert (int(first["image_id"]), int(second["image_id"])) == (7, 8)  # so a metric can drop repeated images


class ToyDetector(Detector):
    """One conv layer; its loss turns NaN from ``nan_from_step`` on."""

    def __init__(self, nan_from_step: int = 10**9, **kwargs):
        super().__init__(**kwargs)
        self.conv = torch.nn.Conv2d(3, 1, 1)
        self.nan_from_step = nan_from_step

    def forward(self, images):
        return self.conv(images)

    def loss(self, outputs, batch):
        value = outputs.square().mean()
        if self.global_step >= self.nan_from_step:
            value = value * float("nan")
        return {"loss": value, "square": value}


def toy_batches(n: int) -> DataLoader:
    batches = [{"images": torch.randn(2, 3, 8, 8), "labels": torch.full((2, 1, 6), -1.0)} for _ in range(n)]
    return DataLoader(batches, batch_size=None)


def test_training_stops_with_a_message_when_the_loss_is_not_finite(caplog):
    model = ToyDetector(nan_from_step=3, num_classes=1, optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    trainer = L.Trainer(max_epochs=5, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with caplog.at_level(logging.ERROR):
        trainer.fit(model, train_dataloaders=toy_batches(8))
    # stopped in the first of 5 epochs, right after the NaN step, and the NaN did not reach the weights
    assert trainer.current_epoch <= 1 and trainer.global_step <= 4
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert "loss became non-finite at epoch 0, global step 3" in model.nonfinite_loss
    assert "optimizer.lr" in caplog.text


def test_optimizer_given_as_a_config_builds_the_same_optimizer():
    model = ToyDetector(
        nan_from_step=10**6, num_classes=1,
        optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.05, "weight_decay": 1e-3},
    )
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, train_dataloaders=toy_batches(1))
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-3, 0.0]
    assert all(g["lr"] == 0.05 for g in optimizer.param_groups)


def test_normalise_matches_torchvisions_rcnn_transform_on_a_padded_batch():
    """Images of two sizes padded into one batch by our collate, then normalised by the model, equal torchvision's
    GeneralizedRCNNTransform (normalise each image, then pad with zeros) on the same pixels."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    from lightning_det.data.collate import collate_detection
    from lightning_det.data.transforms import Sample

    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    torch.manual_seed(0)
    pixels = [torch.randint(0, 256, (3, 40, 64)).float(), torch.randint(0, 256, (3, 64, 30)).float()]
    samples = [Sample(image=p, boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long),
                      difficult=torch.zeros(0, dtype=torch.bool), image_id=i, path=f"{i}.jpg",
                      orig_size=tuple(p.shape[-2:])) for i, p in enumerate(pixels)]
    batch = collate_detection(samples, size_divisor=32)
    model = ToyDetector(num_classes=1, pixel_mean=mean, pixel_std=std)
    ours = model.normalise(batch["images"], batch["meta"]["image_size"])

    reference = GeneralizedRCNNTransform(min_size=64, max_size=64, image_mean=[m / 255 for m in mean],
                                         image_std=[s / 255 for s in std], size_divisible=32, fixed_size=(1, 1))
    normalised = [reference.normalize(p / 255) for p in pixels]  # torchvision takes [0, 1] images
    expected = reference.batch_images(normalised, size_divisible=32)
    assert ours.shape == expected.shape == (2, 3, 64, 64)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert bool((ours[0, :, 40:] == 0).all()) and bool((ours[1, :, :, 30:] == 0).all())


def test_normalisation_is_the_models_and_travels_in_its_hyperparameters():
    model = ToyDetector(num_classes=1, pixel_mean=(10.0, 20.0, 30.0), pixel_std=(2.0, 4.0, 5.0))
    images = torch.tensor([50.0, 60.0, 80.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(model.normalise(images).flatten(), torch.tensor([20.0, 10.0, 10.0]))
    rebuilt = ToyDetector(**model.hparams)
    assert torch.equal(rebuilt.pixel_mean, model.pixel_mean) and torch.equal(rebuilt.pixel_std, model.pixel_std)
    default = ToyDetector(num_classes=1)  # the base's default: pixels / 255
    torch.testing.assert_close(default.normalise(images).flatten(), torch.tensor([50.0, 60.0, 80.0]) / 255)
