"""Data loader throughput on the sample data: YOLO training augmentation (mosaic on) and the eval pipeline.

    python bench/loader.py                       # img_size 416, batch 16, num_workers 0 and 2
    python bench/loader.py --workers 0 1 2 4 --batches 30

Prints images/s after a warm-up batch (worker start-up is reported separately). The main process uses
``--threads`` torch threads (workers always use one), so num_workers=0 is not slowed by thread contention.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import torch

from lightning_det.data import SAMPLE_CLASSES, DetectionDataModule, LoaderOptions, VOCSource, generate_sample_data


def measure(datamodule: DetectionDataModule, pipeline: str, batches: int) -> tuple[float, float]:
    """(seconds to the first batch, images per second over the next ``batches`` batches)."""
    loader = datamodule.train_dataloader() if pipeline == "train" else datamodule.val_dataloader()
    start = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    first = time.perf_counter() - start
    images, start = 0, time.perf_counter()
    while batches > 0:
        for batch in iterator:
            images += batch["images"].shape[0]
            batches -= 1
            if batches == 0:
                break
        iterator = iter(loader)
    return first, images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("data/sample"), help="sample data (generated if missing)")
    parser.add_argument("--img-size", type=int, default=416)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=12, help="timed batches per row")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)  # no per-split counts
    generate_sample_data(args.root)
    print(f"sample data {args.root}, img_size {args.img_size}, batch {args.batch_size}, "
          f"{os.cpu_count()} CPUs, main-process torch threads {args.threads}\n")
    print(f"{'pipeline':<22} {'workers':>7} {'first batch s':>13} {'images/s':>9} {'ms/image':>9}")
    for pipeline, label in (("train", "train (mosaic 1.0)"), ("val", "eval (letterbox)")):
        for workers in args.workers:
            datamodule = DetectionDataModule(
                args.root, VOCSource(["sample/train"]), VOCSource(["sample/val"]), classes=list(SAMPLE_CLASSES),
                batch_size=args.batch_size, img_size=args.img_size,
                loader=LoaderOptions(num_workers=workers, persistent_workers=True),
            )
            datamodule.setup("fit")
            first, rate = measure(datamodule, pipeline, args.batches)
            print(f"{label:<22} {workers:>7} {first:>13.2f} {rate:>9.1f} {1000 / rate:>9.2f}")


if __name__ == "__main__":
    main()
