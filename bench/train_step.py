"""Training-step throughput on CPU: forward + loss + backward + optimizer step, one row per model.

Each model is built from its Hydra config (``conf/model/<name>.yaml``) at the config's default input size and
trained on a synthetic batch, so a row measures exactly what ``train.py model=<name>`` runs per step.

    python bench/train_step.py
    python bench/train_step.py --models yolov3_tiny --iterations 10 --threads 4
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tables import table

from lightning_det.models.detector import Detector

CONF = Path(__file__).resolve().parents[1] / "conf"
NUM_CLASSES = 20  # Pascal VOC

log = logging.getLogger(__name__)


def from_config(name: str, img_size: int | None = None, tuned: str | None = None) -> Callable[[], tuple[Detector, int]]:
    """A builder for ``conf/model/<name>.yaml`` (merged with ``conf/tuned/<tuned>.yaml`` when given): the model for
    ``NUM_CLASSES`` and the config's ``data.img_size`` (or ``img_size``, for pipelines that resize by the shorter
    side, e.g. Faster R-CNN's 600 -> 608 padded)."""

    def build() -> tuple[Detector, int]:
        cfg = OmegaConf.load(CONF / "model" / f"{name}.yaml")
        if tuned:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(CONF / "tuned" / f"{tuned}.yaml"))
        return instantiate(cfg.model, num_classes=NUM_CLASSES), img_size or int(cfg.data.img_size)

    return build


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], tuple[Detector, int]]
    batch_size: int


# Batch 1 and 4 of the same model show what batching buys on this CPU; the sample-size rows use the settings of
# the sample runs (conf/tuned/), where fixed per-step costs weigh more than at full size.
CASES = [
    Case("yolov3_tiny", from_config("yolov3_tiny"), batch_size=1),
    Case("yolov3_tiny", from_config("yolov3_tiny"), batch_size=4),
    Case("yolov3", from_config("yolov3"), batch_size=1),
    Case("yolov3", from_config("yolov3"), batch_size=4),
    Case("ssd300", from_config("ssd300"), batch_size=2),
    Case("ssdlite", from_config("ssdlite"), batch_size=4),
    Case("faster_rcnn_mobilenet", from_config("faster_rcnn_mobilenet", img_size=608), batch_size=1),
    Case("faster_rcnn_mobilenet", from_config("faster_rcnn_mobilenet", img_size=608), batch_size=4),
    Case("faster_rcnn_mobilenet_sample", from_config("faster_rcnn_mobilenet", 320, "sample_faster_rcnn_mobilenet"), 1),
    Case("faster_rcnn_mobilenet_sample", from_config("faster_rcnn_mobilenet", 320, "sample_faster_rcnn_mobilenet"), 4),
]


def synthetic_batch(batch_size: int, img_size: int, objects: int = 4) -> dict[str, Any]:
    """Random images and ``objects`` random boxes per image (20 to 60 % of the side), in the batch contract."""
    generator = torch.Generator().manual_seed(0)
    size = (0.2 + 0.4 * torch.rand(batch_size, objects, 2, generator=generator)) * img_size
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


def seconds_per_step(model: Detector, batch: dict[str, Any], warmup: int, iterations: int) -> float:
    """Median wall time of one training step after ``warmup`` untimed ones."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step() -> None:
        losses = model.loss(model(batch["images"]), batch)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)  # robust to a step slowed by other work on the machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [c.name for c in CASES]
    parser.add_argument("--models", nargs="+", choices=names, default=names, help="rows to run (default: all)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--iterations", type=int, default=5, help="timed steps (the median is reported)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows = []
    for case in (c for c in CASES if c.name in args.models):
        model, img_size = case.build()
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        seconds = seconds_per_step(model, synthetic_batch(case.batch_size, img_size), args.warmup, args.iterations)
        rows.append((case.name, f"{params / 1e6:.2f}", str(img_size), str(case.batch_size), f"{seconds:.3f}",
                     f"{case.batch_size / seconds:.2f}"))

    header = ("model", "params (M)", "input", "batch", "s/step", "images/s")
    title = f"train step on CPU, {args.threads} torch threads, median of {args.iterations} steps after {args.warmup}"
    log.info(table(title, header, rows))


if __name__ == "__main__":
    main()
