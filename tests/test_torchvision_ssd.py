"""torchvision's COCO SSDs load whole into our SSD and give torchvision's detections.

For ``ssd300_vgg16`` and ``ssdlite320_mobilenet_v3_large``: torchvision's model is built with random weights
(fixed seed), perturbed so that every tensor matters (random batch-norm statistics and affine terms, conv biases
and L2 scale; convolutions re-drawn with He's init so the image's signal reaches the heads; each head's last
convolution scaled so the scores spread over the thresholds), and put in eval mode. Its state dict goes through
``SSD.from_torchvision`` into the model its config here (``conf/model/*_coco.yaml``) builds for COCO's 90 classes,
loaded strictly. Both see the same generated images of different sizes, shapes and aspect ratios: torchvision as
``model([image / 255])``, ours through the real path (the config's eval transform, ``collate_detection``,
``inference_detections``), and must give the same detections in original-image pixels. The decoding settings are
read off both models, and both decoders also meet synthetic outputs on which each setting decides the result.

Where the two cannot agree bit for bit, the op and its tested bound:

- normalisation order: torchvision normalises 0..1 pixels and then resizes, ours resizes 0..255 pixels and the
  model normalises them. Both are linear, so the network inputs agree up to float rounding (``INPUT_ATOL``, in
  units of the normalised input);
- default boxes: torchvision lays them out as fractions of the side and scales them to pixels, ours are laid out
  in pixels (``PRIOR_ATOL`` px);
- boxes back to the original image: torchvision multiplies by original / resized size, ours divides by resized /
  original size (float rounding, inside ``BOX_ATOL``).

The rounding of the input passes through the networks (``OUTPUT_ATOL``) into the scores, so two detections whose
scores are that close may come out in either order: detections are paired by label and box, not by position.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from helpers import spread_weights
from hydra.utils import instantiate
from PIL import Image, ImageDraw
from runs import compose_config
from torch import Tensor, nn

from lightning_det.data.collate import collate_detection
from lightning_det.data.sample import render_image
from lightning_det.data.transforms import Sample
from lightning_det.models.ssd import SSD
from lightning_det.models.ssd.decode import SSDDecoder
from lightning_det.tools.train import build_model

NUM_CLASSES = 90  # COCO's 91 torchvision labels less the background, which our SSD adds inside
#: torchvision builder -> our config
CONFIGS = {"ssd300_vgg16": "ssd300_vgg16_coco", "ssdlite320_mobilenet_v3_large": "ssdlite320_coco"}
LOGIT_STD = 3.0  # class logits spread over the thresholds, not one saturated class
OFFSET_STD = 1.0  # box codes: centres move by ~0.1 of a default box, sizes by ~exp(0.2)
#: (height, width) of the test images: a portrait one and a landscape one stretched far from square.
IMAGE_SIZES = [(400, 300), (180, 560)]

# The bounds, and what was measured: ssd300 / ssdlite
INPUT_ATOL = 1e-4  # normalised input units (0..255 / -1..1 scale): 3.1e-5 / 1.2e-7
OUTPUT_ATOL = 1e-3  # logits and box codes (activations of ~100 after He's init): 1.4e-5 / 6.6e-5
PRIOR_ATOL = 1e-4  # pixels: 3.1e-5 / 3.1e-5
BOX_ATOL = 1e-3  # pixels, original image: 1.2e-4 / 6.9e-4
SCORE_ATOL = 1e-4  # 1.7e-6 / 6.5e-6


@dataclass
class Case:
    """One architecture, run once per module: both models, what their networks saw and gave, and the detections."""

    builder: str
    torchvision_model: nn.Module
    ours: SSD
    torchvision_state: dict[str, Tensor]
    transform_size: int
    torchvision_seen: dict[str, Any]  # "input" of its backbone, "head" outputs, "priors" (xyxy) of its first image
    our_seen: dict[str, Any]  # "input" and "outputs" (SSDOutputs) of our network
    torchvision_detections: list[dict[str, Tensor]]
    our_detections: list[dict[str, Tensor]]


def generated_images() -> list[tuple[Tensor, Tensor]]:
    """``uint8 [3, H, W]`` images with their boxes: sample-data shapes (tiny to large) plus a long horizontal and
    a tall vertical bar, resized to ``IMAGE_SIZES`` so objects take several aspect ratios; noisy everywhere, so no
    two places of an image give the same scores (ties would leave the order of detections to the sort)."""
    images = []
    for seed, (height, width) in enumerate(IMAGE_SIZES):
        rng = np.random.default_rng(seed)
        image, objects = render_image(rng)
        scale = np.array([width / image.width, height / image.height] * 2)
        boxes = [np.array(o.box) * scale for o in objects]
        image = image.resize((width, height), Image.BILINEAR)
        draw = ImageDraw.Draw(image)
        for box, colour in (((0.1, 0.8, 0.7, 0.88), (230, 40, 40)), ((0.85, 0.1, 0.92, 0.6), (40, 40, 230))):
            pixels = np.array(box) * [width, height, width, height]
            draw.rectangle(pixels.tolist(), fill=colour)
            boxes.append(pixels)
        noisy = np.clip(np.asarray(image, dtype=np.float32) + rng.normal(0, 7, (height, width, 3)), 0, 255)
        pixels = torch.from_numpy(noisy.astype(np.uint8)).permute(2, 0, 1).contiguous()
        images.append((pixels, torch.tensor(np.array(boxes), dtype=torch.float32)))
    return images


def as_samples(images: list[tuple[Tensor, Tensor]]) -> list[Sample]:
    return [
        Sample(image=image, boxes=boxes, labels=torch.zeros(len(boxes), dtype=torch.long),
               difficult=torch.zeros(len(boxes), dtype=torch.bool), image_id=k, path=f"image{k}.png",
               orig_size=(image.shape[-2], image.shape[-1]))
        for k, (image, boxes) in enumerate(images)
    ]


def perturbed_torchvision_model(builder: str, image: Tensor) -> nn.Module:
    """torchvision's detector with random weights, each tensor made to matter (see the module docstring); the last
    convolution of each head scaled so that, on ``image`` (0..1), its map's class logits spread by ``LOGIT_STD``
    and its box offsets by ``OFFSET_STD``."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(builder, weights=None, weights_backbone=None).eval()
    generator = torch.Generator().manual_seed(1)
    spread_weights(model, generator, (nn.Conv2d,))
    with torch.no_grad():
        if hasattr(model.backbone, "scale_weight"):
            model.backbone.scale_weight.uniform_(10.0, 30.0, generator=generator)
        features = list(model.backbone(model.transform([image])[0].tensors).values())
        heads = ((model.head.classification_head, LOGIT_STD), (model.head.regression_head, OFFSET_STD))
        for head, spread in heads:
            for block, feature in zip(head.module_list, features, strict=True):
                last = [m for m in block.modules() if isinstance(m, nn.Conv2d)][-1]
                factor = spread / block(feature).std()
                last.weight.mul_(factor)
                last.bias.mul_(factor)
    return model


