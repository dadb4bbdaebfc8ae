"""What a run keeps when a save goes wrong: a kill or a full disk during a save leaves the checkpoints saved
before whole and says so, non-finite weights or a non-finite loss never replace a finite checkpoint, a resume (into
a new run folder, after the freeze release, after a SIGTERM) goes on as the uninterrupted run would, and an epoch or
a search trial without a score never becomes the best.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import optuna
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from runs import REPO, quick_run, with_test_modules
from tiny_detector import TinyDetector
from torch.utils.data import DataLoader

from lightning_det.callbacks import Freeze, RunCheckpoint, SafeCheckpointIO
from lightning_det.metrics import VOCMeanAP
from lightning_det.models.detector import Detector
from lightning_det.search import study as search

# ===================================================================================================================
# A save cut short: a kill, a full disk
# ===================================================================================================================

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
        fit(TinyDetector([0.2, 0.5]), 2, [*checkpointing(tmp_path), FillDiskAtEpoch1()])
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["best-epoch000.ckpt", "last.ckpt"]
    assert leftovers(tmp_path) == []
    assert load(tmp_path / "best-epoch000.ckpt")["epoch"] == 0 and load(tmp_path / "last.ckpt")["epoch"] == 0


def test_a_full_disk_during_a_save_says_so_and_keeps_the_checkpoints(tmp_path, monkeypatch):
    io = SafeCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 0}, tmp_path / "best-epoch000.ckpt")
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 0}, tmp_path / "last.ckpt")

    def as_torch_on_a_full_disk(obj, file):
        """torch.save's zip writer raises its own error while handling the file's ENOSPC (measured on a full
        tmpfs: ``test_a_full_filesystem_during_a_save_says_so``)."""
        file.write(b"x" * 1000)
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None

    monkeypatch.setattr(torch, "save", as_torch_on_a_full_disk)
    with pytest.raises(OSError) as error:  # today: torch's RuntimeError, "unexpected pos 704 vs 598"
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 1}, tmp_path / "last.ckpt")
    monkeypatch.undo()

    assert error.value.errno == errno.ENOSPC
    assert re.fullmatch(
        re.escape(f"saving {tmp_path / 'last.ckpt'} failed: the disk holding {tmp_path} is full (No space left on "
                  f"device, ") + r"\d+\.\d MiB" + re.escape(" free); the previous file, if any, is unchanged, and the "
                  "checkpoints saved before are kept (best-epoch000.ckpt, last.ckpt). Free space there, then resume "
                  f"with ckpt_path={tmp_path / 'last.ckpt'}"), error.value.strerror)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best-epoch000.ckpt", "last.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"] == 0


FILL_A_SMALL_DISK = textwrap.dedent("""
    import sys, torch
    from lightning_det.callbacks import SafeCheckpointIO

    folder = sys.argv[1]
    SafeCheckpointIO().save_checkpoint({"w": torch.ones(10_000), "epoch": 0}, folder + "/last.ckpt")
    try:
        SafeCheckpointIO().save_checkpoint({"w": torch.ones(1_000_000), "epoch": 1}, folder + "/last.ckpt")
    except Exception as error:
        print(type(error).__name__, error)
    print("kept epoch", torch.load(folder + "/last.ckpt", weights_only=True)["epoch"])
""")


def test_a_full_filesystem_during_a_save_says_so(tmp_path):
    """The real failure: a 1 MB tmpfs in a user namespace (unprivileged), filled by a 4 MB checkpoint."""
    mount = shutil.which("unshare") and shutil.which("mount")
    probe = mount and subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0
    if not probe:
        pytest.skip("no unprivileged user and mount namespaces here (unshare -rm)")
    folder = tmp_path / "small"
    folder.mkdir()
    script = tmp_path / "fill.py"
    script.write_text(FILL_A_SMALL_DISK)
    done = subprocess.run(["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size=1m tmpfs "{folder}" && '
                           f'"{sys.executable}" "{script}" "{folder}"'], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"OSError [Errno 28] saving {folder}/last.ckpt failed: the disk holding {folder} is full" in done.stdout
    assert "unexpected pos" not in done.stdout and "kept epoch 0" in done.stdout


# ===================================================================================================================
# Non-finite weights and loss
# ===================================================================================================================

def test_nonfinite_weights_never_replace_a_checkpoint(tmp_path):
    class PoisonAtEpoch1(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                pl_module.body[1].running_var.fill_(float("inf"))

    fit(TinyDetector([0.2, 0.9, 0.95]), 3, [*checkpointing(tmp_path), PoisonAtEpoch1()])
    names = sorted(p.name for p in tmp_path.glob("*.ckpt"))
    assert names == ["best-epoch000.ckpt", "last.ckpt"]  # epoch 1's better score was not worth a poisoned file
    for name in names:
        state = load(tmp_path / name)
        assert state["epoch"] == 0
        assert all(torch.isfinite(t).all() for t in state["state_dict"].values() if t.is_floating_point())


class PoisonImages(L.Callback):
    """From epoch ``epoch`` on, feed infinite pixels: BatchNorm statistics turn non-finite and the loss with them."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch >= self.epoch:
            batch["images"].fill_(float("inf"))


