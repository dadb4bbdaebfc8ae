"""torchvision's COCO Faster R-CNNs load whole into our FasterRCNN and give torchvision's proposals and detections.

For ``fasterrcnn_mobilenet_v3_large_fpn``, ``fasterrcnn_mobilenet_v3_large_320_fpn``, ``fasterrcnn_resnet50_fpn``
and ``fasterrcnn_resnet50_fpn_v2``: torchvision's model is built with random weights (fixed seed) in the layout its
COCO weights are used in (frozen batch norm but for v2, eps 0 for ``fasterrcnn_resnet50_fpn``), perturbed so that
every tensor matters (random batch-norm statistics and affine terms, He-scaled layers; its four output layers
centred and scaled on an image so that objectness, class scores and box codes spread as a trained model's do,
where random ones give every RoI the same class at ~1/91), and put in eval mode. Its state dict goes through
``FasterRCNN.from_torchvision`` into the model its config here (``conf/model/faster_rcnn_*_coco.yaml``) builds for
COCO's 90 classes, loaded strictly. Both see the same generated images of different sizes and aspect ratios:
torchvision as ``model([image / 255])``, ours through the real path (the config's eval transform,
``collate_detection(size_divisor=32)``, ``inference_detections``). Both run at 320-480 px with 100 test-time
proposals per image, set alike on both sides (a CPU would take minutes at 800-1333 px and 1000 proposals); the
published settings are compared on their own.

Where the two cannot agree bit for bit, the op and its tested bound:

- normalisation order: torchvision normalises 0..1 pixels and then resizes, ours resizes pixels and the model
  normalises them. Both are linear, so the network inputs agree to float rounding (``INPUT_ATOL``), which the
  random network carries to its outputs: proposals within ``PROPOSAL_ATOL``, detections within ``BOX_ATOL`` and
  ``SCORE_ATOL``. Given our network input, torchvision's stages compute our features, proposals and scores bit
  for bit, so this rounding is the only difference;
- box decoding: torchvision divides the RoI codes by its ``bbox_reg_weights`` (10, 10, 5, 5), ours multiplies by
  ``box_std`` (0.1, 0.1, 0.2, 0.2), and boxes go back to the original image by multiplying (torchvision) or
  dividing (ours): float rounding, within ``DECODE_ATOL``.

Scores within that rounding of each other may come in either order, so proposals and detections are paired by
box. Given the very same predictions, our proposal filter keeps exactly torchvision's proposals in its order, tied
scores included.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from helpers import spread_weights
from hydra.utils import instantiate
from PIL import Image
from runs import compose_config
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import FrozenBatchNorm2d

from lightning_det.data.collate import collate_detection
from lightning_det.data.sample import render_image
from lightning_det.data.transforms import RCNNTransform, Sample
from lightning_det.models.faster_rcnn import FasterRCNN
from lightning_det.tools.train import build_model

NUM_CLASSES = 90  # COCO's 91 torchvision labels less the background, which our FasterRCNN adds inside
#: torchvision builder -> our config
CONFIGS = {
    "fasterrcnn_mobilenet_v3_large_fpn": "faster_rcnn_mobilenet_coco",
    "fasterrcnn_mobilenet_v3_large_320_fpn": "faster_rcnn_mobilenet_320_coco",
    "fasterrcnn_resnet50_fpn": "faster_rcnn_r50_fpn_coco",
    "fasterrcnn_resnet50_fpn_v2": "faster_rcnn_r50_fpn_v2_coco",
}
#: The builders whose COCO weights torchvision loads into frozen batch norm, with its eps: it overwrites that of
#: fasterrcnn_resnet50_fpn with 0 (``overwrite_eps``). v2 keeps ordinary batch norm.
FROZEN_EPS = {
    "fasterrcnn_mobilenet_v3_large_fpn": 1e-5,
    "fasterrcnn_mobilenet_v3_large_320_fpn": 1e-5,
    "fasterrcnn_resnet50_fpn": 0.0,
}
MIN_SIZE, MAX_SIZE = 320, 480  # both sides, instead of 800 / 1333 (320 / 640)
PROPOSALS = 100  # test-time proposals per image, both sides
#: (height, width): resized to 426 x 320 and 276 x 480 (426 and 276 not multiples of 32), padded to 448 x 480.
IMAGE_SIZES = [(400, 300), (300, 520)]

OBJECTNESS_STD = 2.0  # objectness logits: probabilities over (0, 1), some below the MobileNets' 0.05
ANCHOR_CODE_STD = 0.2  # proposals move ~0.2 of an anchor
LOGIT_STD = 3.0  # class logits: several classes per RoI above 0.05, few near 1
BOX_CODE_STD = 2.0  # RoI codes, divided by (10, 10, 5, 5): detections move ~0.2 of a proposal

INPUT_ATOL = 2e-6  # normalised input units; measured 7.2e-7
PROPOSAL_ATOL = 1e-3  # px of the resized image; measured up to 4.6e-4 (MobileNets, v2)
BOX_ATOL = 1.2e-2  # px of the original image; measured up to 1.3e-3 (MobileNets, v2), 5.8e-4 (ResNet-50 FPN) on an
#                    Intel CPU, 8.0e-3 (v2) on an AMD EPYC, whose float32 kernels sum in another order
SCORE_ATOL = 1e-4  # measured up to 1.6e-5
TIE_ATOL = 1e-5  # proposal scores within this of each other may come in either order
DECODE_ATOL = 2.5e-4  # px: the box decoding alone, a few float32 steps (6.1e-5) of a 500 px coordinate


@dataclass
class Case:
    """One architecture, run once per module: both models, what they computed, and their detections."""

    builder: str
    torchvision_model: nn.Module
    ours: FasterRCNN
    transform: RCNNTransform
    torchvision_state: dict[str, Tensor]
    batch: dict[str, Any]
    torchvision_seen: dict[str, Any]  # its network "input", "features", and its RPN's "proposals" and "scores"
    our_seen: dict[str, Any]  # our network "input" and "outputs" (FasterRCNNOutputs)
    torchvision_detections: list[dict[str, Tensor]]
    our_detections: list[dict[str, Tensor]]
    same_input: dict[str, Any]  # torchvision's "features", "proposals", "detections" from our network input


def generated_images() -> list[Tensor]:
    """``uint8 [3, H, W]`` sample-data images (objects from tiny to large) at ``IMAGE_SIZES``."""
    images = []
    for seed, (height, width) in enumerate(IMAGE_SIZES):
        image, _ = render_image(np.random.default_rng(seed))
        pixels = np.asarray(image.resize((width, height), Image.BILINEAR))
        images.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous())
    return images


def as_samples(images: list[Tensor]) -> list[Sample]:
    return [
        Sample(image=image, boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long),
               difficult=torch.zeros(0, dtype=torch.bool), image_id=k, path=f"image{k}.png",
               orig_size=(image.shape[-2], image.shape[-1]))
        for k, image in enumerate(images)
    ]


def torchvision_model(builder: str, **settings: Any) -> nn.Module:
    """torchvision's detector with random weights (no download), as ``get_model`` builds it."""
    torch.manual_seed(0)
    return torchvision.models.get_model(builder, weights=None, weights_backbone=None, **settings).eval()


