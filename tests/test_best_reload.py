"""ReloadBestAndDecay: at the chosen epoch the best checkpoint's weights return and the lr drops.
RestoreBestOnDecay: the best weights return when the scheduler drops the lr, not when it decays smoothly."""

import math

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_det.callbacks import ReloadBestAndDecay, RestoreBestOnDecay


class Scored(L.LightningModule):
    """A linear layer whose logged score is best at epoch 1 and worse afterwards."""

    def __init__(self, scheduler: bool, factor=lambda step: 1.0):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.use_scheduler = scheduler
        self.factor = factor

    def training_step(self, batch, batch_idx):
        return self.layer(batch).square().mean()

    def on_train_epoch_end(self):
        self.log("score", -abs(self.current_epoch - 1.0))

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05)
        if not self.use_scheduler:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class RecordAtEpochStart(L.Callback):
    def __init__(self):
        self.weights, self.ended, self.lrs = {}, {}, {}

    def on_train_epoch_start(self, trainer, pl_module):
        self.weights[trainer.current_epoch] = pl_module.layer.weight.detach().clone()
        self.lrs[trainer.current_epoch] = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_epoch_end(self, trainer, pl_module):
        self.ended[trainer.current_epoch] = pl_module.layer.weight.detach().clone()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs[(trainer.current_epoch, "step")] = trainer.optimizers[0].param_groups[0]["lr"]
        self.weights[(trainer.current_epoch, batch_idx)] = pl_module.layer.weight.detach().clone()


def run(tmp_path, scheduler: bool, reload=None, factor=lambda step: 1.0) -> tuple[RecordAtEpochStart, ModelCheckpoint]:
    """Four epochs of two steps; the score is best after epoch 1."""
    torch.manual_seed(0)
    record = RecordAtEpochStart()
    best = ModelCheckpoint(dirpath=tmp_path, monitor="score", mode="max", save_top_k=1)
    trainer = L.Trainer(max_epochs=4, callbacks=[best, reload or ReloadBestAndDecay(epoch=3, factor=0.1), record],
                        logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Scored(scheduler, factor), DataLoader(torch.randn(4, 2) + 3, batch_size=2))
    return record, best


def test_reloads_best_weights_and_scales_the_lr(tmp_path):
    record, best = run(tmp_path, scheduler=False)
    saved = torch.load(best.best_model_path, weights_only=True)["state_dict"]["layer.weight"]
    assert "epoch=1" in best.best_model_path
    assert not torch.equal(record.ended[2], saved)  # training moved on after the best epoch ...
    assert torch.equal(record.weights[3], saved)  # ... and the decay epoch starts from the best weights
    assert record.lrs[2] == 0.05 and abs(record.lrs[3] - 0.005) < 1e-12


def test_lambda_schedules_keep_the_drop(tmp_path):
    record, _ = run(tmp_path, scheduler=True)
    assert record.lrs[(2, "step")] == 0.05
    assert abs(record.lrs[(3, "step")] - 0.005) < 1e-12


def best_weights(best: ModelCheckpoint) -> torch.Tensor:
    return torch.load(best.best_model_path, weights_only=True)["state_dict"]["layer.weight"]


def test_restore_best_when_a_milestone_drops_the_lr(tmp_path):
    milestone = 7  # optimizer steps before the second batch of epoch 3 (0-based; two batches per epoch)
    record, best = run(tmp_path, True, RestoreBestOnDecay(), lambda step: 0.1 if step >= milestone else 1.0)
    saved = best_weights(best)
    assert "epoch=1" in best.best_model_path  # saved after the last step of epoch 1
    assert not torch.equal(record.weights[(3, 0)], saved)  # before the drop: where training had got to
    assert torch.equal(record.weights[(3, 1)], saved)  # the first step at the lower rate starts from the best


def test_no_restore_under_smooth_decay(tmp_path):
    record, best = run(tmp_path, True, RestoreBestOnDecay(), lambda step: math.cos(step / 8 * math.pi / 2))
    saved = best_weights(best)
    assert all(not torch.equal(w, saved) for key, w in record.weights.items() if isinstance(key, tuple) and key > (2, 0))
