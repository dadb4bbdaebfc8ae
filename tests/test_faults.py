"""The fault-injection module: what the framework promises when things go wrong.

Each test breaks something on purpose (a kill during a save, a full disk, a NaN, a signal, a resume, a bad
setting) and checks what the user is left with and what they are told.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from pathlib import Path

import lightning as L
import numpy as np
import optuna
import pytest
import torch
from helpers import make_voc, write_image
from hydra.utils import instantiate
from omegaconf import OmegaConf
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tiny_detector import TinyDetector
from torch.utils.data import DataLoader

from lightning_det.callbacks import Freeze, RunCheckpoint, SafeCheckpointIO
from lightning_det.callbacks.ranks import peer_failure
from lightning_det.data import COCOSource, DetectionDataModule, read_coco, read_voc
from lightning_det.metrics import COCOMeanAP, VOCMeanAP
from lightning_det.models.detector import Detector, labels_to_targets
from lightning_det.search import study as search
from lightning_det.tools.evaluate import record_targets, write_voc_results
from lightning_det.tools.train import build, check_devices

REPO = Path(__file__).resolve().parents[1]


# ===================================================================================================================
# Nothing lost
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


def test_a_resume_into_a_new_run_folder_keeps_the_best_score_and_file(tmp_path, recwarn):
    scores = [0.2, 0.9, 0.5, 0.6]  # epochs 2 and 3, after the resume, are worse than epoch 1
    old, new = tmp_path / "old", tmp_path / "new"
    fit(TinyDetector(scores), 2, checkpointing(old))
    trainer = fit(TinyDetector(scores), 4, checkpointing(new), ckpt_path=str(old / "last.ckpt"))

    best = trainer.checkpoint_callback
    assert best.best_model_path == str(new / "best-epoch001.ckpt") and float(best.best_model_score) == pytest.approx(0.9)
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


def test_more_processes_than_cores_or_visible_gpus_are_refused_before_the_data_is_read(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    unreadable_data = {"_target_": "no.such.DataModule"}
    cfg = OmegaConf.create({"trainer": {"accelerator": "cpu", "devices": cores + 62}, "data": unreadable_data})
    with pytest.raises(ValueError, match=rf"^trainer.devices={cores + 62} asks for {cores + 62} CPU processes but "
                                         rf"this machine gives the run {cores} cores; set trainer.devices={cores} "):
        build(cfg)
    for fine in (cores, "auto", -1, "1"):
        check_devices(OmegaConf.create({"accelerator": "cpu", "devices": fine}))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for too_many in (2, [0, 1], "0,1"):
        with pytest.raises(ValueError, match=r"asks for 2 GPUs but 1 are visible .* set trainer.devices=1 or fewer"):
            check_devices(OmegaConf.create({"accelerator": "auto", "devices": too_many}))
    check_devices(OmegaConf.create({"accelerator": "gpu", "devices": [0]}))


# A network and input small enough for about a second per epoch; the run is real: `python train.py` on sample data.
TINY_RUN = ["model=yolov3_tiny", "model.width=0.25", "data.img_size=64", "data.batch_size=4", "data.num_workers=0",
            "data.min_steps_per_epoch=0",
            "data.persistent_workers=false", "data.prepare.num_train=16", "data.prepare.num_val=4",
            "trainer.log_every_n_steps=1", "callbacks.progress_bar.refresh_rate=0", "~callbacks.image_logger",
            "logger=csv"]


def train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python train.py`` with the test's callbacks (this module) importable, writing under ``tmp_path``."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    args = [sys.executable, "train.py", *TINY_RUN, f"data.root={tmp_path / 'sample'}",
            f"paths.log_dir={tmp_path / 'logs'}", *overrides]
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


class SendSigterm(L.Callback):
    """Send this process a real SIGTERM after optimizer step ``at_step`` of a run that was not resumed."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step and trainer.ckpt_path is None:
            os.kill(os.getpid(), signal.SIGTERM)


