"""Training-step speed on CPU: forward + loss + backward + optimizer step.

Each model is built from its Hydra config (``conf/model/<name>.yaml``) at the config's default input size and
trained on a synthetic batch, so a row measures what ``train.py model=<name>`` runs per step.

    python bench/train_step.py                          # throughput, one row per model
    python bench/train_step.py --models yolov3_tiny --iterations 10 --threads 4
    python bench/train_step.py --compare                # today's step against each speed-up, alternated
    python bench/train_step.py --compare --compile      # ... and torch.compile (slow to compile)
    python bench/train_step.py --loss --optimizer       # the ignore rule at 8-1,000 objects; optimizer paths
    python bench/train_step.py --precision --rounds 5   # float32 against bf16 autocast (trainer.precision: auto)

``--compare`` runs the variants of one model round-robin (A/B/A/B), so a slower spell of the machine hits all of
them alike, and reports each variant's median time ratio to "today" over the rounds. "Today" is the step at
the commit before the speed-ups: NCHW layout, Adam's single-tensor loop (torch's CPU default), and the ignore
rule's IoU as one ``[B, predictions, objects]`` matrix.
"""

from __future__ import annotations

import argparse
import copy
import logging
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from configs import CONF, model_config
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tables import table

from lightning_det.models.detector import Detector
from lightning_det.models.yolov3.decode import decode_boxes
from lightning_det.models.yolov3.grid import PredictionGrid
from lightning_det.models.yolov3.loss import YOLOv3Loss

NUM_CLASSES = 20  # Pascal VOC
DARKNET_SIZE = 416  # the YOLO configs choose their input from the data (img_size: auto); measured at Darknet's

log = logging.getLogger(__name__)


def from_config(name: str, img_size: int | None = None, tuned: bool = False) -> Callable[[], tuple[Detector, int]]:
    """A builder for ``model=<name>`` (with its sample-data tuning when ``tuned``): the model for ``NUM_CLASSES``
    and the config's ``data.img_size`` (or ``img_size``, for pipelines that resize by the shorter side, e.g. Faster
    R-CNN's 600 -> 608 padded)."""

    def build() -> tuple[Detector, int]:
        cfg = model_config(name, tuned)
        model = instantiate(cfg.model, num_classes=NUM_CLASSES, _recursive_=False)  # parts go in as configs
        return model, img_size or int(cfg.data.img_size)

    return build


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], tuple[Detector, int]]
    batch_size: int


# Batch 1 and 4 of the same model show what batching buys on this CPU; the sample-size rows use the settings of
# the sample runs (conf/tuned/), where fixed per-step costs weigh more than at full size.
CASES = [
    Case("yolov3_tiny", from_config("yolov3_tiny", DARKNET_SIZE), batch_size=1),
    Case("yolov3_tiny", from_config("yolov3_tiny", DARKNET_SIZE), batch_size=4),
    Case("yolov3", from_config("yolov3", DARKNET_SIZE), batch_size=1),
    Case("yolov3", from_config("yolov3", DARKNET_SIZE), batch_size=4),
    Case("ssd300", from_config("ssd300"), batch_size=2),
    Case("ssdlite", from_config("ssdlite"), batch_size=4),
    Case("faster_rcnn_mobilenet", from_config("faster_rcnn_mobilenet", img_size=608), batch_size=1),
    Case("faster_rcnn_mobilenet", from_config("faster_rcnn_mobilenet", img_size=608), batch_size=4),
    Case("faster_rcnn_mobilenet_sample", from_config("faster_rcnn_mobilenet", 320, tuned=True), 1),
    Case("faster_rcnn_mobilenet_sample", from_config("faster_rcnn_mobilenet", 320, tuned=True), 4),
]


def synthetic_batch(
    batch_size: int, img_size: int, objects: int = 4, side: tuple[float, float] = (0.2, 0.6)
) -> dict[str, Any]:
    """Random images and ``objects`` random boxes per image (``side`` fractions of the image side), in the batch
    contract."""
    generator = torch.Generator().manual_seed(0)
    size = (side[0] + (side[1] - side[0]) * torch.rand(batch_size, objects, 2, generator=generator)) * img_size
    corner = torch.rand(batch_size, objects, 2, generator=generator) * (img_size - size)
    classes = torch.randint(0, NUM_CLASSES, (batch_size, objects, 1), generator=generator).float()
    labels = torch.cat((classes, corner, corner + size, torch.zeros(batch_size, objects, 1)), -1)
    return {
        "images": torch.rand(batch_size, 3, img_size, img_size, generator=generator),
        "labels": labels,
        "meta": {
            "image_id": torch.arange(batch_size),
            "orig_size": torch.full((batch_size, 2), img_size),
            "scale": torch.ones(batch_size, 2),
            "pad": torch.zeros(batch_size, 2),
            "path": [f"synthetic_{i}.jpg" for i in range(batch_size)],
        },
    }