def centre_and_spread(layer: nn.Module, inputs: Tensor, spread: float) -> None:
    """Shift and scale ``layer`` (a 1x1 conv or a linear layer) so that on ``inputs`` its outputs have mean 0 and
    std ``spread``: they then follow the image, not the inputs' mean (one class winning everywhere)."""
    samples = inputs.transpose(0, 1).flatten(1) if inputs.dim() == 4 else inputs.t()  # [channels, samples]
    mean = samples.mean(1)
    layer.weight.mul_(spread / (layer.weight.flatten(1) @ (samples - mean[:, None])).std())
    layer.bias.copy_(-layer.weight.flatten(1) @ mean)


def freeze_batch_norm(model: nn.Module, eps: float) -> None:
    """Each ``BatchNorm2d`` replaced by a ``FrozenBatchNorm2d`` of ``eps`` with its statistics: what torchvision
    builds when it loads these COCO weights."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(module.num_features, eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(module, key))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, frozen)


def perturb(model: nn.Module, builder: str, image: Tensor) -> None:
    """Random batch-norm statistics and affine terms, He-scaled convolutions and linear layers (the image's signal
    lasts through the depth), the COCO weights' batch norm, then the four output layers centred and spread on
    ``image`` (0..1, at its own size: only the statistics of what reaches them are wanted)."""
    spread_weights(model, torch.Generator().manual_seed(1), (nn.Conv2d, nn.Linear))
    if builder in FROZEN_EPS:
        freeze_batch_norm(model, FROZEN_EPS[builder])
    normalised = model.transform.normalize(image)[None]
    images = ImageList(normalised, [tuple(normalised.shape[-2:])])
    features = model.backbone(normalised)
    hidden = torch.cat([model.rpn.head.conv(level).flatten(2) for level in features.values()], 2)[..., None]
    centre_and_spread(model.rpn.head.cls_logits, hidden, OBJECTNESS_STD)
    centre_and_spread(model.rpn.head.bbox_pred, hidden, ANCHOR_CODE_STD)
    proposals, _ = model.rpn(images, features)
    heads = model.roi_heads
    represented = heads.box_head(heads.box_roi_pool(features, proposals, images.image_sizes))
    centre_and_spread(heads.box_predictor.cls_score, represented, LOGIT_STD)
    centre_and_spread(heads.box_predictor.bbox_pred, represented, BOX_CODE_STD)


def our_config(config_name: str, *overrides: str) -> Any:
    """The config of ``python train.py model=<config_name> <overrides>``."""
    return compose_config("train", f"model={config_name}", *overrides)


def our_model(cfg: Any) -> FasterRCNN:
    """The model ``python train.py model=<config>`` builds for COCO's classes."""
    return build_model(cfg, num_classes=NUM_CLASSES, class_names=[f"class{i}" for i in range(NUM_CLASSES)]).eval()


