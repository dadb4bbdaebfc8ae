"""Every training run says why it ended: early stopping, the time budget, max_epochs, a NaN loss or an interrupt
(``RunEnd``): one ``run ended: ...`` line, and ``stopped_by`` in ``final_metrics.json``."""

from __future__ import annotations

import json
import logging
import re
import signal
import time
from datetime import timedelta

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.utilities.exceptions import SIGTERMException
from runs import small_sample, train
from tiny_detector import TinyDetector
from torch.utils.data import DataLoader

from lightning_det.callbacks import BudgetedEarlyStopping, RunEnd, TimeBudget


def batches(count: int = 2) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    return DataLoader([{"images": torch.randn(2, 3, 6, 6, generator=generator) + 2} for _ in range(count)],
                      batch_size=None)


def fit(model: L.LightningModule, callbacks: list[L.Callback], max_epochs: int = 3, ending: RunEnd | None = None,
        **options) -> RunEnd:
    """Train ``model`` on two batches an epoch with ``ending`` (a new ``RunEnd``) after ``callbacks``; returns it."""
    ending = ending or RunEnd()
    trainer = L.Trainer(max_epochs=max_epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, num_sanity_val_steps=0, callbacks=[*callbacks, ending], **options)
    trainer.fit(model, train_dataloaders=batches(), val_dataloaders=batches(1))
    return ending


@pytest.fixture
def lines(caplog) -> callable:
    """The ``run ended:`` lines logged so far."""
    caplog.set_level(logging.INFO, logger="lightning_det")
    return lambda: [r.getMessage() for r in caplog.records if r.getMessage().startswith("run ended: ")]


class Slow(L.Callback):
    """Steps of a known time, so a budget of seconds holds a few epochs."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(0.05)


class NaNFrom(TinyDetector):
    """The loss turns NaN from optimizer step ``step`` on."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.nan_step = step

    def loss(self, outputs, batch):
        losses = super().loss(outputs, batch)
        return {"loss": losses["loss"] * (float("nan") if self.global_step >= self.nan_step else 1.0)}


class Interrupt(L.Callback):
    """Raise ``error`` after optimizer step ``step``, as Ctrl-C or Lightning's SIGTERM handler would."""

    def __init__(self, error: BaseException, step: int = 3) -> None:
        self.error, self.step = error, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise self.error


def test_max_epochs(lines):
    ending = fit(TinyDetector(), [], max_epochs=2)
    assert lines() == ["run ended: max_epochs 2 reached"]
    assert ending.summary() == {"stopped_by": "max_epochs", "run_ended": "max_epochs 2 reached"}


def test_early_stopping_names_the_epoch_the_patience_and_the_budget_left(lines):
    scores = [0.5, 0.4, 0.3, 0.6, 0.7, 0.8]
    early = EarlyStopping(monitor="val/mAP", mode="max", patience=2)
    ending = fit(TinyDetector(scores), [early], max_epochs=6)
    assert lines() == ["run ended: early stopping after 3 of 6 epochs (val/mAP no better in the last 2 validations, "
                       "best 0.5000)"]
    assert ending.stopped_by == "early_stopping"

    early = EarlyStopping(monitor="val/mAP", mode="max", patience=2)
    fit(TinyDetector(scores), [early], max_epochs=6, max_time=timedelta(minutes=10))
    assert re.fullmatch(r"run ended: early stopping after 3 of 6 epochs \(.*\), \d+\.\d of 10\.0 min of the budget "
                        r"left", lines()[-1]), lines()[-1]


def test_an_early_stop_of_an_earlier_run_is_not_this_runs_ending(lines):
    early = EarlyStopping(monitor="val/mAP", mode="max", patience=1)
    early.stopping_reason, early.stopped_epoch = early.stopping_reason.PATIENCE_EXHAUSTED, 0  # as a resumed state
    rising = [epoch / 1000 for epoch in range(1000)]  # early stopping never stops this run: the clock does
    ending = fit(TinyDetector(rising), [early, Slow()], max_epochs=1000, max_time=timedelta(seconds=2))
    assert ending.stopped_by == "time_budget", lines()


