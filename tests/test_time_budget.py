"""``trainer.max_time`` lays max_epochs, the warm-up and the cosine over the epochs that fit (TimeBudget)."""

from __future__ import annotations

import time
from datetime import timedelta

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_det.callbacks import TimeBudget
from lightning_det.optim import cosine

BATCH_SECONDS = 0.05


class SlowRegression(L.LightningModule):
    """A linear model whose training steps take a known time, under the project's cosine schedule."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.lrs: list[float] = []

    def training_step(self, batch, batch_idx):
        time.sleep(BATCH_SECONDS)
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        x, y = batch
        return nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        steps = int(self.trainer.estimated_stepping_batches)
        schedule = cosine(optimizer, total_steps=steps, steps_per_epoch=steps // self.trainer.max_epochs,
                          warmup_epochs=3.0, warmup_steps=0, final_factor=0.01)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def train(callbacks: list, seconds: float) -> tuple[L.Trainer, SlowRegression]:
    data = DataLoader(TensorDataset(torch.randn(40, 2), torch.randn(40, 1)), batch_size=4)  # 10 steps an epoch
    model = SlowRegression()
    trainer = L.Trainer(max_epochs=100, max_time=timedelta(seconds=seconds), callbacks=callbacks, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    return trainer, model


def test_budget_ends_the_cosine_at_the_budget():
    seconds = 4.0
    trainer, model = train([TimeBudget()], seconds)
    epoch_seconds = 10 * BATCH_SECONDS
    assert trainer.current_epoch <= seconds / epoch_seconds  # about 8 epochs fit, never the 100 asked for
    assert trainer.current_epoch >= 0.5 * seconds / epoch_seconds
    assert len(model.lrs) == 10 * trainer.current_epoch  # stopped at an epoch end, by the plan, not the clock
    # the last step sits at the end of the cosine: 0.1 * (0.01 + 0.99 * (1 + cos(pi * ~0.95)) / 2) < 0.01
    assert model.lrs[-1] < 0.01
    # the warm-up (3 epochs asked) was held to 10 % of the steps planned after the first epoch: full rate at the
    # second step of the second epoch (its first was scheduled before the epoch ended)
    assert model.lrs[11] > 0.09


def test_without_the_callback_the_clock_cuts_the_schedule_near_its_peak():
    trainer, model = train([], 2.0)
    assert model.lrs[-1] > 0.09  # 100 planned epochs: cut off just after the warm-up
