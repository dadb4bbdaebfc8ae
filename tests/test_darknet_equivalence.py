"""Darknet's COCO ``yolov3.weights`` and ``yolov3-tiny.weights``, and a ``yolov3-tiny_3l`` file, give in our YOLOv3
what Darknet's own network gives.

Random weights (every conv layer, 80 classes, Darknet's anchors) are written in Darknet's file format, loaded
through ``init_from`` (``initialise_from``) into the YOLOv3 the Hydra config builds (``model=yolov3`` /
``model=yolov3_tiny`` / ``model=yolov3_tiny3`` with ``model.anchors=darknet``), and into ``darknet_reference.py``:
a second, independent reading of the cfg text, the file and the forward pass. Both see one letterboxed image.
Every [yolo] output must agree, and so must the detections, decoded the Darknet way in the reference at our
decoder's thresholds. Both sides run in float64 for the tight comparison (the float32 file values widen
exactly), and in float32 as deployed.

Differences from ``darknet detector valid`` that are ours on purpose, so the reference is given the same
settings: ``pre_nms_topk`` (Darknet has none), ``max_detections`` (Darknet keeps all), and clipping boxes to the
image before NMS (Darknet clips when it writes them, after NMS; measured below). Our decoder's multi-label scoring
(a box kept for every class above the threshold) is Darknet's own rule, and so is its threshold.

Cost: the input is 320 px, not Darknet's 416 (the network has no size-specific part). The default suite runs
yolov3-tiny at full size and yolov3 at full depth (all 75 convs, 23 shortcuts, both routes) with a quarter of the
channels; full-size yolov3 (a 248 MB file, ~40 s on two busy cores) is marked slow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from darknet_reference import TINY_ANCHORS, TINY_MASKS, DarknetNetwork, Yolo, darknet_cfg, darknet_detections, randomise
from runs import compose_config
from torch import Tensor

from lightning_det.data.sample import render_image
from lightning_det.data.transforms.common import letterbox
from lightning_det.models.weights import initialise_from
from lightning_det.tools.train import build_model

NUM_CLASSES = 80
INPUT_SIZE = 320  # a multiple of 32 below Darknet's 416: 40 x 40, 20 x 20 and 10 x 10 cells
CONFIGS = {"yolov3": "yolov3", "tiny": "yolov3_tiny", "tiny3": "yolov3_tiny3"}
SEEN = 32_013_312 + 2**33  # images seen, above 2**32 so an int32 reading of the header would show
MAX_LOG_SCALE = math.log(1000 / 16)  # our decoder caps exp(tw), which Darknet does not; the weights stay below

# float64 on both sides (weights read as float32, widened exactly): only the order of operations differs, so the
# outputs agree to ~1e-13 (measured: 4e-13 yolov3, 2e-13 yolov3 at width 0.25, 5e-14 tiny); 1e-9 leaves room and
# still catches any wrong layer, order or constant (a zero pad in tiny's size-2 stride-1 maxpool moves them 0.28).
OUTPUT_ATOL_64 = 1e-9
# float32, as deployed: rounding through 75 layers (measured: 1.2e-4 for yolov3, 1.2e-5 for yolov3-tiny, on logits
# of spread 0.4 to 1.5). Darknet's own float32 (im2col + gemm) rounds differently again, by as much.
OUTPUT_ATOL_32 = 2e-3
BOX_ATOL = 1e-3  # pixels
SCORE_ATOL = 1e-4


@dataclass
class Case:
    """One variant, run once per module: what both sides give on one image."""

    variant: str
    width: float
    ours: list[Tensor]  # float64 [B, A, H, W, 5 + C] per level, smallest stride first
    reference: list[Tensor]  # the reference's [yolo] inputs in that layout and order, float64
    ours_32: list[Tensor]  # the same in float32
    reference_32: list[Tensor]
    reference_cpu_bn: list[Tensor]  # float64 with Darknet's CPU normalisation
    our_detections: list[dict[str, Tensor]]  # float64
    reference_detections: list[dict[str, Tensor]]
    darknet_order_detections: list[dict[str, Tensor]]  # clipped after NMS, as Darknet does
    min_running_variance: float


def letterboxed_image(size: int) -> Tensor:
    """``[1, 3, size, size]`` pixels (0..255): a sample-data image (shapes on a noisy background), letterboxed."""
    image, _ = render_image(np.random.default_rng(3))
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    return letterbox(pixels, torch.zeros(0, 4), size).image.as_subclass(Tensor).float()[None]


def our_model(config_name: str, width: float = 1.0) -> torch.nn.Module:
    """The model ``python train.py model=<config_name> model.anchors=darknet`` builds for 80 classes."""
    cfg = compose_config("train", f"model={config_name}", "model.anchors=darknet", f"model.width={width}")
    return build_model(cfg, num_classes=NUM_CLASSES, class_names=[f"class{i}" for i in range(NUM_CLASSES)])


def ours_layout(yolo_inputs: list[Tensor], yolos: list[Yolo]) -> list[Tensor]:
    """The reference's ``[B, A * (5 + C), h, w]`` (coarsest first) as ``[B, A, h, w, 5 + C]``, finest first."""
    maps = [
        x.view(x.shape[0], len(y.anchors), 5 + y.classes, *x.shape[2:]).permute(0, 1, 3, 4, 2)
        for x, y in zip(yolo_inputs, yolos)
    ]
    return sorted(maps, key=lambda m: -m.shape[2])


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(("tiny", 1.0), id="tiny"),
        pytest.param(("tiny3", 1.0), id="tiny3"),
        # Every one of yolov3's 75 convs and 23 shortcuts at a quarter of the channels (8 to 256): the full depth
        # in the default suite. The full-size file (248 MB) runs with -m slow.
        pytest.param(("yolov3", 0.25), id="yolov3-width0.25"),
        pytest.param(("yolov3", 1.0), id="yolov3", marks=pytest.mark.slow),
    ],
)
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    variant, width = request.param
    cfg = darknet_cfg(variant, NUM_CLASSES, INPUT_SIZE, width)
    pixels = letterboxed_image(INPUT_SIZE)
    path = tmp_path_factory.mktemp("darknet") / f"{variant}.weights"
    writer = DarknetNetwork(cfg)
    randomise(writer, pixels / 255, seed=0)
    writer.write_weights(path, seen=SEEN)
    del writer

    reference = DarknetNetwork(cfg)
    assert reference.load_weights(path) == {"major": 0, "minor": 2, "revision": 0, "seen": SEEN}
    model = our_model(CONFIGS[variant], width).eval()
    initialise_from(model, path)
    decoder = model.decoder
    assert decoder.multi_label and not decoder.class_agnostic, "the reference decodes Darknet's way: per class"
    settings = dict(thresh=decoder.score_thresh, nms=decoder.nms_thresh, pre_nms_topk=decoder.pre_nms_topk,
                    max_detections=decoder.max_detections)
    size = (INPUT_SIZE, INPUT_SIZE)
    with torch.no_grad():
        ours_32 = list(model.network_outputs({"images": pixels}))
        reference_32 = ours_layout(reference.forward(pixels / 255), reference.yolos)
        model.double()
        reference.to(torch.float64)
        pixels = pixels.double()
        ours = list(model.network_outputs({"images": pixels}))
        yolo_inputs = reference.forward(pixels / 255)
        cpu_bn = reference.forward(pixels / 255, bn_formula="cpu")
        return Case(
            variant=variant,
            width=width,
            ours=ours,
            reference=ours_layout(yolo_inputs, reference.yolos),
            ours_32=ours_32,
            reference_32=reference_32,
            reference_cpu_bn=ours_layout(cpu_bn, reference.yolos),
            our_detections=model.decode(ours, {"images": pixels}),
            reference_detections=darknet_detections(yolo_inputs, reference.yolos, size, **settings),
            darknet_order_detections=darknet_detections(
                yolo_inputs, reference.yolos, size, **settings, clip_before_nms=False
            ),
            min_running_variance=min(
                c.rolling_variance.min().item() for c in reference.convolutionals if c.batch_normalize
            ),
        )


