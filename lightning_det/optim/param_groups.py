"""Split parameters so weight decay applies to weights only, as in the YOLOv3 and SSD reference trainers."""

from __future__ import annotations

from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: conv/linear weights with ``weight_decay``; biases and normalisation parameters without.

    Decaying BatchNorm scales and biases pulls them towards zero for no regularising benefit, so the
    reference implementations (Darknet, Ultralytics, mmdet's ``norm_decay_mult=0``) exempt them.
    """
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            exempt = isinstance(module, norm_types) or name == "bias" or param.ndim <= 1
            (no_decay if exempt else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
