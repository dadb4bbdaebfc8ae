"""Fault injection, round 3 (issue 23): a resume on another dataset's classes, two runs into one run folder, a
full disk during a save, and config values outside their range. Each is refused with one message that names the
setting or the file and the fix, before anything is lost.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import make_voc

from lightning_det.callbacks import SafeCheckpointIO

REPO = Path(__file__).resolve().parents[1]

#: A run small enough for seconds per epoch on a 2-core CPU (the sample data, 16 training images).
TINY_RUN = ["model=yolov3_tiny", "model.width=0.25", "data.img_size=64", "data.batch_size=4", "data.num_workers=0",
            "data.min_steps_per_epoch=0", "data.persistent_workers=false", "data.prepare.num_train=16",
            "data.prepare.num_val=4", "trainer.log_every_n_steps=1", "callbacks.progress_bar.refresh_rate=0",
            "~callbacks.image_logger", "logger=csv"]


def compose_train(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def train_command(tmp_path: Path, *overrides: str) -> list[str]:
    """``python train.py`` on the tiny run, with data and logs under ``tmp_path``."""
    return [sys.executable, "train.py", *TINY_RUN, f"data.root={tmp_path / 'sample'}",
            f"paths.log_dir={tmp_path / 'logs'}", *overrides]


def train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """The tiny run through the command line, with this module's callbacks importable."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    return subprocess.run(train_command(tmp_path, *overrides), cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=env)


# ===================================================================================================================
# A resume on another dataset's classes
# ===================================================================================================================

def voc_of(root: Path, names: list[str]) -> list[str]:
    """A VOC folder holding ``names`` (classes inferred from it: ``data.classes=null``) and the overrides reading
    it with a network matching ``checkpoint_of``."""
    images = {f"{k:03d}": (64, 64, [(names[k % len(names)], (8, 8, 40, 40), False)]) for k in range(4)}
    make_voc(root, {"train": images, "val": images})
    return ["data=voc", f"data.root={root}", "data.classes=null", "data.train.splits=[train]",
            "data.val.splits=[val]", "model=yolov3_tiny", "model.width=0.25", "data.img_size=64",
            "data.num_workers=0", "data.persistent_workers=false", "logger=csv", "~callbacks.image_logger",
            f"paths.output_dir={root.parent / 'run'}"]


def checkpoint_of(path: Path, classes: list[str]) -> Path:
    """What train.py saves for a run on ``classes``: weights, hyper-parameters (class names too), detector class."""
    from lightning_det.models.yolov3 import YOLOv3

    model = YOLOv3(variant="tiny", width=0.25, num_classes=len(classes), class_names=classes)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "epoch": 0,
                "detector_class": "lightning_det.models.yolov3.module.YOLOv3"}, path)
    return path


def test_a_resume_on_data_of_other_classes_is_refused_before_the_model_is_built(tmp_path):
    from lightning_det.checks.run import CheckpointError
    from lightning_det.tools.train import build

    data = voc_of(tmp_path / "pets", ["cat", "dog"])
    three = checkpoint_of(tmp_path / "three.ckpt", ["bird", "cat", "dog"])
    with pytest.raises(CheckpointError) as error:  # today: a page of size mismatches, after the data is read
        build(compose_train(*data, f"ckpt_path={three}"))
    assert str(error.value) == (
        f"ckpt_path={three} was trained on 3 classes [bird, cat, dog], but the data (data.root={tmp_path / 'pets'}) "
        f"has 2 classes [cat, dog]: only in the checkpoint: [bird]. A resume continues the same training on the "
        f"same classes: give it the data it was trained on, or fine-tune it on these classes as a new training "
        f"with init_from={three} (init_classes=by_name carries over the rows of the classes both have)")

    vehicles = checkpoint_of(tmp_path / "vehicles.ckpt", ["bus", "car"])  # the same count: today, silent
    with pytest.raises(CheckpointError, match=re.escape("only in the checkpoint: [bus, car]; only in the data: "
                                                        "[cat, dog]. A resume continues")):
        build(compose_train(*data, f"ckpt_path={vehicles}"))
    swapped = checkpoint_of(tmp_path / "swapped.ckpt", ["dog", "cat"])
    with pytest.raises(CheckpointError, match="the same names in another order"):
        build(compose_train(*data, f"ckpt_path={swapped}"))

    own = checkpoint_of(tmp_path / "own.ckpt", ["cat", "dog"])
    _, model, _ = build(compose_train(*data, f"ckpt_path={own}"))
    assert model.class_names == ["cat", "dog"]


# ===================================================================================================================
# Two runs into one run folder
# ===================================================================================================================

class HoldAtEpoch(L.Callback):
    """At the start of ``epoch`` (the checkpoints of the one before saved), create ``flag`` and stand still until
    the process is killed: a run that is still going."""

    def __init__(self, flag: str, epoch: int = 1) -> None:
        self.flag, self.epoch = Path(flag), epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            self.flag.touch()
            time.sleep(600)


