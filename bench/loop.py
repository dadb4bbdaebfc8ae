"""The whole Lightning training loop on real-size JPEGs: the real DataModule (full YOLO augmentation) against the
same loop on batches loaded beforehand, alternated in one run.

    python bench/loop.py                              # BCCD (640 x 480 JPEGs), yolov3_tiny w0.5, 256 px, batch 8
    python bench/loop.py --workers 0 2 --rounds 3 --root /data/VOCdevkit --split 2007/trainval
    python bench/loop.py --mosaic 0 --workers 0 1 2   # mosaic off
    python bench/loop.py --yaml <aquarium>/data.yaml --img-size 512 --mosaic 0 --rect --precision bf16-mixed \
        --workers 0 2                                 # the README command's loop on aquarium (shipped defaults)

``--root`` and ``--split`` are those of ``VOCSource`` (default: BCCD's yearless folder and its ``train`` split);
``--yaml`` reads an Ultralytics data.yaml instead. The
first epoch of each loop is untimed: it starts the workers and decodes the images a small set then keeps; the rate
is that of the epochs after.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from configs import CONF
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tables import table
from torch.utils.data import DataLoader

from lightning_det.data import DetectionDataModule, LoaderOptions, PipelineOptions, VOCSource, YOLODataModule
from lightning_det.data.transforms import LetterboxTransform, YoloTrainTransform
from lightning_det.models.yolov3 import YOLOv3

BCCD = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "bccd" / "BCCD"

log = logging.getLogger(__name__)


class StepTimer(L.Callback):
    """Images per second from the first batch after ``untimed`` batches to the end of training."""

    def __init__(self, untimed: int) -> None:
        self.untimed = untimed
        self.images = 0
        self.start = 0.0
        self.rate = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.untimed:
            self.start = time.perf_counter()
        if trainer.global_step >= self.untimed:
            self.images += batch["images"].shape[0]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rate = self.images / (time.perf_counter() - self.start)


def datamodule(args: argparse.Namespace, workers: int) -> DetectionDataModule:
    settings = dict(batch_size=args.batch_size,
                    loader=LoaderOptions(num_workers=workers, persistent_workers=workers > 0),
                    img_size=args.img_size,
                    pipeline=PipelineOptions(YoloTrainTransform(args.img_size, mix={"mosaic": args.mosaic}, rect=args.rect),
                                             LetterboxTransform(args.img_size), group_aspect_ratio=args.rect,
                                             size_divisor=32))
    if args.yaml is not None:
        data = YOLODataModule(str(args.yaml), **settings)
    else:
        data = DetectionDataModule(args.root, VOCSource([args.split]), VOCSource([args.split]), **settings)
    data.setup("fit")
    return data


def images_per_second(args: argparse.Namespace, num_classes: int, loader: DataLoader, untimed: int) -> float:
    """Train a fresh yolov3_tiny (same seed every time) for ``untimed + args.steps`` steps on ``loader``."""
    torch.manual_seed(0)
    model = YOLOv3(variant="tiny", width=args.width, num_classes=num_classes,
                   optimizer=instantiate(OmegaConf.load(CONF / "optimizer" / "adam.yaml")))
    model.to(memory_format=torch.channels_last)
    timer = StepTimer(untimed)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision=args.precision, max_steps=untimed + args.steps, limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(model, train_dataloaders=loader)
    return timer.rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=BCCD, help="VOC root (a devkit, or one yearless VOC folder)")
    parser.add_argument("--yaml", type=Path, help="an Ultralytics data.yaml instead (its train split)")
    parser.add_argument("--precision", default="32-true", help="the Trainer's precision, e.g. bf16-mixed")
    parser.add_argument("--rect", action="store_true", help="rectangular training samples (data.rect_train)")
    parser.add_argument("--split", default="train", help="training split: <year>/<name>, or <name> in a yearless folder")
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--width", type=float, default=0.5, help="yolov3_tiny channel multiplier")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mosaic", type=float, default=1.0, help="mosaic probability (the shipped default is 0.0)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per loop")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="loader workers of the real loops")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of all loops")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the main process")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_det"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)

    data = datamodule(args, workers=0)
    epoch = len(data.train_dataloader())
    preloaded = [batch for _, batch in zip(range(epoch), data.train_dataloader())]
    preloaded_loader = DataLoader(preloaded, batch_size=None)  # already batched: yields them as they are
    loops = {"pre-loaded batches": lambda: preloaded_loader}
    loops |= {f"DataModule, {w} workers": (lambda w=w: datamodule(args, w).train_dataloader()) for w in args.workers}

    title = (f"Lightning training loop, {args.split} ({len(data.records['train'])} images), yolov3_tiny w{args.width}, "
             f"{args.img_size} px{' rect' * args.rect}, batch {args.batch_size}, mosaic {args.mosaic}, "
             f"{args.precision}, {args.threads} torch threads, {args.steps} steps after one epoch, median over "
             "alternated rounds")
    rates: dict[str, list[float]] = {name: [] for name in loops}
    for done in range(1, args.rounds + 1):
        for name, loader in loops.items():
            rates[name].append(images_per_second(args, data.num_classes, loader(), untimed=epoch))
        reference = rates["pre-loaded batches"]
        rows = [(name, f"{statistics.median(r):.1f}", f"{statistics.median(a / b for a, b in zip(r, reference)):.2f}x")
                for name, r in rates.items()]
        log.info(table(f"{title} ({done} so far)", ("loop", "images/s", "vs pre-loaded"), rows))


if __name__ == "__main__":
    main()
