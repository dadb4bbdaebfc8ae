"""Fixtures shared by the test modules (the support code they import lives beside them: helpers.py, runs.py,
tiny_detector.py, darknet_sections.py, darknet_reference.py, devkit_reference.py)."""

from __future__ import annotations

import urllib.error
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import make_voc
from omegaconf import DictConfig
from runs import compose_config

ComposeRun = Callable[..., DictConfig]  # (*overrides, run="run") -> the config as that run sees it


@pytest.fixture(scope="module")
def one_torch_thread():
    """Many tiny tensor ops (augmentation) run far slower on two threads when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def offline(monkeypatch, tmp_path) -> Path:
    """An empty torch.hub cache under a temporary TORCH_HOME and a download that fails like a machine offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture
def cfg_train(tmp_path) -> ComposeRun:
    """``cfg_train("model=ssdlite", ...)``: the config ``python train.py model=ssdlite ...`` runs with, in
    ``tmp_path / run`` (``run="run"`` unless given)."""
    return lambda *overrides, run="run": compose_config("train", *overrides, run_dir=tmp_path / run)


@pytest.fixture
def cfg_eval(tmp_path) -> ComposeRun:
    """``cfg_eval("ckpt_path=...", ...)``: the config ``python -m lightning_det.tools.evaluate ...`` runs with, in
    ``tmp_path / run``."""
    return lambda *overrides, run="run": compose_config("evaluate", *overrides, run_dir=tmp_path / run)


@pytest.fixture
def tiny_voc(tmp_path) -> tuple[Path, list[str]]:
    """A VOC folder of two classes (cat, dog), the same four 64 x 64 images of one object each in ``train`` and
    ``val``, and the overrides that read it with the classes found in it."""
    images = {f"{k:03d}": (64, 64, [(("cat", "dog")[k % 2], (8, 8, 40, 40), False)]) for k in range(4)}
    root = make_voc(tmp_path / "voc", {"train": images, "val": images})
    return root, ["data=voc", f"data.root={root}", "data.classes=null", "data.train.splits=[train]",
                  "data.val.splits=[val]"]
