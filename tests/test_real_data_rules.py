"""The schedule rules on data laid out as users bring it, with the numbers worked out by hand.

Defaults (conf/data/voc.yaml, conf/scheduler/cosine.yaml): batch 8, an epoch of at least 50 optimizer steps
(a smaller set is repeated), warm-up max(3 epochs, 100 steps) but at most 10 % of the run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_voc

from lightning_det.data.adapt import epoch_repeats
from lightning_det.optim.schedules import Cosine

REPO = Path(__file__).resolve().parents[1]


def test_rules_for_a_5000_image_set():
    # 5000 / 8 = 625 steps a pass: no repetition; 100 epochs = 62,500 steps; the warm-up is 3 epochs = 1,875
    # steps (more than 100, less than 10 % = 6,250).
    assert epoch_repeats(5000, 8, 50) == 1
    schedule = Cosine(total_steps=62500, steps_per_epoch=625, warmup_epochs=3.0, warmup_steps=100)
    assert schedule.warmup_steps == 1875


def test_rules_for_a_50_image_set():
    # 50 / 8 -> 7 steps a pass; 8 passes (400 images) make the 50 steps of an epoch; 100 epochs = 5,000 steps;
    # the warm-up max(3 x 50, 100) = 150 steps is under 10 % = 500.
    assert epoch_repeats(50, 8, 50) == 8
    assert Cosine(total_steps=5000, steps_per_epoch=50, warmup_epochs=3.0, warmup_steps=100).warmup_steps == 150
    # the same set for 10 epochs: 10 % of 500 steps = 50 caps the 150
    assert Cosine(total_steps=500, steps_per_epoch=50, warmup_epochs=3.0, warmup_steps=100).warmup_steps == 50


@pytest.mark.slow
def test_a_time_budget_on_a_real_layout_folder_ends_the_cosine_at_the_budget(tmp_path):
    images = {f"img {k:02d}": (96, 128, [("cell", (10 + k, 12, 60 + k, 70), False), ("dot", (70, 20, 90, 44), False)])
              for k in range(50)}
    validation = {f"val {k:02d}": image for k, image in enumerate(list(images.values())[:6])}  # files of their own
    root = make_voc(tmp_path / "folder", {"train": images, "val": validation})
    run = tmp_path / "run"
    args = [sys.executable, "train.py", "data=voc", f"data.root={root}", "data.classes=null",
            "data.train.splits=[train]", "data.val.splits=[val]", "model.width=0.125", "data.loader.num_workers=0",
            "data.loader.persistent_workers=false", "+trainer.max_time=00:00:00:40",
            "callbacks.progress_bar.refresh_rate=0",
            f"paths.log_dir={tmp_path / 'logs'}", f"hydra.run.dir={run}"]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "50 images shown 8 times per epoch" in done.stderr + done.stdout
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    schedule = checkpoint["lr_schedulers"][0]["lr_lambdas"][0]
    epochs = checkpoint["epoch"] + 1
    assert schedule["steps_per_epoch"] == 50
    assert 2 <= epochs < 100 and schedule["total_steps"] == 50 * epochs  # the budget, not max_epochs=100
    assert schedule["warmup_steps"] == min(150, round(0.1 * 50 * epochs))
    assert checkpoint["global_step"] == 50 * epochs  # stopped by the plan at an epoch end, not cut by the clock
    lr = checkpoint["optimizer_states"][0]["param_groups"][0]["lr"]
    base = checkpoint["optimizer_states"][0]["param_groups"][0]["initial_lr"]
    assert lr < 0.05 * base  # the last step is at the end of the cosine (final factor 0.01)
