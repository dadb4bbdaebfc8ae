"""``experiment=ssd300_voc`` starts from the real command line on a VOC07+12-layout folder and runs a few steps."""

from __future__ import annotations

import subprocess
import sys

import torch
from helpers import make_voc
from runs import REPO


def test_ssd300_voc_recipe_runs_a_few_steps_on_a_voc_folder(tmp_path):
    image = lambda *objects: (120, 160, list(objects))  # noqa: E731
    root = make_voc(tmp_path / "VOCdevkit", {
        "2007/trainval": {
            "000001": image(("dog", (10, 12, 60, 70), False)),
            "000002": image(("cat", (5, 5, 90, 80), False)),
        },
        "2012/trainval": {"2012_000001": image(("bird", (50, 30, 100, 80), False), ("dog", (3, 3, 30, 30), True))},
        "2007/test": {"000005": image(("bird", (20, 20, 70, 60), False))},
    })
    args = [
        sys.executable, "train.py", "experiment=ssd300_voc", f"data.root={root}", "model.width=0.125",
        "model.backbone_weights=null",
        "data.batch_size=2", "data.loader.num_workers=0", "data.sampler.min_steps_per_epoch=0",
        "data.loader.persistent_workers=false", "trainer.max_epochs=1",
        "callbacks.progress_bar.refresh_rate=0", f"paths.log_dir={tmp_path / 'logs'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2  # 3 training images in batches of 2
    hparams = checkpoint["hyper_parameters"]
    assert len(hparams["class_names"]) == 20 and hparams["optimizer"]["_target_"] == "torch.optim.SGD"
    assert hparams["scheduler"]["milestones"] == [160, 200] and hparams["scheduler"]["unit"] == "epoch"
    assert hparams["metric"]["use_07_metric"] is True
