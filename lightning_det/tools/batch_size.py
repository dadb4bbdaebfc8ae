"""``data.batch_size=auto``: the largest training batch that fits one GPU, found before the run is built.

On CUDA, Lightning's batch-size finder (``Tuner.scale_batch_size``, binary search after doubling, 5 % margin) runs
a few training steps per size on a throwaway copy of the model and data; the number it finds becomes
``data.batch_size`` before anything else reads it, so the nominal-batch rule (gradient accumulation and weight
decay, ``tools/train.py``), ``config_resolved.yaml`` and the checkpoint all see the number. Where no search runs (a
CPU, where a larger batch is no faster per image), ``auto`` is the data config's default, ``DEFAULT_BATCH_SIZE``.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
from lightning.pytorch.tuner import Tuner
from omegaconf import DictConfig

log = logging.getLogger(__name__)

AUTO = "auto"
#: ``auto`` where no search runs: ``conf/data/base.yaml``'s ``batch_size`` (a test holds them equal).
DEFAULT_BATCH_SIZE = 8


def searches_on_cuda(trainer_cfg: DictConfig) -> bool:
    """Whether the run trains on a CUDA device, where memory bounds the batch."""
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def keep_default(data_cfg: DictConfig, why: str) -> None:
    """``auto`` without a search: the data config's default, said in one log line."""
    log.info("data.batch_size=auto: %s, so the data config's default is kept: %d", why, DEFAULT_BATCH_SIZE)
    data_cfg.batch_size = DEFAULT_BATCH_SIZE


def largest_batch_size(model: L.LightningModule, datamodule: L.LightningDataModule, trainer_cfg: DictConfig) -> int:
    """The largest batch of ``datamodule`` (its ``batch_size`` attribute, from ``DEFAULT_BATCH_SIZE`` up) with which
    training steps of ``model`` run on one device of ``trainer_cfg``'s accelerator, at its precision. The model's
    weights are restored afterwards (Lightning keeps them in a temporary checkpoint)."""
    trainer = L.Trainer(accelerator=trainer_cfg.get("accelerator", "auto"), devices=1,
                        precision=trainer_cfg.get("precision"), logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, max_epochs=1)
    datamodule.batch_size = DEFAULT_BATCH_SIZE
    found = Tuner(trainer).scale_batch_size(model, datamodule=datamodule, mode="binsearch",
                                            init_val=DEFAULT_BATCH_SIZE)
    if not found:
        raise RuntimeError("data.batch_size=auto: Lightning's batch-size finder found no batch size that trains; set "
                           "data.batch_size=<images per batch>")
    return int(found)