def our_model(config_name: str) -> tuple[SSD, Any]:
    """The model ``python train.py model=<config_name>`` builds for COCO's classes, and its config."""
    cfg = compose_config("train", f"model={config_name}")
    model = build_model(cfg, num_classes=NUM_CLASSES, class_names=[f"class{i}" for i in range(NUM_CLASSES)])
    return model.eval(), cfg


def record(module: nn.Module, seen: dict[str, Any], key: str, what: Callable[[tuple, Any], Any]) -> None:
    """Keep ``what(inputs, output)`` of each call of ``module`` in ``seen[key]``: what the real path computed."""
    module.register_forward_hook(lambda _, inputs, output: seen.__setitem__(key, what(inputs, output)))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request: pytest.FixtureRequest) -> Case:
    builder = request.param
    images = generated_images()
    reference = perturbed_torchvision_model(builder, images[0][0].float() / 255)
    ours, cfg = our_model(CONFIGS[builder])
    state = reference.state_dict()
    ours.load_state_dict(ours.from_torchvision(state), strict=True)

    torchvision_seen: dict[str, Any] = {}
    record(reference.backbone, torchvision_seen, "input", lambda inputs, _: inputs[0])
    record(reference.head, torchvision_seen, "head", lambda _, output: output)
    record(reference.anchor_generator, torchvision_seen, "priors", lambda _, output: output[0])
    our_seen: dict[str, Any] = {}
    record(ours.network, our_seen, "input", lambda inputs, _: inputs[0])
    record(ours.network, our_seen, "outputs", lambda _, output: output)

    transform = instantiate(cfg.data.pipeline.val_transform)
    batch = collate_detection([transform([sample]) for sample in as_samples(images)])
    with torch.no_grad():
        torchvision_detections = reference([image.float() / 255 for image, _ in images])
        our_detections = ours.inference_detections(batch)
    return Case(builder, reference, ours, state, transform.img_size, torchvision_seen, our_seen,
                torchvision_detections, our_detections)


