"""Annotation records written back out as a Pascal VOC folder, COCO json or an Ultralytics YOLO dataset, each
with its format's own conventions, so another tool reads the result as if it had been exported there.

- VOC (``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt``): 1-based inclusive pixel indices, so
  ``xmin = x1 + 1`` and ``xmax = x2`` (the reader's rule in reverse); ``difficult`` kept.
- COCO (``annotations/instances_<split>.json``, images in ``<split>/``): ``bbox`` ``[x, y, w, h]`` in pixels,
  ``area`` (the source's own where it has one, else the box's), categories with the source's ids (else ``1..C``),
  image and annotation ids from 1; difficult objects become ``iscrowd: 1``, which this project reads back as
  difficult.
- YOLO (``data.yaml``, ``images/<split>/``, ``labels/<split>/*.txt``): ``class cx cy w h`` divided by the image
  size. The format has no difficult flag: such objects are left out (as Ultralytics' own VOC conversion does)
  unless ``keep_difficult``.

Images are linked or copied byte for byte, never re-encoded. Coordinates are written with enough decimals that
reading the result back gives the same boxes to well under 1e-3 px. An image listed twice in a split is written
once. The writers fill a folder that the caller renames into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from lightning_det.data.records import AnnotationRecord
from lightning_det.data.voc import IMAGE_SUFFIXES as VOC_IMAGE_SUFFIXES

IMAGE_MODES = ("symlink", "hardlink", "copy")


@dataclass
class SplitRecords:
    """What a writer needs: the class list, the records of each split and (COCO sources) the category ids."""

    classes: list[str]
    splits: dict[str, list[AnnotationRecord]]
    category_ids: list[int] | None = None


def place_image(source: str, target: Path, mode: str) -> None:
    """Put ``source`` at ``target`` as a symbolic link (absolute), a hard link, or a byte copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if mode == "symlink":
        os.symlink(os.path.abspath(source), target)
    elif mode == "hardlink":
        os.link(source, target)
    elif mode == "copy":
        shutil.copyfile(source, target)
    else:
        raise ValueError(f"images={mode!r} must be one of {list(IMAGE_MODES)}")


