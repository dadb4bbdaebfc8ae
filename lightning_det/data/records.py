"""Annotation records and the checks every reader shares.

Readers (VOC, COCO) first *parse* their files into a flat table of objects that still carry class *names*
(:class:`ParsedSource`); :func:`build_records` then checks the boxes, turns names into labels ``0..C-1`` and groups
the objects per image into a :class:`RecordTable`. Keeping the class list out of parsing lets the data module
infer it from several sources at once before any label is assigned.

A split's records live in a few numpy arrays, not in a list of Python objects: loader workers forked from the
main process share those pages as long as nobody writes to them, and reading a Python object writes its
reference count, so a list of 118k records would be copied page by page into every worker over an epoch
(BENCHMARKS.md, "COCO scale"). :class:`AnnotationRecord` is the view of one image, made when it is asked for.

Bad input raises :class:`InvalidAnnotationError` naming the file and the fix, or, with ``skip_invalid``, is
skipped, counted and reported in one warning by :class:`InvalidInputLog`. That includes the image files, checked
while reading (see :mod:`lightning_det.data.image_checks`), so a bad one rarely reaches a loader worker; one that
still fails to decode there (corrupt data behind a valid header) is replaced and counted under ``skip_invalid``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol, overload

import numpy as np
import torch
from PIL import Image

from lightning_det.data.image_checks import CUT_SHORT, CheckedImages, decode_rgb, image_problem
from lightning_det.io import write_atomically

log = logging.getLogger(__name__)
#: The run folder's list of image files that end early and are decoded as far as they go (train.py writes it).
CUT_SHORT_LIST = "restored_images.txt"

#: Boxes may exceed the image by this many pixels (rounding in annotation tools) and are clipped; beyond it they
#: are invalid.
BOX_TOLERANCE_PX = 1.0


class InvalidAnnotationError(ValueError):
    """An annotation file or object that cannot be used as given."""


class ImageLoadError(RuntimeError):
    """An image that is missing, cannot be decoded, or does not match its annotation."""


@dataclass(frozen=True)
class AnnotationRecord:
    """Everything known about one image before it is loaded. Boxes are xyxy in pixels of the original image."""

    path: str
    image_id: int
    height: int
    width: int
    boxes: np.ndarray  # float32 [N, 4]
    labels: np.ndarray  # int64 [N]
    difficult: np.ndarray  # bool [N]; VOC "difficult" or COCO "iscrowd": ignored by evaluation
    area: np.ndarray | None = None  # float32 [N]: COCO's "area" (mask area), 0 where absent; None: no such field
    exif_orientation: bool = False  # rotate the pixels as the file's EXIF orientation says when loading
    cut_short: bool = False  # the file ends early: decoded as far as it goes (found so by check_images)


@dataclass(frozen=True)
class RecordTable(Sequence[AnnotationRecord]):
    """The records of a split as flat arrays: per image ``paths`` ... ``exif_orientation``, per object ``boxes`` ...
    ``area``, the objects of image ``i`` at ``offsets[i]:offsets[i + 1]``. Indexing gives an
    :class:`AnnotationRecord` whose arrays are views into these."""

    paths: np.ndarray  # bytes [N]: utf-8 paths (fixed width)
    image_ids: np.ndarray  # int64 [N]
    heights: np.ndarray  # int64 [N]
    widths: np.ndarray  # int64 [N]
    exif_orientation: np.ndarray  # bool [N]
    offsets: np.ndarray  # int64 [N + 1]
    boxes: np.ndarray  # float32 [M, 4]
    labels: np.ndarray  # int64 [M]
    difficult: np.ndarray  # bool [M]
    area: np.ndarray | None = None  # float32 [M], or None when the source has no area field
    cut_short: np.ndarray | None = None  # bool [N]: files that end early, decoded as far as they go; None: none
    skip_unreadable: bool = False  # data.reading.skip_invalid: a loader worker replaces an image that fails to decode

    @classmethod
    def from_records(cls, records: Iterable[AnnotationRecord]) -> RecordTable:
        """The table of a list of records (records built one by one, e.g. in tests)."""
        records = list(records)
        counts = [len(r.labels) for r in records]
        has_area = bool(records) and all(r.area is not None for r in records)

        def joined(values: list[np.ndarray], dtype: type, shape: tuple[int, ...] = ()) -> np.ndarray:
            return np.concatenate([np.asarray(v, dtype).reshape(-1, *shape) for v in values]) if values else \
                np.zeros((0, *shape), dtype)

        return cls(
            paths=np.array([r.path.encode() for r in records], dtype=bytes),
            image_ids=np.array([r.image_id for r in records], dtype=np.int64),
            heights=np.array([r.height for r in records], dtype=np.int64),
            widths=np.array([r.width for r in records], dtype=np.int64),
            exif_orientation=np.array([r.exif_orientation for r in records], dtype=bool),
            offsets=np.concatenate(([0], np.cumsum(counts, dtype=np.int64))),
            boxes=joined([r.boxes for r in records], np.float32, (4,)),
            labels=joined([r.labels for r in records], np.int64),
            difficult=joined([r.difficult for r in records], bool),
            area=joined([r.area for r in records], np.float32) if has_area else None,
            cut_short=np.array([r.cut_short for r in records], dtype=bool),
        )

    def __len__(self) -> int:
        return len(self.image_ids)

    @overload
    def __getitem__(self, index: int) -> AnnotationRecord: ...

    @overload
    def __getitem__(self, index: slice) -> RecordTable: ...

    def __getitem__(self, index: int | slice) -> AnnotationRecord | RecordTable:
        if isinstance(index, slice):
            return self.take(np.arange(len(self))[index])
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        index = int(index) % len(self)
        start, stop = self.offsets[index], self.offsets[index + 1]
        return AnnotationRecord(
            self.paths[index].decode(), int(self.image_ids[index]), int(self.heights[index]),
            int(self.widths[index]), self.boxes[start:stop], self.labels[start:stop], self.difficult[start:stop],
            None if self.area is None else self.area[start:stop], bool(self.exif_orientation[index]),
            self.cut_short is not None and bool(self.cut_short[index]),
        )

    @property
    def object_counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def object_image(self) -> np.ndarray:
        """int64 [M]: the image index of every object."""
        return np.repeat(np.arange(len(self)), self.object_counts)

    def object_image_sizes(self) -> np.ndarray:
        """int64 [M, 2]: the ``(height, width)`` of every object's image."""
        return np.stack((self.heights, self.widths), axis=1)[self.object_image]

    def take(self, indices: np.ndarray) -> RecordTable:
        """The images at ``indices`` (in that order) with their objects."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        counts = self.object_counts[indices]
        starts = self.offsets[indices]
        objects = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(int(counts.sum()))
        return replace(
            self, paths=self.paths[indices], image_ids=self.image_ids[indices], heights=self.heights[indices],
            widths=self.widths[indices], exif_orientation=self.exif_orientation[indices],
            cut_short=None if self.cut_short is None else self.cut_short[indices],
            offsets=np.concatenate(([0], np.cumsum(counts, dtype=np.int64))), **self._objects(objects),
        )

    def select_objects(self, keep: np.ndarray) -> RecordTable:
        """Every image, with only the objects where ``keep`` (bool [M]) is true."""
        kept = np.bincount(self.object_image[keep], minlength=len(self))
        return replace(self, offsets=np.concatenate(([0], np.cumsum(kept, dtype=np.int64))),
                       **self._objects(np.flatnonzero(keep)))

    def with_exif_orientation(self, apply: bool) -> RecordTable:
        return replace(self, exif_orientation=np.full(len(self), apply))

    def _objects(self, objects: np.ndarray) -> dict[str, np.ndarray | None]:
        return {"boxes": self.boxes[objects], "labels": self.labels[objects], "difficult": self.difficult[objects],
                "area": None if self.area is None else self.area[objects]}


def as_table(records: Sequence[AnnotationRecord]) -> RecordTable:
    """``records`` as a :class:`RecordTable` (itself when it is one)."""
    return records if isinstance(records, RecordTable) else RecordTable.from_records(records)


@dataclass(frozen=True)
class ImageEntry:
    path: str
    image_id: int
    height: int
    width: int
    annotation_file: str  # where the image's annotations come from, for error messages


@dataclass
class ParsedSource:
    """All objects of one annotation source as flat arrays, with class names instead of labels."""

    images: list[ImageEntry]
    object_image: np.ndarray  # int64 [M]: index into ``images``
    boxes: np.ndarray  # float32 [M, 4] xyxy
    names: np.ndarray  # str [M]
    difficult: np.ndarray  # bool [M]
    object_ids: np.ndarray  # int64 [M]: position in its file (VOC) or annotation id (COCO), for error messages
    declared_classes: list[str] | None = None  # class order fixed by the source itself (COCO categories)
    category_ids: dict[str, int] = field(default_factory=dict)  # class name -> dataset category id (COCO)
    area: np.ndarray | None = None  # float32 [M]: the annotation's own area (COCO), 0 where it gives none

    @classmethod
    def from_lists(
        cls, images: list[ImageEntry], object_image: list[int], boxes: list[list[float]], names: list[str],
        difficult: list[bool], object_ids: list[int], **kwargs: object,
    ) -> ParsedSource:
        return cls(
            images=images,
            object_image=np.asarray(object_image, dtype=np.int64),
            boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            names=np.asarray(names, dtype=str),
            difficult=np.asarray(difficult, dtype=bool),
            object_ids=np.asarray(object_ids, dtype=np.int64),
            **kwargs,
        )


class InvalidInputLog:
    """Raises on invalid input, or (``skip_invalid``) counts it and reports everything in one warning. Image files
    that fail the check are gathered first, so the error names every one of them, not the first alone."""

    shown = 5  # file names quoted in the summary warning

    def __init__(self, skip_invalid: bool) -> None:
        self.skip_invalid = skip_invalid
        self.skipped: dict[str, list[str]] = {"image": [], "object": []}
        self.bad_images: list[str] = []  # without skip_invalid: raised together by finish()
        self.cut_short: list[str] = []  # image files that end early, decoded as far as they go

    def report(self, kind: str, message: str, fix: str) -> None:
        """``kind`` is "image" (the whole image and its objects are dropped) or "object"."""
        if not self.skip_invalid:
            raise InvalidAnnotationError(
                f"{message}. Fix: {fix}; or set data.reading.skip_invalid=true to skip and count such {kind}s."
            )
        self.skipped[kind].append(message)

    def bad_image(self, message: str) -> None:
        """An image file that cannot be used: skipped and counted, or held for the one error of :meth:`finish`."""
        (self.skipped["image"] if self.skip_invalid else self.bad_images).append(message)

    def finish(self) -> None:
        """The error naming every bad image file, else one warning for what was skipped and one for the files
        decoded as far as they go."""
        if self.bad_images:
            raise InvalidAnnotationError(
                f"{len(self.bad_images)} image file{'s' * (len(self.bad_images) > 1)} cannot be used:\n  "
                + "\n  ".join(self.bad_images) + "\nFix: replace them, or remove the images from the annotations; "
                "or set data.reading.skip_invalid=true to skip and count such images."
            )
        counts = {kind: len(messages) for kind, messages in self.skipped.items() if messages}
        if counts:
            first = [m for messages in self.skipped.values() for m in messages][: self.shown]
            log.warning(
                "skip_invalid: skipped %s with invalid annotations. First ones:\n  %s",
                " and ".join(f"{n} {kind}{'s' if n > 1 else ''}" for kind, n in counts.items()),
                "\n  ".join(first),
            )
        if self.cut_short:
            count, first = len(self.cut_short), self.cut_short[: self.shown]
            log.warning(
                "%d %s cut short and decoded as far as %s (the rest gray or black); a training run lists %s in "
                "<run folder>/%s:\n  %s%s", count, "image was" if count == 1 else "images were",
                "it goes" if count == 1 else "they go", "it" if count == 1 else "them", CUT_SHORT_LIST,
                "\n  ".join(first), "\n  ..." * (count > len(first)),
            )


def image_size(path: str) -> tuple[int, int]:
    """``(height, width)`` read from the image header only, for annotations that do not state it."""
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except (OSError, ValueError) as error:
        raise ImageLoadError(f"cannot read the size of image {path}: {error}") from error


def load_image(record: AnnotationRecord) -> torch.Tensor:
    """Decode a record's image to ``uint8 [3, H, W]`` RGB, checking it against the annotated size."""
    try:
        image = decode_rgb(record.path, record.exif_orientation, record.cut_short)
    except (RuntimeError, OSError, ValueError) as error:
        raise ImageLoadError(
            f"cannot read image {record.path}: {error}. Replace the file, or remove the image from the "
            "annotations (VOC: its line in ImageSets/Main/<split>.txt; COCO: its entry in the json)."
        ) from error
    height, width = image.shape[-2:]
    if (height, width) != (record.height, record.width):
        raise ImageLoadError(
            f"image {record.path} is {width}x{height} pixels but its annotation says {record.width}x{record.height}; "
            "the boxes would land in the wrong place. Fix the size in the annotation or re-export the image."
        )
    return image


