"""FasterRCNN end to end on tiny inputs: losses fall, padded mixed-shape batches train and map back, logging."""

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_voc
from PIL import Image
from torchvision.models import mobilenet_v3_large
from torchvision.ops import box_iou

from lightning_det.data import DetectionDataModule, LoaderOptions, PipelineOptions, VOCSource
from lightning_det.data.transforms import RCNNTransform
from lightning_det.models.faster_rcnn import FasterRCNN
from lightning_det.report.confusion import heat_map

SMALL_RPN = dict(anchor_sizes=[[16, 32, 64, 128]] * 3, pre_nms_topk=(200, 100), max_detections=(50, 30))
SMALL = dict(
    backbone="mobilenet_v3_fpn",
    rpn=SMALL_RPN,
    representation=64,
    assigner=dict(roi_batch_size=32),
)


def small_model(num_classes: int = 2) -> FasterRCNN:
    torch.manual_seed(0)
    return FasterRCNN(num_classes=num_classes, **SMALL)


def write_voc_with_shapes(root: Path) -> Path:
    """Two images of opposite aspect ratios, each with one bright rectangle (its only object) on dark noise."""
    images = {"wide": (96, 160, ("a", (20, 30, 100, 80))), "tall": (160, 96, ("b", (10, 60, 70, 140)))}
    folder = root / "VOC2007" / "JPEGImages"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (height, width, (_, (x1, y1, x2, y2))) in images.items():
        pixels = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8)
        pixels[y1 - 1 : y2, x1 - 1 : x2] = 230 if name == "wide" else (230, 60, 60)
        Image.fromarray(pixels).save(folder / f"{name}.jpg", quality=95)
    splits = {name: (h, w, [(cls, box, False)]) for name, (h, w, (cls, box)) in images.items()}
    return make_voc(root, {"2007/trainval": splits})


def loss_values(model: FasterRCNN, batch: dict) -> dict[str, float]:
    """Losses with a fixed sampling seed, so two calls differ only through the weights."""
    torch.manual_seed(123)
    with torch.no_grad():
        return {k: v.item() for k, v in model.loss(model.network_outputs(batch), batch).items()}


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> dict:
    """The two images in one batch, resized by their shorter side to 96 and padded to 160 x 160."""
    root = write_voc_with_shapes(tmp_path_factory.mktemp("voc"))
    transform = RCNNTransform(min_size=96, max_size=160)
    data = DetectionDataModule(root, VOCSource(["2007/trainval"]), VOCSource(["2007/trainval"]), batch_size=2,
                               loader=LoaderOptions(num_workers=0),
                               pipeline=PipelineOptions(transform, transform, size_divisor=32))
    data.setup("fit")
    return next(iter(data.val_dataloader()))


def test_padded_batch_of_two_aspect_ratios(batch):
    assert tuple(batch["images"].shape[-2:]) == (160, 160)
    assert batch["meta"]["orig_size"].tolist() == [[96, 160], [160, 96]]


