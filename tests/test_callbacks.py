"""Callbacks: the EMA average against a hand-rolled recursion of the same formula."""

import functools
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tiny_detector import TinyDetector
from torch.utils.data import DataLoader

from lightning_det.callbacks import Freeze, ModelEMA, MultiScale
from lightning_det.models.detector import Detector

IDENTITY = (1.0, 1.0, 1.0)  # the synthetic batches are the network's input as they are (mean 0, std 1)


class Regressor(Detector):
    def __init__(self):
        super().__init__(num_classes=1, optimizer=functools.partial(torch.optim.SGD, lr=0.2), pixel_std=IDENTITY)
        self.conv = torch.nn.Conv2d(3, 1, 1)

    def forward(self, images):
        return self.conv(images)

    def loss(self, outputs, batch):
        value = (outputs - 1).square().mean()
        return {"loss": value}


class RecordWeights(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(pl_module.conv.weight.detach().clone())


def test_ema_follows_the_ramped_formula_and_is_what_the_checkpoint_holds(tmp_path):
    torch.manual_seed(0)
    batches = DataLoader([{"images": torch.randn(2, 3, 4, 4)} for _ in range(6)], batch_size=None)
    record, ema = RecordWeights(), ModelEMA(decay=0.9, ramp=3.0)
    model = Regressor()
    saver = ModelCheckpoint(dirpath=tmp_path, filename="last", monitor=None)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, callbacks=[record, ema, saver])
    trainer.fit(model, train_dataloaders=batches)

    expected = record.seen[0]
    for updates, raw in enumerate(record.seen[1:], start=1):
        d = 0.9 * (1 - math.exp(-updates / 3.0))
        expected = expected * d + raw * (1 - d)

    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert torch.allclose(checkpoint["state_dict"]["conv.weight"], expected, atol=1e-6)
    assert torch.allclose(checkpoint["current_model_state"]["conv.weight"], record.seen[-1])
    assert not torch.allclose(expected, record.seen[-1], atol=1e-3)


def test_auto_decay_sizes_the_average_to_the_planned_run(tmp_path):
    """decay=auto: a window of window_share of the planned steps (2 epochs x 6 = 12; half: 6 steps, decay 5/6),
    ramped over a fifth of it, against the hand-rolled recursion."""
    torch.manual_seed(0)
    batches = DataLoader([{"images": torch.randn(2, 3, 4, 4)} for _ in range(6)], batch_size=None)
    record, ema = RecordWeights(), ModelEMA(window_share=0.5)
    saver = ModelCheckpoint(dirpath=tmp_path, filename="last", monitor=None)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, callbacks=[record, ema, saver],
                        limit_val_batches=0)
    trainer.fit(Regressor(), train_dataloaders=batches)

    expected = record.seen[0]
    for updates, raw in enumerate(record.seen[1:], start=1):
        d = (1 - 1 / 6) * (1 - math.exp(-updates / 1.2))
        expected = expected * d + raw * (1 - d)
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert torch.allclose(checkpoint["state_dict"]["conv.weight"], expected, atol=1e-6)


class RecordValidatedWeights(L.Callback):
    def __init__(self):
        self.seen = []

    def on_validation_epoch_start(self, trainer, pl_module):
        self.seen.append(pl_module.body[0].weight.detach().clone())


def test_validating_a_checkpoint_after_fit_validates_that_checkpoint(tmp_path):
    """After fit, trainer.validate(ckpt_path=best) must score the best checkpoint's (averaged) weights, not the
    average of the last step swapped in by the EMA callback."""
    torch.manual_seed(0)
    batches = DataLoader([{"images": torch.randn(2, 3, 6, 6) + 2} for _ in range(4)], batch_size=None)
    validated = RecordValidatedWeights()
    saver = ModelCheckpoint(dirpath=tmp_path, filename="epoch{epoch}", monitor=None, save_top_k=-1,
                            auto_insert_metric_name=False)
    trainer = L.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, num_sanity_val_steps=0,
                        callbacks=[ModelEMA(decay=0.5, ramp=1.0), validated, saver])
    model = TinyDetector()
    trainer.fit(model, train_dataloaders=batches, val_dataloaders=batches)
    first = tmp_path / "epoch0.ckpt"
    trainer.validate(model, dataloaders=batches, ckpt_path=str(first), verbose=False)
    saved = torch.load(first, weights_only=False)["state_dict"]["body.0.weight"]
    assert torch.equal(validated.seen[0], saved)  # validation during fit saw the average, as saved
    assert torch.equal(validated.seen[-1], saved)
    assert not torch.equal(validated.seen[-2], saved)


