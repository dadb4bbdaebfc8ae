"""COCO reader: an ``instances_*.json`` file plus the folder its ``file_name`` entries are relative to.

Category ids become contiguous labels ``0..C-1`` in category-id order; ``Annotations.label_to_category_id``
keeps the way back for result files. ``iscrowd`` annotations are marked difficult, so evaluation ignores them
and training leaves them out (unless ``keep_difficult_in_training``). Boxes go from COCO ``xywh`` to ``xyxy``.
Each annotation's ``area`` (the mask area for COCO itself) is kept: COCO bins objects into small / medium / large
by it, not by the box. Its ``segmentation`` is dropped while the json is parsed: boxes are trained, and train2017's
polygons would otherwise hold hundreds of MB of Python lists (BENCHMARKS.md, "COCO scale").
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from lightning_det.data.records import (
    Annotations,
    ImageEntry,
    InvalidAnnotationError,
    InvalidInputLog,
    ParsedSource,
    read_annotations,
)
from lightning_det.io import collector_paused


def load_coco_json(path: Path) -> dict[str, Any]:
    """The json's content without the annotations' ``segmentation``, with the three lists the reader needs checked
    to be there."""
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file {path} not found. Check data.root and the annotation_file.")
    try:
        with open(path) as file:
            content = json.load(file, object_hook=without_segmentation)
    except json.JSONDecodeError as error:
        raise InvalidAnnotationError(
            f"{path}: malformed JSON at line {error.lineno}, column {error.colno} ({error.msg})"
        ) from None
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(content.get(key), list)]
    if missing:
        raise InvalidAnnotationError(f"{path}: no {' / '.join(missing)} list; is it a COCO 'instances' file?")
    return content


def without_segmentation(entry: dict[str, Any]) -> dict[str, Any]:
    entry.pop("segmentation", None)
    return entry


def _annotation_arrays(path: Path, annotations: list[dict]) -> tuple[np.ndarray, ...]:
    """``(annotation id, image id, category id, xywh, iscrowd, area)`` arrays (area 0 where the annotation has none);
    names the first malformed annotation."""
    try:
        return (
            np.array([a.get("id", -1) for a in annotations], dtype=np.int64),
            np.array([a["image_id"] for a in annotations], dtype=np.int64),
            np.array([a["category_id"] for a in annotations], dtype=np.int64),
            np.array([a["bbox"] for a in annotations], dtype=np.float64).reshape(-1, 4),
            np.array([a.get("iscrowd", 0) for a in annotations], dtype=bool),
            np.array([a.get("area") or 0 for a in annotations], dtype=np.float32),
        )
    except (KeyError, TypeError, ValueError):
        for k, a in enumerate(annotations):
            bbox = a.get("bbox") if isinstance(a, dict) else None
            if not (isinstance(bbox, list) and len(bbox) == 4 and "image_id" in a and "category_id" in a):
                raise InvalidAnnotationError(
                    f"{path}: annotation #{k} (id {a.get('id') if isinstance(a, dict) else '?'}) needs image_id, "
                    f"category_id and a bbox of 4 numbers, got {a}"
                ) from None
        raise


class COCOSource:
    """One COCO json; ``annotation_file`` and ``image_dir`` are relative to the data root (or absolute)."""

    def __init__(self, annotation_file: str, image_dir: str) -> None:
        self.annotation_file = annotation_file
        self.image_dir = image_dir

    def __repr__(self) -> str:
        return f"COCOSource(annotation_file={self.annotation_file!r}, image_dir={self.image_dir!r})"

    @collector_paused()
    def parse(self, root: Path, invalid: InvalidInputLog) -> ParsedSource:
        path = root / self.annotation_file
        content = load_coco_json(path)
        categories = sorted(content["categories"], key=lambda c: c["id"])
        category_ids = {c["name"]: int(c["id"]) for c in categories}
        if len(category_ids) != len(categories):
            raise InvalidAnnotationError(f"{path}: category names are not unique")
        name_of = {int(c["id"]): c["name"] for c in categories}

        images, known_ids = self._images(root, path, content["images"], invalid)
        annotation_id, image_id, category_id, xywh, crowd, area = _annotation_arrays(path, content["annotations"])
        index_of = {entry.image_id: i for i, entry in enumerate(images)}
        object_image = np.array([index_of.get(i, -1) for i in image_id.tolist()], dtype=np.int64)
        names = np.array([name_of.get(c, "") for c in category_id.tolist()], dtype=str)

        orphan = (object_image < 0) & ~np.isin(image_id, known_ids)
        uncategorised = (names == "") & (object_image >= 0)
        for j in np.flatnonzero(orphan):
            invalid.report("object", f"{path}: annotation {annotation_id[j]} refers to unknown image id "
                           f"{image_id[j]}", "remove the annotation or add its image")
        for j in np.flatnonzero(uncategorised):
            invalid.report("object", f"{path}: annotation {annotation_id[j]} has category_id {category_id[j]}, "
                           f"which is not in 'categories' (ids {sorted(name_of)})", "fix its category_id")
        keep = (object_image >= 0) & ~uncategorised
        boxes = np.concatenate((xywh[:, :2], xywh[:, :2] + xywh[:, 2:]), axis=1)[keep]
        return ParsedSource(
            images=images,
            object_image=object_image[keep],
            boxes=boxes.astype(np.float32),
            names=names[keep],
            difficult=crowd[keep],
            object_ids=annotation_id[keep],
            declared_classes=[c["name"] for c in categories],
            category_ids=category_ids,
            area=area[keep],
        )

    def _images(
        self, root: Path, path: Path, entries: list[dict], invalid: InvalidInputLog
    ) -> tuple[list[ImageEntry], np.ndarray]:
        """Usable image entries, and the ids of all entries (to tell skipped images from unknown ones). An id given to
        several images is reported for each: their annotations cannot be attributed."""
        images = []
        image_dir = str(root / self.image_dir)
        for k, entry in enumerate(entries):
            try:
                image_path = os.path.join(image_dir, entry["file_name"])  # not pathlib: 3 s at COCO's 118k images
                image = ImageEntry(image_path, int(entry["id"]), int(entry["height"]), int(entry["width"]),
                                   f"{path} (image {entry['file_name']})")
            except (KeyError, TypeError, ValueError):
                raise InvalidAnnotationError(
                    f"{path}: image #{k} needs id, file_name, height and width, got {entry}"
                ) from None
            if not os.path.exists(image_path):
                invalid.report("image", f"{path}: image {image_path} (id {image.image_id}) does not exist",
                               f"add the image under {image_dir} or remove its entry from the json")
                continue
            images.append(image)
        ids = np.array([entry["id"] for entry in entries], dtype=np.int64)
        unique, counts = np.unique(ids, return_counts=True)
        shared: dict[int, list[str]] = {}
        for k in np.flatnonzero(np.isin(ids, unique[counts > 1])).tolist():
            shared.setdefault(int(ids[k]), []).append(entries[k]["file_name"])
        for image_id, file_names in shared.items():
            for j, name in enumerate(file_names):
                others = ", ".join(file_names[:j] + file_names[j + 1:])
                invalid.report("image", f"{path}: image {name} shares its id {image_id} with {others}, so their "
                               "annotations cannot be told apart", "give every image its own id in the json")
        return [image for image in images if image.image_id not in shared] if shared else images, ids


def read_coco(
    root: str | Path,
    annotation_file: str,
    image_dir: str,
    classes: list[str] | None = None,
    skip_invalid: bool = False,
) -> Annotations:
    """Read one COCO json; ``classes=None`` takes all its categories in id order."""
    return read_annotations(root, [COCOSource(annotation_file, image_dir)], classes, skip_invalid)
