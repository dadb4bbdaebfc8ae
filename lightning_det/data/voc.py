"""Pascal VOC reader: the devkit layout ``<root>/VOC<year>/{JPEGImages,Annotations,ImageSets/Main}``, or one folder
``<root>/{JPEGImages,Annotations,ImageSets/Main}`` without the year level, with or without ImageSets.

Coordinates: VOC XML gives 1-based, inclusive pixel indices (``xmin=1`` is the first column, ``xmax=W`` the last).
They become continuous pixel coordinates by subtracting 1 from ``xmin``/``ymin`` only, so a box covering columns
``xmin..xmax`` spans ``[xmin - 1, xmax]`` and has width ``xmax - xmin + 1``, the width VOC's own tools use.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from lightning_det.data.records import (
    Annotations,
    ImageEntry,
    InvalidAnnotationError,
    InvalidInputLog,
    ParsedSource,
    image_size,
    once_each,
    read_annotations,
)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

VOCObject = tuple[str, list[float], bool]


def _text(node: ET.Element, tag: str, where: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise InvalidAnnotationError(f"{where} has no <{tag}>")
    return child.text.strip()


def _number(node: ET.Element, tag: str, where: str) -> float:
    text = _text(node, tag, where)
    try:
        return float(text)
    except ValueError:
        raise InvalidAnnotationError(f"{where}: <{tag}> is '{text}', not a number") from None


def parse_voc_xml(xml_path: str | Path) -> tuple[tuple[int, int] | None, list[VOCObject]]:
    """``((height, width) or None if absent, [(name, [x1, y1, x2, y2], difficult), ...])`` of one XML file."""
    xml_path = str(xml_path)
    try:
        tree = ET.parse(xml_path)
    except ET.ParseError as error:
        line, column = error.position
        raise InvalidAnnotationError(
            f"{xml_path}: malformed XML at line {line}, column {column} ({error.msg})"
        ) from None
    except OSError as error:
        raise InvalidAnnotationError(f"cannot read annotation {xml_path}: {error.strerror}") from None
    annotation = tree.getroot()
    size_node = annotation.find("size")
    size = None
    if size_node is not None:
        height = int(_number(size_node, "height", f"{xml_path}: <size>"))
        width = int(_number(size_node, "width", f"{xml_path}: <size>"))
        size = (height, width) if height > 0 and width > 0 else None
    objects = []
    for k, node in enumerate(annotation.iter("object"), start=1):
        where = f"{xml_path}: object {k}"
        name = _text(node, "name", where)
        box_node = node.find("bndbox")
        if box_node is None:
            raise InvalidAnnotationError(f"{where} ('{name}') has no <bndbox>")
        xmin, ymin, xmax, ymax = (_number(box_node, tag, where) for tag in ("xmin", "ymin", "xmax", "ymax"))
        difficult_node = node.find("difficult")
        difficult = difficult_node is not None and (difficult_node.text or "0").strip() not in ("0", "")
        objects.append((name, [xmin - 1, ymin - 1, xmax, ymax], difficult))
    return size, objects


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".JPG", ".JPEG", ".PNG")


class VOCSource:
    """The images of one or more split lists, in any of the layouts VOC-style datasets come in.

    - ``"2007/trainval"``: the devkit, ``<root>/VOC2007/ImageSets/Main/trainval.txt``;
    - ``"train"``: a single folder without a year level (what most exporters write),
      ``<root>/ImageSets/Main/train.txt`` beside ``<root>/Annotations`` and ``<root>/JPEGImages``;
    - ``splits=None``: every ``<root>/Annotations/*.xml``, for a folder with no ImageSets (hold out a validation
      share with ``data.val_split``).

    Image ids are positions in the combined list, since VOC file ids (``2008_000123``) are not numbers.
    """

    def __init__(self, splits: Sequence[str] | None) -> None:
        if isinstance(splits, str):
            splits = [splits]
        for split in splits or []:
            if split.count("/") > 1 or not split.strip("/"):
                raise ValueError(
                    f"VOC split '{split}' must be '<split>' (e.g. 'train': <root>/ImageSets/Main/train.txt) or "
                    "'<year>/<split>' (e.g. '2007/trainval': <root>/VOC2007/ImageSets/Main/trainval.txt)"
                )
        self.splits = None if splits is None else list(splits)

    def __repr__(self) -> str:
        return f"VOCSource(splits={self.splits})"

    def image_ids(self, root: Path) -> list[tuple[Path, str]]:
        """``(folder holding Annotations/ and JPEGImages/, file id)`` of every listed image, in list order; an id
        listed again (in one list or another of the same folder) is kept once, with one warning."""
        if self.splits is None:
            annotations = root / "Annotations"
            if not annotations.is_dir():
                raise FileNotFoundError(
                    f"no folder {annotations}: with data.train.splits=null, data.root must hold Annotations/ "
                    "and JPEGImages/ directly"
                )
            return [(root, xml.stem) for xml in sorted(annotations.glob("*.xml"))]
        listed, keys, list_files = [], [], []
        for split in self.splits:
            year, _, name = split.rpartition("/")
            folder = root / f"VOC{year}" if year else root
            list_file = folder / "ImageSets" / "Main" / f"{name}.txt"
            if not list_file.is_file():
                where = f"VOC{year}/ImageSets/Main/" if year else "ImageSets/Main/"
                raise FileNotFoundError(
                    f"VOC split list {list_file} not found for split '{split}'. Check data.root (it must contain "
                    f"{where}) and the split names; a folder without ImageSets takes data.train.splits=null "
                    "data.val=null data.val_split=0.2"
                )
            lines = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
            file_ids = [listed_id(folder, line) for line in lines]
            listed += [(folder, file_id) for file_id in file_ids]
            keys += [f"VOC{year}/{file_id}" if year else file_id for file_id in file_ids]
            list_files.append(str(list_file))
        return [listed[i] for i in once_each(keys, ", ".join(list_files))]

    def parse(self, root: Path, invalid: InvalidInputLog) -> ParsedSource:
        images: list[ImageEntry] = []
        object_image, boxes, names, difficult, object_ids = [], [], [], [], []
        for folder, file_id in self.image_ids(root):
            xml_path = folder / "Annotations" / f"{file_id}.xml"
            image_path = find_image(folder / "JPEGImages", file_id)
            try:
                size, objects = parse_voc_xml(xml_path)
                if not os.path.exists(image_path):
                    raise InvalidAnnotationError(f"{xml_path}: its image {image_path} does not exist")
            except InvalidAnnotationError as error:
                invalid.report(
                    "image", str(error), "repair the XML / add the image, or remove its id from the split list"
                )
                continue
            height, width = size or image_size(image_path)
            for k, (name, box, hard) in enumerate(objects, start=1):
                object_image.append(len(images))
                boxes.append(box)
                names.append(name)
                difficult.append(hard)
                object_ids.append(k)
            images.append(ImageEntry(image_path, len(images), height, width, str(xml_path)))
        return ParsedSource.from_lists(images, object_image, boxes, names, difficult, object_ids)


def listed_id(folder: Path, line: str) -> str:
    """The file id of a split-list line: the whole line when an annotation has that name (ids with spaces), else
    its first word (class lists such as ``cat_train.txt`` add a flag: ``000012  1``)."""
    if (folder / "Annotations" / f"{line}.xml").exists():
        return line
    return line.split()[0]


def find_image(folder: Path, file_id: str) -> str:
    """``<folder>/<file_id>.jpg``, or the same name with another common image suffix when that exists."""
    default = folder / f"{file_id}.jpg"
    if default.exists():
        return str(default)
    return next((str(p) for p in (folder / f"{file_id}{s}" for s in IMAGE_SUFFIXES[1:]) if p.exists()), str(default))


def read_voc(
    root: str | Path,
    splits: Sequence[str],
    classes: Sequence[str] | None = VOC_CLASSES,
    skip_invalid: bool = False,
) -> Annotations:
    """Read VOC splits with the 20 VOC classes, a user list, or (``classes=None``) the sorted names found."""
    return read_annotations(root, [VOCSource(splits)], None if classes is None else list(classes), skip_invalid)
