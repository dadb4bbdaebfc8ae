"""Initialise a model from another run's weights: every tensor whose name and shape match, nothing else."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class TransferReport:
    loaded: list[str] = field(default_factory=list)
    skipped_shape: list[str] = field(default_factory=list)  # in both, with different shapes (e.g. a new class count)
    excluded: list[str] = field(default_factory=list)  # matched an exclude pattern
    unexpected: list[str] = field(default_factory=list)  # in the file only
    missing: list[str] = field(default_factory=list)  # in the model only: keep their fresh initialisation

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


def is_torch_file(path: Path) -> bool:
    """``torch.save`` writes a zip archive (or, before 1.6, a pickle); anything else is another framework's format."""
    with path.open("rb") as f:
        start = f.read(2)
    return start == b"PK" or start[:1] == b"\x80"


def initialise_from(
    model: nn.Module, path: str | Path, exclude: list[str] | tuple[str, ...] = (), cutoff: int | None = None
) -> None:
    """``init_from``: a PyTorch checkpoint or state dict by matching names and shapes; any other file through the
    model's own ``load_foreign_weights`` (YOLOv3 reads Darknet ``.weights``), ``cutoff`` conv layers at most."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_from: no file at {path}")
    if is_torch_file(path):
        load_matching_weights(model, path, exclude)
    elif hasattr(model, "load_foreign_weights"):
        header = model.load_foreign_weights(str(path), cutoff)
        log.info("init_from %s: read %s", path, header)
    else:
        raise ValueError(f"init_from: {path} is not a PyTorch file and {type(model).__name__} reads no other format")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A Lightning checkpoint's ``state_dict`` or a plain state dict file, loaded without executing code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_from: no file at {path}")
    content = torch.load(path, map_location="cpu", weights_only=True)
    state = content.get("state_dict", content) if isinstance(content, dict) else None
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
    model.load_state_dict(chosen, strict=False)
    log.info("init_from %s:\n%s", path, report.summary())
    return report
