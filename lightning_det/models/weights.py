"""Initialise a model from another run's weights: every tensor whose name and shape match, nothing else."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lightning_det.checks.run import is_torch_file, read_checkpoint

log = logging.getLogger(__name__)


@dataclass
class TransferReport:
    loaded: list[str] = field(default_factory=list)
    skipped_shape: list[str] = field(default_factory=list)  # in both, with different shapes (e.g. a new class count)
    excluded: list[str] = field(default_factory=list)  # matched an exclude pattern
    unexpected: list[str] = field(default_factory=list)  # in the file only
    missing: list[str] = field(default_factory=list)  # in the model only: keep their fresh initialisation
    loaded_values: int = 0  # elements of the loaded tensors
    model_values: int = 0  # elements of the model's whole state dict

    def summary(self) -> str:
        def names(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f", ... (+{len(items) - 5})" if len(items) > 5 else "")

        lines = [f"loaded {len(self.loaded)} tensors"]
        for label, items in (
            ("skipped (shape differs)", self.skipped_shape),
            ("excluded by pattern", self.excluded),
            ("in the file only", self.unexpected),
            ("missing from the file (left as initialised)", self.missing),
        ):
            if items:
                lines.append(f"{label}: {len(items)}: {names(items)}")
        return "\n".join(lines)


#: Below this share of the model's values, an ``init_from`` is refused unless ``init_partial`` allows it.
MIN_LOADED_SHARE = 0.5


def initialise_from(
    model: nn.Module, path: str | Path, exclude: list[str] | tuple[str, ...] = (), cutoff: int | None = None,
    partial: bool = False,
) -> None:
    """``init_from``: a PyTorch checkpoint or state dict by matching names and shapes; any other file through the
    model's own ``load_foreign_weights`` (YOLOv3 reads Darknet ``.weights``), ``cutoff`` conv layers at most.

    A file that fills less than :data:`MIN_LOADED_SHARE` of the model's values is an error unless ``partial``:
    training on from scratch after a typo in the model settings would look like a transfer that did not help.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_from: no file at {path}")
    if is_torch_file(path):
        report = load_matching_weights(model, path, exclude)
        share = report.loaded_values / max(report.model_values, 1)
        if share < MIN_LOADED_SHARE and not partial:
            raise ValueError(
                f"init_from={path} filled only {share:.0%} of the model's values ({len(report.loaded)} of "
                f"{len(report.loaded) + len(report.missing) + len(report.skipped_shape) + len(report.excluded)} "
                "tensors); check that the model settings match the checkpoint's, or set init_partial=true to "
                f"train from this partial start:\n{report.summary()}"
            )
    else:
        header = model.load_foreign_weights(str(path), cutoff)
        log.info("init_from %s: read %s", path, header)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A Lightning checkpoint's ``state_dict`` or a plain state dict file, loaded without executing code."""
    content = read_checkpoint(path, "init_from")
    state = content.get("state_dict", content)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"init_from: {path} holds neither a Lightning checkpoint nor a state dict of tensors")
    return state


def load_matching_weights(model: nn.Module, path: str | Path, exclude: list[str] | tuple[str, ...] = ()) -> TransferReport:
    """Copy into ``model`` each tensor of ``path`` with the same name and shape unless a regex of ``exclude``
    matches its name. Distinct from resuming (``ckpt_path``): no optimizer, epoch or callback state is read.
    """
    source = read_state_dict(path)
    target = model.state_dict()
    patterns = [re.compile(p) for p in exclude]
    report = TransferReport()
    chosen = {}
    for name, tensor in source.items():
        if name not in target:
            report.unexpected.append(name)
        elif any(p.search(name) for p in patterns):
            report.excluded.append(name)
        elif tensor.shape != target[name].shape:
            report.skipped_shape.append(name)
        else:
            chosen[name] = tensor
            report.loaded.append(name)
    report.missing = [name for name in target if name not in source]
    report.loaded_values = sum(tensor.numel() for tensor in chosen.values())
    report.model_values = sum(tensor.numel() for tensor in target.values())
    model.load_state_dict(chosen, strict=False)
    log.info("init_from %s:\n%s", path, report.summary())
    return report
