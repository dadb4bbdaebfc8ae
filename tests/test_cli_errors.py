"""The framework's own errors print as ``Error: <message>`` without a traceback, exit status 1; the traceback comes
back with ``HYDRA_FULL_ERROR=1``, and a bug's error (a library's, or another kind) keeps it."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from omegaconf import OmegaConf
from runs import REPO, train

from lightning_det.checks.config import ConfigValueError, check_group_options
from lightning_det.tools.errors import FrameworkError, framework_error, report_errors
from lightning_det.tools.train import check_devices, saved_epoch


def run_tool(tmp_path, module: str, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", module, *overrides, f"hydra.run.dir={tmp_path / 'run'}",
            f"paths.log_dir={tmp_path / 'logs'}"]
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def test_a_data_error_prints_its_message_alone_and_hydra_full_error_the_traceback(tmp_path):
    missing = [f"data.root={tmp_path / 'nowhere'}", "data=voc"]
    done = train(tmp_path, *missing, expect_ok=False)
    assert done.returncode == 1
    assert f"Error: data.root={tmp_path / 'nowhere'}: no such folder. Point data.root at the dataset" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout, done.stderr

    done = train(tmp_path, *missing, expect_ok=False, env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert f"FileNotFoundError: data.root={tmp_path / 'nowhere'}: no such folder" in done.stderr


def test_an_error_raised_while_hydra_builds_an_object_prints_its_own_message(tmp_path):
    done = train(tmp_path, "data.sampler.repeat_threshold=5", expect_ok=False)
    assert done.returncode == 1
    assert "Error: data.sampler.repeat_threshold must be a share of images in (0, 1], got 5" in done.stderr
    assert "Traceback" not in done.stderr and "Error in call to target" not in done.stderr, done.stderr


def test_every_hydra_tool_reports_the_same_way(tmp_path):
    missing = tmp_path / "missing.ckpt"
    done = run_tool(tmp_path, "lightning_det.tools.evaluate", f"ckpt_path={missing}")
    assert done.returncode == 1 and f"Error: ckpt_path={missing}: no such file" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_only_the_frameworks_own_errors_lose_their_traceback(tmp_path, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(ValueError, match="asks for 64 CPU processes") as own:
        check_devices(OmegaConf.create({"devices": 64, "accelerator": "cpu"}))
    assert framework_error(own.value) is own.value
    with pytest.raises(ValueError) as library:  # raised inside numpy: a bug's, whatever its kind
        np.arange(2).reshape(3)
    assert framework_error(library.value) is None
    with pytest.raises(FileNotFoundError) as library_file:  # raised by torch.load for the framework's call
        saved_epoch(str(tmp_path / "none.ckpt"))
    assert framework_error(library_file.value) is None

    def task(cfg):
        check_devices(cfg)

    with pytest.raises(FrameworkError, match=r"^Error: trainer.devices=64 asks for 64 CPU processes"):
        report_errors(task)(OmegaConf.create({"devices": 64, "accelerator": "cpu"}))
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ValueError, match="asks for 64 CPU processes"):
        report_errors(task)(OmegaConf.create({"devices": 64, "accelerator": "cpu"}))


@pytest.mark.parametrize("entry, override, suggestion", [
    (["train.py"], "model=yolo3", "model=yolov3"),
    (["train.py"], "model=yolov3,ssdlit", "model=ssdlite"),  # a multirun sweep: each option checked
    (["-m", "lightning_det.tools.evaluate"], "data=vocc", "data=voc"),
])
def test_a_config_option_that_does_not_exist_names_the_closest_and_stops_with_status_2(entry, override, suggestion):
    done = subprocess.run([sys.executable, *entry, override], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    group, _, option = override.partition("=")
    assert line.startswith(f"error: {override}: there is no {group} '{option.split(',')[-1]}'")
    assert f"did you mean {suggestion}?" in line and "The options: " in line


def test_help_is_a_page_of_commands_and_config_groups_not_the_whole_config():
    done = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert len(lines) < 50  # Hydra's generic help printed the whole config: ~300 lines
    for tool in ("evaluate", "predict", "export"):
        assert any(line.strip().startswith(f"python -m lightning_det.tools.{tool} ckpt_path=") for line in lines)
    groups = dict(line.split(": ", 1) for line in lines if line.startswith(("model: ", "data: ")))
    assert "yolov3_tiny_cpu" in groups["model"].split(", ") and "voc" in groups["data"].split(", ")


def test_an_option_on_the_search_path_is_found_and_a_misspelt_one_suggested(tmp_path):
    """A user's own config folder (``hydra.searchpath``, docs/adding.md) holds options of its own."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "grid.yaml").write_text("# @package _global_\n")
    search = f"hydra.searchpath=[file://{tmp_path}]"
    check_group_options([search, "model=grid"])
    with pytest.raises(ConfigValueError, match=r"did you mean model=grid\?.*grid, ssd300"):
        check_group_options([search, "model=gird"])
    check_group_options(["hydra.searchpath=[pkg://my_project.conf]", "model=grid"])  # a package: Hydra decides
