"""COCO-size data, simulated: how set-up time and memory grow from 1k to 118k training images.

    python bench/coco_scale.py                                   # 1,000, 10,000 and 118,287 images
    python bench/coco_scale.py --sizes 1000 10000 --folder /tmp/coco_scale

Each size gets a COCO ``instances`` json as train2017 has them: ~7.3 boxes an image (a long tail up to ~60), 80
categories of long-tailed frequency, COCO's spread of box sizes, a polygon and an area per object, 1 % crowd
regions, and a validation json of 5,000 images scaled by the same ratio as COCO's (5k to 118k). The image files
are hard links to a few real JPEGs of COCO's common sizes: the header checks open and read real files, and the
disk holds a few kilobytes.

Each size is measured in a fresh process, stage by stage: reading the json, building the records, the image
checks (cold, then cached), the data-adaptive rules (input size, YOLO anchor check, k-means, epoch repeats), the
DataModule set-up as ``train.py data=coco`` composes it (checks cached), the first training batch, and peak RSS.
Then the loader workers: each reads every training record once (an epoch of record access, without decoding
images: the records are what a worker would copy) while its private memory is sampled, once with the records as
the DataModule holds them (numpy arrays) and once as a list of Python record objects (what they were before).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from PIL import Image
from torch.utils.data import DataLoader, Dataset, get_worker_info

from lightning_det.data import COCOSource
from lightning_det.data.adapt import choose_img_size, epoch_repeats
from lightning_det.data.coco import load_coco_json
from lightning_det.data.records import InvalidInputLog, build_records, check_images, resolve_classes
from lightning_det.models.yolov3.anchor_clustering import kmeans_anchors, letterboxed_sizes
from lightning_det.models.yolov3.module import YOLOv3

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from configs import compose_config  # noqa: E402
from tables import table  # noqa: E402

COCO_TRAIN, COCO_VAL = 118_287, 5_000
#: (width, height) of the JPEGs the image files link to, with their share: COCO's most common sizes.
IMAGE_SIZES = {(640, 480): 0.45, (480, 640): 0.15, (640, 427): 0.2, (500, 375): 0.1, (640, 640): 0.1}


def write_split(folder: Path, split: str, count: int, first_id: int, seed: int) -> None:
    """``annotations/instances_<split>.json`` and ``<split>/`` of ``count`` hard-linked images."""
    rng = np.random.default_rng(seed)
    sizes = list(IMAGE_SIZES)
    kinds = rng.choice(len(sizes), count, p=list(IMAGE_SIZES.values()))
    (folder / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    boxes_per_image = np.minimum(rng.negative_binomial(1.2, 1.2 / (1.2 + 7.3), count), 60)
    category_weights = 1 / np.arange(1, 81)
    for index, (kind, boxes) in enumerate(zip(kinds.tolist(), boxes_per_image.tolist())):
        image_id = first_id + index
        width, height = sizes[kind]
        name = f"{image_id:012d}.jpg"
        link = folder / split / name
        if not link.exists():
            os.link(folder / "base" / f"{width}x{height}.jpg", link)
        images.append({"id": image_id, "file_name": name, "width": width, "height": height, "license": 1,
                       "date_captured": "2013-11-14 16:28:13"})
        side = np.exp(rng.normal(np.log(40), 1.0, boxes)).clip(2, min(width, height) - 1)
        aspect = np.exp(rng.normal(0, 0.5, boxes))
        w, h = np.minimum(side * aspect, width - 1), np.minimum(side / aspect, height - 1)
        x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
        categories = rng.choice(80, boxes, p=category_weights / category_weights.sum()) + 1
        for j in range(boxes):
            x1, y1, x2, y2 = round(x[j], 2), round(y[j], 2), round(x[j] + w[j], 2), round(y[j] + h[j], 2)
            annotations.append({
                "id": len(annotations) + 1 + first_id * 100, "image_id": image_id, "category_id": int(categories[j]),
                "bbox": [x1, y1, round(w[j], 2), round(h[j], 2)], "area": round(float(w[j] * h[j]) * 0.6, 2),
                "iscrowd": int(rng.random() < 0.01), "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]],
            })
    content = {"info": {"description": "simulated COCO"}, "licenses": [{"id": 1, "name": "none"}], "images": images,
               "annotations": annotations,
               "categories": [{"id": c, "name": f"class{c:02d}", "supercategory": "thing"} for c in range(1, 81)]}
    (folder / "annotations").mkdir(exist_ok=True)
    (folder / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))


def make_dataset(folder: Path, train_images: int) -> None:
    """The simulated dataset of ``train_images`` images under ``folder`` (kept between runs)."""
    if (folder / "complete").exists():
        return
    (folder / "base").mkdir(parents=True, exist_ok=True)
    for (width, height), _ in IMAGE_SIZES.items():
        pixels = np.random.default_rng(width * height).integers(0, 256, (height // 16, width // 16, 3), np.uint8)
        Image.fromarray(pixels).resize((width, height)).save(folder / "base" / f"{width}x{height}.jpg", quality=80)
    write_split(folder, "train", train_images, 1, seed=0)
    write_split(folder, "val", max(50, round(train_images * COCO_VAL / COCO_TRAIN)), 10_000_000, seed=1)
    (folder / "complete").touch()


def private_kib() -> int:
    """This process's private resident memory (not shared with its parent), from ``/proc/self/smaps_rollup``."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:])
    return sum(int(fields[name].split()[0]) for name in ("Private_Clean", "Private_Dirty"))


def rss_mib() -> float:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmRSS"].split()[0]) / 1024