def test_every_torchvision_tensor_takes_its_place(case: Case) -> None:
    """Each of our tensors is the torchvision tensor of the mapping, and every torchvision tensor is used."""
    mapping = case.ours.network.torchvision_mapping().names
    ours = case.ours.state_dict()
    assert sorted(mapping.values()) == sorted(case.torchvision_state)
    for name, theirs in mapping.items():
        assert torch.equal(ours[f"network.{name}"], case.torchvision_state[theirs]), name


def owner(model: nn.Module, tensor: str) -> nn.Module:
    return model.get_submodule(tensor.rpartition(".")[0])


def test_every_layer_is_configured_as_torchvisions(case: Case) -> None:
    """What the weights cannot show: each convolution's kernel, stride, padding, dilation and groups, each batch
    norm's eps and momentum (SSDLite's 0.001 / 0.03), compared layer by layer through the mapping."""
    compared = set()
    for ours, theirs in case.ours.network.torchvision_mapping().names.items():
        layer = owner(case.torchvision_model, theirs)
        if isinstance(layer, (nn.Conv2d, nn.BatchNorm2d)):
            assert repr(owner(case.ours.network, ours)) == repr(layer), ours
            compared.add(id(layer))
    assert len(compared) == sum(isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) for m in case.torchvision_model.modules())


def test_the_settings_are_torchvisions(case: Case) -> None:
    """Decoding, box coding, normalisation and input size, read off both models."""
    reference, decoder = case.torchvision_model, case.ours.decoder
    assert decoder.score_thresh == reference.score_thresh
    assert decoder.nms_thresh == reference.nms_thresh
    assert decoder.pre_nms_topk == reference.topk_candidates and decoder.pre_nms_topk_per_class
    assert decoder.max_detections == reference.detections_per_img and not decoder.class_agnostic
    centre, size = decoder.variances
    assert reference.box_coder.weights == (1 / centre, 1 / centre, 1 / size, 1 / size)
    for ours, theirs in ((case.ours.pixel_mean, reference.transform.image_mean),
                         (case.ours.pixel_std, reference.transform.image_std)):
        assert torch.equal(ours.flatten(), (255 * torch.tensor(theirs, dtype=torch.float64)).float())
    assert reference.transform.fixed_size == (case.transform_size, case.transform_size)


def test_the_network_input_agrees_within_the_normalisation_order_bound(case: Case) -> None:
    theirs, ours = case.torchvision_seen["input"], case.our_seen["input"]
    assert ours.shape == theirs.shape == (len(IMAGE_SIZES), 3, case.transform_size, case.transform_size)
    assert (ours - theirs).abs().max() <= INPUT_ATOL
    assert theirs.std() > 0.1  # images, not blanks


def test_the_network_outputs_agree(case: Case) -> None:
    """Every layer in place: the class logits and box offsets of every default box."""
    theirs, ours = case.torchvision_seen["head"], case.our_seen["outputs"]
    assert (ours.conf - theirs["cls_logits"]).abs().max() <= OUTPUT_ATOL
    assert (ours.loc - theirs["bbox_regression"]).abs().max() <= OUTPUT_ATOL
    assert theirs["cls_logits"].std(1).mean() > 1.0  # the scores depend on the place (default box) ...
    assert theirs["cls_logits"].std(0).mean() > 0.1  # ... and on the image


def test_the_default_boxes_are_torchvisions_in_the_same_order(case: Case) -> None:
    outputs = case.our_seen["outputs"]
    ours = torchvision.ops.box_convert(case.ours.priors(outputs, (case.transform_size,) * 2), "cxcywh", "xyxy")
    theirs = case.torchvision_seen["priors"]
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() <= PRIOR_ATOL


def in_torchvision_order(ours: dict[str, Tensor], theirs: dict[str, Tensor]) -> Tensor:
    """For each of torchvision's detections, the index of our detection of its label (ours + 1) with the nearest
    box; NMS leaves no two boxes of a label that close."""
    box_error = (ours["boxes"][None] - theirs["boxes"][:, None]).abs().amax(-1)  # [theirs, ours]
    other_label = (ours["labels"][None] + 1) != theirs["labels"][:, None]
    return box_error.masked_fill(other_label, float("inf")).argmin(1)