@pytest.mark.slow  # the checkpoint side runs by default (test_nonfinite_weights_never_replace_a_checkpoint)
def test_a_nonfinite_loss_keeps_the_last_finite_checkpoint_and_names_it(tmp_path):
    done = quick_run(tmp_path, "trainer.max_epochs=3", f"hydra.run.dir={tmp_path / 'run'}",
                     f"+callbacks.poison._target_={__name__}.PoisonImages", "+callbacks.poison.epoch=1")
    output = done.stdout + done.stderr
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert done.returncode != 0 and "Error: loss became non-finite at epoch 1" in output, output[-3000:]
    assert f"The last finite checkpoint is {last} (epoch 0): resume from it with ckpt_path={last}" in output
    state = load(last)
    assert state["epoch"] == 0
    assert all(torch.isfinite(t).all() for t in state["state_dict"].values() if t.is_floating_point())


# ===================================================================================================================
# Resumes
# ===================================================================================================================

def test_a_resume_into_a_new_run_folder_keeps_the_best_score_and_file(tmp_path, recwarn):
    scores = [0.2, 0.9, 0.5, 0.6]  # epochs 2 and 3, after the resume, are worse than epoch 1
    old, new = tmp_path / "old", tmp_path / "new"
    fit(TinyDetector(scores), 2, checkpointing(old))
    trainer = fit(TinyDetector(scores), 4, checkpointing(new), ckpt_path=str(old / "last.ckpt"))

    best = trainer.checkpoint_callback
    assert best.best_model_path == str(new / "best-epoch001.ckpt")
    assert float(best.best_model_score) == pytest.approx(0.9)
    assert sorted(p.name for p in new.glob("*.ckpt")) == ["best-epoch001.ckpt", "last.ckpt"]
    assert load(new / "best-epoch001.ckpt")["epoch"] == 1 and load(new / "last.ckpt")["epoch"] == 3
    assert (old / "best-epoch001.ckpt").is_file() and (old / "last.ckpt").is_file()  # the old run is left whole
    assert not [w for w in recwarn if "dirpath has changed" in str(w.message)]


def freeze_run(folder: Path, epochs: int, ckpt_path: Path | None = None) -> tuple[TinyDetector, L.Trainer]:
    torch.manual_seed(0)
    model = TinyDetector([0.1] * 4)
    freeze = Freeze(pattern=r"^body\.", unfreeze_at_epoch=1, lr_factor=0.1)
    trainer = fit(model, epochs, [freeze, *checkpointing(folder)], str(ckpt_path) if ckpt_path else None)
    return model, trainer


def training_state(model: TinyDetector, trainer: L.Trainer) -> dict:
    optimizer, scheduler = trainer.optimizers[0], trainer.lr_scheduler_configs[0].scheduler
    return {
        "trainable": sorted(name for name, p in model.named_parameters() if p.requires_grad),
        "lrs": [round(g["lr"], 12) for g in optimizer.param_groups],
        "base_lrs": [round(lr, 12) for lr in scheduler.base_lrs],
        "norm_training": model.body[1].training,
    }


def test_a_resume_after_the_freeze_release_trains_like_the_uninterrupted_run(tmp_path):
    straight_model, straight = freeze_run(tmp_path / "straight", 3)
    freeze_run(tmp_path / "first", 2)  # released at epoch 1, stopped after it
    resumed_model, resumed = freeze_run(tmp_path / "resumed", 3, tmp_path / "first" / "last.ckpt")

    expected = training_state(straight_model, straight)
    assert expected["trainable"] == ["body.0.weight", "body.1.bias", "body.1.weight", "head.bias", "head.weight"]
    assert sorted(expected["lrs"]) == [0.01, 0.01, 0.1, 0.1]  # released groups at lr_factor 0.1
    assert training_state(resumed_model, resumed) == expected
    for (name, weight), reference in zip(resumed_model.state_dict().items(), straight_model.state_dict().values()):
        assert torch.allclose(weight.float(), reference.float(), atol=1e-6), name