def max_difference(a: list[Tensor], b: list[Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def test_every_yolo_output_matches_darknets(case: Case) -> None:
    strides = (16, 32) if case.variant == "tiny" else (8, 16, 32)
    shapes = [(1, 3, INPUT_SIZE // s, INPUT_SIZE // s, 5 + NUM_CLASSES) for s in strides]
    assert [o.shape for o in case.ours] == [r.shape for r in case.reference] == shapes
    for level in case.reference:
        assert torch.isfinite(level).all()
        # Non-trivial: the logits spread as the weights intend, so a wrong layer would move them.
        assert 0.5 < level[..., 5:].std() < 2 and 0.2 < level[..., 2:4].std() < 1
        assert level[..., 2:4].max() < MAX_LOG_SCALE  # our cap on box size is never the difference
    assert max_difference(case.ours, case.reference) <= OUTPUT_ATOL_64
    assert max_difference(case.ours_32, case.reference_32) <= OUTPUT_ATOL_32


def test_detections_match_darknets(case: Case) -> None:
    (ours,), (reference,) = case.our_detections, case.reference_detections
    # Enough detections over enough classes and scores that a wrong anchor, level or class order would show.
    assert len(reference["scores"]) >= 100 and len(reference["labels"].unique()) >= 40
    assert reference["scores"][-1] < 0.9 * reference["scores"][0]  # not all saturated at 1
    assert len(ours["scores"]) == len(reference["scores"])
    assert torch.equal(ours["labels"], reference["labels"])
    assert (ours["boxes"] - reference["boxes"]).abs().max() <= BOX_ATOL
    assert (ours["scores"] - reference["scores"]).abs().max() <= SCORE_ATOL


def test_clipping_before_or_after_nms_changes_few_detections(case: Case) -> None:
    """Our decoder clips boxes to the image before NMS (as torchvision does), Darknet after: an overlap changes
    only where a box crosses the border, so the two orders keep nearly the same detections."""
    def keys(detections: dict[str, Tensor]) -> set[tuple[int, float]]:
        pairs = zip(detections["labels"].tolist(), detections["scores"].tolist())
        return {(label, round(score, 9)) for label, score in pairs}

    (clipped_first,), (darknet,) = case.reference_detections, case.darknet_order_detections
    differing = len(keys(clipped_first) - keys(darknet))
    print(f"{case.variant}: {differing} of {len(clipped_first['scores'])} detections differ by clipping order")
    assert differing <= 0.05 * len(clipped_first["scores"])


def test_darknets_cpu_normalisation_differs_within_its_bound(case: Case) -> None:
    """Darknet's CPU inference divides by ``sqrt(var) + 1e-6`` where its GPU inference, its (cuDNN) training
    and our BatchNorm (eps 1e-5) divide by ``sqrt(var + 1e-5)``: per channel the normalised value changes by a
    factor within ``5e-6 / var`` of 1 (``sqrt(1 + x) <= 1 + x / 2``). Running variances down to ~1e-3 here make
    that 0.5 % per channel, which the layers compound into a visible change of the logits."""
    assert 5e-6 / case.min_running_variance < 1e-2
    difference = max_difference(case.reference_cpu_bn, case.reference)
    print(f"{case.variant}: Darknet CPU vs GPU normalisation moves the logits by up to {difference:.3g}")
    assert 0 < difference < 3


def test_old_headers_count_seen_images_in_32_bits(tmp_path: Path) -> None:
    """Version 0.1 files (``seen`` an int32, 16-byte header) load the same tensors as 0.2 files (int64)."""
    network = DarknetNetwork(darknet_cfg("tiny", NUM_CLASSES, INPUT_SIZE))
    generator = torch.Generator().manual_seed(1)
    for conv in network.convolutionals:
        for name in conv.file_tensors():
            setattr(conv, name, torch.rand(getattr(conv, name).shape, generator=generator) + 0.5)
    network.write_weights(tmp_path / "new.weights", version=(0, 2, 0), seen=SEEN)
    network.write_weights(tmp_path / "old.weights", version=(0, 1, 0), seen=123_456)
    assert (tmp_path / "new.weights").stat().st_size == (tmp_path / "old.weights").stat().st_size + 4
    new, old = our_model("yolov3_tiny"), our_model("yolov3_tiny")
    assert new.load_foreign_weights(str(tmp_path / "new.weights"))["seen"] == SEEN
    assert old.load_foreign_weights(str(tmp_path / "old.weights")) == {
        "major": 0, "minor": 1, "revision": 0, "seen": 123_456
    }
    for (name, a), b in zip(new.state_dict().items(), old.state_dict().values()):
        assert torch.equal(a, b), name


def test_tiny_darknet_anchors_are_the_ones_its_weights_were_trained_with() -> None:
    """yolov3-tiny.weights' stride-16 [yolo] uses anchors 1, 2, 3 (see ``TINY_MASKS``): the reference reads them
    off the cfg text, and our ``anchors: darknet`` must be the same pixels, level by level."""
    yolos = DarknetNetwork(darknet_cfg("tiny", NUM_CLASSES, INPUT_SIZE)).yolos
    pairs = list(zip(TINY_ANCHORS[::2], TINY_ANCHORS[1::2]))
    assert [y.anchors for y in yolos] == [[pairs[m] for m in mask] for mask in TINY_MASKS]
    model = our_model("yolov3_tiny")
    assert model.anchors.tolist() == [[list(a) for a in y.anchors] for y in reversed(yolos)]