def check_images(records: RecordTable, invalid: InvalidInputLog, level: str, exif_orientation: bool) -> RecordTable:
    """The records whose image passes :func:`~lightning_det.data.image_checks.image_problem`; the others are
    reported to ``invalid`` (one error naming them all, or counted skips). Files that end early but decode as far as
    they go are kept and flagged (``cut_short``); with ``skip_invalid`` the table says so to the loader workers."""
    checked = CheckedImages(level, exif_orientation)
    usable = np.ones(len(records), dtype=bool)
    cut_short = np.zeros(len(records), dtype=bool)
    for i, (path, height, width) in enumerate(zip(records.paths, records.heights.tolist(), records.widths.tolist())):
        path = path.decode()
        if checked.passed(path, height, width):
            continue
        problem = image_problem(path, height, width, level == "decode", exif_orientation)
        if problem == CUT_SHORT:  # not remembered: warned about and listed on every run
            cut_short[i] = True
            invalid.cut_short.append(path)
        elif problem:
            invalid.bad_image(f"image {path} {problem}")
            usable[i] = False
        else:
            checked.remember(path, height, width)
    checked.save()
    flagged = replace(records, cut_short=cut_short, skip_unreadable=invalid.skip_invalid)
    usable_records = flagged if usable.all() else flagged.take(np.flatnonzero(usable))
    return usable_records.with_exif_orientation(True) if exif_orientation else usable_records


