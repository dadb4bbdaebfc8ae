"""Small on-disk datasets for tests: a VOC devkit folder, a COCO json and an Ultralytics YOLO dataset, written from
plain Python values.

VOC objects are given as written in the XML (1-based inclusive pixel indices); COCO boxes as ``[x, y, w, h]``; YOLO
labels as the text lines of their label files.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import yaml
from PIL import Image
from torch import nn

VOCObject = tuple[str, tuple[float, float, float, float], bool]  # name, (xmin, ymin, xmax, ymax), difficult
VOCImage = tuple[int, int, list[VOCObject]]  # height, width, objects
YOLOImage = tuple[int, int, list[str] | None]  # height, width, label file lines (None: no label file)


def write_image(path: Path, height: int, width: int, seed: int = 0) -> None:
    """A random RGB image (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def voc_xml(file_name: str, height: int, width: int, objects: list[VOCObject]) -> str:
    parts = [
        f"<annotation><filename>{file_name}</filename>",
        f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>",
    ]
    for name, (xmin, ymin, xmax, ymax), difficult in objects:
        parts.append(
            f"<object><name>{name}</name><difficult>{int(difficult)}</difficult><bndbox><xmin>{xmin}</xmin>"
            f"<ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
        )
    return "\n".join(parts + ["</annotation>"])


def make_voc(root: Path, splits: dict[str, dict[str, VOCImage]]) -> Path:
    """Write ``{"2007/trainval": {"000001": (h, w, objects), ...}, ...}`` in the VOC devkit layout; a split without
    a year (``"train"``) goes into ``root`` itself, the layout of a single exported folder."""
    for seed, (split, images) in enumerate(splits.items()):
        year, _, name = split.rpartition("/")
        folder = root / f"VOC{year}" if year else root
        (folder / "Annotations").mkdir(parents=True, exist_ok=True)
        (folder / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
        for k, (file_id, (height, width, objects)) in enumerate(images.items()):
            image_path = folder / "JPEGImages" / f"{file_id}.jpg"
            if not image_path.exists():
                write_image(image_path, height, width, seed=seed * 1000 + k)
            (folder / "Annotations" / f"{file_id}.xml").write_text(voc_xml(image_path.name, height, width, objects))
        (folder / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{i}\n" for i in images))
    return root


def read_voc_train(root: Path):
    """The DataModule of a ``make_voc`` folder's ``2007/train`` split (used for both roles), read: its records and
    classes as training sees them."""
    from lightning_det.data import DetectionDataModule, LoaderOptions, VOCSource

    data = DetectionDataModule(root, VOCSource(["2007/train"]), VOCSource(["2007/train"]),
                               loader=LoaderOptions(num_workers=0))
    data.setup("fit")
    return data


def make_coco(
    root: Path,
    categories: list[tuple[int, str]],
    images: list[tuple[int, str, int, int]],
    annotations: list[tuple[int, int, list[float], int]],
    name: str = "instances_train.json",
    image_dir: str = "images",
) -> Path:
    """Write ``annotations/<name>`` from ``categories (id, name)``, ``images (id, file_name, h, w)`` and
    ``annotations (image_id, category_id, [x, y, w, h], iscrowd)``, plus the images; returns the json path."""
    for k, (_, file_name, height, width) in enumerate(images):
        if not (root / image_dir / file_name).exists():
            write_image(root / image_dir / file_name, height, width, seed=k)
    content = {
        "images": [{"id": i, "file_name": f, "height": h, "width": w} for i, f, h, w in images],
        "annotations": [
            {"id": k + 1, "image_id": image_id, "category_id": category_id, "bbox": bbox,
             "area": bbox[2] * bbox[3] if len(bbox) == 4 else 0, "iscrowd": crowd}
            for k, (image_id, category_id, bbox, crowd) in enumerate(annotations)
        ],
        "categories": [{"id": i, "name": n, "supercategory": "thing"} for i, n in categories],
    }
    path = root / "annotations" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=1))
    return path


def make_yolo(root: Path, splits: dict[str, dict[str, YOLOImage]], names: list[str] | dict[int, str]) -> Path:
    """Write ``{"train": {"a.jpg": (h, w, ["0 0.5 0.5 0.2 0.4"]), ...}, ...}`` in the Ultralytics layout
    (``images/<split>/``, ``labels/<split>/<stem>.txt``) with a ``data.yaml`` naming the splits as folders;
    returns the yaml's path."""
    for seed, (split, images) in enumerate(splits.items()):
        for k, (file_name, (height, width, lines)) in enumerate(images.items()):
            write_image(root / "images" / split / file_name, height, width, seed=seed * 1000 + k)
            if lines is not None:
                label = root / "labels" / split / f"{Path(file_name).stem}.txt"
                label.parent.mkdir(parents=True, exist_ok=True)
                label.write_text("".join(f"{line}\n" for line in lines))
    data_yaml = root / "data.yaml"
    data_yaml.write_text(yaml.safe_dump({"path": str(root), **{s: f"images/{s}" for s in splits}, "names": names}))
    return data_yaml


def spread_weights(model: nn.Module, generator: torch.Generator, layers: tuple[type[nn.Module], ...]) -> None:
    """Random batch-norm statistics and affine terms, and He-scaled weights for ``layers`` (the signal of an image
    lasts through the depth of a randomly initialised detector, so a comparison of two implementations means
    something)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.2, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0.0, 0.2, generator=generator)
            elif isinstance(module, layers):
                module.weight.normal_(0.0, (2 / module.weight[0].numel()) ** 0.5, generator=generator)
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.05, generator=generator)


def two_rank_result(make_metric, rank0_batches, rank1_batches):
    """The metric of two DDP ranks: rank 1 runs torchmetrics' real sync path recording what it sends, rank 0's
    gather then receives it; returns rank 0's result."""
    sent = []

    def send(tensor, group=None):
        sent.append(tensor)
        return [tensor]

    received = iter(sent)

    def receive(tensor, group=None):
        return [tensor, next(received)]

    rank1 = make_metric(dist_sync_fn=send, distributed_available_fn=lambda: True)
    rank0 = make_metric(dist_sync_fn=receive, distributed_available_fn=lambda: True)
    for batch in rank1_batches:
        rank1.update(*batch)
    for batch in rank0_batches:
        rank0.update(*batch)
    rank1.compute()
    return rank0.compute()


def tiny_checkpoint(path: Path, width: float = 0.5, num_classes: int = 2) -> Path:
    """A checkpoint as train.py writes it (weights, hyper-parameters, detector class, pipeline)."""
    from lightning_det.models.yolov3 import YOLOv3

    model = YOLOv3(variant="tiny", width=width, num_classes=num_classes)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "detector_class": "lightning_det.models.yolov3.module.YOLOv3",
                "inference_pipeline": {"_target_": "lightning_det.data.transforms.LetterboxTransform",
                                       "img_size": 64}}, path)
    return path


BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench_script(name: str) -> ModuleType:
    """``bench/<name>.py`` loaded by path (a script, not a package module), registered under its name so that its
    dataclasses work, with its sibling modules (``configs``, ``tables``) importable as when it runs."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))
