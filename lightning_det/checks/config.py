"""Type checks of a composed config, before anything is built.

Hydra passes a mistyped override through as a string (``data.reading.skip_invalid=flase`` arrives as ``"flase"``, which
Python reads as true), so every value of a ``_target_`` node is checked against the type hint of the parameter it
fills, and strings against the ``choices`` its class declares. The message names the key, the value and what is
allowed.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import sys
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightning_det.data import DetectionDataModule
from lightning_det.models import SSD, FasterRCNN, YOLOv3

SCALARS = (bool, int, float, str)

#: Top-level keys of ``conf/train.yaml`` and the entry points' configs, with their types (None: may be null).
TOP_LEVEL: dict[str, tuple[type, ...]] = {
    "seed": (int,),
    "monitor": (str,),
    "ckpt_path": (str, type(None)),
    "init_from": (str, type(None)),
    "init_cutoff": (int, type(None)),
    "init_partial": (bool,),
    "init_classes": (("=", "auto"), ("=", "by_name")),
    "nominal_batch_size": (int, type(None)),
    "score_thresh": (float,),
    "batch_size": (int,),
    "device": (str,),
    "img_size": (int, type(None)),
    "dynamic_batch": (bool,),
    "opset": (int,),
    "video": (bool,),
    "fps": (float,),
}


#: Numbers with a lower bound, by key: ``(lowest allowed, the valid range as the message says it)``. Checked after
#: the types, before anything is built: torch would refuse some only later and without the key, and accept others.
RANGES: dict[str, tuple[float, str]] = {
    "data.batch_size": (1, ">= 1 (images per batch on each device)"),
    "optimizer.lr": (0, ">= 0"),
    "trainer.max_epochs": (-1, ">= 1, 0 to validate the model as built without training, or -1 for no limit"),
}


class ConfigValueError(ValueError):
    """A config value of the wrong type, outside its choices or outside its range."""


#: Settings that moved within or out of the data config: the model normalises its own input, the multi-image
#: augmentations are one ``mix`` node, the DataModule's settings are grouped by subject
#: (``DetectionDataModule.renamed``), and the run's length weakens more than the zoom.
MOVED_FROM_DATA = {
    **{f"data.{transform}.{statistic}": f"model.pixel_{statistic}"
       for transform in ("train_transform", "val_transform") for statistic in ("mean", "std")},
    "data.train_transform.mosaic": "data.pipeline.train_transform.mix.mosaic",
    **{f"data.{old}": f"data.{new}" for old, new in DetectionDataModule.renamed.items()},
    "data.pipeline.full_zoom_passes": "data.pipeline.full_augment_passes",
}


def renamed_settings() -> dict[str, list[tuple[str, str]]]:
    """Every renamed setting: ``old path -> [(family, new path)]`` (family empty where it is the same for all)."""
    table: dict[str, list[tuple[str, str]]] = {old: [("", new)] for old, new in MOVED_FROM_DATA.items()}
    for family in (YOLOv3, SSD, FasterRCNN):
        for old, new in family.renamed.items():
            table.setdefault(f"model.{old}", []).append((family.__name__, f"model.{new}"))
    return table


def renamed_message(key: str, moves: list[tuple[str, str]]) -> str:
    if len({new for _, new in moves}) == 1:
        return f"{key} was renamed: use {moves[0][1]}"
    return f"{key} was renamed: " + "; ".join(f"{family} uses {new}" for family, new in moves)


def check_renamed_overrides(overrides: list[str]) -> None:
    """Refuse command-line overrides of renamed settings, naming the new key. Hydra would refuse them first,
    but only with "Key 'conf_thresh' is not in struct", which does not say where the setting went."""
    table = renamed_settings()
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        parts = key.split(".")
        for end in range(len(parts), 1, -1):  # the key, or a node above it that moved (data.train_transform.flip)
            moved = ".".join(parts[:end])
            below_itself = end < len(parts) and all(new.startswith(f"{moved}.") for _, new in table.get(moved, []))
            if moved in table and not below_itself:  # data.sampler.kind is today's key under an old one's name
                raise ConfigValueError(f"{override}: {renamed_message(moved, table[moved])}")


#: The Hydra config folder of the entry points (train.py, the tools).
CONF = Path(__file__).resolve().parents[2] / "conf"


def search_path(overrides: list[str], conf: Path = CONF) -> list[Path] | None:
    """The config folders Hydra reads: ``conf`` and the ``file://`` folders of a ``hydra.searchpath`` override; None
    when that override names a package (``pkg://``), whose options a folder listing cannot see."""
    folders = [conf]
    for override in overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+") == "hydra.searchpath":
            entries = [entry.strip() for entry in value.strip("[]").split(",") if entry.strip()]
            if any(not entry.startswith("file://") for entry in entries):
                return None
            folders += [Path(entry.removeprefix("file://")) for entry in entries]
    return folders


def check_group_options(overrides: list[str], conf: Path = CONF) -> None:
    """Refuse a config group option that does not exist (``model=yolo3``), suggesting the closest by name. Hydra
    would refuse it too, but inside a traceback listing every option."""
    folders = search_path(overrides, conf)
    if folders is None:
        return
    for override in overrides:
        key, _, value = override.partition("=")
        group = key.lstrip("+~")
        places = [folder / group for folder in folders if (folder / group).is_dir()]
        if not value or not places or value.startswith(("[", "{", "null")):
            continue
        options = sorted({path.stem for place in places for path in place.glob("*.yaml")})
        for option in value.split(","):  # a multirun sweep names several
            if option not in options:
                closest = difflib.get_close_matches(option, options, n=1, cutoff=0.5)
                hint = f"did you mean {group}={closest[0]}? " if closest else ""
                where = ", ".join(str(folder) for folder in folders)
                raise ConfigValueError(f"{override}: there is no {group} '{option}' ({group}/{option}.yaml under "
                                       f"{where}); {hint}The options: {', '.join(options)}")


def refuse_renamed_overrides(argv: list[str]) -> None:
    """``check_renamed_overrides`` and ``check_group_options`` for an entry point's ``sys.argv``: one line and exit
    status 2 (a usage error, as Hydra's own), no traceback."""
    try:
        check_renamed_overrides(argv)
        check_group_options(argv)
    except ConfigValueError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def check_renamed(cfg: DictConfig) -> None:
    """Refuse a composed config (a user's own yaml, an experiment file) holding a renamed setting."""
    for old, new in MOVED_FROM_DATA.items():
        if _holds_value(cfg, old) if new.startswith(f"{old}.") else OmegaConf.select(cfg, old, default=None) is not None:
            raise ConfigValueError(f"{renamed_message(old, [('', new)])} (in the composed config)")
    model = cfg.get("model")
    if not OmegaConf.is_dict(model) or "_target_" not in model:
        return
    try:
        renamed = getattr(get_object(model._target_), "renamed", {})
    except Exception:  # noqa: BLE001 - an unimportable target is reported by check_config
        return
    for old, new in renamed.items():
        if _holds_value(model, old):
            raise ConfigValueError(f"{renamed_message(f'model.{old}', [('', f'model.{new}')])} "
                                   "(in the composed config)")


def _holds_value(cfg: DictConfig, path: str) -> bool:
    """Whether the dotted ``path`` is set in ``cfg`` to a value, not to a node of its own: an old ``sampler:
    repeat_factor`` in a data config is refused, today's ``sampler`` node is not."""
    *parents, key = path.split(".")
    node = OmegaConf.select(cfg, ".".join(parents), default=None) if parents else cfg
    return OmegaConf.is_dict(node) and key in node and not OmegaConf.is_dict(node._get_node(key))


# Values of a library's argument that the framework turns into one the library takes before it builds the object.
RESOLVED_HERE: dict[tuple[str, str], tuple[str, ...]] = {
    ("lightning.pytorch.Trainer", "precision"): ("auto",),  # tools/precision.py
}
# The same by the key's place in the config, whatever the node's class.
RESOLVED_AT: dict[str, tuple[str, ...]] = {
    "data.batch_size": ("auto",),  # tools/batch_size.py
}


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigValueError` for the first mistyped value of ``cfg``."""
    check_renamed(cfg)
    for key, types_allowed in TOP_LEVEL.items():
        if key in cfg:
            check_value(key, _value(cfg, key), types_allowed)
    for path, node in _target_nodes(cfg, ""):
        target = node.get("_target_")
        try:
            built = _import(target)
            hints = _parameter_hints(built)
        except Exception:  # noqa: BLE001 - any import failure means the name is wrong
            raise ConfigValueError(
                f"{path}._target_={target!r} cannot be imported; check the spelling, or pick a config group "
                "option (e.g. optimizer=sgd)"
            ) from None
        for key in node:
            if key.startswith("_") or key not in hints or OmegaConf.is_interpolation(node, key):
                continue  # an interpolated value is checked where it is set
            value = _value(node, key)
            if value is _UNRESOLVED or value in (*RESOLVED_HERE.get((target, key), ()),
                                                 *RESOLVED_AT.get(f"{path}.{key}", ())):
                continue
            allowed = _scalar_types(hints[key])
            if allowed is not None:
                check_value(f"{path}.{key}", value, allowed)
            options = getattr(built, "choices", {}).get(key)
            if options and value not in options:
                raise ConfigValueError(f"{path}.{key}={value!r} is not one of {list(options)}")
    check_ranges(cfg)
    check_input_size(cfg)


def check_ranges(cfg: DictConfig) -> None:
    """Each number of ``RANGES`` within its range (values of another type were refused by their type check)."""
    for key, (lowest, valid) in RANGES.items():
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        if _is_instance(value, float) and value < lowest:
            raise ConfigValueError(f"{key}={value} must be {valid}")


def check_input_size(cfg: DictConfig) -> None:
    """``data.img_size`` a positive multiple of the model's ``input_multiple``: YOLO's grids of stride 32 cover
    only 96 px of a 100 px input, silently."""
    size = OmegaConf.select(cfg, "data.img_size", default=None, throw_on_resolution_failure=False)
    target = OmegaConf.select(cfg, "model._target_", default=None, throw_on_resolution_failure=False)
    if not _is_instance(size, int) or not isinstance(target, str):
        return
    model = _import(target)  # importable: the type checks refused it otherwise
    multiple = getattr(model, "input_multiple", 1)
    if size >= multiple and size % multiple == 0:
        return
    if multiple == 1:
        raise ConfigValueError(f"data.img_size={size} must be >= 1 (pixels), or auto")
    below = size // multiple * multiple
    nearest = [side for side in (below, below + multiple) if side >= multiple] or [multiple]
    raise ConfigValueError(f"data.img_size={size} must be a positive multiple of {multiple} for {model.__name__} "
                           f"(its coarsest stride), e.g. {' or '.join(map(str, nearest))}, or auto")


def check_value(key: str, value: Any, allowed: tuple[Any, ...]) -> None:
    """``value`` must be an instance of one of ``allowed``: types, or Literal values given as ``("=", value)``."""
    if any(_is_instance(value, kind) for kind in allowed):
        return
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    expected = list(dict.fromkeys(repr(kind[1]) if isinstance(kind, tuple) else names[kind] for kind in allowed))
    shown = "null" if value is None else repr(value)
    raise ConfigValueError(f"{key}={shown} must be {' or '.join(expected)}")


def _is_instance(value: Any, kind: Any) -> bool:
    """``isinstance`` as a config reads it: true/false are not numbers, and an integer is a valid float."""
    if isinstance(kind, tuple):
        return type(value) is type(kind[1]) and value == kind[1]
    if isinstance(value, bool) or kind is bool:
        return isinstance(value, bool) and kind is bool
    return isinstance(value, (int, float)) if kind is float else isinstance(value, kind)


_UNRESOLVED = object()


def _value(node: DictConfig, key: str) -> Any:
    """The resolved value (a container as plain data), or ``_UNRESOLVED`` for an interpolation that resolves only
    inside a Hydra run."""
    try:
        value = node[key]
        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except OmegaConfBaseException:
        return _UNRESOLVED
    return value


def _target_nodes(node: Any, path: str) -> Iterator[tuple[str, DictConfig]]:
    """Every ``_target_`` node below ``node`` with its dotted path (the ``hydra`` node is Hydra's own)."""
    if isinstance(node, DictConfig):
        if "_target_" in node and isinstance(node.get("_target_"), str):
            yield path, node
        for key in node:
            if key != "hydra" and not OmegaConf.is_missing(node, key):
                yield from _target_nodes(node._get_node(key), f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        for index, item in enumerate(node):
            yield from _target_nodes(item, f"{path}[{index}]")


def _import(target: str) -> Any:
    """The object ``target`` names; Hydra's own error log is silenced, the caller reports the failure."""
    hydra_log = logging.getLogger("hydra.utils")
    level = hydra_log.level
    hydra_log.setLevel(logging.CRITICAL)
    try:
        return get_object(target)
    finally:
        hydra_log.setLevel(level)


def _parameter_hints(target: Callable[..., Any]) -> dict[str, Any]:
    """Type hints of the parameters ``target`` is called with (a class: its ``__init__``)."""
    function = target.__init__ if inspect.isclass(target) else target
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # noqa: BLE001 - hints that do not evaluate are not checked
        return {}
    parameters = inspect.signature(target).parameters
    return {name: hint for name, hint in hints.items() if name in parameters}


def _scalar_types(hint: Any) -> tuple[Any, ...] | None:
    """The scalar types (and Literal values) a hint allows, or None when it allows anything else too."""
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    allowed: list[Any] = []
    for member in members:
        if member is type(None) or member in SCALARS:
            allowed.append(member)
        elif member is torch.Tensor:  # torch.optim's ``lr: float | Tensor``: from a config, a number
            allowed.append(float)
        elif typing.get_origin(member) is Literal:
            allowed += [("=", v) for v in typing.get_args(member)]
        else:
            return None
    return tuple(allowed)
