"""ImageNet weights for the backbones, from a torchvision-format state dict file or a torchvision weights name.

torchvision names its tensors after its own modules (``features.0.weight``, ``layer1.0.conv1.weight``); each
backbone here says which torchvision tensor each of its tensors takes (a ``Mapping``), and ``load_mapped`` copies
those whose shapes match and reports the rest. A weights name (``IMAGENET1K_V1``, ``DEFAULT`` or the full
``VGG16_Weights.IMAGENET1K_V1``) is read from torch.hub's cache, or downloaded by torchvision when it can be.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn
from torchvision.models import get_model_weights, get_weight
from torchvision.models._api import WeightsEnum

from lightning_det.models.transfer import TransferReport

log = logging.getLogger(__name__)

# torchvision's weight enums are `<Network>_Weights` with upper-case members; file paths do not look like that.
WEIGHTS_NAME = re.compile(r"^(\w+_Weights\.)?[A-Z][A-Z0-9_]*$")


@dataclass
class Mapping:
    """``names``: our tensor name -> the torchvision tensor it takes; ``convert`` (by our name): how that tensor
    is reshaped first (fully connected layers turned into convolutions)."""

    names: dict[str, str]
    convert: dict[str, Callable[[Tensor], Tensor]] = field(default_factory=dict)


def check_published_width(width: float, backbone_weights: str | None) -> None:
    """ImageNet weights fit the published network only: refuse them for a narrowed one, naming the fix."""
    if backbone_weights is not None and width != 1.0:
        raise ValueError(f"backbone_weights: ImageNet weights fit the published network only, but width={width}; "
                         "set model.width=1.0 or drop backbone_weights")


def renamed(module: nn.Module, prefixes: dict[str, str]) -> Mapping:
    """Each tensor of ``module`` whose name starts with a key of ``prefixes`` takes the torchvision tensor with
    that prefix replaced by the value (``{"backbone.body.": "features."}``)."""
    names = {}
    for name in module.state_dict():
        for ours, theirs in prefixes.items():
            if name.startswith(ours):
                names[name] = theirs + name[len(ours) :]
    return Mapping(names)


def by_module_names(module: nn.Module, module_names: dict[str, str]) -> Mapping:
    """Each tensor of ``module`` takes the same-named tensor of the torchvision module ``module_names`` gives for
    its own module (for backbones that regroup torchvision's modules)."""
    names = {}
    for name in module.state_dict():
        owner, _, leaf = name.rpartition(".")
        if owner in module_names:
            names[name] = f"{module_names[owner]}.{leaf}"
    return Mapping(names)


def load_torchvision_weights(
    module: nn.Module, weights: str | Path, architecture: str, mapping: Mapping
) -> TransferReport:
    """Load ``weights`` (a file or a weights name of the torchvision network ``architecture``, e.g. ``"vgg16"``)
    into ``module`` through ``mapping``."""
    state, source = torchvision_state_dict(weights, architecture)
    report = load_mapped(module, state, mapping, source)
    if not report.loaded:
        raise ValueError(
            f"backbone_weights: no tensor of {source} fits this backbone: give a torchvision {architecture} state "
            f"dict (torchvision.models.{architecture}().state_dict() layout)"
        )
    return report


def load_mapped(module: nn.Module, state: dict[str, Tensor], mapping: Mapping, source: str) -> TransferReport:
    """Copy into ``module`` every mapped tensor of ``state`` whose (converted) shape matches and whose values are
    finite (torchvision's ``VGG16_Weights.IMAGENET1K_FEATURES`` has no valid classifier); log what was left."""
    target = module.state_dict()
    report = TransferReport()
    not_finite, chosen = [], {}
    for ours, theirs in mapping.names.items():
        if theirs not in state:
            report.missing.append(ours)
            continue
        tensor = mapping.convert.get(ours, lambda t: t)(state[theirs])
        if tensor.shape != target[ours].shape:
            report.skipped_shape.append(ours)
        elif not torch.isfinite(tensor).all():
            not_finite.append(ours)
        else:
            chosen[ours] = tensor
            report.loaded.append(ours)
    used = set(mapping.names.values())
    # batch counters have no use in frozen batch norm; anything else the file holds is worth naming
    report.unexpected = [k for k in state if k not in used and not k.endswith(".num_batches_tracked")]
    report.missing += [name for name in target if name not in mapping.names]
    module.load_state_dict(chosen, strict=False)
    log.info("backbone_weights %s:\n%s", source, report.summary())
    if report.skipped_shape or not_finite:
        log.warning(
            "backbone_weights %s: %d tensors of another shape and %d with non-finite values were not loaded: %s",
            source, len(report.skipped_shape), len(not_finite), ", ".join([*report.skipped_shape, *not_finite][:8]),
        )
    return report


def torchvision_state_dict(weights: str | Path, architecture: str) -> tuple[dict[str, Tensor], str]:
    """The state dict ``weights`` names (a file, else a torchvision weights name of ``architecture``) and a
    description of where it came from."""
    path = Path(weights).expanduser()
    if path.is_file():
        return read_state_dict_file(path), str(path)
    if WEIGHTS_NAME.match(str(weights)):
        resolved = resolve_weights(str(weights), architecture)
        return cached_or_downloaded(resolved), str(resolved)
    raise FileNotFoundError(
        f"backbone_weights: no file at {path}. Give a torchvision-format state dict of {architecture} (what "
        f"torch.save(torchvision.models.{architecture}().state_dict()) writes) or a torchvision weights name "
        "such as IMAGENET1K_V1 or DEFAULT"
    )


def resolve_weights(name: str, architecture: str) -> WeightsEnum:
    """``IMAGENET1K_V1`` / ``DEFAULT`` / ``VGG16_Weights.IMAGENET1K_V1`` -> torchvision's enum member for
    ``architecture``; a name of another network's weights is an error."""
    enum = get_model_weights(architecture)
    available = ", ".join(["DEFAULT", *(member.name for member in enum)])
    try:
        weights = get_weight(name if "." in name else f"{enum.__name__}.{name}")
    except (KeyError, ValueError) as error:
        raise ValueError(f"backbone_weights={name}: not a torchvision weights name of {architecture}; "
                         f"use one of {available} (of {enum.__name__})") from error
    if not isinstance(weights, enum):
        raise ValueError(f"backbone_weights={name}: those weights are for another network; this backbone is "
                         f"{architecture}: use one of {available} (of {enum.__name__})")
    return weights


def cached_file(weights: WeightsEnum) -> Path:
    """Where torchvision's own download puts ``weights``: ``<torch.hub.get_dir()>/checkpoints/<file of the url>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def cached_or_downloaded(weights: WeightsEnum, key: str = "model.backbone_weights") -> dict[str, Tensor]:
    """``weights`` from torch.hub's cache, else through torchvision's download; no network -> one clear error
    naming the setting ``key`` that asked for them."""
    cached = cached_file(weights)
    if cached.is_file():
        return read_state_dict_file(cached, key)
    try:
        return weights.get_state_dict(progress=False)
    except OSError as error:  # URLError, HTTP errors, timeouts, an unwritable cache
        raise FileNotFoundError(
            f"{key}={weights}: {cached.name} is not in torch's cache and could not be downloaded ({error}). Fetch "
            f"{weights.url} where there is internet access and copy it to {cached} (the cache under TORCH_HOME), "
            f"or pass the file itself: {key}=/path/to/{cached.name}"
        ) from error


def read_state_dict_file(path: Path, key: str = "model.backbone_weights") -> dict[str, Tensor]:
    """A plain state dict of tensors, loaded without executing code; errors name the setting ``key``."""
    try:
        state: Any = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as error:
        raise ValueError(f"{key}: cannot read {path} as a PyTorch file, it is truncated or damaged ({error}); "
                         "copy it again") from error
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            f"{key}: {path} is not a torchvision-format state dict (the file "
            "torch.save(model.state_dict()) writes); a checkpoint of a detector goes to init_from instead"
        )
    return state


def forget_weights_file(checkpoint: dict[str, Any], **recorded: Any) -> None:
    """A checkpoint holds the trained backbone already: record ``backbone_weights=None`` (and the layout the
    weights chose, ``recorded``) so rebuilding the detector from it never needs the ImageNet file again."""
    if "hyper_parameters" in checkpoint:
        checkpoint["hyper_parameters"] = {**checkpoint["hyper_parameters"], "backbone_weights": None, **recorded}


#: The input normalisation of torchvision's ImageNet weights, in pixel units: ``(pixel - mean) / std``.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def pretrained_normalisation(weights: str | None, detector_arguments: dict[str, Any]) -> dict[str, Any]:
    """The base detector's arguments with ImageNet's mean/std when backbone ``weights`` are loaded and no
    normalisation is configured: a pretrained backbone brings the normalisation it was trained with."""
    if weights is None or detector_arguments.get("pixel_mean") is not None:
        return detector_arguments
    return {**detector_arguments, "pixel_mean": IMAGENET_MEAN, "pixel_std": IMAGENET_STD}
