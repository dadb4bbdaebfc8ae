"""The fault-injection module: what the framework promises when things go wrong.

Each test breaks something on purpose (a kill during a save, a full disk, a NaN, a signal, a resume, a bad
setting) and checks what the user is left with and what they are told.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from lightning_det.callbacks import Freeze, RunCheckpoint, SafeCheckpointIO
from lightning_det.models.detector import Detector
from lightning_det.train import build, check_devices

REPO = Path(__file__).resolve().parents[1]


# ===================================================================================================================
# Nothing lost
# ===================================================================================================================

class Scripted(Detector):
    """A tiny detector-shaped module whose validation score per epoch is given: the checkpoint logic sees the
    scores a real run would log, with no detector in the way."""

    def __init__(self, scores: list[float] | None = None, lr: float = 0.1):
        super().__init__(num_classes=1, optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": lr},
                         scheduler={"_target_": "lightning_det.optim.constant", "_partial_": True})
        self.scores = scores or []
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4))
        self.head = torch.nn.Conv2d(4, 1, 1)

    def forward(self, images):
        return self.head(self.body(images))

    def loss(self, outputs, batch):
        return {"loss": (outputs - 1).square().mean()}

    def on_validation_epoch_end(self) -> None:
        self.log("val/mAP", self.scores[self.current_epoch])


def batches(count: int = 2) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    return DataLoader([{"images": torch.randn(2, 3, 6, 6, generator=generator) + 2} for _ in range(count)],
                      batch_size=None)


def checkpointing(folder: Path) -> list[L.Callback]:
    """The default config's two checkpoints (best score, last every epoch), on ``folder``."""
    best = RunCheckpoint(dirpath=folder, filename="best-epoch{epoch:03d}", auto_insert_metric_name=False,
                         monitor="val/mAP", mode="max", save_top_k=1)
    last = RunCheckpoint(dirpath=folder, filename="last", monitor=None, save_top_k=1, enable_version_counter=False)
    return [best, last]


def fit(model: L.LightningModule, epochs: int, callbacks: list[L.Callback], ckpt_path: str | None = None
        ) -> L.Trainer:
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=callbacks, plugins=[SafeCheckpointIO()])
    trainer.fit(model, train_dataloaders=batches(), val_dataloaders=batches(1), ckpt_path=ckpt_path)
    return trainer


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


@pytest.fixture
def other_filesystem(tmp_path):
    """A run folder on a filesystem of its own (a tmpfs, when the tests run as root), as in the reported case;
    otherwise a plain folder (the rename is then within one filesystem, which is what the writer ensures anyway)."""
    folder = tmp_path / "mounted"
    folder.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)],
                                                   capture_output=True).returncode == 0
    yield folder
    if mounted:
        subprocess.run(["umount", "-l", str(folder)], check=True)


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    from lightning_det.callbacks import SafeCheckpointIO

    path, halfway = Path(sys.argv[1]), Path(sys.argv[2])
    io = SafeCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 0}, path)

    def stalls_halfway(obj, file):
        file.write(b"x" * 2_000_000)
        file.flush()
        halfway.touch()
        time.sleep(120)

    torch.save = stalls_halfway
    io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 1}, path)
""")


def test_a_kill_during_a_save_keeps_the_previous_checkpoint(other_filesystem, tmp_path):
    path, halfway = other_filesystem / "last.ckpt", tmp_path / "halfway"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path), str(halfway)], cwd=REPO)
    deadline = time.monotonic() + 120
    while not halfway.exists():
        assert writer.poll() is None and time.monotonic() < deadline, "the writer never reached its second save"
        time.sleep(0.05)
    writer.kill()
    writer.wait()

    kept = load(path)
    assert kept["epoch"] == 0 and torch.equal(kept["state_dict"]["w"], torch.ones(3))
    assert leftovers(other_filesystem) == [f".last.ckpt.tmp-{writer.pid}"]  # beside the file, not in $TMPDIR

    SafeCheckpointIO().save_checkpoint({"state_dict": {"w": torch.full((3,), 2.0)}, "epoch": 2}, path)
    assert load(path)["epoch"] == 2
    assert leftovers(other_filesystem) == []  # the dead writer's partial file went with the next save


def test_a_full_disk_mid_write_keeps_the_previous_best_and_last(tmp_path, monkeypatch):
    def disk_fills_up(obj, file):
        file.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    class FillDiskAtEpoch1(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                monkeypatch.setattr(torch, "save", disk_fills_up)

    with pytest.raises(OSError, match="No space left on device.*the previous file, if any, is unchanged"):
        fit(Scripted([0.2, 0.5]), 2, [*checkpointing(tmp_path), FillDiskAtEpoch1()])
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["best-epoch000.ckpt", "last.ckpt"]
    assert leftovers(tmp_path) == []
    assert load(tmp_path / "best-epoch000.ckpt")["epoch"] == 0 and load(tmp_path / "last.ckpt")["epoch"] == 0


def test_nonfinite_weights_never_replace_a_checkpoint(tmp_path):
    class PoisonAtEpoch1(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                pl_module.body[1].running_var.fill_(float("inf"))

    fit(Scripted([0.2, 0.9, 0.95]), 3, [*checkpointing(tmp_path), PoisonAtEpoch1()])
    names = sorted(p.name for p in tmp_path.glob("*.ckpt"))
    assert names == ["best-epoch000.ckpt", "last.ckpt"]  # epoch 1's better score was not worth a poisoned file
    for name in names:
        state = load(tmp_path / name)
        assert state["epoch"] == 0
        assert all(torch.isfinite(t).all() for t in state["state_dict"].values() if t.is_floating_point())