def record(module: nn.Module, seen: dict[str, Any], key: str, what: Callable[[tuple, Any], Any]) -> RemovableHandle:
    """Keep ``what(inputs, output)`` of each call of ``module`` in ``seen[key]``: what the real path computed."""
    return module.register_forward_hook(lambda _, inputs, output: seen.__setitem__(key, what(inputs, output)))


def recording_filter(rpn: nn.Module, seen: dict[str, Any]) -> Callable[..., Any]:
    """torchvision's proposal filter, keeping the per-image proposals and scores its RPN's forward drops."""
    def filter_proposals(*args: Any) -> Any:
        seen["proposals"], seen["scores"] = type(rpn).filter_proposals(rpn, *args)
        return seen["proposals"], seen["scores"]

    return filter_proposals


def torchvision_stages(model: nn.Module, images: Tensor, batch: dict[str, Any]) -> dict[str, Any]:
    """What torchvision's forward does after its transform (backbone, RPN, RoI heads, back to the original
    image), on the network input ``images`` of ``batch``."""
    sizes = [tuple(size) for size in batch["meta"]["image_size"].tolist()]
    features = model.backbone(images)
    proposals, _ = model.rpn(ImageList(images, sizes), features)
    detections, _ = model.roi_heads(features, proposals, sizes)
    original = [tuple(size) for size in batch["meta"]["orig_size"].tolist()]
    return {"features": features, "proposals": proposals,
            "detections": model.transform.postprocess(detections, sizes, original)}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request: pytest.FixtureRequest, one_torch_thread: None) -> Case:
    builder = request.param
    images = generated_images()
    reference = torchvision_model(builder, min_size=MIN_SIZE, max_size=MAX_SIZE, rpn_post_nms_top_n_test=PROPOSALS)
    with torch.no_grad():
        perturb(reference, builder, images[0].float() / 255)
    cfg = our_config(CONFIGS[builder], f"data.pipeline.train_transform.min_size={MIN_SIZE}",
                     f"data.pipeline.train_transform.max_size={MAX_SIZE}", f"model.rpn.max_detections=[2000,{PROPOSALS}]")
    ours = our_model(cfg)
    state = reference.state_dict()
    ours.load_state_dict(ours.from_torchvision(state), strict=True)

    torchvision_seen: dict[str, Any] = {}
    our_seen: dict[str, Any] = {}
    hooks = [record(reference.backbone, torchvision_seen, "input", lambda inputs, _: inputs[0]),
             record(reference.backbone, torchvision_seen, "features", lambda _, output: output),
             record(ours.backbone, our_seen, "input", lambda inputs, _: inputs[0]),
             record(ours, our_seen, "outputs", lambda _, output: output)]
    reference.rpn.filter_proposals = recording_filter(reference.rpn, torchvision_seen)
    transform = instantiate(cfg.data.pipeline.val_transform)
    batch = collate_detection([transform([sample]) for sample in as_samples(images)], size_divisor=32)
    with torch.no_grad():
        torchvision_detections = reference([image.float() / 255 for image in images])
        our_detections = ours.inference_detections(batch)
        for hook in hooks:
            hook.remove()
        del reference.rpn.filter_proposals  # the method again
        same_input = torchvision_stages(reference, our_seen["input"], batch)
    return Case(builder, reference, ours, transform, state, batch, torchvision_seen, our_seen,
                torchvision_detections, our_detections, same_input)


