"""MLflow and W&B (offline) through Lightning's loggers: one short training logs to both beside TensorBoard, and
each store is read back on its own terms (MLflow's client API; the W&B run's transaction log) against TensorBoard:
hyper-parameters, every scalar and the report images arrive. A run without the two packages imports neither."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from mlflow.tracking import MlflowClient
from runs import REPO, REPORT_IMAGES, scalars, small_sample, train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_detector import TinyDetector
from wandb.proto import wandb_internal_pb2

from lightning_det.callbacks import ValidationImageLogger
from lightning_det.report.loggers import pixels

EPOCH_IMAGES = ["val/images", "train/first_batch"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """One training with TensorBoard, MLflow and W&B together: the tmp folder, with ``run/`` and ``logs/``."""
    tmp_path = tmp_path_factory.mktemp("loggers")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "WANDB_"))}
    env.update({"WANDB_MODE": "offline", **{f"WANDB_{name}_DIR": str(tmp_path / "wandb_home" / name.lower())
                                            for name in ("CONFIG", "CACHE", "DATA")}})
    train(tmp_path, *small_sample(tmp_path), "logger=[tensorboard,mlflow,wandb]", env=env)
    return tmp_path


def logged_scalars(run_dir: Path) -> set[str]:
    """Every scalar TensorBoard received, less its hparams-tab metric (``best/``, TensorBoard's alone)."""
    return {tag for tag, values in scalars(run_dir).items() if values and not tag.startswith("best/")}


def test_mlflow_store_holds_the_parameters_every_scalar_and_the_report_images(run):
    client = MlflowClient(f"sqlite:///{run / 'logs' / 'mlflow.db'}")
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("lightning_det").experiment_id])
    run_id = mlflow_run.info.run_id
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.tags["output_dir"] == str(run / "run")

    params = mlflow_run.data.params
    assert params["model.width"] == "0.25" and params["data.img_size"] == "128"
    assert params["optimizer.lr"] == params["optimizer/lr"]  # the run's settings and the model's own
    assert params["model._target_"] == "lightning_det.models.yolov3.YOLOv3"

    assert logged_scalars(run / "run") <= set(mlflow_run.data.metrics)
    assert {"val/mAP", "train/loss_epoch", "train/box_step", "train/obj_step", "train/cls_step"} <= set(
        mlflow_run.data.metrics)
    tensorboard_map = scalars(run / "run")["val/mAP"]
    assert [m.value for m in client.get_metric_history(run_id, "val/mAP")] == pytest.approx(tensorboard_map)
    final = json.loads((run / "run" / "final_metrics.json").read_text())  # the best checkpoint's score, to sort by
    assert mlflow_run.data.metrics["best/val/mAP"] == pytest.approx(final["val/mAP"])

    images = [a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    for tag in [f"report/{name}" for name in REPORT_IMAGES] + EPOCH_IMAGES:
        assert any(path.startswith(f"images/{tag.replace('/', '~')}+step+") for path in images), (tag, images)
    local = Path(mlflow_run.info.artifact_uri.removeprefix("file://"))
    assert local.is_relative_to(run / "logs" / "mlartifacts") and all((local / path).stat().st_size > 1000
                                                                       for path in images)


def wandb_records(path: Path):
    """The protobuf records of a ``.wandb`` transaction log: a 7-byte file header, then LevelDB-log-style 32 KiB
    blocks of chunks (crc32 4, length 2, type 1: full 1, first 2, middle 3, last 4)."""
    data, position, pieces = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pieces += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


def test_wandb_offline_run_holds_the_config_every_scalar_and_the_report_images(run):
    (run_folder,) = (run / "run" / "wandb").glob("offline-run-*")
    config: dict[str, object] = {}
    history: dict[str, list] = {}
    kinds = []
    for record in wandb_records(next(run_folder.glob("run-*.wandb"))):
        kinds.append(record.WhichOneof("record_type"))
        for update in record.config.update:
            config[update.key] = json.loads(update.value_json)
        for item in record.history.item:
            history.setdefault(item.key or "/".join(item.nested_key), []).append(json.loads(item.value_json))
    assert kinds[-1] == "exit"  # the run was closed, so `wandb sync` uploads all of it

    assert config["model.width"] == 0.25 and config["optimizer.lr"] == config["optimizer"]["lr"]
    assert logged_scalars(run / "run") <= set(history)
    assert history["val/mAP"] == pytest.approx(scalars(run / "run")["val/mAP"])

    for tag in [f"report/{name}" for name in REPORT_IMAGES] + EPOCH_IMAGES:
        files = history[f"{tag}/filenames"][-1]
        assert files and all((run_folder / "files" / name).stat().st_size > 1000 for name in files), tag


def test_images_reach_the_loggers_as_uint8_pixels():
    grid = torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8)
    assert (pixels(grid) == grid.permute(1, 2, 0).numpy()).all()
    heat_map = pixels(torch.tensor([[[0.0, 0.5, 1.0, 2.0]]]))  # one channel in [0, 1] (a confusion heat map)
    assert heat_map.dtype.name == "uint8" and heat_map.tolist() == [[0, 128, 255, 255]]


def test_a_run_without_mlflow_and_wandb_never_imports_them(tmp_path):
    code = f"""
import sys
sys.modules.update(mlflow=None, wandb=None)  # `import mlflow` now fails, as where the packages are missing
import lightning as L, torch
from lightning.pytorch.loggers import TensorBoardLogger
import lightning_det.tools.train, lightning_det.callbacks.results_report, lightning_det.callbacks.image_logger
from lightning_det.report.loggers import log_image
trainer = L.Trainer(logger=TensorBoardLogger({str(tmp_path)!r}, name="tb"), enable_progress_bar=False)
log_image(trainer, "val/images", torch.zeros(3, 8, 8, dtype=torch.uint8))
trainer.loggers[0].experiment.flush()
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))


def test_the_image_logger_draws_the_matrices_a_model_accumulates_in_training(tmp_path):
    """Faster R-CNN's RPN and RoI confusion reach TensorBoard through the callback, row-normalised."""
    class Confused(TinyDetector):
        def training_matrices(self):
            return {"confusion/rpn": torch.tensor([[3, 1], [0, 4]])}

    trainer = L.Trainer(logger=TensorBoardLogger(tmp_path, name="tb", version=0), enable_progress_bar=False)
    ValidationImageLogger().on_train_epoch_end(trainer, Confused())
    trainer.loggers[0].experiment.flush()
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"images": 0}).Reload()
    assert events.Tags()["images"] == ["confusion/rpn"]
    (image,) = events.Images("confusion/rpn")
    assert (image.width, image.height) == (32, 32)  # 2 x 2 cells of 16 px
