"""SSD as a whole: the reference SSD300 parameter count, layouts, decoding, and a few steps that lower the loss."""

from __future__ import annotations

import re

import pytest
import torch
from omegaconf import OmegaConf
from runs import compose_config

from lightning_det.checks.config import ConfigValueError, check_config, check_renamed, check_renamed_overrides
from lightning_det.models.ssd import SSD
from lightning_det.models.ssd.decode import SSDDecoder
from lightning_det.models.ssd.targets import encode

SSD300_RATIOS = [[2], [2, 3], [2, 3], [2, 3], [2], [2]]
NARROW_SSDLITE = ["model=ssdlite", "model.width=0.25"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def conv(c_in: int, c_out: int, kernel: int) -> int:
    return c_in * c_out * kernel * kernel + c_out


def test_ssd300_vgg16_has_the_reference_parameter_count():
    vgg = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
           (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
    count = sum(conv(i, o, 3) for i, o in vgg)
    count += conv(512, 1024, 3) + conv(1024, 1024, 1)  # fc6 (atrous), fc7
    count += 512  # L2Norm scale of conv4_3
    count += conv(1024, 256, 1) + conv(256, 512, 3) + conv(512, 128, 1) + conv(128, 256, 3)
    count += conv(256, 128, 1) + conv(128, 256, 3) + conv(256, 128, 1) + conv(128, 256, 3)
    sources, boxes = [512, 1024, 512, 256, 256, 256], [4, 6, 6, 6, 4, 4]
    count += sum(conv(c, b * 4, 3) + conv(c, b * 21, 3) for c, b in zip(sources, boxes))
    model = SSD(variant="ssd300", num_classes=20, prior={"aspect_ratios": SSD300_RATIOS})
    assert sum(p.numel() for p in model.parameters()) == count == 26_285_486  # ssd.pytorch's published figure


def test_layouts_at_the_default_sizes():
    ssd300 = SSD(variant="ssd300", width=0.125, num_classes=3, prior={"aspect_ratios": SSD300_RATIOS}).eval()
    outputs = ssd300(torch.zeros(1, 3, 300, 300))
    assert outputs.loc.shape == (1, 8732, 4) and outputs.conf.shape == (1, 8732, 4)
    ssd512_ratios = [[2], *[[2, 3]] * 4, [2], [2]]
    ssd512 = SSD(variant="ssd512", width=0.125, num_classes=3, prior={"aspect_ratios": ssd512_ratios}).eval()
    outputs = ssd512(torch.zeros(1, 3, 512, 512))
    assert outputs.feature_sizes == [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    assert outputs.loc.shape[1] == 24564
    ssdlite = SSD(variant="ssdlite", width=0.25, num_classes=3, prior={"aspect_ratios": [[2, 3]] * 6}).eval()
    assert ssdlite(torch.zeros(1, 3, 320, 320)).feature_sizes == [(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]


def test_decoder_keeps_per_class_boxes_and_class_agnostic_merges_classes():
    priors = torch.tensor([[50.0, 50, 40, 40], [52, 50, 40, 40], [150, 150, 40, 40]])
    boxes = torch.tensor([[30.0, 30, 70, 70], [32, 30, 72, 70], [130, 130, 170, 170]])
    loc = encode(boxes, priors)[None]
    logits = torch.full((1, 3, 3), -10.0)
    logits[0, 0, 1], logits[0, 1, 2], logits[0, 2, 1] = 5.0, 4.0, 3.0  # two overlapping boxes of different classes
    per_class = SSDDecoder(score_thresh=0.5)(loc, logits, priors, (200, 200))[0]
    assert sorted(per_class["labels"].tolist()) == [0, 0, 1]
    torch.testing.assert_close(per_class["boxes"][0], boxes[0])
    merged = SSDDecoder(score_thresh=0.5, class_agnostic=True)(loc, logits, priors, (200, 200))[0]
    assert merged["labels"].tolist() == [0, 0] and torch.equal(merged["boxes"][1], boxes[2])
    top1 = SSDDecoder(score_thresh=0.5, max_detections=1)(loc.repeat(2, 1, 1), logits.repeat(2, 1, 1), priors, (200, 200))
    assert [len(d["scores"]) for d in top1] == [1, 1] and top1[1]["scores"][0] > 0.9


def small_batch() -> dict:
    labels = torch.tensor([[[0, 10, 12, 60, 70, 0], [2, 70, 60, 120, 110, 0]],
                           [[1, 30, 30, 100, 90, 0], [-1, 0, 0, 0, 0, 0]]])
    return {
        "images": torch.randn(2, 3, 128, 128),
        "labels": labels,
        "meta": {"scale": torch.tensor([[0.5, 0.5], [1.0, 2.0]]), "pad": torch.zeros(2, 2),
                 "orig_size": torch.tensor([[256, 256], [64, 128]])},
    }


def test_a_few_steps_lower_the_loss_and_detections_come_out_in_original_pixels():
    torch.manual_seed(0)
    model = SSD(variant="ssdlite", width=0.25, num_classes=3,
                prior={"aspect_ratios": [[2, 3]] * 6, "s_min": 0.15, "s_max": 0.8})
    batch = small_batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = None
    for _ in range(8):
        losses = model.loss(model(batch["images"]), batch)
        first = losses if first is None else first
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    assert losses["loss"] < 0.8 * first["loss"]
    assert set(losses) == {"loss", "loc", "conf", "ce"}
    model.eval()
    with torch.no_grad():
        detections = model.predict_step(batch, 0)
    assert detections[0]["boxes"].max() <= 256 and detections[1]["boxes"][:, [1, 3]].max() <= 64
    assert detections[0]["labels"].max() < 3 and len(detections[0]["boxes"]) <= 200


class ConstantLoss:
    """A stand-in ``loss`` part: keeps the settings it is built with and returns fixed terms."""

    def __init__(self, **settings):
        self.settings = settings

    def __call__(self, loc, conf, classes, loc_targets):
        zero = loc.sum() * 0.0  # keeps the graph, so the loop could backpropagate through it
        self.positives = int((classes > 0).sum())
        return {"loss": zero + 7.0, "loc": zero + 3.0, "conf": zero + 4.0}


def test_a_part_is_swapped_from_the_command_line(cfg_train):
    """``model.loss._target_=...`` builds that class through train.py's path with the rest of the loss node; the
    swapped part gets the assigner's matches, and the checkpoint keeps the part as plain data."""
    from lightning_det.tools.train import build_model

    cfg = cfg_train(*NARROW_SSDLITE, f"model.loss._target_={__name__}.ConstantLoss", "model.loss.neg_pos_ratio=5.0")
    check_config(cfg)
    model = build_model(cfg, num_classes=3, class_names=["a", "b", "c"])
    assert isinstance(model.criterion, ConstantLoss)
    assert model.criterion.settings == {"neg_pos_ratio": 5.0, "loc_weight": 1.0}
    batch = small_batch()
    assert model.loss(model(batch["images"]), batch)["loss"].item() == 7.0
    assert model.criterion.positives >= 3  # every object takes at least its best default box
    assert model.hparams.loss["_target_"] == f"{__name__}.ConstantLoss" and isinstance(model.hparams.loss, dict)


def test_the_decoder_settings_of_the_config_reach_the_decoder(cfg_train):
    from lightning_det.tools.train import build_model

    cfg = cfg_train(*NARROW_SSDLITE, "model.decoder.max_detections=7", "model.decoder.class_agnostic=true",
                    "model.variances=[0.2,0.1]")
    model = build_model(cfg, num_classes=3, class_names=["a", "b", "c"])
    assert model.decoder.max_detections == 7 and model.decoder.class_agnostic
    assert model.decoder.variances == (0.2, 0.1) == model.variances


@pytest.fixture(scope="module")
def composed_model():
    return compose_config("train", *NARROW_SSDLITE).model


@pytest.mark.parametrize("old, new", sorted(SSD.renamed.items()))
def test_every_old_key_is_refused_with_a_key_the_config_has(composed_model, old, new):
    """On the command line (the message names SSD's new key, also where another family moved the key elsewhere)
    and in a user's own model yaml still holding the old key."""
    assert OmegaConf.select(composed_model, old, default="absent") == "absent"
    assert OmegaConf.select(composed_model, new, default="absent") != "absent"
    with pytest.raises(ConfigValueError, match=re.escape(f"model.{new}")):
        check_renamed_overrides([f"model.{old}=1"])
    cfg = OmegaConf.create({"model": OmegaConf.to_container(composed_model)})
    OmegaConf.update(cfg, f"model.{old}", 1, force_add=True)
    with pytest.raises(ConfigValueError, match=rf"use {re.escape(f'model.{new}')}\b"):
        check_renamed(cfg)


def test_a_checkpoint_of_the_flat_layout_loads_into_the_parts_with_the_same_detections(tmp_path):
    """A previous release's SSD checkpoint (flat keys, normalisation in the pipeline) goes through ``renamed``."""
    from lightning_det.tools.inference import load_detector

    torch.manual_seed(0)
    prior = {"aspect_ratios": [[2, 3]] * 6, "s_min": 0.15, "s_max": 0.8, "clip": True}
    decoder = {"score_thresh": 0.0, "pre_nms_topk": 50, "max_detections": 9, "class_agnostic": True}
    model = SSD(variant="ssdlite", width=0.25, num_classes=2, prior=prior, assigner={"positive_iou": 0.4},
                loss={"loc_weight": 2.0}, decoder=decoder, pixel_mean=[0.0] * 3, pixel_std=[255.0] * 3).eval()
    pipeline = {"_target_": "lightning_det.data.transforms.SSDEvalTransform", "img_size": 128}
    flat = {k: v for k, v in model.hparams.items() if k not in ("prior", "assigner", "loss", "decoder", "pixel_mean",
                                                                "pixel_std")}
    flat.update(aspect_ratios=[[2, 3]] * 6, s_min=0.15, s_max=0.8, clip=True, overlap_threshold=0.4, loc_weight=2.0,
                conf_thresh=0.0, nms_topk=50, keep_topk=9, force_suppress=True)
    paths = {}
    for name, arguments, saved_pipeline in (("new", dict(model.hparams), pipeline),
                                            ("old", flat, {**pipeline, "mean": [0.0] * 3, "std": [255.0] * 3})):
        paths[name] = tmp_path / f"{name}.ckpt"
        torch.save({"state_dict": model.state_dict(), "hyper_parameters": arguments, "inference_pipeline":
                    saved_pipeline, "detector_class": "lightning_det.models.ssd.module.SSD"}, paths[name])
    (new, _), (old, _) = load_detector(paths["new"]), load_detector(paths["old"])
    assert vars(old.decoder) == vars(new.decoder) and old.assigner.positive_iou == 0.4
    assert vars(old.prior) == vars(new.prior) and old.criterion.loc_weight == 2.0
    images = torch.rand(2, 3, 128, 128) * 255
    with torch.no_grad():
        expected = new.decode(new(new.normalise(images)), {"images": images})
        got = old.decode(old(old.normalise(images)), {"images": images})
    assert [len(d["scores"]) for d in expected] == [9, 9]
    for a, b in zip(expected, got):
        assert all(torch.equal(a[k], b[k]) for k in a)