def torchvision_settings(model: nn.Module) -> dict[str, Any]:
    """The resize, normalisation, anchor, proposal-filter, target and decoding settings of a torchvision detector."""
    rpn, heads, transform = model.rpn, model.roi_heads, model.transform
    return {
        "resize": (transform.min_size[-1], transform.max_size),
        "pixel_mean": [255 * m for m in transform.image_mean],
        "pixel_std": [255 * s for s in transform.image_std],
        "anchors": (rpn.anchor_generator.sizes, rpn.anchor_generator.aspect_ratios),
        "rpn_pre_nms_top_n": (rpn._pre_nms_top_n["training"], rpn._pre_nms_top_n["testing"]),
        "rpn_post_nms_top_n": (rpn._post_nms_top_n["training"], rpn._post_nms_top_n["testing"]),
        "rpn_filter": (rpn.nms_thresh, rpn.min_size, rpn.score_thresh),
        "rpn_matcher": (rpn.proposal_matcher.high_threshold, rpn.proposal_matcher.low_threshold),
        "rpn_sampler": (rpn.fg_bg_sampler.batch_size_per_image, rpn.fg_bg_sampler.positive_fraction),
        "roi_matcher": (heads.proposal_matcher.high_threshold, heads.proposal_matcher.low_threshold),
        "roi_sampler": (heads.fg_bg_sampler.batch_size_per_image, heads.fg_bg_sampler.positive_fraction),
        "roi_align": (heads.box_roi_pool.output_size, heads.box_roi_pool.sampling_ratio),
        "bbox_reg_weights": heads.box_coder.weights,
        # per-class NMS and the 1e-2 px small-box rule are fixed in its postprocess_detections
        "decoding": (heads.score_thresh, heads.nms_thresh, heads.detections_per_img, False, 1e-2),
    }


def our_settings(model: FasterRCNN, transform: RCNNTransform) -> dict[str, Any]:
    """The same settings of our model and eval transform, in torchvision's terms."""
    rpn, head, assigner, decoder = model.rpn, model.roi_head, model.assigner, model.decoder
    return {
        "resize": (transform.min_size, transform.max_size),
        "pixel_mean": model.pixel_mean.flatten().tolist(),
        "pixel_std": model.pixel_std.flatten().tolist(),
        "anchors": (rpn.anchor_generator.sizes, rpn.anchor_generator.aspect_ratios),
        "rpn_pre_nms_top_n": rpn.pre_nms_topk,
        "rpn_post_nms_top_n": rpn.max_detections,
        "rpn_filter": (rpn.nms_thresh, rpn.min_size, rpn.score_thresh),
        "rpn_matcher": (assigner.rpn_positive_iou, assigner.rpn_negative_iou),
        "rpn_sampler": (assigner.rpn_batch_size, assigner.rpn_positive_fraction),
        "roi_matcher": (assigner.roi_positive_iou, assigner.roi_negative_iou[1]),
        "roi_sampler": (assigner.roi_batch_size, assigner.roi_positive_fraction),
        "roi_align": (head.pooler.output_size, head.pooler.sampling_ratio),
        "bbox_reg_weights": tuple(1 / s for s in head.box_std.tolist()),
        "decoding": (decoder.score_thresh, decoder.nms_thresh, decoder.max_detections, decoder.class_agnostic,
                     decoder.min_size),
    }