def test_a_second_run_into_a_busy_run_folder_is_refused_and_a_killed_run_leaves_no_lock(tmp_path):
    folder, flag, log = tmp_path / "run", tmp_path / "holding", tmp_path / "first.log"
    with open(log, "w") as output:
        first = subprocess.Popen(
            train_command(tmp_path, "trainer.max_epochs=2", f"hydra.run.dir={folder}",
                          "+callbacks.hold._target_=test_faults_round3.HoldAtEpoch", f"+callbacks.hold.flag={flag}"),
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO / "tests")}, stdout=output, stderr=output)
    try:
        deadline = time.monotonic() + 300
        while not flag.exists():
            assert first.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the first run never reached its second epoch"
            time.sleep(0.2)
        second = train(tmp_path, "trainer.max_epochs=1", f"hydra.run.dir={folder}", "seed=7")
        assert second.returncode != 0, "the second run trained too, into the same results.csv and checkpoints"
        refusal = f"run folder {folder} is in use by another training (PID {first.pid} on "
        message = next((line for line in second.stderr.splitlines() if refusal in line), "")
        assert message, second.stderr[-3000:]
        assert "hydra.run.dir=<another folder>" in message
        assert "\nseed: 0\n" in (folder / "config_resolved.yaml").read_text()  # the refused run wrote nothing
    finally:
        first.send_signal(signal.SIGKILL)  # a kill: the kernel releases its lock, nothing else does
        first.wait()

    resumed = train(tmp_path, "trainer.max_epochs=2", f"hydra.run.dir={folder}",
                    f"ckpt_path={folder / 'checkpoints' / 'last.ckpt'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["epoch"] == 1
    holder = (folder / "run.lock").read_text()
    assert holder.startswith("PID ") and f"PID {first.pid} " not in holder


def test_only_global_rank_zero_locks_the_run_folder(tmp_path, monkeypatch):
    """Under DDP every rank runs the same command into the same folder: the others must neither take the lock nor
    be refused by rank 0's."""
    from lightning_det.tools.train import lock_run_folder

    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(name, raising=False)
    for variable in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"):
        monkeypatch.setenv(variable, "1")
        lock_run_folder(tmp_path)
        assert not (tmp_path / "run.lock").exists()
        monkeypatch.setenv(variable, "0")
    lock_run_folder(tmp_path)
    assert (tmp_path / "run.lock").read_text().startswith(f"PID {os.getpid()} on ")
    lock_run_folder(tmp_path)  # the same process again (a job after the first): not refused by its own lock


# ===================================================================================================================
# A full disk during a save
# ===================================================================================================================

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
# Config values outside their range
# ===================================================================================================================

@pytest.mark.parametrize("overrides, message", [
    (["data.batch_size=0"], "data.batch_size=0 must be >= 1 (images per batch on each device)"),
    (["optimizer.lr=-1"], "optimizer.lr=-1 must be >= 0"),
    (["data.img_size=100"], "data.img_size=100 must be a positive multiple of 32 for YOLOv3 (its coarsest stride), "
                            "e.g. 96 or 128, or auto"),
    (["model=ssdlite", "data.img_size=0"], "data.img_size=0 must be >= 1 (pixels), or auto"),
    (["trainer.max_epochs=-2"], "trainer.max_epochs=-2 must be >= 1, 0 to validate the model as built without "
                                "training, or -1 for no limit"),
])
def test_a_config_value_outside_its_range_is_refused_naming_the_key_and_the_range(overrides, message):
    from lightning_det.checks.config import ConfigValueError
    from lightning_det.checks.run import check_run

    with pytest.raises(ConfigValueError) as error:
        check_run(compose_train(*overrides))
    assert str(error.value) == message


@pytest.mark.parametrize("overrides", [["data.img_size=96"], ["optimizer.lr=0"], ["trainer.max_epochs=-1"],
                                       ["model=ssdlite", "data.img_size=100"]])
def test_values_inside_their_range_pass(overrides):
    """SSD builds its default boxes on the feature maps an input gives, so it takes any size; YOLO needs 32."""
    from lightning_det.checks.run import check_run

    check_run(compose_train(*overrides))


def test_a_val_split_leaving_no_training_image_names_the_share_and_the_count(tmp_path):
    from lightning_det.data import DetectionDataModule, VOCSource

    images = {f"{k:03d}": (64, 64, [("cat", (8, 8, 40, 40), False)]) for k in range(16)}
    make_voc(tmp_path, {"train": images})

    def held_out(share: float) -> DetectionDataModule:
        data = DetectionDataModule(tmp_path, VOCSource(["train"]), val_split=share, img_size=64)
        data.setup("fit")
        return data

    with pytest.raises(ValueError) as error:  # today: "the train split has no images ...; check data.root"
        held_out(0.99)
    assert str(error.value) == (
        "data.val_split=0.99 holds out 16 of the 16 training images, leaving none to train on: it must hold out at "
        "most 15 (e.g. data.val_split=0.1), or set data.val to a separate validation source")
    assert [len(held_out(0.9).records[role]) for role in ("train", "val")] == [2, 14]


def test_max_epochs_0_validates_the_model_as_built_and_says_so(tmp_path):
    done = train(tmp_path, "trainer.max_epochs=0", f"hydra.run.dir={tmp_path / 'run'}")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert re.search(r"trainer\.max_epochs=0: nothing trained; val/mAP of the model as built, with its initial "
                     r"weights: \d\.\d{4}", output), output[-3000:]
    assert "epoch -1" not in output
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final["epoch"] is None and final["checkpoint"] == ""
