"""``data.batch_size=auto``: the config check takes it, a CPU run keeps the data config's default and says so, and
on CUDA the number Lightning's batch-size finder returns is what the run and its nominal-batch rule use."""

from __future__ import annotations

import logging

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from runs import REPO

from lightning_det.checks.config import ConfigValueError, check_config
from lightning_det.tools import train as train_tool
from lightning_det.tools.batch_size import DEFAULT_BATCH_SIZE, largest_batch_size

TINY_MODEL = ["model=yolov3_tiny", "model.width=0.25", "data.img_size=64", "data.loader.num_workers=0",
              "data.sampler.min_steps_per_epoch=0", "data.loader.persistent_workers=false"]


def test_the_fallback_is_the_data_configs_default():
    assert OmegaConf.load(REPO / "conf" / "data" / "base.yaml").batch_size == DEFAULT_BATCH_SIZE


def test_the_config_check_takes_auto_and_still_refuses_other_words(cfg_train):
    check_config(cfg_train("data.batch_size=auto"))
    with pytest.raises(ConfigValueError, match="data.batch_size='big' must be an integer"):
        check_config(cfg_train("data.batch_size=big"))


def test_on_a_cpu_auto_is_the_default_with_one_log_line(cfg_train, caplog):
    cfg = cfg_train("data.batch_size=auto", "trainer.accelerator=cpu")
    with caplog.at_level(logging.INFO, logger="lightning_det"):
        train_tool.resolve_batch_size(cfg)
    assert cfg.data.batch_size == DEFAULT_BATCH_SIZE == 8
    lines = [r.getMessage() for r in caplog.records if "data.batch_size=auto" in r.getMessage()]
    assert lines == ["data.batch_size=auto: no CUDA device to search on, so the data config's default is kept: 8"]


def test_a_number_is_left_alone(cfg_train, monkeypatch):
    monkeypatch.setattr(train_tool, "searches_on_cuda", lambda trainer_cfg: True)
    cfg = cfg_train("data.batch_size=3")
    train_tool.resolve_batch_size(cfg)
    assert cfg.data.batch_size == 3


def test_on_cuda_the_found_size_feeds_the_nominal_batch(cfg_train, tiny_voc, monkeypatch, caplog):
    """The search (Lightning's, replaced here: no GPU) gets the run's model and data, built on a copy of the config;
    the number it returns is the run's, and the gradient accumulation of ``nominal_batch_size`` divides by it."""
    _, data = tiny_voc
    searched = {}

    def search(model, datamodule, trainer_cfg):
        searched.update(classes=list(datamodule.classes), model=type(model).__name__, start=datamodule.batch_size)
        return 12

    monkeypatch.setattr(train_tool, "searches_on_cuda", lambda trainer_cfg: True)
    monkeypatch.setattr(train_tool, "largest_batch_size", search)
    cfg = cfg_train(*data, *TINY_MODEL, "data.batch_size=auto", "nominal_batch_size=24")
    with caplog.at_level(logging.INFO, logger="lightning_det"):
        train_tool.resolve_batch_size(cfg)
        train_tool.apply_nominal_batch_size(cfg)
    assert searched == {"classes": ["cat", "dog"], "model": "YOLOv3", "start": DEFAULT_BATCH_SIZE}
    assert cfg.data.batch_size == 12 and cfg.trainer.accumulate_grad_batches == 2
    assert "data.batch_size=auto: 12 images per batch fit on one GPU" in caplog.text


def test_several_devices_are_refused(cfg_train, monkeypatch):
    monkeypatch.setattr(train_tool, "searches_on_cuda", lambda trainer_cfg: True)
    with pytest.raises(ValueError, match="find it with trainer.devices=1"):
        train_tool.resolve_batch_size(cfg_train("data.batch_size=auto", "trainer.devices=2"))


def test_lightnings_finder_runs_on_the_models_training_steps(cfg_train, tiny_voc, one_torch_thread):
    """The finder itself, on a CPU (where nothing runs out of memory): it trains from the default batch and stops
    there, as that already covers the four training images."""
    _, data = tiny_voc
    cfg = cfg_train(*data, *TINY_MODEL, "data.batch_size=2")
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = train_tool.build_model(cfg, num_classes=2, class_names=["cat", "dog"], records=datamodule.records["train"],
                                   img_size=64)
    found = largest_batch_size(model, datamodule, OmegaConf.create({"accelerator": "cpu", "precision": "32-true"}))
    assert isinstance(found, int) and 4 <= found <= DEFAULT_BATCH_SIZE, found  # 7: 8 less the finder's 5 % margin