class PoisonImages(L.Callback):
    """From epoch ``epoch`` on, feed infinite pixels: BatchNorm statistics turn non-finite and the loss with them."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch >= self.epoch:
            batch["images"].fill_(float("inf"))


def test_sigterm_saves_the_interrupted_state_and_prints_the_command_that_resumes_it(tmp_path):
    interrupted = train(tmp_path, "trainer.max_epochs=3", f"hydra.run.dir={tmp_path / 'interrupted'}",
                        "+callbacks.sigterm._target_=test_faults.SendSigterm", "+callbacks.sigterm.at_step=6")
    output = interrupted.stdout + interrupted.stderr
    saved = tmp_path / "interrupted" / "checkpoints" / "last.ckpt"
    assert f"SIGTERM at epoch 1, step 6: saved {saved}. Resume with:" in output, output[-3000:]
    state = load(saved)
    assert state["global_step"] == 6 and state["epoch"] == 1  # the interrupt, not the end of epoch 0 (step 4)

    command = shlex.split(output.split("Resume with:\n", 1)[1].splitlines()[0])  # as a shell reads it
    assert command[:2] == ["python", "train.py"] and command[-1] == f"ckpt_path={saved}"
    resumed = subprocess.run([sys.executable, *command[1:], f"hydra.run.dir={tmp_path / 'resumed'}"], cwd=REPO,
                             capture_output=True, text=True, timeout=600,
                             env={**os.environ, "PYTHONPATH": str(REPO / "tests")})
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


@pytest.mark.slow  # the checkpoint side runs by default (test_nonfinite_weights_never_replace_a_checkpoint)
def test_a_nonfinite_loss_keeps_the_last_finite_checkpoint_and_names_it(tmp_path):
    done = train(tmp_path, "trainer.max_epochs=3", f"hydra.run.dir={tmp_path / 'run'}",
                 "+callbacks.poison._target_=test_faults.PoisonImages", "+callbacks.poison.epoch=1")
    output = done.stdout + done.stderr
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert done.returncode != 0 and "Error: loss became non-finite at epoch 1" in output, output[-3000:]
    assert f"The last finite checkpoint is {last} (epoch 0): resume from it with ckpt_path={last}" in output
    state = load(last)
    assert state["epoch"] == 0
    assert all(torch.isfinite(t).all() for t in state["state_dict"].values() if t.is_floating_point())


ORPHAN = textwrap.dedent("""
    import os, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; from lightning_det.callbacks.ranks import "
                              "end_with_launcher; end_with_launcher(); print('ready', flush=True); time.sleep(120)"],
                             env={**os.environ, "LOCAL_RANK": "1"}, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "ready\\n"
    print(child.pid, flush=True)
    time.sleep(120)
