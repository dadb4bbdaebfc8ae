"""Initialise a model from pretrained weights (``init_from``): another run's checkpoint, a state dict, a reference
implementation's file (Darknet ``.weights``), or a torchvision COCO detector by its weights name.

Every source is first put in the model's own tensor names, with the class head of the source's classes, and then
loaded the same way: tensors of matching name and shape, and the class head carried over by
:func:`~lightning_det.models.transfer.match_classes` (``init_classes``). A reference model's weights must fit the
network whole: a tensor of another shape there means another architecture or width, which is refused with the
config that fits.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from lightning_det.io import is_torch_file, read_checkpoint
from lightning_det.models.backbones.pretrained import cached_or_downloaded
from lightning_det.models.detector import Detector
from lightning_det.models.torchvision_zoo import TORCHVISION_CONFIGS, TORCHVISION_PREFIX, torchvision_weights
from lightning_det.models.transfer import (
    COCO_80,
    TORCHVISION_COCO,
    ClassRows,
    TransferReport,
    match_classes,
    transfer_rows,
)

log = logging.getLogger(__name__)

#: Below this share of the model's values, an ``init_from`` is refused unless ``init_partial`` allows it.
MIN_LOADED_SHARE = 0.5


@dataclass
class Pretrained:
    """Weights in the model's tensor names, with the class head of the source's classes."""

    state: dict[str, Tensor]
    class_names: list[str] | None  # the source's classes (None: a file that does not name them)
    description: str  # where they came from, for messages
    whole: bool = False  # a reference model's weights: every tensor but the class head must fit
    fits: str = (  # what to use instead
        "the model config built for these weights (docs/recipes.md, 'Start from pretrained detectors')"
    )


def initialise_from(
    model: Detector, source: str | Path, exclude: list[str] | tuple[str, ...] = (), cutoff: int | None = None,
    partial: bool = False, classes: str = "auto",
) -> TransferReport:
    """``init_from``: load ``source`` into ``model`` (see the module docstring); ``cutoff`` reads only the first N
    conv layers of a Darknet file; ``classes`` is ``init_classes`` (``auto`` | ``by_name``).

    A file that fills less than :data:`MIN_LOADED_SHARE` of the model's values is an error unless ``partial``:
    training on from scratch after a typo in the model settings would look like a transfer that did not help.
    """
    if str(source).startswith(TORCHVISION_PREFIX):
        pretrained = torchvision_detector(model, str(source)[len(TORCHVISION_PREFIX):])
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"init_from: no file at {path}")
        if not is_torch_file(path) and cutoff is not None:  # a backbone file (darknet53.conv.74): no head to carry
            header = model.load_foreign_weights(str(path), cutoff)
            log.info("init_from %s: read %s", path, header)
            return TransferReport()
        pretrained = torch_file(model, path) if is_torch_file(path) else foreign_file(model, path)
    report = load_pretrained(model, pretrained, exclude, classes)
    share = report.loaded_values / max(report.model_values, 1)
    if share < MIN_LOADED_SHARE and not partial:
        raise ValueError(
            f"init_from={pretrained.description} filled only {share:.0%} of the model's values "
            f"({len(report.loaded)} of "
            f"{len(report.loaded) + len(report.missing) + len(report.skipped_shape) + len(report.excluded)} "
            "tensors); check that the model settings match the checkpoint's, or set init_partial=true to "
            f"train from this partial start:\n{report.summary()}"
        )
    log.info("init_from %s:\n%s", pretrained.description, report.summary())
    if report.classes.startswith("class head re-initialised"):
        log.warning("init_from: %s", report.classes)
    return report


def recorded_settings(source: str | Path) -> dict[str, Any]:
    """What ``init_from`` weights say of the settings they were trained with: a checkpoint's hyper-parameters,
    and ``format`` (``checkpoint``, ``state_dict``, ``torchvision`` or ``foreign``: a reference implementation's
    file such as Darknet's)."""
    if str(source).startswith(TORCHVISION_PREFIX):
        return {"format": "torchvision"}
    path = Path(source)
    if not path.is_file() or not is_torch_file(path):
        return {"format": "foreign"}
    content = read_checkpoint(path, "init_from")
    if "state_dict" not in content:
        return {"format": "state_dict"}
    return {**content.get("hyper_parameters", {}), "format": "checkpoint"}


def load_matching_weights(
    model: Detector, path: str | Path, exclude: list[str] | tuple[str, ...] = ()
) -> TransferReport:
    """Copy into ``model`` each tensor of the checkpoint or state dict ``path`` with the same name and shape unless
    a regex of ``exclude`` matches its name. Distinct from resuming (``ckpt_path``): no optimizer, epoch or
    callback state is read."""
    content = read_checkpoint(path, "init_from")
    return load_pretrained(model, Pretrained(state_of(content, path), None, str(path)), exclude)


def state_of(content: dict, path: str | Path) -> dict[str, Tensor]:
    """A Lightning checkpoint's ``state_dict``, or the plain state dict ``content`` is."""
    state = content.get("state_dict", content)
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"init_from: {path} holds neither a Lightning checkpoint nor a state dict of tensors")
    return state


