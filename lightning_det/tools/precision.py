"""``trainer.precision: auto``: bf16 mixed precision where the hardware computes in bf16, full precision elsewhere.

On a CPU with AVX512-BF16 or AMX, the default model's training step takes 0.56-0.62x the time in ``bf16-mixed``
(oneDNN runs the convolutions in bf16; ``python bench/train_step.py --precision``), but SSDLite's depthwise
convolutions take 1.10x: a family trains in bf16 on a CPU only where it declares that it was measured faster
(``Detector.cpu_bf16``). Without those instructions bf16 is emulated and slower, so such a CPU keeps ``32-true``.
A CUDA GPU that supports bf16 (Ampere and later) takes ``bf16-mixed``; an older one keeps ``32-true``
(``trainer.precision=16-mixed`` by hand). Only the training step's forward runs in bf16: its losses and box
decoding are computed in float32 (``Detector.network_outputs``), and validation, ``evaluate`` and ``predict`` run
wholly in float32 (``Detector.full_precision``), so their scores do not change with the batch.
"""

from __future__ import annotations

import torch
from hydra.utils import get_class
from omegaconf import DictConfig

AUTO = "auto"


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic instructions (AVX512-BF16 or AMX tiles)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def on_cuda(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def auto_precision(accelerator: str, cpu_bf16: bool = True) -> str:
    """The Lightning precision ``auto`` stands for on this machine with ``trainer.accelerator=<accelerator>``, for
    a model family that is (``cpu_bf16``) or is not faster in bf16 on a CPU."""
    if on_cuda(accelerator):
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    if accelerator in ("auto", "cpu"):
        return "bf16-mixed" if cpu_bf16 and cpu_has_bf16() else "32-true"
    return "32-true"


def resolve_precision(trainer_cfg: DictConfig, model_target: str | None = None) -> None:
    """Replace ``precision: auto`` in the trainer's config by what it means here for the model of ``model_target``
    (a class path), before the config is saved, so ``config_resolved.yaml`` says which precision the run used."""
    if str(trainer_cfg.get("precision")) == AUTO:
        cpu_bf16 = bool(getattr(get_class(model_target), "cpu_bf16", False)) if model_target else False
        trainer_cfg.precision = auto_precision(str(trainer_cfg.get("accelerator", "auto")), cpu_bf16)