def flat(value: Any) -> list[Any]:
    return [item for part in value for item in flat(part)] if isinstance(value, (tuple, list)) else [value]


def assert_same_settings(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    """Equal setting by setting; numbers to float32 rounding (our pixel statistics and box weights)."""
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert flat(ours[key]) == pytest.approx(flat(theirs[key]), rel=1e-6), key


def batch_norms(model: nn.Module) -> set[tuple[str, float]]:
    """The kinds of batch norm a model holds, with their eps."""
    return {(type(m).__name__, m.eps) for m in model.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))}


@pytest.mark.parametrize("builder", sorted(CONFIGS))
def test_each_config_holds_the_published_settings(builder: str) -> None:
    """The configs as written (800-1333 px and 1000 proposals; 320-640 px and 150 for the 320 variant) against the
    builders' own settings, and the batch norm of the COCO weights (torchvision's model is built on the meta
    device: only its settings are read, and it has ordinary batch norm without weights)."""
    cfg = our_config(CONFIGS[builder])
    with torch.device("meta"):
        reference = torchvision_model(builder)
    ours = our_model(cfg)
    transform = instantiate(cfg.data.pipeline.val_transform)
    assert transform.resize == "torchvision"  # its resize: bilinear without antialiasing, the size floored
    assert_same_settings(our_settings(ours, transform), torchvision_settings(reference))
    frozen = builder in FROZEN_EPS
    expected = {("FrozenBatchNorm2d", FROZEN_EPS[builder])} if frozen else {("BatchNorm2d", 1e-5)}
    assert batch_norms(ours) == expected and ours.pretrained_layout  # and the first stages frozen


def test_the_settings_of_both_test_models_are_the_same(case: Case) -> None:
    """Read off the two models the equivalence is shown with (the test's sizes and proposal count set alike)."""
    assert_same_settings(our_settings(case.ours, case.transform), torchvision_settings(case.torchvision_model))
    assert batch_norms(case.ours) == batch_norms(case.torchvision_model)


def test_every_torchvision_tensor_takes_its_place(case: Case) -> None:
    """Each of our tensors is the torchvision tensor of the same name after the RoI head's renaming, and each of
    torchvision's is used; a model built without weights (ordinary batch norm) converts too, its step counters
    dropped where our batch norm is frozen."""
    ours = case.ours.state_dict()
    renamed = {"roi_head.box_head.": "roi_heads.box_head.", "roi_head.predictor.": "roi_heads.box_predictor."}
    used = set()
    for name, tensor in ours.items():
        theirs = next((new + name[len(old):] for old, new in renamed.items() if name.startswith(old)), name)
        assert torch.equal(tensor, case.torchvision_state[theirs]), name
        used.add(theirs)
    assert used == set(case.torchvision_state)
    with torch.device("meta"):
        unfrozen = torchvision_model(case.builder).state_dict()
    assert set(case.ours.from_torchvision(unfrozen)) == set(ours)


def test_the_network_input_agrees_within_the_normalisation_order_bound(case: Case) -> None:
    theirs, ours = case.torchvision_seen["input"], case.our_seen["input"]
    assert ours.shape == theirs.shape == (len(IMAGE_SIZES), 3, 448, 480)
    assert (ours - theirs).abs().max() <= INPUT_ATOL
    sizes = case.batch["meta"]["image_size"]
    assert torch.equal(sizes, torch.tensor([[426, 320], [276, 480]]))  # floored: 426.7, 276.9


