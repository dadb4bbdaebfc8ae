"""Ultralytics / YOLO-format reader: a ``data.yaml`` plus ``images/...`` and ``labels/.../*.txt`` files.

``data.yaml`` gives ``path`` (the dataset root; relative to the yaml's folder, and the yaml's folder when absent),
``train`` / ``val`` / ``test`` (each a folder of images, a list file of image paths, or a list of those; relative
to ``path``; an entry starting with ``../`` that does not exist is also tried without it, as Roboflow exports need)
and ``names`` (a list, or an ``{id: name}`` map with ids ``0..n-1``), whose order is the label order.

An image's labels are at the image's path with its last ``/images/`` replaced by ``/labels/`` and its suffix by
``.txt`` (beside the image when the path has no ``images`` folder). Each line is ``class cx cy w h``, the box's
centre and size divided by the image's width and height. An image without a label file, or with an empty one, has
no objects. Coordinates may stray outside [0, 1] by :data:`COORDINATE_TOLERANCE` (rounding in export tools) and
are clipped; beyond that the object is invalid. Object ids in messages are line numbers.
"""

from __future__ import annotations

import inspect
import logging
import os
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml as yaml_parser

from lightning_det.data.datamodule import DetectionDataModule
from lightning_det.data.records import (
    ImageEntry,
    ImageLoadError,
    InvalidAnnotationError,
    InvalidInputLog,
    ParsedSource,
    image_size,
    once_each,
)

log = logging.getLogger(__name__)

SPLIT_KEYS = ("train", "val", "test")
#: Suffixes (lower case) of the files a folder entry takes as images.
IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
#: Normalised coordinates may lie this far outside [0, 1] and are clipped; further out the object is invalid.
COORDINATE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class DataYaml:
    """A checked ``data.yaml``: the dataset root, each split's entries as existing paths, and the class names."""

    file: Path
    root: Path
    splits: dict[str, list[Path]]
    names: list[str]


def load_data_yaml(file: str | Path) -> DataYaml:
    """Read and check ``data.yaml``; every problem names the file and the key to fix. Paths come out absolute (not
    resolved: a linked image keeps the path its label rule applies to)."""
    file = Path(os.path.abspath(file))
    if not file.is_file():
        raise FileNotFoundError(f"data.yaml {file} not found: set data.yaml to the dataset's yaml file")
    try:
        content = yaml_parser.safe_load(file.read_text())
    except yaml_parser.YAMLError as error:
        raise InvalidAnnotationError(f"{file}: malformed YAML ({error})") from None
    if not isinstance(content, dict):
        raise InvalidAnnotationError(f"{file}: expected a mapping with path, train, val and names")
    names = class_names(file, content.get("names"), content.get("nc"))
    root = file.parent / str(content.get("path") or ".")
    splits = {key: split_entries(file, root, key, content[key]) for key in SPLIT_KEYS if content.get(key)}
    if "train" not in splits:
        raise InvalidAnnotationError(f"{file}: no 'train' entry; add train: <image folder or list file>")
    return DataYaml(file, root, splits, names)


def class_names(file: Path, names: Any, count: Any) -> list[str]:
    """``names`` as a list in id order, checked against ``nc`` when that is given."""
    if isinstance(names, dict):
        if set(names) != set(range(len(names))):
            raise InvalidAnnotationError(
                f"{file}: names ids {list(names)} must be the whole numbers 0..{len(names) - 1}, "
                "e.g. names: {0: cat, 1: dog}"
            )
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names:
        raise InvalidAnnotationError(f"{file}: 'names' must be a non-empty list or {{id: name}} map of the classes")
    names = [str(name) for name in names]
    if len(set(names)) != len(names):
        raise InvalidAnnotationError(f"{file}: 'names' lists a class twice: {names}; give each class one name")
    if count is not None and count != len(names):
        raise InvalidAnnotationError(f"{file}: nc is {count} but names lists {len(names)} classes; make them agree")
    return names


def split_entries(file: Path, root: Path, key: str, value: Any) -> list[Path]:
    """The folders and list files of one split, each resolved against the root and checked to exist."""
    entries = value if isinstance(value, list) else [value]
    paths = []
    for entry in map(str, entries):
        path = root / entry
        if not path.exists() and entry.startswith("../"):
            path = root / entry[3:]
        if not path.exists():
            raise FileNotFoundError(
                f"{file}: {key} entry '{entry}' not found (looked for {root / entry}); entries are relative to "
                f"'path' ({root}); fix the entry or the path"
            )
        paths.append(path)
    return paths