def assert_same_detections(ours: dict[str, Tensor], theirs: dict[str, Tensor]) -> None:
    """Same count, labels (torchvision's = ours + 1), boxes and scores, paired by ``in_torchvision_order``; any
    change of order is between scores within rounding."""
    assert len(ours["scores"]) == len(theirs["scores"]) > 0
    order = in_torchvision_order(ours, theirs)
    assert torch.equal(order.sort().values, torch.arange(len(order)))  # one of ours for each of theirs
    assert torch.equal(ours["labels"][order] + 1, theirs["labels"])
    assert (ours["boxes"][order] - theirs["boxes"]).abs().max() <= BOX_ATOL
    assert (ours["scores"][order] - theirs["scores"]).abs().max() <= SCORE_ATOL
    assert (ours["scores"] - theirs["scores"]).abs().max() <= SCORE_ATOL


def test_the_detections_are_torchvisions(case: Case) -> None:
    """In original-image pixels, for every image of the batch."""
    assert len(case.our_detections) == len(case.torchvision_detections) == len(IMAGE_SIZES)
    for ours, theirs in zip(case.our_detections, case.torchvision_detections):
        # non-trivial: the cap is reached, with several classes and spread scores
        assert len(theirs["scores"]) == case.ours.decoder.max_detections
        assert theirs["labels"].unique().numel() > 5
        assert theirs["scores"].unique().numel() > 0.9 * len(theirs["scores"])
        assert_same_detections(ours, theirs)


def synthetic_head(
    priors: Tensor, side: int, score_thresh: float, crowd: bool, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Class logits and box offsets ``[1, N, ...]`` at the default boxes ``priors`` (cx, cy, w, h): spread logits,
    and either one class confident on every large default box (``crowd``: they overlap, so NMS keeps few of
    them), or a background so confident that only some tens of (box, class) pairs clear ``score_thresh``."""
    logits = 2 * torch.randn(1, len(priors), NUM_CLASSES + 1, generator=generator)
    if crowd:
        logits[0, priors[:, 2:].amin(1) > 0.2 * side, 1] += 10.0
    else:  # a class's score is about exp(logit - background logit); ~1e-4 of the pairs sit 3.7 sigma above
        logits[..., 0] += math.log(1 / score_thresh) + 3.7 * 2 * math.sqrt(2)
    return logits, 0.3 * torch.randn(1, len(priors), 4, generator=generator)


def test_decoding_is_torchvisions_where_each_setting_binds(case: Case) -> None:
    """Both decoders on the same synthetic head outputs (``synthetic_head``). In a crowd, counting
    ``pre_nms_topk`` per image instead of per class would give fewer detections than torchvision's, which reaches
    the cap; under a confident background the score threshold leaves fewer than the cap. Our fixed-shape decoding
    (export's) keeps the same detections."""
    reference, side = case.torchvision_model, case.transform_size
    priors = case.ours.priors(case.our_seen["outputs"], (side, side))
    per_image = SSDDecoder(**{**vars(case.ours.decoder), "pre_nms_topk_per_class": False})
    cap = case.ours.decoder.max_detections
    generator = torch.Generator().manual_seed(2)
    for crowd in (True, False):
        logits, offsets = synthetic_head(priors, side, case.ours.decoder.score_thresh, crowd, generator)
        head = {"cls_logits": logits, "bbox_regression": offsets}
        (theirs,) = reference.postprocess_detections(head, [case.torchvision_seen["priors"]], [(side, side)])
        (ours,) = case.ours.decoder(offsets, logits, priors, (side, side))
        if crowd:
            assert len(theirs["scores"]) == cap > len(per_image(offsets, logits, priors, (side, side))[0]["scores"])
        else:
            assert len(theirs["scores"]) < cap
        assert_same_detections(ours, theirs)
        padded = case.ours.decoder.padded(offsets, logits, priors, (side, side))  # what export puts in the graph
        count = int(padded.num_detections[0])
        assert count == len(ours["scores"]) and torch.equal(padded.scores[0, :count], ours["scores"])


def test_the_other_architectures_state_dict_is_refused_naming_a_tensor(case: Case) -> None:
    (other,) = (builder for builder in CONFIGS if builder != case.builder)
    with torch.device("meta"):  # only the names are read
        state = torchvision.models.get_model(other, weights=None, weights_backbone=None).state_dict()
    with pytest.raises(KeyError) as refused:
        case.ours.from_torchvision(state)
    missing = refused.value.args[0]
    assert missing in case.torchvision_state and missing not in state
