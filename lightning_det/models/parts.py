"""A detector's swappable parts (assigner, loss, decoder, prior box layout ...) built from plain config dicts.

A part reaches its module as ``{"_target_": "<import path>", <settings>}`` (or without ``_target_``: the
family's own class), so a checkpoint's hyper-parameters stay plain data that load with ``weights_only=True``,
and swapping a part is a command-line override: ``model.loss._target_=my_project.FocalMultiBoxLoss``. The
defaults live once, in the part's own signature; the configs repeat them only to document them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from hydra.utils import get_object
from torch import Tensor

#: A part's config: ``None`` (the default part with its defaults) or a mapping of its settings.
PartConfig = Mapping[str, Any] | None


def build_part(config: PartConfig, default: Callable[..., Any], **context: Any) -> Any:
    """``config["_target_"]`` (or ``default``) called with the config's settings and ``context``: the values
    only the module knows, such as the class count."""
    settings = dict(config or {})
    target = settings.pop("_target_", None)
    factory = get_object(target) if target else default
    return factory(**settings, **context)


class Loss(Protocol):
    """The ``loss`` part of every family: called once a step with the network's outputs and their targets, it
    returns the named terms the base logs, the total under ``"loss"``."""

    def __call__(self, *outputs_and_targets: Any) -> dict[str, Tensor]: ...