def train_steps(model: FasterRCNN, batch: dict, steps: int, lr: float) -> None:
    """Adam steps on one batch; the same anchor/RoI samples every step, so the objective is fixed.

    The rate decays to zero (cosine) so the weights settle: at a constant rate the last steps still jump, and where
    they land depends on float summation order (thread count), which made the trained-detections check flaky.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for _ in range(steps):
        torch.manual_seed(123)
        losses = model.loss(model.network_outputs(batch), batch)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        schedule.step()


def test_a_few_steps_lower_all_four_losses(batch):
    # Without proposals the head's RoIs are the objects themselves: a fixed set, where the RoIs taken from the
    # proposals of a changing RPN would make the head's two terms a moving target over the steps.
    torch.manual_seed(0)
    model = FasterRCNN(num_classes=2, **{**SMALL, "rpn": {**SMALL_RPN, "max_detections": (0, 0)}})
    model.train()
    before = loss_values(model, batch)
    train_steps(model, batch, steps=20, lr=3e-4)
    after = loss_values(model, batch)
    assert set(before) == {"loss", "rpn_loc", "rpn_cls", "roi_loc", "roi_cls"}
    for name in before:
        assert after[name] < before[name], (name, before[name], after[name])


@pytest.mark.slow
def test_trained_detections_land_on_each_images_own_object(batch):
    model = small_model()
    train_steps(model, batch, steps=150, lr=1e-3)
    model.eval()
    with torch.no_grad():
        detections = model.predict_step(batch, 0)
    expected = {"wide": ([19, 29, 100, 80], 0), "tall": ([9, 59, 70, 140], 1)}  # VOC 1-based -> 0-based x1, y1
    for path, found in zip(batch["meta"]["path"], detections):
        box, label = expected[Path(path).stem]
        best = found["scores"].argmax()
        assert found["labels"][best] == label
        assert box_iou(found["boxes"][best : best + 1], torch.tensor([box], dtype=torch.float32)) > 0.6


def test_eval_mode_gives_losses_and_detections_in_original_pixels(batch):
    model = small_model().eval()
    with torch.no_grad():
        outputs = model.network_outputs(batch)
        losses = model.loss(outputs, batch)
        detections = model.detections_in_original_pixels(outputs, batch)
    assert all(torch.isfinite(v) for v in losses.values())
    assert len(detections) == 2
    for found, (height, width) in zip(detections, batch["meta"]["orig_size"].tolist()):
        assert len(found["boxes"]) > 0
        assert (found["boxes"][:, 2] <= width).all() and (found["boxes"][:, 3] <= height).all()
        assert found["labels"].max() < 2 and found["labels"].dtype == torch.long


def test_confusion_matrices_accumulate_in_training_only(batch):
    model = small_model()
    model.train()
    model.loss(model.network_outputs(batch), batch)
    rpn_count = model.rpn_confusion.compute().sum().item()
    assert rpn_count == 2 * 256  # every image has enough anchors for a full sample
    assert model.roi_confusion.compute().shape == (3, 3)
    model.eval()
    with torch.no_grad():
        model.loss(model.network_outputs(batch), batch)
    assert model.rpn_confusion.compute().sum().item() == rpn_count
    assert set(model.training_matrices()) == {"confusion/rpn", "confusion/roi"}
    model.on_train_epoch_start()
    assert model.training_matrices() == {}


def test_confusion_image_is_row_normalised():
    image = heat_map(torch.tensor([[3, 1], [0, 0]]), cell=2)
    assert image.shape == (1, 4, 4)
    assert image[0, 0, 0] == 0.75 and image[0, 0, 2] == 0.25 and image[0, 2:].sum() == 0


def test_roi_pool_needs_a_single_level_backbone():
    with pytest.raises(ValueError, match="single-level"):
        FasterRCNN(num_classes=2, **{**SMALL, "roi_head": {"pooling": "pool"}})


def test_width_narrows_the_mobilenet_as_torchvision_does():
    """``width`` is torchvision's ``width_mult``: the backbone body has exactly the parameters of torchvision's
    ``mobilenet_v3_large(width_mult=...)`` features, and ImageNet weights are refused for a narrowed one."""
    for width in (1.0, 0.5):
        body = FasterRCNN(num_classes=2, width=width, **SMALL).backbone.body
        reference = mobilenet_v3_large(weights=None, width_mult=width).features
        assert sum(p.numel() for p in body.parameters()) == sum(p.numel() for p in reference.parameters())
    with pytest.raises(ValueError, match="width=0.5"):
        FasterRCNN(num_classes=2, width=0.5, backbone_weights="DEFAULT", **SMALL)
    with pytest.raises(ValueError, match="only the mobilenet_v3_fpn"):
        FasterRCNN(num_classes=2, **{**SMALL, "backbone": "vgg16", "rpn": None}, width=0.5)


class RecordingMetric(torch.nn.Module):
    """A validation metric that keeps the detections it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.detections: list[dict] = []

    def update(self, detections: list[dict], targets: list[dict]) -> None:
        self.detections += detections


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # no Trainer: nothing logged
def test_validation_filters_proposals_once_per_batch_for_loss_and_detections(batch, monkeypatch):
    model = small_model().eval()
    model.val_metric = RecordingMetric()
    calls = []
    propose = model.rpn.propose
    monkeypatch.setattr(model.rpn, "propose", lambda *args: calls.append(args) or propose(*args))
    with torch.no_grad():
        model.validation_step(batch, 0)
        assert len(calls) == 1  # the loss's RoI sampling and the detections share one proposal filter
        expected = model.predict_step(batch, 0)  # detections alone: no loss in between
    validated = model.val_metric.detections
    assert len(validated) == len(expected) == 2 and sum(len(d["boxes"]) for d in expected) > 0
    for got, want in zip(validated, expected):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(got[key], want[key]), key
