"""Split parameters so weight decay applies to weights only, as in the YOLOv3 and SSD reference trainers."""

from __future__ import annotations

from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Conv/linear weights with ``weight_decay``; biases and normalisation parameters without.

    Decaying BatchNorm scales and biases pulls them towards zero for no regularising benefit, so the
    reference implementations (Darknet, Ultralytics, mmdet's ``norm_decay_mult=0``) exempt them.

    Frozen parameters (``requires_grad=False``) are included, in groups of their own marked ``"frozen": True``:
    they get no gradient, so no optimizer moves them, and releasing them later (``callbacks.Freeze``) needs no
    new parameter group, which keeps the scheduler and a resumed optimizer state aligned with the groups.
    """
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {
        (decays, frozen): [] for frozen in (False, True) for decays in (True, False)
    }
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            decays = not (isinstance(module, norm_types) or name == "bias" or param.ndim <= 1)
            groups[decays, not param.requires_grad].append(param)
    return [
        {"params": params, "weight_decay": weight_decay if decays else 0.0, "frozen": frozen}
        for (decays, frozen), params in groups.items()
        if params
    ]
