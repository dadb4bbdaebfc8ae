"""``trainer.precision: auto``: bf16 mixed precision only where the hardware computes in bf16, and the losses and
decoded boxes in float32 under it."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from tiny_detector import TinyDetector

from lightning_det.tools import precision


@pytest.mark.parametrize(("accelerator", "cpu_bf16", "expected"), [
    ("cpu", True, "bf16-mixed"), ("cpu", False, "32-true"), ("auto", True, "bf16-mixed"), ("mps", True, "32-true"),
])
def test_auto_on_a_cpu_follows_its_bf16_instructions(monkeypatch, accelerator, cpu_bf16, expected):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: cpu_bf16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    trainer = OmegaConf.create({"accelerator": accelerator, "precision": "auto"})
    precision.resolve_precision(trainer, "lightning_det.models.yolov3.YOLOv3")
    assert trainer.precision == expected


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bf16-mixed"), (False, "32-true")])
def test_auto_on_a_gpu_takes_bf16_where_the_card_has_it(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    assert precision.auto_precision("gpu", cpu_bf16=False) == expected


@pytest.mark.parametrize(("target", "expected"), [
    ("lightning_det.models.yolov3.YOLOv3", "bf16-mixed"),  # measured faster in bf16 on a CPU
    ("lightning_det.models.ssd.SSD", "32-true"),  # its depthwise convolutions were slower
    (None, "32-true"),
])
def test_on_a_cpu_only_a_family_measured_faster_takes_bf16(monkeypatch, target, expected):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    trainer = OmegaConf.create({"accelerator": "cpu", "precision": "auto"})
    precision.resolve_precision(trainer, target)
    assert trainer.precision == expected


def test_a_chosen_precision_is_kept(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    trainer = OmegaConf.create({"accelerator": "cpu", "precision": "32-true"})
    precision.resolve_precision(trainer)
    assert trainer.precision == "32-true"


def test_network_outputs_are_float32_under_bf16_autocast():
    model = TinyDetector()
    batch = {"images": torch.randn(2, 3, 8, 8)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        raw = model(batch["images"])
        outputs = model.network_outputs(batch)
    assert raw.dtype == torch.bfloat16  # the convolutions did run in bf16
    assert outputs.dtype == torch.float32
