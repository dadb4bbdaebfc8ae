"""Epoch time and peak memory of the training loader with each ``data.loader.cache``, in 1 and 2 (DDP) processes.

    python bench/cache.py                                   # BCCD, every cache, 0 and 2 workers, 1 and 2 processes
    python bench/cache.py --caches off ram --workers 2 --devices 2 --epochs 4
    python bench/cache.py --img-size 640                    # images kept at full size (4.5 x the bytes)

Each row is a fresh ``train`` run of Lightning's loop on the real DataModule (``conf/data/voc.yaml`` with the YOLO
pipeline, as ``python train.py data=voc ...`` composes it, ``img_size: auto``, one pass an epoch) with a model that
only reads its batch, so the time is the loader's; validation is off. Caches: ``off`` decodes every image every
time (what a set above the per-process budget gets), ``null`` (the default) keeps a private copy in each process
that loads (each worker, each rank), ``ram`` and ``disk`` are the shared file (``lightning_det/data/cache.py``),
built in the first epoch of each row (the folders are emptied before it). Memory is sampled every 50 ms over the
run's process tree (ranks and workers): the peak of the summed RSS, which counts a page shared by n processes n
times, and of the summed PSS, which counts it once (the honest total).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from configs import compose_config
from hydra.utils import instantiate
from tables import table

from lightning_det.data import cache as cache_module

BCCD = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "bccd" / "BCCD"
RAM_FOLDER = Path("/dev/shm/lightning_det_bench")  # the ram cache of these runs, emptied before each


class ReadBatch(L.LightningModule):
    """Touches every pixel of the batch and nothing more: the epoch time is the loader's."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self.weight * batch["images"].mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


class EpochClock(L.Callback):
    """Seconds from the start of fit to the first epoch (loaders built: cache files too) and of every epoch."""

    def __init__(self, result: Path) -> None:
        self.result = result
        self.times: dict[str, Any] = {"epochs": []}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fit_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_start = time.perf_counter()
        self.times.setdefault("setup", self.epoch_start - self.fit_start)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.times["epochs"].append(time.perf_counter() - self.epoch_start)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.times["images"] = len(trainer.datamodule.records["train"])
            self.result.write_text(json.dumps(self.times))


def child(args: argparse.Namespace) -> None:
    """One row: a Lightning run with ``args.cache``, ``args.workers`` and ``args.devices`` (re-run per DDP rank)."""
    cache_module.RAM_FOLDER = RAM_FOLDER
    torch.set_num_threads(1)
    overrides = [
        "data=voc", f"data.root={args.root}", "data.classes=null", "data.train.splits=[train]",
        "data.val.splits=[val]", f"data.loader.num_workers={args.workers}", "data.sampler.min_steps_per_epoch=0",
        f"data.loader.cache={'null' if args.cache in ('off', 'null') else args.cache}",
        f"data.img_size={args.img_size}",
    ]
    cfg = compose_config(overrides)
    datamodule = instantiate(cfg.data)
    if args.cache == "off":  # no private copies either: every image decoded every time
        build_dataset = datamodule.dataset

        def uncached(role: str) -> Any:
            dataset = build_dataset(role)
            dataset.cache = None
            return dataset

        datamodule.dataset = uncached
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.epochs, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[EpochClock(args.result)],
    )
    trainer.fit(ReadBatch(), datamodule=datamodule)


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending += parents.get(current, [])
    return tree


def memory_kb(pids: list[int]) -> tuple[int, int]:
    """Summed (RSS, PSS) in kB of ``pids``, from ``/proc/<pid>/smaps_rollup``."""
    rss = pss = 0
    for pid in pids:
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
        except OSError:
            continue
        rss += int(fields["Rss"].split()[0])
        pss += int(fields["Pss"].split()[0])
    return rss, pss


def run_row(args: argparse.Namespace, cache: str, workers: int, devices: int, folder: Path) -> dict[str, Any]:
    """Start one child run, sample its memory until it ends, return its times and peaks."""
    for stale in (RAM_FOLDER, folder / "cache"):
        shutil.rmtree(stale, ignore_errors=True)
    result = folder / "result.json"
    command = [sys.executable, __file__, "--child", "--cache", cache, "--workers", str(workers), "--devices",
               str(devices), "--epochs", str(args.epochs), "--root", str(args.root), "--img-size", args.img_size,
               "--result", str(result)]
    env = {**os.environ, "LIGHTNING_DET_CACHE": str(folder / "cache"), "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks = [0, 0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peaks[:] = [max(peak, now) for peak, now in zip(peaks, memory_kb(descendants(process.pid)))]
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, errors = process.communicate()
    stop.set()
    sampler.join()
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{errors[-3000:]}")
    cache_bytes = sum(f.stat().st_size for d in (RAM_FOLDER, folder / "cache") for f in d.rglob("*.u8"))
    return {**json.loads(result.read_text()), "rss": peaks[0] / 1024, "pss": peaks[1] / 1024,
            "file": cache_bytes / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=BCCD, help="a yearless VOC folder with train and val splits")
    parser.add_argument("--caches", nargs="+", default=["off", "null", "ram", "disk"])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2], help="processes (DDP on the CPU when 2)")
    parser.add_argument("--img-size", default="auto", help="data.img_size: the training decode size (auto: BCCD 256)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per row; the first includes the build")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.workers, args.devices = args.workers[0], args.devices[0]
        return child(args)

    header = ("cache", "processes", "workers", "to epoch 1 s", "epoch 1 s", "later epochs s", "images/s",
              "peak RSS MB", "peak PSS MB", "cache file MB")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for devices in args.devices:
            for workers in args.workers:
                for cache in args.caches:
                    row = run_row(args, cache, workers, devices, Path(folder))
                    later = statistics.median(row["epochs"][1:] or row["epochs"])
                    rows.append((cache, str(devices), str(workers), f"{row['setup']:.1f}", f"{row['epochs'][0]:.1f}",
                                 f"{later:.2f}", f"{row['images'] / later:.0f}", f"{row['rss']:.0f}",
                                 f"{row['pss']:.0f}", f"{row['file']:.0f}"))
                    print("  ".join(rows[-1]), file=sys.stderr, flush=True)
    shutil.rmtree(RAM_FOLDER, ignore_errors=True)
    title = (f"train loader on {args.root} ({row['images']} images), img_size {args.img_size}, {args.epochs} epochs, "
             "1 torch thread per process")
    print(table(title, header, rows))


if __name__ == "__main__":
    main()
