"""The YOLOv3 LightningModule: configs, argument checks, learning on a fixed batch, and the Lightning loop."""

import functools
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict
from runs import compose_config

from lightning_det.models import YOLOv3
from lightning_det.models.yolov3.grid import DEFAULT_ANCHORS
from lightning_det.models.yolov3.loss import YOLOv3Loss
from lightning_det.models.yolov3.module import flatten

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
NARROW_TINY = ["model=yolov3_tiny", "model.width=0.125"]


def synthetic_batch(size=64):
    """Two images with a few well-separated objects, one a difficult one, padded to width 4."""
    torch.manual_seed(0)
    labels = torch.tensor(
        [
            [[0, 4, 6, 28, 30, 0], [2, 36, 30, 60, 62, 0], [1, 10, 40, 20, 56, 1], [-1, 0, 0, 0, 0, 0]],
            [[1, 8, 8, 56, 50, 0], [-1, 0, 0, 0, 0, 0], [-1, 0, 0, 0, 0, 0], [-1, 0, 0, 0, 0, 0]],
        ],
        dtype=torch.float32,
    )
    return {
        "images": torch.rand(2, 3, size, size),
        "labels": labels,
        "meta": {
            "image_id": torch.tensor([0, 1]),
            "orig_size": torch.tensor([[size, size], [2 * size, 2 * size]]),
            "scale": torch.tensor([[1.0, 1.0], [0.5, 0.5]]),
            "pad": torch.zeros(2, 2),
            "path": ["a.jpg", "b.jpg"],
        },
    }


@pytest.mark.parametrize(("name", "variant", "levels"), [("yolov3", "yolov3", 3), ("yolov3_tiny", "tiny", 2)])
def test_config_builds_the_model(name, variant, levels):
    cfg = compose_config("train", f"model={name}")
    assert "num_classes" not in cfg.model
    assert cfg.data.img_size == "auto"  # a multiple of 32 chosen from the training boxes
    model = instantiate(cfg.model, num_classes=3, width=0.125, depth=1.0, _recursive_=False)
    assert model.hparams.variant == variant and model.num_classes == 3
    assert cfg.model.anchors == "auto"  # Darknet's until refitted to a dataset
    expected_anchors = torch.tensor(DEFAULT_ANCHORS[variant], dtype=torch.float32).view(levels, 3, 2)
    assert torch.equal(model.anchors, expected_anchors)
    assert model.strides == list(cfg.model.strides)


@pytest.mark.parametrize("name", ["yolov3", "yolov3_tiny"])
def test_config_composes_as_a_global_package(tmp_path, name):
    """The model files set both ``model`` and ``data.img_size`` and pull in the YOLO data pipeline."""
    shutil.copytree(CONF, tmp_path / "model")
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "yolo.yaml").write_text("# @package _global_\ndata:\n  pipeline_marker: yolo\n")
    (tmp_path / "run.yaml").write_text("defaults:\n  - model: yolov3\n  - _self_\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        cfg = compose("run", overrides=[f"model={name}", "model.assigner.positive_iou=0.3", "data.img_size=320"])
    assert cfg.model._target_ == "lightning_det.models.yolov3.YOLOv3"
    assert cfg.data.pipeline_marker == "yolo" and cfg.data.img_size == 320
    assert instantiate(cfg.model, num_classes=2, width=0.125, _recursive_=False).assigner.positive_iou == 0.3


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"variant": "yolov4"}, "variant"),
        ({"strides": [8, 16]}, "strides"),
        ({"anchors": [[10, 13, 16, 30]]}, "levels"),
        ({"anchors": [[10, 13, 16], [1, 2, 3], [4, 5, 6]]}, "pairs"),
        ({"anchors": [[10, 13], [16, -30], [33, 23]]}, "positive"),
    ],
)
def test_bad_arguments_are_named(arguments, message):
    with pytest.raises(ValueError, match=message):
        YOLOv3(num_classes=3, width=0.125, depth=0.33, **arguments)


@pytest.mark.parametrize(("variant", "box_loss"), [("tiny", "giou"), ("yolov3", "xywh")])
def test_a_few_steps_lower_every_loss_term(variant, box_loss):
    torch.manual_seed(0)
    depth = {"depth": 0.33} if variant == "yolov3" else {}
    model = YOLOv3(variant=variant, width=0.125, loss={"box_loss": box_loss}, num_classes=3, **depth)
    batch = synthetic_batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    first = None
    for _ in range(30):
        losses = model.loss(model(batch["images"]), batch)
        first = first or {k: v.item() for k, v in losses.items()}
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    last = {k: v.item() for k, v in model.loss(model(batch["images"]), batch).items()}
    assert set(last) == {"loss", "box", "obj", "cls"}
    assert last["loss"] < 0.5 * first["loss"]
    assert all(last[k] < first[k] for k in ("box", "obj", "cls")), (first, last)


def test_lightning_fit_and_predict(tmp_path):
    batch = synthetic_batch()
    batch["images"][1] = batch["images"][0]  # same pixels; image 1's original is twice the size
    loader = torch.utils.data.DataLoader([batch], batch_size=None)
    model = YOLOv3(
        variant="tiny", width=0.125, num_classes=3, optimizer=functools.partial(torch.optim.SGD, lr=1e-3),
    )
    trainer = L.Trainer(
        fast_dev_run=True, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, default_root_dir=tmp_path,
    )
    trainer.fit(model, train_dataloaders=loader, val_dataloaders=loader)
    model.decoder.score_thresh = 0.0  # an untrained net scores low; keep everything to see the mapping
    first, second = trainer.predict(model, dataloaders=loader)[0]
    assert len(first["boxes"]) > 0
    # image 1 was shrunk by 0.5 into the batch: its detections come back in its own 128 px frame
    assert torch.allclose(second["boxes"], 2 * first["boxes"], atol=1e-4)
    assert torch.equal(second["labels"], first["labels"])


