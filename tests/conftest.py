"""Fixtures shared by the test modules (the support code they import lives beside them: helpers.py, runs.py,
tiny_detector.py, darknet_sections.py)."""

import urllib.error
from pathlib import Path

import pytest
import torch


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
