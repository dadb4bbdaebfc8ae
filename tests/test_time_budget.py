"""``trainer.max_time`` lays max_epochs, the warm-up and the cosine over the epochs that fit (TimeBudget)."""

from __future__ import annotations

import math
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
from runs import quick_run
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_det.callbacks import RunCheckpoint, TimeBudget
from lightning_det.optim import cosine
from lightning_det.report.results_csv import read_rows

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


def train(callbacks: list, seconds: float, model: SlowRegression | None = None, samples: int = 40,
          **trainer_options) -> tuple[L.Trainer, SlowRegression]:
    """``model`` (a ``SlowRegression``) trained under a budget of ``seconds``, ``samples / 4`` steps an epoch; a
    ``SlowValidation`` also validates on one sample after the epochs it is asked to."""
    data = DataLoader(TensorDataset(torch.randn(samples, 2), torch.randn(samples, 1)), batch_size=4)
    model = model or SlowRegression()
    validates = isinstance(model, SlowValidation)
    validation = DataLoader(TensorDataset(torch.randn(1, 2)), batch_size=1) if validates else None
    options = {"enable_checkpointing": False, "num_sanity_val_steps": 0, **trainer_options}
    trainer = L.Trainer(max_epochs=100, max_time=timedelta(seconds=seconds), callbacks=callbacks, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, **options)
    trainer.fit(model, data, val_dataloaders=validation)
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


class SlowValidation(SlowRegression):
    """Validation of a known time, a quarter of a training epoch's cost or more; records the epochs it ran after.
    Its score, ``val_loss``, improves every epoch, so the best checkpoint is the last validated epoch's."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.validation_seconds = seconds
        self.validated_epochs: list[int] = []

    def validation_step(self, batch, batch_idx):
        time.sleep(self.validation_seconds)
        if not self.trainer.sanity_checking:
            self.validated_epochs.append(self.current_epoch)
        self.log("val_loss", 1.0 / (1 + self.current_epoch))


def test_costly_validation_runs_every_kth_epoch_then_every_epoch_at_the_end():
    # an epoch trains 0.25 s and validates 0.125 s: at a share of 0.1, every ceil(0.125 * 0.9 / 0.025) = 5th epoch
    trainer, model = train([TimeBudget(validation_share=0.1)], 8.0, SlowValidation(0.125), samples=20)
    epochs = trainer.current_epoch
    assert model.lrs[-1] < 0.01  # the plan, not the clock, ended the run: the cosine annealed
    final = max(5, math.ceil(epochs / 5))
    assert model.validated_epochs[-final:] == list(range(epochs - final, epochs))  # the last fifth, every epoch
    early = [e for e in model.validated_epochs if e < epochs - final]
    assert early[0] == 0 and len(early) >= 3, model.validated_epochs  # the first epoch measures a validation
    assert min(b - a for a, b in zip(early, early[1:])) >= 4, model.validated_epochs  # then far apart

    every_epoch, model_every = train([TimeBudget(validation_share=None)], 8.0, SlowValidation(0.125), samples=20)
    assert model_every.validated_epochs == list(range(every_epoch.current_epoch))
    assert epochs >= every_epoch.current_epoch + 2  # the time saved trains more epochs


def test_a_configured_validation_interval_stays():
    trainer, model = train([TimeBudget(validation_share=0.1)], 2.0, SlowValidation(0.125), samples=20,
                           check_val_every_n_epoch=2)
    assert model.validated_epochs == list(range(1, trainer.current_epoch, 2))


def test_checkpoints_follow_the_validations_the_budget_keeps(tmp_path):
    best = RunCheckpoint(dirpath=tmp_path, filename="best-{epoch:03d}", monitor="val_loss", mode="min",
                          auto_insert_metric_name=False)
    last = RunCheckpoint(dirpath=tmp_path, filename="last", monitor=None, save_on_train_epoch_end=True)
    trainer, model = train([TimeBudget(validation_share=0.1), best, last], 4.0, SlowValidation(0.125), samples=20,
                           enable_checkpointing=True)
    assert len(model.validated_epochs) < trainer.current_epoch  # some epochs were not validated
    final_epoch = trainer.current_epoch - 1
    assert model.validated_epochs[-1] == final_epoch
    assert Path(best.best_model_path).name == f"best-{final_epoch:03d}.ckpt"  # the score improves every validation
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["epoch"] == final_epoch


def test_a_budgeted_run_that_skips_validations_keeps_its_records(tmp_path):
    run = tmp_path / "run"
    done = quick_run(tmp_path, "+trainer.max_time=00:00:00:15", "callbacks.time_budget.validation_share=0.02",
                     f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_rows(run / "results.csv")
    validated = [int(row["epoch"]) for row in rows if row["val/mAP"]]
    assert 0 < len(validated) < len(rows), validated  # empty, not the last validation's, where none ran
    assert validated[-1] == len(rows) - 1
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == len(rows) - 1  # written after the epochs without validation too
    best = torch.load(next((run / "checkpoints").glob("best-*.ckpt")), map_location="cpu", weights_only=False)
    assert best["epoch"] in validated


class SlowValidationOnRankOne(L.Callback):
    """Rank 1 validates slower than rank 0: ranks planning on their own clocks would skip different validations and
    wait for each other forever."""

    def on_validation_batch_end(self, trainer, *args, **kwargs):
        if trainer.global_rank == 1 and not trainer.sanity_checking:
            time.sleep(0.3)


@pytest.mark.slow
def test_two_ddp_processes_skip_the_same_validations(tmp_path):
    run = tmp_path / "run"
    done = quick_run(tmp_path, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                     "+trainer.max_time=00:00:00:30", "callbacks.time_budget.validation_share=0.02",
                     f"hydra.run.dir={run}", f"+callbacks.slow._target_={__name__}.SlowValidationOnRankOne")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_rows(run / "results.csv")
    validated = [int(row["epoch"]) for row in rows if row["val/mAP"]]
    assert 0 < len(validated) < len(rows), validated  # some epochs skipped their validation, on both ranks alike
    final = max(5, math.ceil(len(rows) / 5))
    assert validated[-final:] == list(range(len(rows) - final, len(rows)))