def make_step(model: Detector, batch: dict[str, Any], optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """One training step (forward, loss, backward, optimizer step) of ``model`` on ``batch``."""
    model.train()

    def step() -> None:
        losses = model.loss(model(batch["images"]), batch)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()

    return step


def seconds_per_step(model: Detector, batch: dict[str, Any], warmup: int, iterations: int) -> float:
    """Median wall time of one training step after ``warmup`` untimed ones, with the defaults of ``train.py``
    (channels-last layout, the foreach optimizer)."""
    model.to(memory_format=torch.channels_last)
    step = make_step(model, batch, torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, foreach=True))
    for _ in range(warmup):
        step()
    return statistics.median(timed(step) for _ in range(iterations))  # robust to a step slowed by other work


def timed(function: Callable[[], Any]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


# --- today's step against the speed-ups -------------------------------------------------------------------------
class TodaysIgnoreRule(YOLOv3Loss):
    """The YOLOv3 loss as it was: the ignore rule's IoU of every prediction with every object as one
    ``[B, N, P]`` matrix (and ``[B, N, P, 2]`` corner tensors)."""

    @torch.no_grad()
    def _overlaps_an_object(self, preds: torch.Tensor, grid: PredictionGrid, labels: torch.Tensor) -> torch.Tensor:
        boxes = decode_boxes(preds[..., :4], grid.cell_xy, grid.anchor_wh, grid.stride)
        objects = labels[..., 1:5]
        area1 = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0).prod(-1)
        area2 = (objects[..., 2:] - objects[..., :2]).clamp(min=0).prod(-1)
        top_left = torch.maximum(boxes[:, :, None, :2], objects[:, None, :, :2])
        bottom_right = torch.minimum(boxes[:, :, None, 2:], objects[:, None, :, 2:])
        inter = (bottom_right - top_left).clamp(min=0).prod(-1)
        iou = inter / (area1[:, :, None] + area2[:, None, :] - inter).clamp(min=1e-9)
        return iou.masked_fill(labels[:, None, :, 0] < 0, 0.0).amax(-1) > self.ignore_thresh


def todays_loss(model: Detector) -> Detector:
    if isinstance(getattr(model, "criterion", None), YOLOv3Loss):
        criterion = TodaysIgnoreRule()
        criterion.__dict__.update(model.criterion.__dict__)
        model.criterion = criterion
    return model


def adam(params: Any, configured: bool) -> torch.optim.Optimizer:
    """``conf/optimizer/adam.yaml``'s Adam as configured (foreach), or the single-tensor loop torch picks on CPU."""
    cfg = OmegaConf.load(CONF / "optimizer" / "adam.yaml")
    return instantiate(cfg)(params) if configured else instantiate(cfg, foreach=False)(params)


@dataclass(frozen=True)
class Variant:
    name: str
    new_loss: bool
    foreach: bool
    channels_last: bool
    compile: bool = False


TODAY = Variant("today (NCHW, Adam single-tensor, full IoU matrix)", False, False, False)
LOSS_ONLY = Variant("+ chunked ignore IoU", True, False, False)
VARIANTS = [
    TODAY,
    LOSS_ONLY,
    Variant("+ foreach Adam", False, True, False),
    Variant("+ channels_last", False, False, True),
    Variant("new default (all three)", True, True, True),
]
COMPILED = Variant("new default + torch.compile", True, True, True, compile=True)

COMPARE_CASES = [("yolov3", 416, 4), ("yolov3_tiny", 416, 8), ("yolov3_tiny", 256, 16), ("ssdlite", 320, 4),
                 ("faster_rcnn_mobilenet", 608, 1)]


def variant_step(base: Detector, variant: Variant, batch: dict[str, Any]) -> Callable[[], None]:
    model = copy.deepcopy(base)
    if not variant.new_loss:
        todays_loss(model)
    images = batch["images"]
    if variant.channels_last:
        model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    if variant.compile:
        model.compile()
    return make_step(model, {**batch, "images": images}, adam(model.parameters(), variant.foreach))