def test_on_our_input_torchvisions_stages_compute_what_ours_do(case: Case) -> None:
    """The same features, proposals and scores to the bit, and boxes within the decoding's rounding, in the same
    order: beyond the input's rounding, nothing differs."""
    theirs, outputs = case.same_input, case.our_seen["outputs"]
    assert list(outputs.features) == list(theirs["features"])
    for level, feature in theirs["features"].items():
        assert torch.equal(outputs.features[level], feature), level
    for image, proposals in enumerate(theirs["proposals"]):
        assert torch.equal(outputs.proposals[outputs.proposal_image == image], proposals)
    for ours, detections in zip(case.our_detections, theirs["detections"], strict=True):
        assert torch.equal(ours["labels"] + 1, detections["labels"])
        assert torch.equal(ours["scores"], detections["scores"])
        assert (ours["boxes"] - detections["boxes"]).abs().max() <= DECODE_ATOL


def pair_boxes(ours: Tensor, theirs: Tensor, other: Tensor | None = None) -> Tensor:
    """For each of torchvision's boxes, the index of our nearest (``other``: pairs that may not match, e.g. other
    labels). NMS leaves no two kept boxes that close, so this pairs them whatever their order."""
    error = (ours[None] - theirs[:, None]).abs().amax(-1)  # [theirs, ours]
    return (error if other is None else error.masked_fill(other, float("inf"))).argmin(1)


def assert_same_detections(ours: dict[str, Tensor], theirs: dict[str, Tensor], box_atol: float) -> None:
    """Same count, labels (torchvision's = ours + 1), boxes within ``box_atol`` and scores, paired by box."""
    assert len(ours["scores"]) == len(theirs["scores"])
    order = pair_boxes(ours["boxes"], theirs["boxes"], (ours["labels"][None] + 1) != theirs["labels"][:, None])
    assert torch.equal(order.sort().values, torch.arange(len(order)))  # one of ours for each of theirs
    assert torch.equal(ours["labels"][order] + 1, theirs["labels"])
    assert (ours["boxes"][order] - theirs["boxes"]).abs().max() <= box_atol
    assert (ours["scores"][order] - theirs["scores"]).abs().max() <= SCORE_ATOL
    assert (ours["scores"] - theirs["scores"]).abs().max() <= SCORE_ATOL  # any swap is within rounding


def test_the_proposals_are_torchvisions(case: Case) -> None:
    """Per image the same proposals in resized-image pixels, in torchvision's order up to scores within rounding
    of each other."""
    outputs = case.our_seen["outputs"]
    proposals, scores = case.torchvision_seen["proposals"], case.torchvision_seen["scores"]
    for image, (theirs, their_scores) in enumerate(zip(proposals, scores, strict=True)):
        ours = outputs.proposals[outputs.proposal_image == image]
        assert len(ours) == len(theirs) == PROPOSALS
        order = pair_boxes(ours, theirs)
        assert torch.equal(order.sort().values, torch.arange(len(order)))  # one of ours for each of theirs
        assert (ours[order] - theirs).abs().max() <= PROPOSAL_ATOL
        assert (their_scores[order] - their_scores).abs().max() <= TIE_ATOL  # any reordering is among equal scores
        assert their_scores.unique().numel() > 0.9 * len(their_scores)


def test_the_detections_are_torchvisions(case: Case) -> None:
    """In original-image pixels, non-trivial: many detections of several classes with spread scores."""
    assert len(case.our_detections) == len(case.torchvision_detections) == len(IMAGE_SIZES)
    for ours, theirs in zip(case.our_detections, case.torchvision_detections, strict=True):
        assert len(theirs["scores"]) > 20 and theirs["labels"].unique().numel() > 5
        assert theirs["scores"].unique().numel() > 0.9 * len(theirs["scores"]) and theirs["scores"].max() > 0.5
        assert_same_detections(ours, theirs, BOX_ATOL)