@pytest.mark.parametrize("laid_by_the_budget", [True, False])
def test_the_time_budget(lines, laid_by_the_budget):
    callbacks = [Slow(), TimeBudget()] if laid_by_the_budget else [Slow()]  # without TimeBudget, the clock cuts
    ending = fit(TinyDetector(), callbacks, max_epochs=1000, max_time=timedelta(seconds=2))
    assert ending.stopped_by == "time_budget"
    found = re.fullmatch(r"run ended: time budget spent after (\d+) epochs \([12] of 2 s\)", lines()[-1])
    assert found and 2 <= int(found[1]) < 1000, lines()


def test_max_epochs_under_a_budget_says_what_was_left(lines):
    ending = fit(TinyDetector(), [TimeBudget()], max_epochs=2, max_time=timedelta(minutes=10))
    assert ending.stopped_by == "max_epochs"
    assert re.fullmatch(r"run ended: max_epochs 2 reached, \d+\.\d of 10\.0 min of the budget left", lines()[-1])


def test_a_nonfinite_loss(lines):
    ending = fit(NaNFrom(step=3), [], max_epochs=5)
    assert lines() == ["run ended: non-finite loss at epoch 1, step 3"]
    assert ending.stopped_by == "non_finite_loss"


@pytest.fixture
def sigint_restored():
    """Lightning ignores SIGINT once it has handled a Ctrl-C: give pytest its handler back."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


def test_ctrl_c_and_sigterm(lines, sigint_restored):
    ending = RunEnd()
    with pytest.raises(SystemExit):  # Lightning ends the process after a Ctrl-C
        fit(TinyDetector(), [Interrupt(KeyboardInterrupt())], max_epochs=5, ending=ending)
    assert lines() == ["run ended: interrupted (Ctrl-C) at epoch 1, step 3"]
    assert ending.stopped_by == "interrupted"

    with pytest.raises(SIGTERMException):
        fit(TinyDetector(), [Interrupt(SIGTERMException(), step=5)], max_epochs=5)
    assert lines()[-1] == "run ended: interrupted (SIGTERM) at epoch 2, step 5"


def test_a_run_through_the_command_line_prints_it_and_writes_it(tmp_path):
    done = train(tmp_path, *small_sample(tmp_path), "trainer.max_epochs=4", "callbacks.early_stopping.patience=1",
                 "+callbacks.early_stopping.min_delta=1.0")  # mAP cannot gain 1.0: the second validation stops it
    line = "run ended: early stopping after 2 of 4 epochs (val/mAP no better in the last 1 validation, best "
    assert line in done.stdout + done.stderr, (done.stdout + done.stderr)[-3000:]
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final["stopped_by"] == "early_stopping" and final["run_ended"].startswith(line.removeprefix("run ended: "))


def test_budgeted_early_stopping_waits_for_the_budget_and_stops_without_one(lines):
    """The default early stopping: under trainer.max_time the same scores that stop an unbudgeted run at epoch 3
    leave it to run to its last epoch (the schedule anneals there); without a budget it is Lightning's."""
    scores = [0.5, 0.4, 0.3, 0.2, 0.2, 0.2]
    ending = fit(TinyDetector(scores), [BudgetedEarlyStopping(monitor="val/mAP", mode="max", patience=2)],
                 max_epochs=6)
    assert ending.stopped_by == "early_stopping"
    ending = fit(TinyDetector(scores), [BudgetedEarlyStopping(monitor="val/mAP", mode="max", patience=2)],
                 max_epochs=6, max_time=timedelta(minutes=10))
    assert ending.stopped_by == "max_epochs" and lines()[-1].startswith("run ended: max_epochs 6 reached")
