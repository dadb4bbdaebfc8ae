"""Several machines, exercised on this one: two "nodes" of one process each (gloo over localhost, each node with its
own run folder as two machines would have), launched the three ways Lightning recognises a cluster: torchrun, its
own environment variables, and a SLURM job step (its variables; no SLURM install needed). Each launch must be one
training: rank 0 names the environment Lightning chose, the two nodes' validation mAP is one process's, checkpoints
and logs are written once by rank 0, and a resume from its ``last.ckpt`` continues at the next epoch."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from runs import REPO, TINY, scalars, small_sample, train, train_arguments

from lightning_det.tools.train import check_launch

#: A node's launch: the command before ``train.py ...`` and the variables it adds, given the node's rank.
Node = Callable[[int], tuple[list[str], dict[str, str]]]

TWO_NODES = ["trainer.accelerator=cpu", "trainer.num_nodes=2", "trainer.devices=1"]
#: All that rank 1 may leave in its own run folder: Hydra's record of the command, the resolved config, its log.
RANK_ONE_FILES = {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "config_resolved.yaml",
                  "train.log", "job_result.json"}
#: Variables of a launch this test itself may run inside (a CI job under SLURM or torchrun); the nodes get their own.
OUTER_LAUNCH = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


def outside_any_launch() -> dict[str, str]:
    return {key: value for key, value in os.environ.items()
            if key not in OUTER_LAUNCH and not key.startswith(("SLURM_", "TORCHELASTIC_"))}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(port: int) -> Node:
    return lambda rank: ([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                          "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port)], {})


def lightning_variables(port: int) -> Node:
    return lambda rank: ([sys.executable], {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                            "NODE_RANK": str(rank), "WORLD_SIZE": "2"})


def slurm_step(port: int) -> Node:
    """What ``srun`` gives each task of ``sbatch --nodes=2 --ntasks-per-node=1``. Lightning takes the main address
    from the node list; ``MASTER_PORT`` replaces the port it derives from the job id, so that it is free."""
    return lambda rank: ([sys.executable], {
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "detector", "SLURM_NNODES": "2", "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NODELIST": "localhost", "SLURM_NODELIST": "localhost",
        "SLURM_PROCID": str(rank), "SLURM_NODEID": str(rank), "SLURM_LOCALID": "0", "MASTER_PORT": str(port)})


def launch(folder: Path, name: str, node: Node, *overrides: str, env: dict[str, str] | None = None,
           timeout: float = 600) -> list[str]:
    """Both nodes at once, node ``r`` in run folder ``<name><r>``; returns their outputs. When one fails or time
    runs out, both are ended (with whatever they started): a node left alone would wait for its peer for 30 min."""
    procs = []
    with ExitStack() as files:
        for rank in range(2):
            prefix, variables = node(rank)
            output = files.enter_context(open(folder / f"{name}{rank}.out", "w"))
            command = [*prefix, *train_arguments(folder, *overrides, run=f"{name}{rank}")]
            procs.append(subprocess.Popen(command, cwd=REPO, env={**outside_any_launch(), **(env or {}), **variables},
                                          stdout=output, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + timeout
        try:
            while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
                assert time.monotonic() < deadline, f"{name}: the nodes did not finish in {timeout} s"
                time.sleep(0.5)
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    outputs = [(folder / f"{name}{rank}.out").read_text() for rank in range(2)]
    failed = [f"node {rank} exited with {p.returncode}:\n{outputs[rank][-5000:]}" for rank, p in enumerate(procs)
              if p.returncode != 0]
    assert not failed, "\n".join(failed)
    return outputs


def assert_one_training(folder: Path, name: str, outputs: list[str], environment: str, epochs: list[int]) -> None:
    """Lightning chose ``environment`` and the two nodes ran as one training: rank 0 wrote checkpoints, results.csv
    (one row per epoch) and TensorBoard events (one process, one value per step), rank 1 none of them."""
    line = f"cluster environment: {environment}, 2 nodes x 1 device, world size 2"
    assert outputs[0].count(line) == 1, outputs[0][-3000:]
    assert "cluster environment:" not in outputs[1]
    run, other = folder / f"{name}0", folder / f"{name}1"
    left = {path.relative_to(other).as_posix() for path in other.rglob("*") if path.is_file()}
    assert left <= RANK_ONE_FILES, left - RANK_ONE_FILES

    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == epochs[-1] and any((run / "checkpoints").glob("best-epoch*.ckpt"))
    with open(run / "results.csv") as file:
        assert [int(row["epoch"]) for row in csv.DictReader(file)] == epochs
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and len({path.name.rsplit(".", 2)[1] for path in events}) == 1  # <time>.<host>.<pid>.<n>
    tags = scalars(run)
    assert len(tags["val/mAP"]) == len(epochs) + 1  # each epoch and the final validation of the best checkpoint
    steps_per_epoch = last["global_step"] // (epochs[-1] + 1)
    assert len(tags["train/loss_step"]) == steps_per_epoch * len(epochs)


def assert_map_of_one_process(folder: Path, run: Path, data: list[str]) -> None:
    """The best checkpoint validated by one process scores what the two nodes reported for it: their metric is
    synchronised over both halves of the validation set (the nodes' training itself differs from one process's)."""
    nodes = json.loads((run / "final_metrics.json").read_text())
    train(folder, *data, "trainer.accelerator=cpu", "trainer.max_epochs=0", f"init_from={nodes['checkpoint']}",
          run=f"{run.name}-one-process")
    single = json.loads((folder / f"{run.name}-one-process" / "final_metrics.json").read_text())
    assert single["val/mAP"] > 0 and single["val/recall"] > 0
    assert nodes["val/mAP"] == pytest.approx(single["val/mAP"], abs=1e-7)
    assert nodes["val/recall"] == pytest.approx(single["val/recall"], abs=1e-7)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    """The small sample set, shared by the launches (the first one's nodes generate it together)."""
    return small_sample(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory, data) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("slurm")
    return folder, launch(folder, "node", slurm_step(free_port()), *data, *TWO_NODES)


@pytest.mark.slow
def test_torchrun_two_nodes_train_as_one(tmp_path, data):
    outputs = launch(tmp_path, "node", torchrun(free_port()), *data, *TWO_NODES)
    assert_one_training(tmp_path, "node", outputs, "TorchElasticEnvironment", epochs=[0, 1])
    assert_map_of_one_process(tmp_path, tmp_path / "node0", data)


@pytest.mark.slow
def test_lightning_variables_two_nodes_train_as_one_with_srun_installed(tmp_path, data):
    """An ``srun`` on the PATH (a SLURM login node) only draws Lightning's warning, not SLURM's environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    outputs = launch(tmp_path, "node", lightning_variables(free_port()), *data, *TWO_NODES,
                     env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert "The `srun` command is available on your system but is not used" in outputs[0]
    assert_one_training(tmp_path, "node", outputs, "LightningEnvironment", epochs=[0, 1])
    assert_map_of_one_process(tmp_path, tmp_path / "node0", data)


@pytest.mark.slow
def test_slurm_step_two_nodes_train_as_one(slurm_run, data):
    folder, outputs = slurm_run
    assert_one_training(folder, "node", outputs, "SLURMEnvironment", epochs=[0, 1])
    assert_map_of_one_process(folder, folder / "node0", data)


@pytest.mark.slow
def test_two_nodes_resume_from_the_last_checkpoint_at_the_next_epoch(slurm_run, data, tmp_path):
    """Every node is given rank 0's ``last.ckpt``; the best checkpoint is carried into rank 0's new folder only."""
    last = slurm_run[0] / "node0" / "checkpoints" / "last.ckpt"
    outputs = launch(tmp_path, "resumed", slurm_step(free_port()), *data, *TWO_NODES, "trainer.max_epochs=3",
                     f"ckpt_path={last}")
    assert_one_training(tmp_path, "resumed", outputs, "SLURMEnvironment", epochs=[2])
    first = torch.load(last, map_location="cpu", weights_only=False)
    resumed = torch.load(tmp_path / "resumed0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == first["global_step"] * 3 // 2


#: What each launcher gives the process of node 1 in a group of two nodes of one process.
GROUP_MEMBER = {
    "torchrun": {"TORCHELASTIC_RUN_ID": "7", "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "0", "GROUP_RANK": "1",
                 "GROUP_WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
    "srun": slurm_step(29500)(1)[1],
}


@pytest.mark.parametrize("launcher", GROUP_MEMBER)
def test_a_process_of_a_group_asking_for_one_process_is_refused(monkeypatch, launcher):
    """Lightning would train each process of the group alone, each writing its own checkpoints."""
    for key in set(os.environ) - set(outside_any_launch()):
        monkeypatch.delenv(key)
    for key, value in GROUP_MEMBER[launcher].items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=rf"^{launcher} started 2 processes \(2 nodes x 1\) .* set trainer.num_nodes=2 "
                                         r"trainer.devices=1"):
        check_launch(OmegaConf.create({"devices": 1, "num_nodes": 1}))
    check_launch(OmegaConf.create({"devices": 1, "num_nodes": 2}))


def test_the_documented_slurm_recipe_composes():
    """The submitit command of docs/scaling.md: a SLURM launcher whose tasks and nodes match the trainer's."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    command = re.search(r"python train\.py -m hydra/launcher=submitit_slurm(.|\\\n)*?[^\\]\n",
                        (REPO / "docs" / "scaling.md").read_text()).group(0)
    overrides = shlex.split(command.replace("\\\n", " "))[3:]
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.tasks_per_node == cfg.trainer.devices
    assert cfg.hydra.launcher.nodes == cfg.trainer.num_nodes > 1


@pytest.mark.slow
def test_submitit_local_multirun_runs_each_job_through_submitit(tmp_path, data):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    command = [sys.executable, "train.py", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
               *TINY, *data, "trainer.max_epochs=1", "seed=0,1", f"paths.log_dir={tmp_path / 'logs'}",
               f"hydra.sweep.dir={sweep}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=outside_any_launch())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert len(list(sweep.glob(".submitit/*/*_0_result.pkl"))) == 2  # each job ran as a submitit job
    rows = [line.split(" | ") for line in (sweep / "summary.md").read_text().splitlines()[2:4]]
    assert [row[:2] + row[3:4] for row in rows] == [["| 0", "seed=0", "COMPLETED"], ["| 1", "seed=1", "COMPLETED"]]
    assert all(Path(row[4].rstrip(" |")).is_file() for row in rows)