def test_anchors_may_be_given_as_pairs():
    flat = YOLOv3(variant="tiny", width=0.125, num_classes=2, anchors=[[10, 14, 23, 27, 37, 58], [81, 82, 1, 2, 3, 4]])
    pairs = YOLOv3(
        variant="tiny", width=0.125, num_classes=2, anchors=[[[10, 14], [23, 27], [37, 58]], [[81, 82], [1, 2], [3, 4]]]
    )
    assert torch.equal(flat.anchors, pairs.anchors)
    assert flat.anchors[1, 2].tolist() == [3.0, 4.0]


def test_rectangular_inputs_get_a_grid_of_their_own_shape():
    """Rectangular evaluation (data.pipeline.rect_eval) feeds 64 x 96 batches: cells span the width, not a square."""
    model = YOLOv3(variant="tiny", width=0.125, num_classes=3).eval()
    batch = synthetic_batch()
    batch["images"] = torch.rand(2, 3, 64, 96)
    batch["labels"][1, 0, 1:5] = torch.tensor([70.0, 20.0, 94.0, 60.0])  # an object right of x = 64
    with torch.no_grad():
        outputs = model(batch["images"])
        grid = model.grid(outputs)
        losses = model.loss(outputs, batch)
    assert all(torch.isfinite(v) for v in losses.values())
    for stride in (32, 16):
        cells = grid.cell_xy[grid.stride == stride]
        assert cells.max(0).values.tolist() == [96 // stride - 1, 64 // stride - 1]
    model.decoder.score_thresh = 0.0
    boxes = model.decode(outputs, batch)[0]["boxes"]
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    assert centres[:, 0].max() > 64 and centres[:, 1].max() <= 64


def test_classification_gain_is_scaled_to_the_class_count():
    """The default gains were tuned on COCO's 80 classes; Ultralytics' YOLOv3 multiplies cls by nc / 80."""
    torch.manual_seed(0)
    model = YOLOv3(variant="tiny", width=0.125, num_classes=3, loss={"cls": 37.4})
    batch = synthetic_batch()
    outputs = model(batch["images"])
    grid = model.grid(outputs)
    unscaled = YOLOv3Loss("giou", 3.54, 3.54, 3.54, 64.3, 37.4, 1.0, 1.0, 0.7)(
        flatten(outputs), grid, model.assigner(batch["labels"], grid), batch["labels"])
    scaled = model.loss(outputs, batch)
    assert scaled["cls"].item() == pytest.approx(unscaled["cls"].item() * 3 / 80, rel=1e-6)
    assert scaled["obj"].item() == pytest.approx(unscaled["obj"].item(), rel=1e-6)


class ConstantLoss:
    """A stand-in ``loss`` part: keeps the settings it is built with and returns fixed terms."""

    def __init__(self, **settings):
        self.settings = settings

    def __call__(self, preds, grid, targets, labels):
        zero = preds.sum() * 0.0  # keeps the graph, so the loop could backpropagate through it
        return {"loss": zero + 7.0, "box": zero + 1.0, "obj": zero + 2.0, "cls": zero + 4.0}


def test_a_part_is_swapped_from_the_command_line(cfg_train):
    """``model.loss._target_=...`` builds that class through train.py's path, with the config's other loss settings
    and the class count; the checkpoint keeps the part as plain data."""
    from lightning_det.checks.config import check_config
    from lightning_det.tools.train import build_model

    cfg = cfg_train(*NARROW_TINY, f"model.loss._target_={__name__}.ConstantLoss", "model.loss.obj=5.0")
    check_config(cfg)
    model = build_model(cfg, num_classes=3, class_names=["a", "b", "c"])
    assert isinstance(model.criterion, ConstantLoss)
    assert model.criterion.settings["obj"] == 5.0 and model.criterion.settings["num_classes"] == 3
    assert model.criterion.settings["box_loss"] == "giou"  # the rest of the node reaches the swapped part
    batch = synthetic_batch()
    assert model.loss(model(batch["images"]), batch)["loss"].item() == 7.0
    assert model.hparams.loss["_target_"] == f"{__name__}.ConstantLoss" and isinstance(model.hparams.loss, dict)


@pytest.mark.parametrize("old, new", sorted(YOLOv3.renamed.items()))
def test_every_renamed_key_names_a_key_of_the_config(cfg_train, old, new):
    model = cfg_train(*NARROW_TINY).model
    assert OmegaConf.select(model, old, default="missing") == "missing"
    assert OmegaConf.select(model, new, default="missing") != "missing"


@pytest.mark.parametrize(("override", "new"), [("model.conf_thresh=0.1", "model.decoder.score_thresh"),
                                                ("model.nms_topk=100", "model.decoder.max_detections"),
                                                ("model.iou_t=0.3", "model.assigner.positive_iou"),
                                                ("model.assigner.iou_t=0.3", "model.assigner.positive_iou"),
                                                ("model.giou=2.0", "model.loss.giou")])
def test_an_old_key_is_refused_with_its_new_name(cfg_train, override, new):
    from lightning_det.checks.config import ConfigValueError, check_renamed, check_renamed_overrides

    with pytest.raises(ConfigValueError, match=rf"{override}: .*{new}\b"):
        check_renamed_overrides([override])
    old_key, value = override.split("=")
    cfg = cfg_train(*NARROW_TINY)
    with open_dict(cfg):
        OmegaConf.update(cfg, old_key, value, force_add=True)  # a user's own model yaml still holding the old key
    with pytest.raises(ConfigValueError, match=rf"{new}\b"):
        check_renamed(cfg)