def write_cut_short_list(folder: Path, tables: Iterable[RecordTable]) -> None:
    """:data:`CUT_SHORT_LIST` in ``folder``: the images of ``tables`` decoded as far as their data goes, one path a
    line, for the user to replace (no file when there are none)."""
    paths = sorted({path.decode() for table in tables if table.cut_short is not None
                    for path in table.paths[table.cut_short]})
    if paths:
        text = "".join(f"{path}\n" for path in paths).encode()
        write_atomically(folder / CUT_SHORT_LIST, lambda file: file.write(text))


def check_boxes(boxes: np.ndarray, width: np.ndarray, height: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Clip boxes that exceed their image by at most :data:`BOX_TOLERANCE_PX`; flag the rest.

    Returns the clipped boxes and a reason per box: ``""`` when valid, else why it is not.
    """
    finite = np.isfinite(boxes).all(1)
    low = -BOX_TOLERANCE_PX
    inside = (
        (boxes[:, 0] >= low) & (boxes[:, 1] >= low)
        & (boxes[:, 2] <= width + BOX_TOLERANCE_PX) & (boxes[:, 3] <= height + BOX_TOLERANCE_PX)
    )
    upper = np.stack((width, height, width, height), axis=1).astype(np.float32)
    clipped = np.clip(boxes, 0, upper)
    ordered = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    reason = np.full(len(boxes), "", dtype=object)
    reason[~ordered] = "has x2<=x1 or y2<=y1"
    reason[~inside] = f"lies outside the image by more than {BOX_TOLERANCE_PX:g} px"
    reason[~finite] = "has a non-finite coordinate"
    return clipped, reason


def build_records(parsed: ParsedSource, classes: list[str], invalid: InvalidInputLog) -> RecordTable:
    """Check boxes, map class names to labels ``0..C-1`` and group the objects per image."""
    images = parsed.images
    image_heights = np.array([image.height for image in images], dtype=np.int64)
    image_widths = np.array([image.width for image in images], dtype=np.int64)
    boxes, reason = check_boxes(parsed.boxes, image_widths[parsed.object_image].astype(np.float32),
                                image_heights[parsed.object_image].astype(np.float32))

    class_index = {name: i for i, name in enumerate(classes)}
    unique_names, inverse = np.unique(parsed.names, return_inverse=True)
    labels = np.array([class_index.get(name, -1) for name in unique_names], dtype=np.int64)[inverse.reshape(-1)]

    for j in np.flatnonzero(reason != ""):
        image = images[parsed.object_image[j]]
        invalid.report(
            "object",
            f"{image.annotation_file}: object {parsed.object_ids[j]} ('{parsed.names[j]}') box "
            f"{np.round(parsed.boxes[j], 2).tolist()} {reason[j]} of size {image.width}x{image.height}",
            "correct the box (xyxy in pixels, inside the image)",
        )
    for j in np.flatnonzero((labels < 0) & (reason == "")):
        invalid.report(
            "object",
            f"{images[parsed.object_image[j]].annotation_file}: unknown class '{parsed.names[j]}' "
            f"(known classes: {classes})",
            "add it to data.classes, or set data.classes=null to infer the classes from the annotations",
        )

    keep = (labels >= 0) & (reason == "")
    object_image = parsed.object_image[keep]
    order = np.argsort(object_image, kind="stable")

    def grouped(values: np.ndarray) -> np.ndarray:
        return values[keep][order]

    return RecordTable(
        paths=np.array([image.path.encode() for image in images], dtype=bytes),
        image_ids=np.array([image.image_id for image in images], dtype=np.int64),
        heights=image_heights,
        widths=image_widths,
        exif_orientation=np.zeros(len(images), dtype=bool),
        offsets=np.concatenate(([0], np.cumsum(np.bincount(object_image, minlength=len(images)), dtype=np.int64))),
        boxes=grouped(boxes),
        labels=grouped(labels),
        difficult=grouped(parsed.difficult),
        area=None if parsed.area is None else grouped(parsed.area),
    )


def once_each(keys: list[str], where: str, shown: int = 5) -> np.ndarray:
    """Indices of the first listing of every key, in listing order. A key listed again is kept once, with one warning
    for all: a repeated line is a typo, not a way to show an image more often (``data.sampler.kind=repeat_factor``
    is)."""
    unique, first, counts = np.unique(np.array(keys, dtype=str), return_index=True, return_counts=True)
    if len(unique) == len(keys):
        return np.arange(len(keys))
    repeated = np.flatnonzero(counts > 1)
    repeated = repeated[np.argsort(first[repeated])]
    extra = len(keys) - len(unique)
    log.warning(
        "%s: %d image%s listed more than once (%d extra line%s), kept once: %s%s. Listing an image again does not "
        "show it more often; data.sampler.kind=repeat_factor shows the images of rare classes more often",
        where, len(repeated), "s" * (len(repeated) > 1), extra, "s" * (extra > 1),
        ", ".join(f"{unique[i]} ({counts[i]} times)" for i in repeated[:shown]), ", ..." * (len(repeated) > shown),
    )
    return np.sort(first)


def resolved_paths(paths: np.ndarray) -> list[bytes]:
    """The real paths of image files (``paths``: bytes [N]), so one file reached through a linked folder, a linked
    file or ``..`` compares equal. Each folder is resolved once and only its linked files one by one: one
    ``realpath`` a file would take seconds at COCO's 118k images."""
    separator = os.fsencode(os.sep)
    real: dict[bytes, bytes] = {}  # folder -> its real path, ending in a separator
    linked: dict[bytes, bytes] = {}  # linked file -> its target's real path
    resolved = []
    for path in paths.tolist():
        folder, _, name = path.rpartition(separator)
        if folder not in real:
            listed = folder or separator  # b"": the file system's root
            real[folder] = os.path.join(os.path.realpath(listed), b"")
            linked.update((entry.path, os.path.realpath(entry.path)) for entry in os.scandir(listed)
                          if entry.is_symlink())
        resolved.append(linked.get(path) or real[folder] + name)
    return resolved


def train_without_val_images(
    train: RecordTable, val: RecordTable, sources: tuple[AnnotationSource, AnnotationSource], root: Path,
    skip_invalid: bool,
    shown: int = 5,
) -> RecordTable:
    """``train`` without the images ``val`` holds too (the same file; folders and links resolved): trained on, they
    inflate the validation score. An error naming them, unless ``skip_invalid`` leaves them out of training (never
    out of validation). A val set that is exactly the train set is a deliberate check of fit: only a warning."""
    train_paths, val_paths = resolved_paths(train.paths), resolved_paths(val.paths)
    train_set, val_set = set(train_paths), set(val_paths)  # np.isin would sort the strings: 5x slower
    in_val = np.array([path in val_set for path in train_paths], dtype=bool)
    in_train = np.array([path in train_set for path in val_paths], dtype=bool)
    if not in_train.any():
        return train
    if in_train.all() and in_val.all():
        log.warning("val holds the same %d images as train: its scores measure how well the training images are "
                    "fitted, not how well unseen images are detected", len(val))
        return train
    first = [os.path.relpath(path.decode(), root) for path in val.paths[in_train][:shown]]
    named = ", ".join(first) + ", ..." * (int(in_train.sum()) > shown)
    if not skip_invalid or in_val.all():
        or_else = ("(data.reading.skip_invalid=true would leave no training image)" if skip_invalid
                   else "or set data.reading.skip_invalid=true to leave them out of training")
        raise InvalidAnnotationError(
            f"{int(in_train.sum())} of the {len(val)} val images are also train images: {named} (train: {sources[0]}, "
            f"val: {sources[1]}, under {root}); trained on, they inflate the validation score. Fix: remove them from "
            f"one split (VOC: its ImageSets/Main/<split>.txt; COCO: its json; YOLO: its list file or folder); {or_else}"
        )
    log.warning("skip_invalid: left %d images out of training that val holds too (train: %s, val: %s): %s",
                int(in_val.sum()), sources[0], sources[1], named)
    return train.take(np.flatnonzero(~in_val))


class AnnotationSource(Protocol):
    """Where a split's annotations come from (:class:`~lightning_det.data.voc.VOCSource`, ``COCOSource``)."""

    def parse(self, root: Path, invalid: InvalidInputLog) -> ParsedSource: ...


@dataclass
class Annotations:
    """The result of reading: records per source, the class list and (COCO) the dataset category id per label."""

    records: list[RecordTable]
    classes: list[str]
    label_to_category_id: list[int] | None


def resolve_classes(classes: list[str] | None, parsed: list[ParsedSource]) -> list[str]:
    """The user's list; else the order a source declares (COCO categories); else the sorted names found."""
    if classes is not None:
        classes = [str(name) for name in classes]
        if not classes or len(set(classes)) != len(classes):
            raise InvalidAnnotationError(f"data.classes must be a non-empty list of distinct names, got {classes}")
        return classes
    declared = [p.declared_classes for p in parsed if p.declared_classes is not None]
    if declared:
        if any(d != declared[0] for d in declared):
            raise InvalidAnnotationError(
                f"the annotation files declare different category lists: {declared}. "
                "Give the class list explicitly with data.classes=[...]"
            )
        return list(declared[0])
    inferred = sorted(set().union(*(set(p.names.tolist()) for p in parsed)))
    if not inferred:
        raise InvalidAnnotationError("no objects found to infer the classes from; set data.classes=[...]")
    log.info("classes inferred from the annotations (%d): %s", len(inferred), inferred)
    return inferred


def category_ids_for(classes: list[str], parsed: list[ParsedSource]) -> list[int] | None:
    """Dataset category id of every label, for writing result files; None when no source has category ids."""
    known: dict[str, int] = {}
    for source in parsed:
        for name, category_id in source.category_ids.items():
            if known.setdefault(name, category_id) != category_id:
                raise InvalidAnnotationError(
                    f"category '{name}' has id {known[name]} in one annotation file and {category_id} in another; "
                    "use annotation files that share one category list"
                )
    if not known:
        return None
    missing = [name for name in classes if name not in known]
    if missing:
        raise InvalidAnnotationError(
            f"classes {missing} are not categories of the annotation files (categories: {sorted(known)}); "
            "fix data.classes or set data.classes=null to use the categories of the json"
        )
    return [known[name] for name in classes]


def read_annotations(
    root: str | Path, sources: list[AnnotationSource], classes: list[str] | None = None, skip_invalid: bool = False,
    check_level: str = "header", exif_orientation: bool = False,
) -> Annotations:
    """Read several sources against one class list, so train and val labels always mean the same classes, and
    check their images (``check_level`` "header" or "decode")."""
    invalid = InvalidInputLog(skip_invalid)
    parsed = [source.parse(Path(root), invalid) for source in sources]
    classes = resolve_classes(classes, parsed)
    label_to_category_id = category_ids_for(classes, parsed)
    records = [check_images(build_records(p, classes, invalid), invalid, check_level, exif_orientation)
               for p in parsed]
    invalid.finish()
    return Annotations(records, classes, label_to_category_id)
