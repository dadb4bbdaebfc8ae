"""Runs of several processes: more processes than the machine gives are refused before the data is read, a rank
dies with the launcher that started it, the rank that failed first is the one named at the end, and a run folder
takes one training at a time (a lock that global rank zero holds and a kill releases).
"""

from __future__ import annotations

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
from runs import REPO, quick_run, quick_run_command, with_test_modules

from lightning_det.callbacks.ranks import peer_failure
from lightning_det.tools.train import build, check_devices

# ===================================================================================================================
# More processes than the machine gives
# ===================================================================================================================

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


# ===================================================================================================================
# Ranks
# ===================================================================================================================

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
    done = quick_run(tmp_path, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=2",
                     f"hydra.run.dir={tmp_path / 'run'}", f"+callbacks.fail._target_={__name__}.FailOnRank",
                     "+callbacks.fail.rank=1")
    assert done.returncode != 0
    last_error = [line for line in done.stderr.splitlines() if line.startswith("RuntimeError")][-1]
    assert last_error.startswith("RuntimeError: rank 1 failed first: RuntimeError: rank 1 broke on purpose  (rank 0 "
                                 "then stopped with"), done.stderr[-3000:]


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
            quick_run_command(tmp_path, "trainer.max_epochs=2", f"hydra.run.dir={folder}",
                              f"+callbacks.hold._target_={__name__}.HoldAtEpoch", f"+callbacks.hold.flag={flag}"),
            cwd=REPO, env=with_test_modules(), stdout=output, stderr=output)
    try:
        deadline = time.monotonic() + 300
        while not flag.exists():
            assert first.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the first run never reached its second epoch"
            time.sleep(0.2)
        second = quick_run(tmp_path, "trainer.max_epochs=1", f"hydra.run.dir={folder}", "seed=7")
        assert second.returncode != 0, "the second run trained too, into the same results.csv and checkpoints"
        refusal = f"run folder {folder} is in use by another training (PID {first.pid} on "
        message = next((line for line in second.stderr.splitlines() if refusal in line), "")
        assert message, second.stderr[-3000:]
        assert "hydra.run.dir=<another folder>" in message
        assert "\nseed: 0\n" in (folder / "config_resolved.yaml").read_text()  # the refused run wrote nothing
    finally:
        first.send_signal(signal.SIGKILL)  # a kill: the kernel releases its lock, nothing else does
        first.wait()

    resumed = quick_run(tmp_path, "trainer.max_epochs=2", f"hydra.run.dir={folder}",
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