class SendSigterm(L.Callback):
    """Send this process a real SIGTERM after optimizer step ``at_step`` of a run that was not resumed."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step and trainer.ckpt_path is None:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_saves_the_interrupted_state_and_prints_the_command_that_resumes_it(tmp_path):
    interrupted = quick_run(tmp_path, "trainer.max_epochs=3", f"hydra.run.dir={tmp_path / 'interrupted'}",
                            f"+callbacks.sigterm._target_={__name__}.SendSigterm", "+callbacks.sigterm.at_step=6")
    output = interrupted.stdout + interrupted.stderr
    saved = tmp_path / "interrupted" / "checkpoints" / "last.ckpt"
    assert f"SIGTERM at epoch 1, step 6: saved {saved}. Resume with:" in output, output[-3000:]
    state = load(saved)
    assert state["global_step"] == 6 and state["epoch"] == 1  # the interrupt, not the end of epoch 0 (step 4)

    command = shlex.split(output.split("Resume with:\n", 1)[1].splitlines()[0])  # as a shell reads it
    assert command[:2] == ["python", "train.py"] and command[-1] == f"ckpt_path={saved}"
    resumed = subprocess.run([sys.executable, *command[1:], f"hydra.run.dir={tmp_path / 'resumed'}"], cwd=REPO,
                             capture_output=True, text=True, timeout=600, env=with_test_modules())
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-3000:]
    assert f"Restored all states from the checkpoint at {saved}" in output
    final = json.loads((tmp_path / "resumed" / "final_metrics.json").read_text())
    best_epoch = load(final["checkpoint"])["epoch"]
    assert final["epoch"] == best_epoch and Path(final["checkpoint"]).parent == tmp_path / "resumed" / "checkpoints"
    last_table = [line for line in output.splitlines() if line.startswith("epoch ") and "val/mAP=" in line][-1]
    assert last_table.startswith(f"epoch {best_epoch}: val/mAP="), last_table  # the re-validation, labelled
    resumed_last = load(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert resumed_last["epoch"] == 2 and resumed_last["global_step"] == 12  # 3 epochs of 4 steps, none repeated


# ===================================================================================================================
# Epochs and trials without a score
# ===================================================================================================================

class NothingToScore(TinyDetector):
    """Validation images without any object: the VOC mAP of every epoch is NaN."""

    def __init__(self):
        super().__init__()
        self.val_metric = VOCMeanAP(num_classes=1, class_names=["thing"])

    def decode(self, outputs, batch):
        return [{"boxes": torch.tensor([[0.0, 0.0, 3.0, 3.0]]), "scores": torch.tensor([0.9]),
                 "labels": torch.tensor([0])} for _ in range(len(outputs))]

    def validation_step(self, batch, batch_idx):
        count = batch["images"].shape[0]
        meta = {"pad": torch.zeros(count, 2), "scale": torch.ones(count, 2), "orig_size": torch.full((count, 2), 6),
                "image_id": list(range(count))}
        Detector.validation_step(self, {**batch, "labels": torch.zeros(count, 0, 6), "meta": meta}, batch_idx)

    on_validation_epoch_end = Detector.on_validation_epoch_end


def default_callbacks(folder: Path) -> list[L.Callback]:
    """The shipped conf/callbacks/default.yaml's checkpoints and early stopping, on ``folder``."""
    cfg = OmegaConf.create({"monitor": "val/mAP", "paths": {"output_dir": str(folder)},
                            "callbacks": OmegaConf.load(REPO / "conf" / "callbacks" / "default.yaml")})
    return [instantiate(cfg.callbacks[name]) for name in ("model_checkpoint", "last_checkpoint", "early_stopping")]


def test_epochs_without_a_score_are_never_best_and_do_not_stop_training(tmp_path, caplog):
    trainer = fit(NothingToScore(), 3, default_callbacks(tmp_path))
    assert trainer.current_epoch == 3 and torch.isnan(trainer.callback_metrics["val/mAP"])
    assert trainer.checkpoint_callback.best_model_path == ""
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt")) == ["last.ckpt"]
    assert "val/mAP, val/recall logged as NaN at epoch 2: no validation image holds a (non-difficult) object" \
        in caplog.text

    trainer = fit(TinyDetector([float("nan"), 0.3, float("nan"), 0.2]), 4, default_callbacks(tmp_path / "mixed"))
    assert trainer.current_epoch == 4
    assert Path(trainer.checkpoint_callback.best_model_path).name == "best-epoch001.ckpt"
    assert float(trainer.checkpoint_callback.best_model_score) == pytest.approx(0.3)


def test_a_search_trial_without_a_score_fails_instead_of_becoming_best(tmp_path, monkeypatch):
    monkeypatch.setattr(search, "run", lambda cfg: {"best_score": float("nan"), "best_model_path": ""})
    study = optuna.create_study(direction="maximize")
    cfg = OmegaConf.create({"monitor": "val/mAP", "paths": {"output_dir": str(tmp_path)}})
    assert search.run_trial(cfg, study.ask(), tmp_path / "trial") == optuna.trial.TrialState.FAIL
    assert not study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