def label_path(image: str) -> str:
    """Where an image's label file is: its last ``/images/`` becomes ``/labels/``, its suffix ``.txt``."""
    head, found, tail = image.rpartition(f"{os.sep}images{os.sep}")
    path = f"{head}{os.sep}labels{os.sep}{tail}" if found else image
    return os.path.splitext(path)[0] + ".txt"


def listed_images(entry: Path) -> Iterator[tuple[str, str]]:
    """``(image path, where it was listed)`` of a folder (recursively, image suffixes only, sorted) or a list
    file (one path a line, relative ones to the list file's folder)."""
    if entry.is_dir():
        files = sorted(str(p) for p in entry.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        yield from ((path, str(entry)) for path in files)
        return
    for number, line in enumerate(entry.read_text().splitlines(), start=1):
        if line.strip():
            yield os.path.normpath(entry.parent / line.strip()), f"{entry}, line {number}"


@dataclass
class LabelLine:
    number: int
    class_id: int
    box: list[float]  # x1, y1, x2, y2 normalised, clipped to [0, 1]


def read_label_file(path: str, num_classes: int, invalid: InvalidInputLog) -> list[LabelLine] | None:
    """The usable lines of a label file; ``None`` when the file is malformed (the image is then reported)."""
    lines = []
    for number, text in enumerate(Path(path).read_text().splitlines(), start=1):
        fields = text.split()
        if not fields:
            continue
        problem = line_problem(fields)
        if problem:
            invalid.report("image", f"{path}: line {number} ('{text.strip()}') {problem}",
                           "write each line as 'class cx cy w h', or remove the image and its label file")
            return None
        class_id, (cx, cy, w, h) = int(float(fields[0])), map(float, fields[1:])
        corners = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        if not 0 <= class_id < num_classes:
            invalid.report("object", f"{path}: line {number}: class id {class_id} is not in names (ids 0.."
                           f"{num_classes - 1})", "fix the class id, or add the class to names in data.yaml")
        elif (corners < -COORDINATE_TOLERANCE).any() or (corners > 1 + COORDINATE_TOLERANCE).any():
            invalid.report("object", f"{path}: line {number}: box (cx cy w h) {fields[1:]} reaches outside [0, 1] "
                           f"by more than {COORDINATE_TOLERANCE:g}",
                           "correct it (pixel coordinates divided by the image's width and height)")
        else:
            lines.append(LabelLine(number, class_id, np.clip(corners, 0, 1).tolist()))
    return lines


def line_problem(fields: list[str]) -> str:
    """Why a label line's fields are not ``class cx cy w h`` ("" when they are)."""
    if len(fields) != 5:
        return f"has {len(fields)} fields, not the 5 of 'class cx cy w h' (segment polygons are not read)"
    try:
        values = [float(field) for field in fields]
    except ValueError:
        return "has a field that is not a number"
    if not all(np.isfinite(values)) or values[0] != int(values[0]):
        return "has a class id that is not a whole number, or a non-finite coordinate"
    return ""


class YOLOSource:
    """One split (``train``, ``val`` or ``test``) of a ``data.yaml``. Image ids are positions in the split; an image
    listed again (in a list file, or by two entries) is read once, with one warning."""

    def __init__(self, data_yaml: str, split: str) -> None:
        if split not in SPLIT_KEYS:
            raise ValueError(f"YOLO split '{split}' must be one of {list(SPLIT_KEYS)} (a key of data.yaml)")
        self.data_yaml = str(data_yaml)
        self.split = split

    def __repr__(self) -> str:
        return f"YOLOSource(data_yaml={self.data_yaml!r}, split={self.split!r})"

    def parse(self, root: Path, invalid: InvalidInputLog) -> ParsedSource:
        dataset = load_data_yaml(root / self.data_yaml)
        if self.split not in dataset.splits:
            raise InvalidAnnotationError(f"{dataset.file}: no '{self.split}' entry; add {self.split}: <images>")
        images: list[ImageEntry] = []
        object_image, boxes, names, object_ids = [], [], [], []
        unlabelled: list[str] = []
        listed: list[tuple[str, str]] = []
        for entry in dataset.splits[self.split]:
            entry_images = list(listed_images(entry))
            if entry.is_dir():
                report_orphan_labels([path for path, _ in entry_images], invalid)
            listed += entry_images
        once = once_each([os.path.normpath(path) for path, _ in listed], f"{dataset.file}, '{self.split}' images")
        for image_path, where in (listed[i] for i in once):
            size = self._size(image_path, where, invalid)
            if size is None:
                continue
            labels = label_path(image_path)
            has_labels = os.path.exists(labels)
            lines = read_label_file(labels, len(dataset.names), invalid) if has_labels else []
            if lines is None:
                continue
            if not has_labels:
                unlabelled.append(labels)
            height, width = size
            for line in lines:
                object_image.append(len(images))
                boxes.append(np.multiply(line.box, [width, height] * 2).tolist())
                names.append(dataset.names[line.class_id])
                object_ids.append(line.number)
            images.append(ImageEntry(image_path, len(images), height, width, labels if has_labels else image_path))
        self._check_labels_found(dataset, images, unlabelled)
        return ParsedSource.from_lists(images, object_image, boxes, names, [False] * len(names), object_ids,
                                       declared_classes=dataset.names)

    @staticmethod
    def _size(path: str, where: str, invalid: InvalidInputLog) -> tuple[int, int] | None:
        """``(height, width)`` from the image's header, or ``None`` (reported) when it is missing or unreadable."""
        fix = "add the image, or remove it (and its label file) from the split"
        if not os.path.isfile(path):
            invalid.report("image", f"image {path} (listed in {where}) does not exist", fix)
            return None
        try:
            return image_size(path)
        except ImageLoadError as error:
            invalid.report("image", str(error), fix)
            return None

    def _check_labels_found(self, dataset: DataYaml, images: list[ImageEntry], unlabelled: list[str]) -> None:
        """No label file at all means the labels are somewhere the rule does not look: refuse, saying where."""
        if images and len(unlabelled) == len(images):
            raise InvalidAnnotationError(
                f"{dataset.file}: none of the {len(images)} '{self.split}' images has a label file (the first "
                f"would be {unlabelled[0]}). Labels go where the image path's last /images/ is /labels/ and its "
                "suffix .txt; move them there"
            )
        if unlabelled:
            log.info("%s: %d of %d images have no label file and count as images without objects",
                     self.split, len(unlabelled), len(images))


def report_orphan_labels(image_paths: list[str], invalid: InvalidInputLog) -> None:
    """Label files with no image beside their siblings' images (a deleted or misnamed image)."""
    labels = [label_path(path) for path in image_paths]
    expected = set(labels)
    folders = {os.path.dirname(label) for label, image in zip(labels, image_paths)
               if os.path.dirname(label) != os.path.dirname(image)}
    for folder in sorted(folders):
        for label in sorted(str(p) for p in Path(folder).glob("*.txt")):
            if label not in expected:
                invalid.report("image", f"label file {label} has no image (none of "
                               f"{'/'.join(IMAGE_SUFFIXES)} with its name in the images folder)",
                               "add the image, or delete the label file")


def forwarding_parameters(set_here: tuple[str, ...]) -> Callable[[type], type]:
    """Give a subclass whose ``__init__`` forwards ``**kwargs`` to its parent the signature and type hints of the
    parameters it forwards (all the parent's but ``set_here``), so the config checks
    (:mod:`lightning_det.checks.config`) check ``data.reading.skip_invalid=flase`` as they do for the parent."""

    def decorate(cls: type) -> type:
        parent_init = cls.__mro__[1].__init__
        own = [p for p in inspect.signature(cls.__init__).parameters.values() if p.kind is not p.VAR_KEYWORD]
        taken = {p.name for p in own} | set(set_here)
        forwarded = [p.replace(kind=p.KEYWORD_ONLY) for name, p in inspect.signature(parent_init).parameters.items()
                     if name not in taken]
        cls.__signature__ = inspect.Signature(own[1:] + forwarded)  # without self
        cls.__init__.__annotations__ = {**typing.get_type_hints(parent_init), **typing.get_type_hints(cls.__init__)}
        return cls

    return decorate


@forwarding_parameters(set_here=("root", "train", "val"))
class YOLODataModule(DetectionDataModule):
    """The data module of a ``data.yaml``: its ``train`` and ``val`` entries become the sources, so
    ``data=yolo data.yaml=<file>`` is the whole configuration. ``test`` names the key whose images ``evaluate`` and
    ``predict`` take (``"test"``); ``None`` takes the validation images, as for the other datasets. The class list
    defaults to ``names``. Other arguments: :class:`DetectionDataModule`."""

    def __init__(self, yaml: str, test: str | None = None, **kwargs: Any) -> None:
        dataset = load_data_yaml(yaml)
        file = str(dataset.file)
        kwargs["classes"] = kwargs.get("classes") or dataset.names  # known now: no need to read every split first
        super().__init__(
            root=dataset.root,
            train=YOLOSource(file, "train"),
            val=YOLOSource(file, "val") if "val" in dataset.splits else None,
            test=None if test is None else YOLOSource(file, test),
            **kwargs,
        )