def distinct_names(paths: list[str]) -> dict[str, str]:
    """A file name for each distinct path, distinct by stem within the list (VOC ids and YOLO label files are
    stems): the path's own name, or ``<stem>_2<suffix>``, ``_3`` ... when an earlier path took that stem."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for path in dict.fromkeys(paths):
        stem, suffix = os.path.splitext(os.path.basename(path))
        candidate, k = stem, 1
        while candidate in taken:
            k += 1
            candidate = f"{stem}_{k}"
        taken.add(candidate)
        names[path] = candidate + suffix
    return names


def decimal(value: float, places: int) -> str:
    """``value`` with at most ``places`` decimals and no trailing zeros (``12``, ``0.5``)."""
    text = f"{value:.{places}f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def distinct_records(records: list[AnnotationRecord]) -> list[AnnotationRecord]:
    return list({record.path: record for record in records}.values())


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# --- VOC -------------------------------------------------------------------------------------------------------
def voc_xml(record: AnnotationRecord, file_name: str, classes: list[str]) -> str:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "JPEGImages"
    ET.SubElement(root, "filename").text = file_name
    size = ET.SubElement(root, "size")
    for tag, value in (("width", record.width), ("height", record.height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for (x1, y1, x2, y2), label, difficult in zip(record.boxes.tolist(), record.labels.tolist(),
                                                  record.difficult.tolist()):
        node = ET.SubElement(root, "object")
        for tag, text in (("name", classes[label]), ("pose", "Unspecified"), ("truncated", "0"),
                          ("difficult", str(int(difficult)))):
            ET.SubElement(node, tag).text = text
        box = ET.SubElement(node, "bndbox")
        for tag, value in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(box, tag).text = decimal(value, 4)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def write_voc(out: Path, dataset: SplitRecords, images: str) -> None:
    """One VOC folder without a year level; the splits are its ``ImageSets/Main`` lists."""
    records = distinct_records([record for split in dataset.splits.values() for record in split])
    unfound = sorted({os.path.splitext(r.path)[1] for r in records} - set(VOC_IMAGE_SUFFIXES))
    if unfound:
        raise ValueError(f"VOC readers look for images ending in {VOC_IMAGE_SUFFIXES}, not {unfound}; convert to "
                         "coco or yolo instead, or re-save those images first")
    names = distinct_names([record.path for record in records])
    for record in records:
        name = names[record.path]
        place_image(record.path, out / "JPEGImages" / name, images)
        write_text(out / "Annotations" / f"{os.path.splitext(name)[0]}.xml", voc_xml(record, name, dataset.classes))
    for split, split_records in dataset.splits.items():
        ids = "".join(f"{os.path.splitext(names[record.path])[0]}\n" for record in distinct_records(split_records))
        write_text(out / "ImageSets" / "Main" / f"{split}.txt", ids)


# --- COCO ------------------------------------------------------------------------------------------------------
def coco_json(records: list[AnnotationRecord], names: dict[str, str], dataset: SplitRecords) -> dict:
    category_ids = dataset.category_ids or list(range(1, len(dataset.classes) + 1))
    content: dict = {
        "images": [],
        "annotations": [],
        "categories": [{"id": i, "name": name, "supercategory": ""} for i, name in zip(category_ids, dataset.classes)],
    }
    for image_id, record in enumerate(records, start=1):
        content["images"].append({"id": image_id, "file_name": names[record.path], "height": record.height,
                                  "width": record.width})
        xywh = np.concatenate((record.boxes[:, :2], record.boxes[:, 2:] - record.boxes[:, :2]), axis=1)
        box_area = xywh[:, 2] * xywh[:, 3]
        area = box_area if record.area is None else np.where(record.area > 0, record.area, box_area)
        objects = zip(xywh.tolist(), record.labels.tolist(), record.difficult.tolist(), area.tolist())
        for box, label, crowd, box_or_mask_area in objects:
            content["annotations"].append({
                "id": len(content["annotations"]) + 1, "image_id": image_id, "category_id": category_ids[label],
                "bbox": [round(v, 4) for v in box], "area": round(box_or_mask_area, 4), "iscrowd": int(crowd),
            })
    return content


def write_coco(out: Path, dataset: SplitRecords, images: str) -> None:
    """``annotations/instances_<split>.json`` and the split's images in ``<split>/``, one pair per split."""
    for split, records in dataset.splits.items():
        records = distinct_records(records)
        names = distinct_names([record.path for record in records])
        for path, name in names.items():
            place_image(path, out / split / name, images)
        write_text(out / "annotations" / f"instances_{split}.json", json.dumps(coco_json(records, names, dataset)))


# --- YOLO ------------------------------------------------------------------------------------------------------
def yolo_lines(record: AnnotationRecord, keep_difficult: bool) -> str:
    keep = np.ones(len(record.labels), dtype=bool) if keep_difficult else ~record.difficult
    size = np.array([record.width, record.height] * 2, dtype=np.float64)
    x1, y1, x2, y2 = (record.boxes[keep].astype(np.float64) / size).T
    rows = zip(record.labels[keep].tolist(), ((x1 + x2) / 2).tolist(), ((y1 + y2) / 2).tolist(),
               (x2 - x1).tolist(), (y2 - y1).tolist())
    return "".join(f"{label} " + " ".join(decimal(v, 8) for v in values) + "\n" for label, *values in rows)


def write_yolo(out: Path, dataset: SplitRecords, images: str, final_path: Path | None = None,
               keep_difficult: bool = False) -> None:
    """``images/<split>/``, ``labels/<split>/<stem>.txt`` (one per image, empty for an image without objects) and
    ``data.yaml`` naming them, whose ``path`` is the absolute ``final_path`` the folder will have (default ``out``):
    Ultralytics resolves a relative one against its own datasets folder."""
    for split, records in dataset.splits.items():
        records = distinct_records(records)
        names = distinct_names([record.path for record in records])
        for record in records:
            name = names[record.path]
            place_image(record.path, out / "images" / split / name, images)
            write_text(out / "labels" / split / f"{os.path.splitext(name)[0]}.txt", yolo_lines(record, keep_difficult))
    content = {"path": os.path.abspath(final_path or out), **{split: f"images/{split}" for split in dataset.splits},
               "names": dict(enumerate(dataset.classes))}
    write_text(out / "data.yaml", yaml.safe_dump(content, sort_keys=False, allow_unicode=True))


WRITERS = {"voc": write_voc, "coco": write_coco, "yolo": write_yolo}
