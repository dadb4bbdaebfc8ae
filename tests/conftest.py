"""Fixtures shared by the test modules (the support code they import lives beside them: helpers.py, runs.py,
tiny_detector.py, darknet_sections.py)."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Many tiny tensor ops (augmentation) run far slower on two threads when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