def torch_file(model: Detector, path: Path) -> Pretrained:
    """A checkpoint of this framework (its classes are in it), a state dict in the model's names, or the state
    dict of the torchvision detector the model mirrors (``torch.save(torchvision_model.state_dict())``)."""
    content = read_checkpoint(path, "init_from")
    state = state_of(content, path)
    if "state_dict" in content:
        names = content.get("hyper_parameters", {}).get("class_names")
        return Pretrained(state, list(names) if names else None, str(path))
    ours = model.state_dict()
    try:
        converted = model.from_torchvision(state)
    except (NotImplementedError, KeyError) as error:
        if sum(name in ours for name in state) >= len(state) / 2:
            return Pretrained(state, None, str(path))
        why = f"it lacks {error}" if isinstance(error, KeyError) else f"{type(model).__name__} mirrors none"
        return Pretrained(state, None, f"{path} (a state dict of {len(state)} tensors such as {next(iter(state))}, "
                                       f"neither in this model's names nor a torchvision detector it mirrors: {why})")
    count = source_class_count(model, converted)
    return Pretrained(converted, TORCHVISION_COCO[1:] if count == len(TORCHVISION_COCO) - 1 else None,
                      f"{path} (a torchvision state dict)", whole=True)


def foreign_file(model: Detector, path: Path) -> Pretrained:
    """A reference implementation's file read by the model's own reader (Darknet ``.weights`` for YOLOv3): into
    the model as it is when the file fits it, else as COCO's 80 classes (the published files) into a twin of the
    model with that head."""
    try:
        header = model.load_foreign_weights(str(path))
        return Pretrained(model.state_dict(), None, f"{path} {header}", whole=True)
    except ValueError as own_count:
        if model.num_classes == len(COCO_80) or type(model).load_foreign_weights is Detector.load_foreign_weights:
            raise
        twin = twin_of(model, len(COCO_80), COCO_80)
        try:
            header = twin.load_foreign_weights(str(path))
        except ValueError:
            raise own_count from None
        return Pretrained(twin.state_dict(), COCO_80, f"{path} {header}", whole=True)


def twin_of(model: Detector, num_classes: int, class_names: list[str] | None) -> Detector:
    """The same network with another class head, to read a file that holds one."""
    arguments = {**model.hparams, "num_classes": num_classes, "class_names": class_names,
                 "optimizer": None, "scheduler": None, "metric": None}
    return type(model)(**arguments)


