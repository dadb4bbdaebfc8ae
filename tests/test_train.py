"""End to end through the real command line: `python train.py ...` on data the tests write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_coco, make_voc
from omegaconf import OmegaConf
from runs import REPO, TINY, scalars, small_sample, train

from lightning_det.tools.precision import auto_precision


def test_sample_run_writes_config_checkpoints_and_tensorboard(tmp_path):
    done = train(tmp_path, *small_sample(tmp_path))
    run_dir = tmp_path / "run"

    resolved = OmegaConf.load(run_dir / "config_resolved.yaml")
    assert resolved.data.img_size == 128 and resolved.model.width == 0.25
    assert "${" not in (run_dir / "config_resolved.yaml").read_text()
    assert resolved.trainer.precision == auto_precision("auto", cpu_bf16=True)  # auto, recorded as what it meant

    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in checkpoints and any(name.startswith("best-epoch") for name in checkpoints)

    tags = scalars(run_dir)
    for term in ("loss", "box", "obj", "cls"):
        assert f"train/{term}_step" in tags and f"val/{term}" in tags, sorted(tags)
    assert "val/mAP" in tags and len(tags["val/mAP"]) >= 2
    assert any(tag.startswith("val_AP/") for tag in tags)
    sample_classes = {"circle", "square", "triangle", "ring", "cross", "star"}
    pr_curves = {tag.removeprefix("val_PR/") for tag in tags if tag.startswith("val_PR/")}
    assert pr_curves and pr_curves <= sample_classes
    assert any(tag.startswith("lr-") for tag in tags)
    assert "val/images" in tags and "train/first_batch" in tags
    assert "best/val/mAP" in tags  # the hparams tab's metric
    assert "val/mAP of the best checkpoint" in done.stdout + done.stderr
    for noise in ("litlogger", "LeafSpec", "not supported by the model summary", "doesn't contain any box",
                  "WeightAveraging"):  # the libraries' messages that are not the user's business (tools/quiet.py)
        assert noise not in done.stdout + done.stderr


def test_resume_continues_epochs_optimizer_and_best_score(tmp_path):
    train(tmp_path, *small_sample(tmp_path), run="first")
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    first = torch.load(last, map_location="cpu", weights_only=False)

    train(tmp_path, *small_sample(tmp_path), "trainer.max_epochs=3", f"ckpt_path={last}", run="resumed")
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)

    steps_per_epoch = first["global_step"] // 2
    assert resumed["epoch"] == 2 and resumed["global_step"] == first["global_step"] + steps_per_epoch
    assert resumed["lr_schedulers"][0]["last_epoch"] == first["lr_schedulers"][0]["last_epoch"] + steps_per_epoch
    momentum_first = first["optimizer_states"][0]["state"]
    momentum_resumed = resumed["optimizer_states"][0]["state"]
    assert momentum_first and set(momentum_first) == set(momentum_resumed)
    best_key = next(k for k in first["callbacks"] if k.startswith("ModelCheckpoint"))
    assert resumed["callbacks"][best_key]["best_model_score"] >= first["callbacks"][best_key]["best_model_score"]


def voc_folder(root: Path) -> Path:
    image = lambda *objects: (96, 128, list(objects))  # noqa: E731
    splits = {
        "2007/trainval": {
            "000001": image(("dog", (10, 12, 60, 70), False), ("cat", (70, 20, 120, 90), False)),
            "000002": image(("cat", (5, 5, 40, 50), True), ("bird", (50, 30, 100, 80), False)),
            "000003": image(("dog", (30, 30, 90, 90), False)),
            "000004": image(),
        },
        "2007/test": {
            "000005": image(("bird", (20, 20, 70, 60), False)),
            "000006": image(("dog", (40, 10, 110, 80), False), ("cat", (3, 3, 30, 30), True)),
        },
    }
    return make_voc(root, splits)


def test_voc_folder_with_inferred_classes_and_a_plateau_schedule(tmp_path):
    root = voc_folder(tmp_path / "VOCdevkit")
    done = train(
        tmp_path, "data=voc", f"data.root={root}", "data.classes=null", "data.train.splits=[2007/trainval]",
        "data.val.splits=[2007/test]", "scheduler=plateau", "scheduler.warmup_steps=2",
        "scheduler.warmup_share=null",  # 2 steps would exceed 10 % of this tiny run
    )
    assert "bird" in done.stdout + done.stderr  # the inferred class list is reported
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["hyper_parameters"]["class_names"] == ["bird", "cat", "dog"]
    burn_in, reduce = checkpoint["lr_schedulers"]
    assert burn_in["schedule"]["warmup_steps"] == 2
    assert burn_in["last_epoch"] == checkpoint["global_step"] > 0  # stepped once per iteration
    assert reduce["mode"] == "max"  # ReduceLROnPlateau stepped on val/mAP


def test_coco_folder_with_what_the_data_decides_recorded(tmp_path):
    root = tmp_path / "coco"
    categories = [(3, "car"), (7, "person")]
    images = [(1, "a.jpg", 96, 128), (2, "b.jpg", 96, 128), (3, "c.jpg", 80, 100)]
    boxes = [(1, 3, [10, 10, 40, 30], 0), (1, 7, [60, 20, 30, 60], 0), (2, 7, [5, 5, 50, 50], 1),
             (2, 3, [70, 40, 40, 40], 0), (3, 3, [20, 20, 30, 30], 0)]
    make_coco(root, categories, images, boxes, name="instances_train2017.json", image_dir="train2017")
    make_coco(root, categories, images, boxes, name="instances_val2017.json", image_dir="val2017")
    train(tmp_path, "data=coco", f"data.root={root}", "metric=coco", "logger=many", "data.img_size=auto")
    assert (tmp_path / "run" / "csv" / "hparams.yaml").is_file()  # the CSV logger beside TensorBoard
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["hyper_parameters"]["class_names"] == ["car", "person"]
    # input size and anchors resolved from the data, written as numbers where the run and its checkpoint use them
    resolved = OmegaConf.load(tmp_path / "run" / "config_resolved.yaml")
    size = resolved.data.img_size
    assert isinstance(size, int) and size == checkpoint["inference_pipeline"]["img_size"]
    anchors = checkpoint["hyper_parameters"]["anchors"]
    assert resolved.model.anchors == anchors and all(isinstance(v, (int, float)) for level in anchors for v in level)
    assert "val/AP50" in scalars(tmp_path / "run")


def test_missing_dataset_fails_with_a_clear_message(tmp_path):
    done = train(tmp_path, "data=voc", f"data.root={tmp_path / 'nowhere'}", expect_ok=False)
    assert done.returncode != 0
    assert str(tmp_path / "nowhere") in done.stderr


@pytest.mark.slow
def test_default_sample_run_learns(tmp_path):
    """The README's first command, as shipped: must reach a useful mAP on the sample data."""
    args = [sys.executable, "train.py", f"paths.data_dir={tmp_path / 'data'}", f"paths.log_dir={tmp_path / 'logs'}",
            f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-5000:]
    assert max(scalars(tmp_path / "run")["val/mAP"]) > 0.55  # issue 9: >= 0.55 through the general rules (0.669 measured)


