"""Freeze part of a detector, optionally releasing it at a later epoch with its own learning-rate factor."""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn
from torch.optim import Optimizer

log = logging.getLogger(__name__)


def leading_conv_modules(model: nn.Module, count: int) -> list[nn.Module]:
    """The first ``count`` convolutions in registration order, each with the norm layers that follow it."""
    chosen: list[nn.Module] = []
    convs = 0
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            convs += 1
            if convs > count:
                break
        if convs and not list(module.children()) and any(True for _ in module.parameters(recurse=False)):
            chosen.append(module)
    return chosen


class Freeze(BaseFinetuning):
    """Freeze by module name prefix, by a regex over parameter names, or the first N conv layers.

    Frozen BatchNorm layers stay in eval mode, normalising with their running statistics (mmdet's
    ``norm_eval``), instead of switching to batch statistics they would no longer learn from.
    ``unfreeze_at_epoch`` releases everything at that epoch, ``unfreeze_at_share`` at that share of the run's
    ``max_epochs`` (re-estimated under a time budget); the released parameters then train at ``lr_factor`` times
    the learning rate the schedule gives the rest. Only what this callback froze is released: layers a model keeps
    frozen itself (torchvision's fine-tuning layout of Faster R-CNN) stay frozen.
    """

    def __init__(
        self,
        modules: list[str] | None = None,
        pattern: str | None = None,
        first_n: int | None = None,
        unfreeze_at_epoch: int | None = None,
        lr_factor: float = 1.0,
        unfreeze_at_share: float | None = None,
    ) -> None:
        super().__init__()
        if not (modules or pattern or first_n):
            raise ValueError("Freeze needs modules, pattern or first_n")
        if unfreeze_at_epoch is not None and unfreeze_at_share is not None:
            raise ValueError("Freeze: give unfreeze_at_epoch or unfreeze_at_share, not both")
        if unfreeze_at_share is not None and not 0 <= unfreeze_at_share <= 1:
            raise ValueError(f"Freeze: unfreeze_at_share={unfreeze_at_share} must be a share of the run in [0, 1]")
        self.module_names = list(modules or [])
        self.pattern = re.compile(pattern) if pattern else None
        self.first_n = first_n
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.unfreeze_at_share = unfreeze_at_share
        self.lr_factor = lr_factor
        self.frozen_norms: list[nn.Module] = []
        self.frozen_parameters: list[nn.Parameter] = []
        self.released = False

    def frozen_modules(self, pl_module: L.LightningModule) -> list[nn.Module]:
        modules = [pl_module.get_submodule(name) for name in self.module_names]
        if self.first_n:
            modules += leading_conv_modules(pl_module, self.first_n)
        if self.pattern:
            modules += [
                module
                for prefix, module in pl_module.named_modules()
                if any(self.pattern.search(f"{prefix}.{name}".lstrip(".")) for name, _ in module.named_parameters(recurse=False))
            ]
        return self.flatten_modules(modules)

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        modules = self.frozen_modules(pl_module)
        self.frozen_parameters = [p for m in modules for p in m.parameters(recurse=False) if p.requires_grad]
        self.freeze(modules, train_bn=False)
        self.frozen_norms = [m for m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        frozen = sum(p.numel() for m in modules for p in m.parameters(recurse=False))
        log.info("Freeze: %d parameters in %d modules frozen", frozen, len(modules))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if not self.released:
            for norm in self.frozen_norms:
                norm.eval()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "released": self.released}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.released = bool(state_dict.get("released", False))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A run resumed after the release trains the released parameters again; their learning rates (the
        factor included) come back with the optimizer and scheduler states."""
        super().on_fit_start(trainer, pl_module)
        if self.released:
            self.release_modules(pl_module)

    def release_modules(self, pl_module: L.LightningModule) -> None:
        for parameter in self.frozen_parameters:
            parameter.requires_grad_(True)
        for norm in self.frozen_norms:
            norm.track_running_stats = True  # BaseFinetuning.freeze turned it off
            norm.train()

    def release_epoch(self, trainer: L.Trainer) -> int | None:
        """The epoch the frozen part is released at: ``unfreeze_at_epoch``, or the share of ``max_epochs``."""
        if self.unfreeze_at_share is not None and trainer.max_epochs and trainer.max_epochs > 0:
            return math.ceil(self.unfreeze_at_share * trainer.max_epochs)
        return self.unfreeze_at_epoch

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        release = self.release_epoch(pl_module.trainer)
        if self.released or release is None or epoch < release:
            return
        self.release_modules(pl_module)
        scheduler = next(
            (config.scheduler for config in pl_module.trainer.lr_scheduler_configs
             if config.scheduler.optimizer is optimizer), None,
        )
        for index, group in enumerate(optimizer.param_groups):
            if group.get("frozen"):
                group["frozen"] = False
                group["lr"] *= self.lr_factor
                if scheduler is not None:
                    scheduler.base_lrs[index] *= self.lr_factor
        self.released = True
        log.info("Freeze: released at epoch %d with lr factor %g", epoch, self.lr_factor)