class RecordReader(Dataset):
    """Reads record ``i`` as the training dataset does; every ``every`` items, the worker's RSS and private memory."""

    def __init__(self, records, every: int) -> None:
        self.records = records
        self.every = every

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        touched = len(record.path) + float(record.boxes.sum()) + int(record.labels.sum())
        return (get_worker_info().id, rss_mib(), private_kib() / 1024, touched) if index % self.every == 0 else None


def keep_readings(items: list) -> list:
    return [item for item in items if item is not None]


def worker_memory(records, workers: int) -> tuple[float, float, float]:
    """(RSS at the start, its growth, private-memory growth) of the worst worker over an epoch, MiB."""
    loader = DataLoader(RecordReader(records, max(1, len(records) // 50)), batch_size=256, num_workers=workers,
                        collate_fn=keep_readings, multiprocessing_context="fork")
    readings: dict[int, list[tuple[float, float]]] = {}
    for batch in loader:
        for worker, rss, private, _ in batch:
            readings.setdefault(worker, []).append((rss, private))
    first = max(values[0][0] for values in readings.values())
    return (first, max(v[-1][0] - v[0][0] for v in readings.values()),
            max(v[-1][1] - v[0][1] for v in readings.values()))


class Stages(dict):
    """Seconds per stage: ``with stages("json"): ...``."""

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self[name] = time.perf_counter() - start


def measure(folder: Path, workers: int) -> dict:
    """Every stage on the dataset in ``folder``, in this (fresh) process."""
    logging.disable(logging.INFO)
    torch.set_num_threads(1)
    os.environ["LIGHTNING_DET_CACHE"] = tempfile.mkdtemp(prefix="coco_scale_cache_")
    results = Stages()
    source = COCOSource("annotations/instances_train.json", "train")
    with results("json"):
        load_coco_json(folder / source.annotation_file)
    invalid = InvalidInputLog(skip_invalid=True)
    with results("parse"):
        parsed = source.parse(folder, invalid)
    classes = resolve_classes(None, [parsed])
    with results("records"):
        records = build_records(parsed, classes, invalid)
    del parsed
    with results("checks cold"):
        check_images(records, invalid, "header", False)
    with results("checks cached"):
        records = check_images(records, invalid, "header", False)
    results["images"], results["objects"] = len(records), len(records.labels)

    with results("img_size rule"):
        img_size = choose_img_size(records)
    with results("anchor check"):
        YOLOv3.fit_to_data({"variant": "yolov3", "anchors": "auto"}, records, img_size)
    wh = letterboxed_sizes(records, img_size)
    with results("k-means"):
        kmeans_anchors(wh, 9)
    with results("epoch repeats"):
        epoch_repeats(len(records), 8, 50)
    del records, wh

    overrides = ["data=coco", f"data.root={folder}", "data.train.annotation_file=annotations/instances_train.json",
                 "data.train.image_dir=train", "data.val.annotation_file=annotations/instances_val.json",
                 "data.val.image_dir=val", f"data.loader.num_workers={workers}", f"data.img_size={img_size}"]
    cfg = compose_config(overrides)
    datamodule = instantiate(cfg.data)
    with results("setup"):  # image checks cached: the training images were checked above
        datamodule.setup("fit")
    with results("loader"):
        loader = datamodule.train_dataloader()
    with results("first batch"):
        next(iter(loader))
    results["main rss"] = rss_mib()
    results["main peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    table_records = datamodule.dataset("train").records
    results["worker table"] = worker_memory(table_records, workers)
    results["worker list"] = worker_memory(list(table_records), workers)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, COCO_TRAIN])
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "coco_scale")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.workers)))
        return

    measured = {}
    for size in args.sizes:
        folder = args.folder / str(size)
        start = time.perf_counter()
        make_dataset(folder, size)
        made = time.perf_counter() - start
        done = subprocess.run([sys.executable, __file__, "--child", str(folder), "--workers", str(args.workers)],
                              capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"measuring {folder} failed:\n{done.stderr[-4000:]}")
        measured[size] = json.loads(done.stdout.strip().splitlines()[-1])
        json_mb = (folder / "annotations" / "instances_train.json").stat().st_size / 2**20
        print(f"{size} images: {measured[size]['objects']} objects, train json {json_mb:.0f} MB, generated in "
              f"{made:.0f} s", flush=True)

    stages = ["json", "parse", "records", "checks cold", "checks cached", "img_size rule", "anchor check", "k-means",
              "epoch repeats", "setup", "loader", "first batch"]
    sizes = list(measured)  # growth: between the two largest sizes, where fixed costs no longer hide it
    growth = f"growth, x{sizes[-1] / sizes[-2]:.1f} images" if len(sizes) > 1 else ""
    rows = [[stage] + [f"{measured[s][stage]:.2f}" for s in sizes]
            + ([f"x{measured[sizes[-1]][stage] / max(measured[sizes[-2]][stage], 1e-9):.1f}"] if growth else [])
            for stage in stages]
    for key, label in (("main rss", "main RSS after set-up, MiB"), ("main peak", "main peak RSS, MiB")):
        rows.append([label] + [f"{measured[s][key]:.0f}" for s in sizes] + ([""] if growth else []))
    for key, label in (("worker table", "records as arrays"), ("worker list", "records as objects (before)")):
        rows.append([f"worker RSS at start, {label}"] + [f"{measured[s][key][0]:.0f}" for s in sizes]
                    + ([""] if growth else []))
        rows.append([f"worker growth over an epoch, {label}: RSS / private"]
                    + [f"{measured[s][key][1]:.1f} / {measured[s][key][2]:.1f}" for s in sizes] + ([""] if growth else []))
    header = ["stage (s, unless MiB)"] + [f"{s:,}" for s in sizes] + ([growth] if growth else [])
    print("\n" + table(f"{args.workers} loader workers, torch threads 1, {os.cpu_count()} CPUs", header, rows))


if __name__ == "__main__":
    main()