def compare(name: str, img_size: int, batch_size: int, variants: list[Variant], rounds: int) -> list[tuple[str, ...]]:
    """Each variant's median s/step and its median ratio to today's step of the same round."""
    base, _ = from_config(name, img_size)()
    if not isinstance(getattr(base, "criterion", None), YOLOv3Loss):  # the loss change is YOLOv3's only
        variants = [v for v in variants if v != LOSS_ONLY]
    batch = synthetic_batch(batch_size, img_size)
    steps = {v: variant_step(base, v, batch) for v in variants}
    for step in steps.values():  # warm-up (and compilation), untimed
        step()
    times: dict[Variant, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for variant, step in steps.items():
            times[variant].append(timed(step))
    rows = []
    for variant in variants:
        ratio = statistics.median(t / today for t, today in zip(times[variant], times[TODAY]))
        rows.append((f"{name} {img_size} b{batch_size}", variant.name, f"{statistics.median(times[variant]):.3f}",
                     f"{ratio:.2f}x"))
    return rows


# --- parts: the ignore rule in dense scenes, the optimizer paths --------------------------------------------------
# (config, width, input, batch): yolov3_tiny at half width is the default model (yolov3_tiny_cpu), at aquarium's and
# BCCD's input sizes
PRECISION_CASES = [("yolov3_tiny", 0.5, 512, 8), ("yolov3_tiny", 0.5, 256, 8), ("ssdlite", 0.5, 320, 8)]


def precision_rows(rounds: int) -> list[tuple[str, ...]]:
    """Each case's step in float32 and under bf16 autocast (what Lightning's ``bf16-mixed`` does on a CPU: the
    forward and loss autocast, the backward and the Adam step outside), alternated over ``rounds``."""
    rows = []
    for name, width, size, batch_size in PRECISION_CASES:
        cfg = model_config(name)
        cfg.model.width = width
        model = instantiate(cfg.model, num_classes=NUM_CLASSES, _recursive_=False)
        model.to(memory_format=torch.channels_last).train()
        batch = synthetic_batch(batch_size, size)
        optimizer = adam(model.parameters(), configured=True)

        def step(bf16: bool) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                losses = model.loss(model.network_outputs(batch), batch)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()

        step(False), step(True)  # warm-up, untimed
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(rounds):
            for bf16 in (False, True):
                times[bf16].append(timed(lambda: step(bf16)))
        fp32, bf16 = (statistics.median(times[k]) for k in (False, True))
        rows.append((f"{name} w{width}", str(size), str(batch_size), f"{fp32:.3f}", f"{bf16:.3f}",
                     f"{bf16 / fp32:.2f}x"))
    return rows


LOSS_OBJECTS = (8, 200, 1000)
LOSS_VARIANTS = ("today: full IoU matrix", "chunked")


def loss_case(variant: str, objects: int, iterations: int) -> tuple[float, float]:
    """(median ms, peak resident-memory growth in MB) of the YOLOv3 loss, targets included, on random yolov3 416 b4
    predictions with ``objects`` per image. Run in a fresh process (``--loss-case``), so the peak is this loss's."""
    cfg = model_config("yolov3")
    img_size = DARKNET_SIZE
    model = instantiate(cfg.model, num_classes=NUM_CLASSES, width=0.0625, _recursive_=False)  # no full network needed
    if variant == LOSS_VARIANTS[0]:
        todays_loss(model)
    batch = synthetic_batch(4, img_size, objects, side=(0.02, 0.2) if objects > 8 else (0.2, 0.6))
    generator = torch.Generator().manual_seed(0)
    channels = 3 * (5 + NUM_CLASSES)
    outputs = [torch.randn(4, 3, img_size // s, img_size // s, channels // 3, generator=generator) for s in (8, 16, 32)]
    with open("/proc/self/statm") as statm:
        resident_before = int(statm.read().split()[1]) * resource.getpagesize() / 2**20
    model.loss(outputs, batch)  # warm-up
    seconds = statistics.median(timed(lambda: model.loss(outputs, batch)) for _ in range(iterations))
    return 1000 * seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - resident_before


def loss_rows(iterations: int) -> list[tuple[str, ...]]:
    """:func:`loss_case` at 8, 200 and 1,000 objects per image, each variant in its own process."""
    rows = []
    for objects in LOSS_OBJECTS:
        for variant in LOSS_VARIANTS:
            command = [sys.executable, __file__, "--loss-case", variant, str(objects), "--iterations", str(iterations)]
            ms, peak = subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()
            rows.append(("yolov3 416 b4", str(objects), variant, ms, peak))
    return rows


def optimizer_rows(iterations: int) -> list[tuple[str, ...]]:
    """Adam's step over the parameters of yolov3 and yolov3_tiny: time, and the largest parameter difference
    from the single-tensor loop after ``iterations`` steps on the same gradients."""
    rows = []
    for name in ("yolov3", "yolov3_tiny"):
        model, _ = from_config(name)()
        generator = torch.Generator().manual_seed(0)
        grads = [torch.randn(p.shape, generator=generator) * 1e-2 for p in model.parameters()]
        results = {}
        for label, options in (("single-tensor", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
            params = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
            cfg = OmegaConf.merge(OmegaConf.load(CONF / "optimizer" / "adam.yaml"), {"foreach": False, **options})
            optimizer = instantiate(cfg)(params)
            for param, grad in zip(params, grads):
                param.grad = grad
            seconds = statistics.median(timed(optimizer.step) for _ in range(iterations))
            results[label] = params
            difference = max((a - b).abs().max().item() for a, b in zip(results["single-tensor"], params))
            rows.append((name, label, f"{1000 * seconds:.1f}", f"{difference:.1e}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [c.name for c in CASES]
    parser.add_argument("--models", nargs="+", choices=names, default=names, help="throughput rows (default: all)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--iterations", type=int, default=5, help="timed steps (the median is reported)")
    parser.add_argument("--compare", action="store_true", help="today's step against each speed-up, alternated")
    parser.add_argument("--compare-models", nargs="+", default=sorted({c[0] for c in COMPARE_CASES}),
                        help="models of --compare (default: all)")
    parser.add_argument("--rounds", type=int, default=3, help="--compare: rounds of one step per variant")
    parser.add_argument("--compile", action="store_true", help="--compare: add the torch.compile variant")
    parser.add_argument("--short", action="store_true", help="--compare: only today's step and the new default")
    parser.add_argument("--loss", action="store_true", help="the YOLOv3 loss at 8, 200 and 1,000 objects")
    parser.add_argument("--loss-case", nargs=2, metavar=("VARIANT", "OBJECTS"), help=argparse.SUPPRESS)
    parser.add_argument("--optimizer", action="store_true", help="Adam's single-tensor, foreach and fused steps")
    parser.add_argument("--precision", action="store_true", help="float32 against bf16 autocast (bf16-mixed)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    threads = f"{args.threads} torch threads"
    if args.loss_case:
        print("%.1f %.0f" % loss_case(args.loss_case[0], int(args.loss_case[1]), args.iterations))
        return

    if args.compare:
        variants = [VARIANTS[0], VARIANTS[-1]] if args.short else VARIANTS
        variants = variants + [COMPILED] * args.compile
        title = f"train step on CPU, {threads}, Adam; variants alternated over {args.rounds} rounds after 1"
        rows: list[tuple[str, ...]] = []
        for name, size, batch in COMPARE_CASES:
            if name in args.compare_models:
                rows += compare(name, size, batch, variants, args.rounds)
                log.info(table(title, ("model", "variant", "s/step", "vs today"), rows))  # so far, in case of a stop
    if args.loss:
        title = f"YOLOv3 loss incl. targets (forward only), {threads}, median of {args.iterations}"
        log.info(table(title, ("model", "objects/image", "ignore rule", "ms", "peak MB"), loss_rows(args.iterations)))
    if args.optimizer:
        title = f"Adam step on CPU, {threads}, median of {args.iterations}; max |param - single-tensor's|"
        log.info(table(title, ("params of", "implementation", "ms", "difference"), optimizer_rows(args.iterations)))
    if args.precision:
        title = (f"train step on CPU, {threads}, Adam, channels_last; float32 and bf16 autocast alternated over "
                 f"{args.rounds} rounds")
        log.info(table(title, ("model", "input", "batch", "fp32 s/step", "bf16 s/step", "bf16 / fp32"),
                       precision_rows(args.rounds)))
    if args.compare or args.loss or args.optimizer or args.precision:
        return

    rows = []
    for case in (c for c in CASES if c.name in args.models):
        model, img_size = case.build()
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)  # before a layout change
        seconds = seconds_per_step(model, synthetic_batch(case.batch_size, img_size), args.warmup, args.iterations)
        rows.append((case.name, f"{params / 1e6:.2f}", str(img_size), str(case.batch_size), f"{seconds:.3f}",
                     f"{case.batch_size / seconds:.2f}"))

    header = ("model", "params (M)", "input", "batch", "s/step", "images/s")
    title = (f"train step on CPU (channels_last, foreach SGD), {threads}, median of {args.iterations} steps after "
             f"{args.warmup}")
    log.info(table(title, header, rows))


if __name__ == "__main__":
    main()
