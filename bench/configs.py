"""The configs the benchmarks measure, composed from ``conf/`` as ``train.py`` composes them.

A bare ``OmegaConf.load`` of a model file misses its defaults list: ``yolov3_tiny`` starts from ``yolov3`` and
every model selects its data pipeline, so only a composed config holds the whole model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """``conf/train.yaml`` composed with ``overrides``, as ``python train.py <overrides>`` composes it."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def model_config(name: str, tuned: bool = False) -> DictConfig:
    """The whole config of ``model=<name>``: with its sample-data tuning (``conf/tuned/sample_<name>.yaml``) when
    ``tuned``, else as on a user's own data (``data=voc``, which no tuning file names)."""
    return compose_config([f"model={name}", "data=sample" if tuned else "data=voc"])