class RecordState(L.Callback):
    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        groups = trainer.optimizers[0].param_groups
        self.steps.append({
            "epoch": trainer.current_epoch,
            "body": pl_module.body[0].weight.detach().clone(),
            "mean": pl_module.body[1].running_mean.clone(),
            "head": pl_module.head.weight.detach().clone(),
            "released_lrs": [g["lr"] for g in groups if any(p is pl_module.body[0].weight for p in g["params"])],
            "other_lrs": [g["lr"] for g in groups if any(p is pl_module.head.weight for p in g["params"])],
        })


def test_freeze_keeps_weights_and_bn_statistics_then_releases_at_a_lower_lr():
    torch.manual_seed(0)
    batches = DataLoader([{"images": torch.randn(4, 3, 6, 6) + 3} for _ in range(3)], batch_size=None)
    model, record = TinyDetector(momentum=0.9), RecordState()
    start = {"body": model.body[0].weight.detach().clone(), "mean": model.body[1].running_mean.clone(),
             "head": model.head.weight.detach().clone()}
    freeze = Freeze(pattern=r"^body\.", unfreeze_at_epoch=1, lr_factor=0.1)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=[freeze, record])
    trainer.fit(model, train_dataloaders=batches)

    first, second = [s for s in record.steps if s["epoch"] == 0], [s for s in record.steps if s["epoch"] == 1]
    assert len(first) == len(second) == 3
    for step in first:
        assert torch.equal(step["body"], start["body"]) and torch.equal(step["mean"], start["mean"])
        assert step["other_lrs"] == [0.1]
    assert not torch.equal(first[-1]["head"], start["head"])
    assert not torch.equal(second[-1]["body"], start["body"])
    assert not torch.equal(second[-1]["mean"], start["mean"])
    assert second[-1]["released_lrs"] == [pytest.approx(0.01)] and second[-1]["other_lrs"] == [0.1]


def test_freeze_releases_at_a_share_of_the_run_and_leaves_what_the_model_froze_itself():
    """Released at epoch 2 of 4 (share 0.5); the body's bias, frozen by the model before the callback ran (as
    torchvision's fine-tuning layout freezes Faster R-CNN's first stages), stays frozen after the release."""
    torch.manual_seed(0)
    batches = DataLoader([{"images": torch.randn(4, 3, 6, 6) + 3} for _ in range(2)], batch_size=None)
    model, record = TinyDetector(momentum=0.9), RecordState()
    norm_bias = model.body[1].bias
    norm_bias.requires_grad_(False)
    start = norm_bias.detach().clone()
    freeze = Freeze(pattern=r"^body\.", unfreeze_at_share=0.5)
    trainer = L.Trainer(max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=[freeze, record])
    trainer.fit(model, train_dataloaders=batches)

    moved = [s["epoch"] for s in record.steps if not torch.equal(s["body"], record.steps[0]["body"])]
    assert moved and min(moved) == 2 and freeze.released
    assert model.body[0].weight.requires_grad and not norm_bias.requires_grad
    assert torch.equal(norm_bias, start)
    with pytest.raises(ValueError, match="unfreeze_at_epoch or unfreeze_at_share, not both"):
        Freeze(pattern="x", unfreeze_at_epoch=1, unfreeze_at_share=0.5)


def test_first_n_freezes_leading_convolutions_with_their_norms():
    model = TinyDetector(momentum=0.9)
    modules = Freeze(first_n=1).frozen_modules(model)
    assert modules == [model.body[0], model.body[1]]


class RecordInputs(Detector):
    def __init__(self):
        super().__init__(num_classes=1, optimizer=functools.partial(torch.optim.SGD, lr=0.01), pixel_std=IDENTITY)
        self.conv = torch.nn.Conv2d(3, 1, 1)
        self.seen = []

    def forward(self, images):
        return self.conv(images)

    def loss(self, outputs, batch):
        self.seen.append((tuple(batch["images"].shape[-2:]), batch["labels"][0, 0, 1:5].clone()))
        return {"loss": outputs.mean()}


def test_multiscale_changes_the_input_size_every_n_batches_and_scales_the_boxes():
    torch.manual_seed(0)
    box = torch.tensor([[[0.0, 32.0, 64.0, 96.0, 160.0, 0.0]]])
    batches = DataLoader([{"images": torch.rand(1, 3, 320, 320), "labels": box} for _ in range(40)], batch_size=None)
    model = RecordInputs()
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=[MultiScale(every_n_batches=4)])
    trainer.fit(model, train_dataloaders=batches)

    sizes = [size for size, _ in model.seen]
    assert len(set(sizes)) > 2
    for start in range(0, 40, 4):
        assert len(set(sizes[start:start + 4])) == 1  # constant within each group of 4 batches
    for (h, w), boxes in model.seen:
        assert h == w and h % 32 == 0 and 0.67 * 320 <= h <= 1.5 * 320
        assert torch.allclose(boxes, box[0, 0, 1:5] * h / 320)