def test_mixed_precision_accumulation_clipping_ema_and_multiscale_together(tmp_path):
    train(tmp_path, *small_sample(tmp_path), "trainer.precision=bf16-mixed", "nominal_batch_size=16",
          "trainer.gradient_clip_val=1.0", "callbacks=[default,multiscale]", "callbacks.multiscale.every_n_batches=1")
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    # 16 images in batches of 4, accumulated 4 at a time: one optimizer step per epoch
    assert checkpoint["global_step"] == 2
    assert "current_model_state" in checkpoint  # the EMA weights are the checkpoint's state_dict
    resolved = OmegaConf.load(tmp_path / "run" / "config_resolved.yaml")
    assert resolved.trainer.precision == "bf16-mixed" and resolved.trainer.accumulate_grad_batches == 4


def test_two_stage_experiment_freezes_then_continues_from_the_first_stage(tmp_path):
    done = train(
        tmp_path, *small_sample(tmp_path), "experiment=yolov3_two_stage", "model=yolov3_tiny", "model.width=0.25",
        "stages.0.trainer.max_epochs=1", "stages.1.trainer.max_epochs=1", "stages.0.data.batch_size=8",
        "stages.1.data.batch_size=4",
    )
    first = torch.load(tmp_path / "run" / "stage1" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    second = torch.load(tmp_path / "run" / "stage2" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    # Adam keeps state only for parameters that received gradients: stage 1 kept the body frozen
    assert len(first["optimizer_states"][0]["state"]) < len(second["optimizer_states"][0]["state"])
    batch_sizes = [OmegaConf.load(tmp_path / "run" / s / "config_resolved.yaml").data.batch_size
                   for s in ("stage1", "stage2")]
    assert batch_sizes == [8, 4]
    assert first["hyper_parameters"]["optimizer"]["lr"] == 1e-3 and second["hyper_parameters"]["optimizer"]["lr"] == 1e-4
    assert second["lr_schedulers"][0]["patience"] == 3
    assert f"init_from {tmp_path / 'run' / 'stage1' / 'checkpoints'}" in done.stdout + done.stderr


@pytest.mark.slow
def test_multirun_grid_writes_a_summary_table(tmp_path):
    args = [sys.executable, "train.py", "-m", *TINY, *small_sample(tmp_path), "trainer.max_epochs=1",
            "model.width=0.125,0.25", "optimizer.lr=1e-3,2e-3", f"paths.log_dir={tmp_path / 'logs'}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    lines = (tmp_path / "sweep" / "summary.md").read_text().splitlines()
    assert lines[0].startswith("| job | overrides | best val/mAP")
    rows = [line.split(" | ") for line in lines[2:]]
    assert [row[0] for row in rows] == ["| 0", "| 1", "| 2", "| 3"]
    assert {row[1] for row in rows} == {f"model.width={w} optimizer.lr={lr}"
                                        for w in ("0.125", "0.25") for lr in ("0.001", "0.002")}
    for row in rows:
        assert row[3] == "COMPLETED" and float(row[2]) >= 0.0
        assert Path(row[4].rstrip(" |")).is_file()


def test_ddp_with_two_processes_gives_the_single_process_val_map(tmp_path):
    """The untrained (seeded) model validated on 7 images (some empty, different box counts) on one process and
    split over two gloo processes (Lightning's sampler repeats one image to give both ranks 4): the synchronised
    metric must not depend on the split. Rectangular evaluation
    batches, so Lightning has to put its distributed sampler under the project's batch sampler."""
    common = [*small_sample(tmp_path), "data.reading.prepare.num_val=7", "trainer.max_epochs=0",
              "model._target_=oracle_detector.OracleDetector", "data.pipeline.rect_eval=true"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    train(tmp_path, *common, run="single", env=env)
    train(tmp_path, *common, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", run="ddp", env=env)
    single = json.loads((tmp_path / "single" / "final_metrics.json").read_text())
    ddp = json.loads((tmp_path / "ddp" / "final_metrics.json").read_text())
    assert single["val/mAP"] > 0 and single["val/recall"] > 0
    assert ddp["val/mAP"] == pytest.approx(single["val/mAP"], abs=1e-7)
    assert ddp["val/recall"] == pytest.approx(single["val/recall"], abs=1e-7)
