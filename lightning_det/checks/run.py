"""Checks of a run's inputs before any data is read: its config values and the checkpoint files it names.

A checkpoint is opened once: an empty, non-PyTorch or truncated file is refused with one message naming it, and
the network it holds (detector class, variant, width, depth, backbone, classes) is compared with the one the run
will build, so a mismatch is one sentence instead of a page of size-mismatch lines after the data is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from lightning_det.checks.config import check_config
from lightning_det.io import CheckpointError, is_torch_file, read_checkpoint
from lightning_det.models.torchvision_zoo import TORCHVISION_PREFIX, torchvision_weights
from lightning_det.models.yolov3.darknet_weights import read_darknet_header

#: Hyper-parameters that decide the network's tensor shapes (where a detector has them).
NETWORK_SETTINGS = ("variant", "width", "depth", "backbone", "representation", "fpn_channels")


def check_run(cfg: DictConfig) -> None:
    """Everything a training run can check before reading data: config types, ``ckpt_path`` and ``init_from``."""
    check_config(cfg)
    if cfg.get("ckpt_path"):
        checkpoint = read_checkpoint(cfg.ckpt_path, "ckpt_path")
        differences = network_differences(checkpoint, cfg)
        if differences:
            raise CheckpointError(
                f"ckpt_path={cfg.ckpt_path}: this checkpoint is {describe(checkpoint)}; the run builds "
                f"{differences}. Resume with the model settings it was trained with, or use init_from to start a "
                "new training from its matching weights"
            )
    if cfg.get("init_from"):
        check_init_from(cfg)


def check_resumed_classes(ckpt_path: str | Path, classes: list[str], data_root: str | Path) -> None:
    """A resume continues one training, so the checkpoint's classes must be the data's, in order. Checked once the
    data's classes are known (read from its annotations when ``data.classes`` is null), before the model is built:
    else another count fails later as a page of size mismatches, and the same count resumes silently on classes
    that are not the ones it learnt."""
    settings = read_checkpoint(ckpt_path, "ckpt_path").get("hyper_parameters", {})
    names, count = settings.get("class_names"), settings.get("num_classes")
    same = list(names) == list(classes) if names else count in (None, len(classes))  # no names: the count alone
    if same:
        return
    if not names:
        differ = "its class names were not recorded"
    elif sorted(names) == sorted(classes):
        differ = "the same names in another order"
    else:
        only = {"checkpoint": [n for n in names if n not in classes], "data": [n for n in classes if n not in names]}
        differ = "; ".join(f"only in the {where}: {listed(some)}" for where, some in only.items() if some)
    trained = f"{count} classes {listed(names)}" if names else f"{count} classes"
    raise CheckpointError(
        f"ckpt_path={ckpt_path} was trained on {trained}, but the data (data.root={data_root}) has "
        f"{len(classes)} classes {listed(classes)}: {differ}. A resume continues the same training on the same "
        f"classes: give it the data it was trained on, or fine-tune it on these classes as a new training with "
        f"init_from={ckpt_path} (init_classes=by_name carries over the rows of the classes both have)"
    )


def listed(names: list[str], limit: int = 12) -> str:
    """``[cat, dog, ...]``, cut after ``limit`` names (COCO has 80)."""
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return "[" + ", ".join(names[:limit]) + more + "]"


def check_init_from(cfg: DictConfig) -> None:
    """A torchvision weights name must name a COCO detector built here; a PyTorch file must load and hold the
    run's network (another class count is fine: the head is carried over); any other file must at least be a
    whole Darknet ``.weights`` header."""
    if str(cfg.init_from).startswith(TORCHVISION_PREFIX):
        torchvision_weights(str(cfg.init_from)[len(TORCHVISION_PREFIX):])
        return
    path = Path(cfg.init_from)
    if not path.is_file():
        raise FileNotFoundError(f"init_from={path}: no such file")
    if path.stat().st_size and not is_torch_file(path):
        read_darknet_header(path)
        return
    checkpoint = read_checkpoint(path, "init_from")
    if "state_dict" not in checkpoint:  # a plain state dict: only loading it tells how much matches
        return
    differences = network_differences(checkpoint, cfg, compare_classes=False)
    if differences and not cfg.get("init_partial"):
        raise CheckpointError(
            f"init_from={path}: this checkpoint is {describe(checkpoint)}; the run builds {differences}, so few of "
            "its tensors would fit. Pick the matching model settings, or set init_partial=true to load the "
            "tensors that fit anyway"
        )


def describe(checkpoint: dict[str, Any]) -> str:
    """E.g. ``"a YOLOv3 (variant tiny, width 0.5, depth 1.0) for 2 classes"``."""
    settings = checkpoint.get("hyper_parameters", {})
    name = str(checkpoint.get("detector_class", "a model")).rsplit(".", 1)[-1]
    shown = ", ".join(f"{key} {settings[key]}" for key in NETWORK_SETTINGS if key in settings)
    classes = settings.get("num_classes")
    return f"a {name}" + (f" ({shown})" if shown else "") + (f" for {classes} classes" if classes else "")


def network_differences(checkpoint: dict[str, Any], cfg: DictConfig, compare_classes: bool = True) -> str:
    """How the network ``cfg`` builds differs from the checkpoint's ("" when it does not), e.g. ``"width 0.25"``."""
    stored = checkpoint.get("detector_class")
    model = OmegaConf.to_container(cfg.model, resolve=True) if cfg.get("model") else {}
    if stored and model.get("_target_") and get_class(stored) is not get_class(model["_target_"]):
        return f"a {model['_target_'].rsplit('.', 1)[-1]}"
    settings = checkpoint.get("hyper_parameters", {})
    differences = [f"{key} {model[key]}" for key in NETWORK_SETTINGS
                   if key in settings and key in model and settings[key] != model[key]]
    classes = cfg.get("data", {}).get("classes")
    names, count = settings.get("class_names"), settings.get("num_classes")
    if compare_classes and classes is not None and (list(classes) != names if names else len(classes) != count):
        differences.append(f"{len(classes)} classes {list(classes)} (the checkpoint's: {names or count})")
    return ", ".join(differences)