def test_the_proposal_filter_is_torchvisions_to_the_bit_ties_included(case: Case) -> None:
    """Both filters on the same predictions (our RPN's, objectness lowered so that the MobileNets' score threshold
    drops some, and rounded to quarters so that many tie), every proposal kept after NMS: the same proposals in
    the same order, clipped to each image where the batch goes on (padding)."""
    rpn = case.our_seen["outputs"].rpn
    rpn = rpn._replace(objectness=((rpn.objectness - 6) * 4).round() / 4)
    sizes = case.batch["meta"]["image_size"]
    batch = len(sizes)
    theirs_filter = copy.copy(case.torchvision_model.rpn)
    theirs_filter._post_nms_top_n = {"training": 10**6, "testing": 10**6}
    ours_filter = copy.copy(case.ours.rpn)
    ours_filter.max_detections = (10**6, 10**6)
    boxes = theirs_filter.box_coder.decode(rpn.deltas.flatten(0, 1), [rpn.anchors] * batch).view(batch, -1, 4)
    per_level = torch.bincount(rpn.anchor_level).tolist()
    theirs, _ = theirs_filter.filter_proposals(boxes, rpn.objectness, sizes.tolist(), per_level)
    ours, image = ours_filter.propose(rpn, sizes)
    assert (rpn.objectness[0].unique(return_counts=True)[1] > 1).sum() > 10
    padded = torch.tensor(case.batch["images"].shape[-2:]) > sizes  # [B, (h, w)]
    for b in range(batch):
        assert len(theirs[b]) > 50 and torch.equal(ours[image == b], theirs[b])
        ends = theirs[b][:, [3, 2]]
        assert (ends <= sizes[b]).all() and (ends[:, padded[b]] == sizes[b][padded[b]]).any()
    if ours_filter.score_thresh > 0:
        ours_filter.score_thresh = 0.0
        assert len(ours_filter.propose(rpn, sizes)[0]) > len(ours)


def test_the_decoding_is_torchvisions_where_each_setting_binds(case: Case) -> None:
    """Both decoders on the same synthetic RoI head outputs for the batch's proposals: with spread logits the cap
    of detections per image is reached; with a confident background few pairs clear ``score_thresh``."""
    outputs, reference = case.our_seen["outputs"], case.torchvision_model
    proposals, image, sizes = outputs.proposals, outputs.proposal_image, case.batch["meta"]["image_size"]
    generator = torch.Generator().manual_seed(2)
    cap = case.ours.decoder.max_detections
    for background in (0.0, 10.0):
        logits = 2 * torch.randn(len(proposals), NUM_CLASSES + 1, generator=generator)
        logits[:, 0] += background
        codes = torch.randn(len(proposals), NUM_CLASSES + 1, 4, generator=generator)
        ours = case.ours.decoder(logits, case.ours.roi_head.decode(codes, proposals), image, len(sizes), sizes)
        theirs = reference.roi_heads.postprocess_detections(
            logits, codes.flatten(1), [proposals[image == b] for b in range(len(sizes))], sizes.tolist())
        for b, (boxes, scores, labels) in enumerate(zip(*theirs, strict=True)):
            assert (len(scores) == cap) if background == 0.0 else (0 < len(scores) < cap)
            assert_same_detections(ours[b], {"boxes": boxes, "scores": scores, "labels": labels}, DECODE_ATOL)


def test_the_other_architectures_state_dicts_are_refused_naming_a_tensor(case: Case) -> None:
    for other in sorted(set(CONFIGS) - {case.builder}):
        with torch.device("meta"):  # only the names are read
            state = torchvision.models.get_model(other, weights=None, weights_backbone=None).state_dict()
        if set(state) <= set(case.torchvision_state) | {n for n in state if n.endswith("num_batches_tracked")}:
            continue  # the 320 variant is the same network
        with pytest.raises(KeyError) as refused:
            case.ours.from_torchvision(state)
        missing = refused.value.args[0]
        assert missing in case.torchvision_state and missing not in state