def torchvision_detector(model: Detector, name: str) -> Pretrained:
    """A torchvision COCO detector's weights (torch.hub's cache, else downloaded) in the model's names."""
    weights, builder = torchvision_weights(name)
    key = f"init_from={TORCHVISION_PREFIX}{name}"
    state = cached_or_downloaded(weights, key="init_from")
    try:
        converted = model.from_torchvision(state)
    except (NotImplementedError, KeyError) as error:
        raise ValueError(f"{key} holds torchvision's {builder}, which {type(model).__name__} cannot hold "
                         f"({error}); use model={TORCHVISION_CONFIGS[builder]}") from None
    return Pretrained(converted, list(weights.meta["categories"])[1:], f"{TORCHVISION_PREFIX}{name} ({builder})",
                      whole=True, fits=f"model={TORCHVISION_CONFIGS[builder]}")


def source_class_count(model: Detector, state: dict[str, Tensor]) -> int | None:
    """How many classes the class head of ``state`` holds, read from the model's class-row layout."""
    for name, layout in model.class_rows().items():
        if name in state:
            return layout.class_count(state[name].shape[0])
    return None


def load_pretrained(model: Detector, pretrained: Pretrained, exclude: list[str] | tuple[str, ...] = (),
                    classes: str = "auto") -> TransferReport:
    """Copy the tensors of ``pretrained`` whose names and shapes match, and the class head as ``classes`` says;
    weights of a reference model must fit whole."""
    target = model.state_dict()
    layouts: dict[str, ClassRows] = model.class_rows()
    patterns = [re.compile(p) for p in exclude]
    report, chosen = TransferReport(), {}
    heads = [name for name in layouts if name in pretrained.state and not any(p.search(name) for p in patterns)
             and fits_layout(pretrained.state[name], target[name], layouts[name])]
    count = layouts[heads[0]].class_count(pretrained.state[heads[0]].shape[0]) if heads else None
    if heads:  # classes the source lacks keep their fresh rows; box, objectness and background rows are copied
        rows, report.classes = match_classes(model.class_names, pretrained.class_names, count, classes)
        for name in heads:
            chosen[name] = transfer_rows(target[name], pretrained.state[name], layouts[name], rows)
    for name, tensor in pretrained.state.items():
        if name in heads:
            continue
        if name not in target:
            report.unexpected.append(name)
        elif any(p.search(name) for p in patterns):
            report.excluded.append(name)
        elif tensor.shape != target[name].shape:
            report.skipped_shape.append(name)
        else:
            chosen[name] = tensor
    report.loaded = list(chosen)
    report.missing = [name for name in target if name not in pretrained.state]
    if pretrained.whole:
        refuse_misfit(pretrained, report, target)
    report.loaded_values = sum(tensor.numel() for tensor in chosen.values())
    report.model_values = sum(tensor.numel() for tensor in target.values())
    model.load_state_dict(chosen, strict=False)
    return report


def fits_layout(source: Tensor, target: Tensor, layout: ClassRows) -> bool:
    """Whether ``source`` is ``target``'s class-indexed tensor for some class count (else another network)."""
    rows = source.shape[0] if source.ndim else 0
    return (source.shape[1:] == target.shape[1:] and rows % layout.groups == 0
            and (rows // layout.groups - layout.lead) % layout.per_class == 0 and layout.class_count(rows) > 0)


def refuse_misfit(pretrained: Pretrained, report: TransferReport, target: dict[str, Tensor]) -> None:
    """A reference model's weights with a tensor of another shape, or one missing, are another network."""
    missing = [n for n in report.missing if not n.endswith("num_batches_tracked")]
    if report.skipped_shape:
        name = report.skipped_shape[0]
        raise ValueError(
            f"init_from={pretrained.description}: these weights are another network than the model builds: "
            f"{len(report.skipped_shape)} tensors differ in shape, e.g. {name} is "
            f"{tuple(pretrained.state[name].shape)} "
            f"there and {tuple(target[name].shape)} here (another width or architecture). Use {pretrained.fits}"
        )
    if missing:
        raise ValueError(
            f"init_from={pretrained.description}: these weights lack {len(missing)} tensors of the model, e.g. "
            f"{missing[0]}: they are another architecture. Use {pretrained.fits}"
        )

