"""The speed options change speed only: channels-last and compiled models predict what the plain model predicts,
and the multi-tensor (foreach) optimizers of ``conf/optimizer`` move parameters as torch's single-tensor loop does."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from lightning_det.callbacks import ChannelsLast, Compile
from lightning_det.models.faster_rcnn import FasterRCNN
from lightning_det.models.ssd import SSD
from lightning_det.models.yolov3 import YOLOv3

CONF = Path(__file__).resolve().parents[1] / "conf"


def yolov3_tiny():
    return YOLOv3(variant="tiny", width=0.25, num_classes=3)


def ssdlite():
    return SSD(variant="ssdlite", width=0.25, num_classes=3, prior={"aspect_ratios": [[2, 3]] * 6})


def faster_rcnn():
    return FasterRCNN(num_classes=3, backbone="mobilenet_v3_fpn", representation=64,
                      rpn=dict(anchor_sizes=[[16, 32, 64]] * 3, pre_nms_topk=(200, 100), max_detections=(50, 30)),
                      assigner=dict(roi_batch_size=32))


def detections(model, images):
    batch = {"images": images, "labels": torch.full((len(images), 1, 6), -1.0)}
    with torch.no_grad():
        torch.manual_seed(0)
        return model.decode(model(images), batch)


def assert_same_detections(expected, actual):
    """Equal as sets: every detection has a partner of the same class with the same box and score (a random
    network's nearly tied scores may come out in another order)."""
    assert sum(len(d["boxes"]) for d in expected) > 0  # something to compare
    for want, got in zip(expected, actual):
        assert len(want["boxes"]) == len(got["boxes"])
        same_box = (want["boxes"][:, None] - got["boxes"][None]).abs().amax(-1) < 1e-3
        same_score = (want["scores"][:, None] - got["scores"][None]).abs() < 1e-5
        same_label = want["labels"][:, None] == got["labels"][None]
        partners = same_box & same_score & same_label
        assert partners.any(0).all() and partners.any(1).all()


@pytest.mark.parametrize("build", [yolov3_tiny, ssdlite, faster_rcnn])
def test_channels_last_predicts_the_same_detections(build):
    torch.manual_seed(0)
    model = build().eval()
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    plain = detections(model, images)
    ChannelsLast().setup(None, model, "fit")
    weights = [p for p in model.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert not all(p.is_contiguous() for p in weights)  # the layout did change
    assert_same_detections(plain, detections(model, images))


@pytest.mark.slow
def test_compiled_model_predicts_the_same_detections_and_keeps_its_parameter_names():
    torch.manual_seed(0)
    model = yolov3_tiny().eval()
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    plain, names = detections(model, images), list(model.state_dict())
    Compile().setup(None, model, "fit")
    assert_same_detections(plain, detections(model, images))
    assert list(model.state_dict()) == names


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_configured_foreach_optimizer_matches_the_single_tensor_loop(name):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    start = [p.detach().clone() for p in net.parameters()]
    grads = [[torch.randn_like(p) for p in start] for _ in range(6)]
    config = OmegaConf.load(CONF / "optimizer" / f"{name}.yaml")
    finals = {}
    for path, options in (("configured", {}), ("single-tensor", {"foreach": False})):
        params = [nn.Parameter(p.clone()) for p in start]
        optimizer = instantiate(config, **options)(params)
        for step_grads in grads:
            for param, grad in zip(params, step_grads):
                param.grad = grad.clone()
            optimizer.step()
        finals[path] = params
    assert config.foreach is True
    moved = max((p - s).abs().max().item() for p, s in zip(finals["single-tensor"], start))
    assert moved > 1e-3
    for multi, single in zip(finals["configured"], finals["single-tensor"]):
        assert torch.allclose(multi, single, rtol=1e-5, atol=1e-7)
