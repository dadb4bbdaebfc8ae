"""Every config option composes and builds, and the composition rules hold (overrides win, tuning stays local)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lightning_det.tools.train import apply_nominal_batch_size, build_callbacks, build_loggers, build_model

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiments_compose(cfg_train, experiment):
    cfg = cfg_train(f"experiment={experiment}")
    OmegaConf.resolve(cfg)
    # square pipelines give the input size (or auto: chosen from the data, a multiple of 32); shorter-side resizing
    # (Faster R-CNN) pads batches to a multiple of 32 (SSD excepted: its 300 / 512 inputs are fixed by its default
    # boxes, not by a stride)
    if "img_size" in cfg.data:
        size = cfg.data.img_size
        assert size == "auto" or size % 32 == 0 or "ssd" in cfg.model._target_
    else:
        assert cfg.data.pipeline.size_divisor == 32


@pytest.mark.parametrize("model", options("model"))
@pytest.mark.parametrize("metric", options("metric"))
def test_models_build_with_every_metric(cfg_train, model, metric):
    narrow = ["model.width=0.125"] if "width" in cfg_train(f"model={model}").model else []
    cfg = cfg_train(f"model={model}", f"metric={metric}", *narrow)
    detector = build_model(cfg, num_classes=3, class_names=["a", "b", "c"])
    size = (2, 3, 320, 320) if model.startswith("ssd") else (1, 3, 64, 64)  # SSD's extra layers need ~300 px
    outputs = detector(torch.zeros(size))
    assert detector.val_metric is not None and outputs is not None


@pytest.mark.parametrize("optimizer", options("optimizer"))
@pytest.mark.parametrize("scheduler", options("scheduler"))
def test_optimizers_and_schedulers_build(cfg_train, optimizer, scheduler):
    cfg = cfg_train(f"optimizer={optimizer}", f"scheduler={scheduler}")
    params = [torch.nn.Parameter(torch.zeros(2, 2))]
    built = instantiate(cfg.optimizer)([{"params": params}])
    schedule = instantiate(cfg.scheduler)(built, total_steps=100, steps_per_epoch=10)
    if isinstance(schedule, list):  # plateau: Lightning's config, checked after validation on the monitor
        *burn_in, reduce = schedule  # a per-step burn-in first when warm-up is configured (the sample tuning)
        assert reduce["monitor"] == cfg.monitor and reduce["interval"] == "epoch"
        warmup_start = burn_in[0]["scheduler"].schedule.warmup(0) if burn_in else 1.0
        assert built.param_groups[0]["lr"] == pytest.approx(cfg.optimizer.lr * warmup_start)
    else:
        assert built.param_groups[0]["lr"] == pytest.approx(cfg.optimizer.lr * schedule.lr_lambdas[0](0))


@pytest.mark.parametrize("trainer", options("trainer"))
def test_trainers_callbacks_and_loggers_build(tmp_path, cfg_train, trainer):
    cfg = cfg_train(f"trainer={trainer}", "trainer.accelerator=cpu", "logger=many", f"paths.output_dir={tmp_path}")
    callbacks, loggers = build_callbacks(cfg), build_loggers(cfg)
    assert {type(c).__name__ for c in callbacks} >= {"RunCheckpoint", "InterruptCheckpoint", "BudgetedEarlyStopping",
                                                      "ModelEMA", "LearningRateMonitor"}
    assert {type(lg).__name__ for lg in loggers} == {"TensorBoardLogger", "CSVLogger"}
    assert str(tmp_path) in cfg.paths.output_dir


def test_sample_tuning_applies_only_to_the_sample_pair(cfg_train):
    tuned = cfg_train()
    assert tuned.trainer.max_time == "00:00:09:00"
    plain = cfg_train("data=voc")
    assert plain.trainer.max_epochs == 100 and "max_time" not in plain.trainer
    assert plain.data.img_size == "auto" and plain.model.width == 0.5  # the general rules, as on the sample
    darknet = cfg_train("data=voc", "model=yolov3_tiny")
    assert darknet.model.width == 1.0 and darknet.data.img_size == "auto"
    overridden = cfg_train("model.width=0.25", "data.img_size=128")
    assert overridden.model.width == 0.25 and overridden.data.img_size == 128


def test_the_defaults_average_the_weights_and_stop_early_only_without_a_budget(cfg_train):
    cfg = cfg_train()
    names = {type(c).__name__ for c in build_callbacks(cfg)}
    assert {"ModelEMA", "RunCheckpoint", "BudgetedEarlyStopping"} <= names
    off = cfg_train("~callbacks.ema")
    assert "ModelEMA" not in {type(c).__name__ for c in build_callbacks(off)}


def test_freeze_callback_composes_and_freezes_the_backbone(cfg_train):
    cfg = cfg_train("callbacks=[default,freeze]", "model.width=0.125")
    freeze = next(c for c in build_callbacks(cfg) if type(c).__name__ == "Freeze")
    detector = build_model(cfg, num_classes=2, class_names=["a", "b"])
    frozen = {id(p) for m in freeze.frozen_modules(detector) for p in m.parameters(recurse=False)}
    backbone = {id(p) for p in detector.network.backbone.parameters()}
    assert frozen == backbone


@pytest.mark.parametrize("batch, devices, accumulate, decay_factor", [(16, 1, 4, 1.0), (24, 1, 3, 24 * 3 / 64),
                                                                      (8, 2, 4, 1.0), (100, 1, 1, 100 / 64)])
def test_nominal_batch_size_sets_accumulation_and_scales_weight_decay(cfg_train, batch, devices, accumulate,
                                                                      decay_factor):
    cfg = cfg_train("optimizer=sgd", "nominal_batch_size=64", f"data.batch_size={batch}", f"trainer.devices={devices}")
    apply_nominal_batch_size(cfg)
    assert cfg.trainer.accumulate_grad_batches == accumulate
    assert cfg.optimizer.weight_decay == pytest.approx(5e-4 * decay_factor)