""")


def test_a_rank_started_by_the_launcher_dies_with_it():
    launcher = subprocess.Popen([sys.executable, "-c", ORPHAN], cwd=REPO, stdout=subprocess.PIPE, text=True)
    rank = int(launcher.stdout.readline())
    launcher.kill()  # as the out-of-memory killer would
    launcher.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{rank}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{rank}").exists(), "the child rank outlived its launcher"


class FakeLauncher:
    def __init__(self, procs):
        self.procs = procs


def fake_trainer(rank: int, procs=()) -> object:
    strategy = type("Strategy", (), {"launcher": FakeLauncher(list(procs))})()
    return type("Trainer", (), {"world_size": 2, "global_rank": rank, "is_global_zero": rank == 0,
                                "strategy": strategy})()


def test_the_rank_that_failed_first_is_named_last_not_the_peer_that_lost_it(tmp_path):
    peer_error = RuntimeError("CUDA out of memory on rank 1")
    assert peer_failure(fake_trainer(1), peer_error, tmp_path) is None  # the failing rank records its error
    still_waiting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    lost = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer\nmore")
    message = peer_failure(fake_trainer(0, [still_waiting]), lost, tmp_path, wait=0.5)
    assert message == ("rank 1 failed first: RuntimeError: CUDA out of memory on rank 1  (rank 0 then stopped with "
                       "RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer)")
    assert still_waiting.wait(timeout=5) != 0  # ended, rather than left to print its own "connection closed"

    alone = tmp_path / "alone"
    alone.mkdir()
    assert peer_failure(fake_trainer(0), ValueError("rank 0's own bug"), alone, wait=0.1) is None


class FailOnRank(L.Callback):
    """Raise on one rank only, as an out-of-memory error or a bad batch would."""

    def __init__(self, rank: int, at_step: int = 2) -> None:
        self.rank, self.at_step = rank, at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.at_step:
            raise RuntimeError(f"rank {self.rank} broke on purpose")


@pytest.mark.slow
def test_under_ddp_the_failing_ranks_error_is_the_last_thing_printed(tmp_path):
    done = train(tmp_path, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=2",
                 f"hydra.run.dir={tmp_path / 'run'}", "+callbacks.fail._target_=test_faults.FailOnRank",
                 "+callbacks.fail.rank=1")
    assert done.returncode != 0
    last_error = [line for line in done.stderr.splitlines() if line.startswith("RuntimeError")][-1]
    assert last_error.startswith("RuntimeError: rank 1 failed first: RuntimeError: rank 1 broke on purpose  (rank 0 "
                                 "then stopped with"), done.stderr[-3000:]


# ===================================================================================================================
# Refused early
# ===================================================================================================================

def compose_train(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("override, message", [
    ("data.skip_invalid=flase", "data.skip_invalid='flase' must be true/false"),
    ("model.loss.box_loss=iou", "model.loss.box_loss='iou' is not one of ['giou', 'xywh']"),
    ("model.variant=big", "model.variant='big' is not one of ['tiny', 'yolov3']"),
    ("optimizer.lr=fast", "optimizer.lr='fast' must be a number"),
    ("data.batch_size=2.5", "data.batch_size=2.5 must be an integer"),
    ("optimizer._target_=torch.optim.SGDD", "optimizer._target_='torch.optim.SGDD' cannot be imported"),
    ("init_partial=maybe", "init_partial='maybe' must be true/false"),
    ("data.check_images=full", "data.check_images='full' is not one of ['header', 'decode']"),
])
def test_a_mistyped_config_value_is_refused_with_its_key_and_choices(override, message):
    from lightning_det.checks.config import ConfigValueError
    from lightning_det.checks.run import check_run

    check_run(compose_train())  # the defaults pass
    with pytest.raises(ConfigValueError) as error:
        check_run(compose_train(override))
    assert message in str(error.value)


def tiny_checkpoint(path: Path, width: float = 0.5, num_classes: int = 2) -> Path:
    """A checkpoint as train.py writes it (weights, hyper-parameters, detector class, pipeline)."""
    from lightning_det.models.yolov3 import YOLOv3

    model = YOLOv3(variant="tiny", width=width, num_classes=num_classes)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "detector_class": "lightning_det.models.yolov3.module.YOLOv3",
                "inference_pipeline": {"_target_": "lightning_det.data.transforms.LetterboxTransform",
                                       "img_size": 64}}, path)
    return path


def broken_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Each kind of bad checkpoint file, with what its message must say."""
    good = tiny_checkpoint(tmp_path / "good.ckpt").read_bytes()
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "notes.ckpt").write_text("epoch 3 was the best\n")
    (tmp_path / "truncated.ckpt").write_bytes(good[: len(good) // 2])
    return {
        "empty": (tmp_path / "empty.ckpt", "is empty (0 bytes), not a checkpoint"),
        "text": (tmp_path / "notes.ckpt", "is not a PyTorch checkpoint"),
        "truncated": (tmp_path / "truncated.ckpt", "is truncated or damaged"),
    }


@pytest.mark.parametrize("kind", ["empty", "text", "truncated"])
def test_a_broken_checkpoint_is_refused_by_every_entry_point_naming_the_file(tmp_path, kind):
    from lightning_det.checks.run import CheckpointError, check_run
    from lightning_det.tools.inference import load_detector
    from lightning_det.tools.train import run

    path, message = broken_files(tmp_path)[kind]
    expected = re.escape(f"ckpt_path={path} {message}")
    with pytest.raises(CheckpointError, match=expected):
        check_run(compose_train(f"ckpt_path={path}"))
    with pytest.raises(CheckpointError, match=expected):  # evaluate, predict and export load through this
        load_detector(path)
    # train.run refuses it before reading data: the data root does not even exist
    with pytest.raises(CheckpointError, match=expected):
        run(compose_train(f"ckpt_path={path}", f"data.root={tmp_path / 'no data here'}"))
    if kind == "text":  # init_from also reads Darknet files, so it says it is neither
        message = "bytes) is neither a PyTorch checkpoint nor a Darknet .weights file"
    with pytest.raises(ValueError, match=re.escape(f"init_from={path} ") + ".*" + re.escape(message)):
        check_run(compose_train(f"init_from={path}"))


def test_a_checkpoint_of_another_network_is_described_against_the_run(tmp_path):
    from lightning_det.checks.run import CheckpointError, check_run

    path = tiny_checkpoint(tmp_path / "w05.ckpt", width=0.5, num_classes=2)
    check_run(compose_train(f"ckpt_path={path}", "model.width=0.5", "data.classes=[cat,dog]"))
    with pytest.raises(CheckpointError) as error:
        check_run(compose_train(f"ckpt_path={path}", "model.width=0.25", "data.classes=[cat,dog]"))
    assert ("this checkpoint is a YOLOv3 (variant tiny, width 0.5, depth 1.0) for 2 classes; the run builds "
            "width 0.25") in str(error.value)
    with pytest.raises(CheckpointError, match="the run builds a FasterRCNN"):
        check_run(compose_train(f"ckpt_path={path}", "model=faster_rcnn_mobilenet"))
    with pytest.raises(CheckpointError, match=r"3 classes \['a', 'b', 'c'\] \(the checkpoint's: 2\)"):
        check_run(compose_train(f"ckpt_path={path}", "model.width=0.5", "data.classes=[a,b,c]"))
    with pytest.raises(CheckpointError, match="set init_partial=true"):
        check_run(compose_train(f"init_from={path}", "model=yolov3"))
    check_run(compose_train(f"init_from={path}", "model=yolov3", "init_partial=true"))


@pytest.mark.parametrize("content, message", [
    (b"", "is empty (0 bytes), not a checkpoint"),
    (b"\x00" * 8, "is too short for a Darknet .weights file"),
    (b"<html>not found</html>", "is neither a PyTorch checkpoint nor a Darknet .weights file"),
    (np.array([0, 2, 0], np.int32).tobytes() + b"\x00" * 10, "is not a whole Darknet .weights file"),
])
def test_an_empty_or_tiny_darknet_file_is_refused_naming_it(tmp_path, content, message):
    from lightning_det.checks.run import check_run

    path = tmp_path / "yolov3.weights"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"init_from={path} ") + ".*" + re.escape(message)):
        check_run(compose_train(f"init_from={path}"))


def test_init_from_that_fills_a_small_share_is_an_error_unless_allowed(tmp_path):
    from lightning_det.models.weights import initialise_from
    from lightning_det.models.yolov3 import YOLOv3

    path = tiny_checkpoint(tmp_path / "tiny.ckpt", width=0.5)
    other = YOLOv3(variant="tiny", width=0.25, num_classes=2)  # same names, other widths: only a few tensors fit
    with pytest.raises(ValueError, match=r"filled only \d+% of the model's values .* set init_partial=true"):
        initialise_from(other, path)
    initialise_from(other, path, partial=True)
    initialise_from(YOLOv3(variant="tiny", width=0.5, num_classes=5), path)  # only the head differs: accepted


@pytest.fixture
def image_cache(tmp_path, monkeypatch) -> Path:
    """The checked-images cache of these tests lives in their temp dir."""
    monkeypatch.setenv("LIGHTNING_DET_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def voc_with_bad_images(root: Path) -> dict[str, Path]:
    """Five listed images: two good, a text file named .jpg, a truncated JPEG, one smaller than its XML says."""
    images = {f"{name}": (48, 64, [("cat", (5, 5, 30, 30), False)])
              for name in ("good 1", "good 2", "text", "truncated", "small")}
    make_voc(root, {"2007/train": images})
    folder = root / "VOC2007" / "JPEGImages"
    (folder / "text.jpg").write_text("not an image\n")
    data = (folder / "truncated.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    write_image(folder / "small.jpg", 40, 64)
    return {name: folder / f"{name}.jpg" for name in images}


def test_bad_images_stop_the_read_naming_the_file_or_are_skipped_and_counted(tmp_path, image_cache, caplog):
    from lightning_det.data.records import InvalidAnnotationError

    files = voc_with_bad_images(tmp_path)
    with pytest.raises(InvalidAnnotationError, match=re.escape(f"image {files['text']} is not a readable image")):
        read_voc(tmp_path, ["2007/train"], ["cat"])
    records = read_voc(tmp_path, ["2007/train"], ["cat"], skip_invalid=True).records[0]
    # ids with spaces work; a JPEG cut short is decoded as far as it goes, not skipped (issue 20)
    assert sorted(Path(r.path).name for r in records) == ["good 1.jpg", "good 2.jpg", "truncated.jpg"]
    assert "skipped 2 images" in caplog.text and "1 image was cut short and decoded as far as it goes" in caplog.text
    assert f"image {files['small']} is 64x40 pixels but its annotation says 64x48" in caplog.text


def test_a_corrupt_image_with_a_valid_header_is_caught_by_the_decode_check(tmp_path, image_cache):
    from lightning_det.data.records import InvalidAnnotationError, read_annotations
    from lightning_det.data.voc import VOCSource

    make_voc(tmp_path, {"2007/train": {"a": (48, 64, [("cat", (5, 5, 30, 30), False)])}})
    path = tmp_path / "VOC2007" / "JPEGImages" / "a.jpg"
    data = path.read_bytes()
    scan = data.index(b"\xff\xda") + 40
    path.write_bytes(data[:scan] + b"\xff\xc0\x00\x11" + data[scan + 4:])  # a second frame header in the data
    source = [VOCSource(["2007/train"])]
    assert len(read_annotations(tmp_path, source, ["cat"]).records[0]) == 1  # its header is fine
    with pytest.raises(InvalidAnnotationError, match=re.escape(f"image {path} cannot be decoded")):
        read_annotations(tmp_path, source, ["cat"], check_level="decode")


def test_checked_images_are_cached_and_a_changed_file_is_checked_again(tmp_path, image_cache, monkeypatch):
    import lightning_det.data.records as records_module

    make_voc(tmp_path, {"2007/train": {f"{k}": (48, 64, []) for k in range(4)}})
    checked = []
    real = records_module.image_problem
    monkeypatch.setattr(records_module, "image_problem", lambda path, *a: checked.append(path) or real(path, *a))
    read_voc(tmp_path, ["2007/train"], ["cat"])
    assert len(checked) == 4
    read_voc(tmp_path, ["2007/train"], ["cat"])
    assert len(checked) == 4  # the second read checked nothing again
    write_image(tmp_path / "VOC2007" / "JPEGImages" / "2.jpg", 48, 64, seed=9)
    read_voc(tmp_path, ["2007/train"], ["cat"])
    assert checked[4:] == [str(tmp_path / "VOC2007" / "JPEGImages" / "2.jpg")]


def test_a_16_bit_png_is_scaled_to_8_bits(tmp_path):
    from PIL import Image

    from lightning_det.data.image_checks import decode_rgb

    values = np.array([[0, 257, 32896, 65535], [128, 383, 65278, 65400]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    pixels = decode_rgb(tmp_path / "deep.png")
    expected = np.round(values.astype(np.float64) * 255 / 65535)  # 0, 1, 128, 255 / 0, 1, 254, 254
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 2, 4)
    assert (pixels.numpy() == expected[None]).all()


def test_exif_orientation_is_ignored_by_default_and_applied_on_request(tmp_path, image_cache):
    from PIL import Image

    from lightning_det.data.records import InvalidAnnotationError, load_image, read_annotations
    from lightning_det.data.voc import VOCSource

    make_voc(tmp_path, {"2007/train": {"a": (40, 60, [("cat", (5, 5, 30, 20), False)])}})
    path = tmp_path / "VOC2007" / "JPEGImages" / "a.jpg"
    exif = Image.Exif()
    exif[274] = 6  # stored 60 wide, 40 high; shown rotated by 90 degrees
    Image.open(path).save(path, exif=exif)
    stored = read_voc(tmp_path, ["2007/train"], ["cat"]).records[0][0]
    assert load_image(stored).shape == (3, 40, 60)
    with pytest.raises(InvalidAnnotationError, match="is 40x60 pixels but its annotation says 60x40"):
        read_annotations(tmp_path, [VOCSource(["2007/train"])], ["cat"], exif_orientation=True)


def test_predict_on_a_folder_names_each_bad_image_and_finishes_the_others(tmp_path, caplog):
    from lightning_det.tools.predict import predict

    checkpoint = tiny_checkpoint(tmp_path / "model.ckpt")
    folder = tmp_path / "photos"
    write_image(folder / "first.jpg", 50, 70)
    write_image(folder / "second photo.png", 64, 64)
    (folder / "notes.jpg").write_text("hello")
    (folder / "cut.png").write_bytes((folder / "second photo.png").read_bytes()[:200])
    paths = sorted(folder.iterdir())
    results = predict(str(checkpoint), paths, score_thresh=0.0, batch_size=2, device="cpu")
    assert sorted(Path(p).name for p in results) == ["first.jpg", "second photo.png"]
    assert f"skipped {folder / 'notes.jpg'}" in caplog.text and f"skipped {folder / 'cut.png'}" in caplog.text
    assert "skipped 2 of 4 images" in caplog.text


def test_a_data_root_with_spaces_and_accents_works_with_the_readme_quoting(tmp_path, image_cache):
    root = tmp_path / "my datasets" / "vélos"
    image = (48, 64, [("cat", (5, 5, 30, 30), False)])
    make_voc(root, {"2007/trainval": {"a b": image}, "2012/trainval": {"c": image}, "2007/test": {"d e": image}})
    cfg = compose_train("data=voc", f'data.root="{root}"', "data.classes=[cat]", "data.num_workers=0")
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    assert [Path(r.path).name for r in datamodule.records["val"]] == ["d e.jpg"]
    assert len(datamodule.records["train"]) == 2


# ===================================================================================================================
# Exact metrics
# ===================================================================================================================

def devkit_voc07_ap(annotations: Path, result_files: Path, classes: list[str], image_ids: list[str]) -> list[float]:
    """The VOC07 devkit's rules (VOCevaldet.m), written out here as the independent reference: ground truth from
    the XML as the integer pixels it holds, detections from the comp4 files, widths ``x2 - x1 + 1``, a detection
    matches the best-overlapping box of its image at overlap >= 0.5, difficult boxes are ignored, 11-point AP."""
    import xml.etree.ElementTree as ET

    truth: dict[str, dict[str, list]] = {c: defaultdict(list) for c in classes}
    for image_id in image_ids:
        for node in ET.parse(annotations / f"{image_id}.xml").getroot().iter("object"):
            box = [float(node.find("bndbox").find(tag).text) for tag in ("xmin", "ymin", "xmax", "ymax")]
            truth[node.find("name").text][image_id].append((box, node.find("difficult").text == "1"))
    aps = []
    for name in classes:
        positives = sum(not hard for boxes in truth[name].values() for _, hard in boxes)
        rows = [line.split() for line in (result_files / f"comp4_det_test_{name}.txt").read_text().splitlines()]
        rows.sort(key=lambda row: -float(row[1]))  # stable, as MATLAB's sort
        taken: set[tuple[str, int]] = set()
        tp, fp = [], []
        for image_id, _, *coords in rows:
            bb = [float(v) for v in coords]
            best, best_index = -math.inf, -1
            for index, (gt, _) in enumerate(truth[name].get(image_id, [])):
                iw = min(bb[2], gt[2]) - max(bb[0], gt[0]) + 1
                ih = min(bb[3], gt[3]) - max(bb[1], gt[1]) + 1
                if iw > 0 and ih > 0:
                    union = (bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1) + (gt[2] - gt[0] + 1) * (gt[3] - gt[1] + 1)
                    overlap = iw * ih / (union - iw * ih)
                    if overlap > best:
                        best, best_index = overlap, index
            if best >= 0.5:
                if truth[name][image_id][best_index][1]:
                    continue
                if (image_id, best_index) in taken:
                    tp.append(0), fp.append(1)
                else:
                    taken.add((image_id, best_index))
                    tp.append(1), fp.append(0)
            else:
                tp.append(0), fp.append(1)
        tp_sum, fp_sum = np.cumsum(tp), np.cumsum(fp)
        recall = tp_sum / positives
        precision = tp_sum / np.maximum(tp_sum + fp_sum, 1e-12)
        aps.append(sum(
            (precision[recall >= t].max() if (recall >= t).any() else 0.0) / 11 for t in np.arange(0, 1.1, 0.1)
        ))
    return aps


def voc_scene(root: Path, seed: int = 0) -> tuple[list[str], dict[str, tuple]]:
    """30 images, 3 classes, some difficult boxes; integer devkit pixels."""
    rng = np.random.default_rng(seed)
    classes = ["cat", "dog", "person"]
    images = {}
    for k in range(30):
        objects = []
        for _ in range(rng.integers(1, 5)):
            xmin, ymin = (int(v) for v in rng.integers(1, 120, 2))
            w, h = (int(v) for v in rng.integers(4, 40, 2))
            objects.append((str(rng.choice(classes)), (xmin, ymin, xmin + w - 1, ymin + h - 1), rng.random() < 0.1))
        images[f"img_{k:03d}"] = (180, 180, objects)
    make_voc(root, {"2007/test": images})
    return classes, images


def jittered_detections(records, num_classes: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Boxes near the ground truth (many near IoU 0.5, where one pixel decides) plus strays, on a 0.1 px grid and
    with 6-decimal distinct scores, so the comp4 text files hold them exactly."""
    rng = np.random.default_rng(seed)
    scores = iter(rng.permutation(10**6)[:10_000] / 10**6)
    detections = []
    for record in records:
        boxes = [record.boxes[i] + rng.normal(0, 3.0, 4) for i in range(len(record.boxes)) for _ in range(2)]
        labels = [int(record.labels[i]) for i in range(len(record.boxes)) for _ in range(2)]
        stray = rng.uniform(0, 140, 2)
        boxes.append(np.concatenate([stray, stray + 20]))
        labels.append(int(rng.integers(num_classes)))
        boxes = np.round(np.clip(np.stack(boxes), 0, 179), 1)
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        detections.append({"boxes": torch.tensor(boxes, dtype=torch.float64),
                           "scores": torch.tensor([next(scores) for _ in labels], dtype=torch.float64),
                           "labels": torch.tensor(labels)})
    return detections


def test_voc07_metric_matches_the_devkit_rules_on_comp4_files(tmp_path):
    classes, images = voc_scene(tmp_path)
    records = read_voc(tmp_path, ["2007/test"], classes).records[0]
    detections = jittered_detections(records, len(classes), seed=1)
    write_voc_results(tmp_path / "results", classes, list(images), detections)
    expected = devkit_voc07_ap(tmp_path / "VOC2007" / "Annotations", tmp_path / "results", classes, list(images))

    metric = instantiate(OmegaConf.load(REPO / "conf" / "metric" / "voc07.yaml"))(num_classes=len(classes))
    metric.update(detections, record_targets(records))
    assert metric.compute()["AP_per_class"].tolist() == pytest.approx(expected, abs=1e-6)
    twice = VOCMeanAP(len(classes), use_07_metric=True, plus_one=True)  # the old setting: a pixel counted twice
    twice.update(detections, record_targets(records))
    assert twice.compute()["AP_per_class"].tolist() != pytest.approx(expected, abs=1e-3)


def coco_with_mask_areas(root: Path) -> tuple[Path, Path]:
    """A json whose ``area`` (as for masks) is about half of w*h, moving objects between the small / medium /
    large ranges; some annotations have no ``area``. Returns it and the same json with w*h filled in there, the
    input pycocotools needs."""
    rng = np.random.default_rng(3)
    images, annotations = [], []
    for k in range(12):
        images.append({"id": k + 1, "file_name": f"image {k}.png", "height": 300, "width": 300})
        write_image(root / "images" / f"image {k}.png", 300, 300, seed=k)
        for _ in range(4):
            side = float(rng.choice([28, 40, 60, 90, 120, 150]))
            x, y = (float(v) for v in rng.uniform(0, 300 - side, 2))
            annotation = {"id": len(annotations) + 1, "image_id": k + 1, "category_id": int(rng.integers(1, 3)),
                          "bbox": [x, y, side, side * 0.9], "iscrowd": 0}
            if len(annotations) % 5:
                annotation["area"] = round(side * side * 0.9 * rng.uniform(0.4, 0.7), 1)
            annotations.append(annotation)
    categories = [{"id": 1, "name": "cell"}, {"id": 2, "name": "platelet"}]
    ours = root / "annotations.json"
    ours.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    filled = [{**a, "area": a.get("area", a["bbox"][2] * a["bbox"][3])} for a in annotations]
    reference = root / "reference.json"
    reference.write_text(json.dumps({"images": images, "annotations": filled, "categories": categories}))
    return ours, reference


def test_coco_area_ranges_use_the_annotation_area_like_pycocotools(tmp_path):
    ours, reference = coco_with_mask_areas(tmp_path)
    result = read_coco(tmp_path, ours.name, "images")
    records = result.records[0]
    detections = jittered_detections(records, 2, seed=4)
    metric = COCOMeanAP(2)
    metric.update(detections, record_targets(records))
    values = metric.compute()

    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(reference))
        found = truth.loadRes([
            {"image_id": record.image_id, "category_id": result.label_to_category_id[label], "score": score,
             "bbox": [x1, y1, x2 - x1, y2 - y1]}
            for record, det in zip(records, detections)
            for (x1, y1, x2, y2), score, label in zip(det["boxes"].tolist(), det["scores"].tolist(),
                                                      det["labels"].tolist())
        ])
        evaluation = COCOeval(truth, found, "bbox")
        evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
    expected = dict(zip(("mAP", "AP50", "AP75", "APs", "APm", "APl"), evaluation.stats[:6]))
    for key, value in expected.items():
        assert values[key].item() == pytest.approx(value, abs=1e-6), key

    by_box = COCOMeanAP(2)  # without the area: w*h bins the objects differently here
    by_box.update(detections, [{k: v for k, v in t.items() if k != "area"} for t in record_targets(records)])
    assert any(abs(by_box.compute()[k].item() - expected[k]) > 1e-3 for k in ("APs", "APm", "APl"))


def test_validation_during_training_scores_with_the_annotation_area(tmp_path):
    """The targets validation builds from batches (letterboxed, padded, mapped back) carry each object's own
    ``area`` too, so metric=coco during training bins objects as pycocotools does, as evaluate does above."""
    ours, _ = coco_with_mask_areas(tmp_path)
    source = COCOSource(ours.name, "images")
    datamodule = DetectionDataModule(tmp_path, source, source, classes=None, batch_size=5, num_workers=0,
                                     img_size=128)
    datamodule.setup("validate")
    annotations = json.loads(ours.read_text())["annotations"]
    expected = defaultdict(list)
    for annotation in annotations:
        expected[annotation["image_id"]].append(annotation.get("area", 0.0))
    seen = {}
    for batch in datamodule.val_dataloader():
        for target in labels_to_targets(batch["labels"], batch["meta"]):
            seen[int(target["image_id"])] = target["area"].tolist()
    assert seen.keys() == expected.keys()  # COCO image ids are the json's
    for image_id, areas in expected.items():  # json order; 0 where an annotation has no area (the metric uses w*h)
        assert seen[image_id] == pytest.approx(areas, abs=0.05)
