"""The DataModule's settings by subject (``data.pipeline``, ``data.loader``, ``data.reading``, ``data.sampler``): a
reader finds the loader's knobs in one node, and each node checks its own values when it is built."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from lightning_det.data.cache import CACHE_KINDS, check_kind
from lightning_det.data.image_checks import CHECK_LEVELS
from lightning_det.data.transforms import DetectionTransform

SAMPLERS = (None, "repeat_factor")  # how training images are drawn: each once a pass, or by repeat factor


@dataclass(frozen=True)
class PipelineOptions:
    """The family's data pipeline and how its samples are batched (``data.pipeline``, set by
    ``conf/pipeline/*.yaml``, which the model config chooses).

    Args:
        train_transform, val_transform: the pipelines; ``None``: YOLO's (the DataModule's defaults).
        close_mosaic: train the last epochs without the multi-image augmentations (``train_transform.mix``): a
            share of the run when below 1 (0.1: the last tenth, at least one epoch), else a count of epochs.
        full_augment_passes: a run planned to show each training image fewer times than this augments in
            proportion weaker (the random zoom, shift and colour jitter of ``train_transform`` times planned passes
            / ``full_augment_passes``), re-planned every epoch as the time budget re-plans ``max_epochs``; 0:
            always the full augmentation.
        size_divisor: images of a batch are padded (bottom/right) to the largest size rounded up to this.
        group_aspect_ratio: training batches hold only landscape or only portrait images (less padding).
        rect_eval: evaluation batches hold images of similar aspect ratio, taken in order of height / width, for
            transforms that keep the aspect ratio (``LetterboxTransform(rect=True)``, ``RCNNTransform``).
        albumentations: albumentations transforms applied to each training image and its boxes before
            ``train_transform`` (:mod:`~lightning_det.data.transforms.albumentations_hook`); ``None``: none.
    """

    train_transform: DetectionTransform | None = None
    val_transform: DetectionTransform | None = None
    close_mosaic: float = 0
    full_augment_passes: float = 0
    size_divisor: int = 1
    group_aspect_ratio: bool = False
    rect_eval: bool = False
    albumentations: Sequence[Any] | None = None

    def __post_init__(self) -> None:
        if not self.full_augment_passes >= 0:
            raise ValueError(f"data.pipeline.full_augment_passes must be 0 (off) or a number of passes, got "
                             f"{self.full_augment_passes}")


@dataclass(frozen=True)
class LoaderOptions:
    """How batches reach the model (``data.loader``).

    Args:
        num_workers: loader worker processes; ``"auto"``: :func:`~lightning_det.data.adapt.loader_workers` (the
            cores a CPU run's step leaves free, none by default; up to 8 per process on an accelerator).
        pin_memory: page-locked batches; ``"auto"``: when the trainer runs on CUDA.
        persistent_workers: keep the workers alive between epochs.
        cache: ``"ram"`` or ``"disk"``: every split's decoded images in one file per machine (``/dev/shm``, or a
            memory-mapped file in the cache folder) that every rank and worker maps (:mod:`~lightning_det.data.cache`);
            ``None``: each process keeps its own copy of a small set's images.
        label_pad_width: fixed label rows per image; ``None`` pads to each batch's maximum.
    """

    #: The strings a field accepts (checked with the config, before anything is read).
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {"cache": (*CACHE_KINDS, None)}

    num_workers: int | str = 2
    pin_memory: bool | str = "auto"
    persistent_workers: bool = False
    cache: str | None = None
    label_pad_width: int | None = None

    def __post_init__(self) -> None:
        workers = self.num_workers
        if workers != "auto" and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
            raise ValueError(f"data.loader.num_workers must be a whole number >= 0 or auto, got {workers!r}")
        if self.pin_memory != "auto" and not isinstance(self.pin_memory, bool):
            raise ValueError(f"data.loader.pin_memory must be true, false or auto, got {self.pin_memory!r}")
        check_kind(self.cache)


@dataclass(frozen=True)
class ReadingOptions:
    """What reading the annotations and images checks and keeps (``data.reading``).

    Args:
        skip_invalid: skip, count and report bad images/objects instead of stopping on the first.
        check_images: ``"header"`` (format, size, end marker: fast) or ``"decode"`` (every image decoded once);
            images that passed are cached, so a second run checks only new or changed files.
        exif_orientation: rotate images as their EXIF orientation says (for labels drawn on the rotated view);
            off by default, as VOC and COCO boxes refer to the stored pixels.
        keep_difficult_in_training: keep difficult/crowd objects in training labels (flagged in column 5);
            validation always keeps them, flagged, so metrics ignore them.
        prepare: called with the data root before reading, once per machine (``prepare_data``), e.g. to generate
            the sample data; ``None``: the data must be on disk.
    """

    choices: ClassVar[dict[str, tuple[Any, ...]]] = {"check_images": CHECK_LEVELS}

    skip_invalid: bool = False
    check_images: str = "header"
    exif_orientation: bool = False
    keep_difficult_in_training: bool = False
    prepare: Callable[[Path], Any] | None = None


@dataclass(frozen=True)
class SamplerOptions:
    """How training images are drawn (``data.sampler``).

    Args:
        kind: ``None`` shows every training image once a pass; ``"repeat_factor"`` shows images of rare classes
            more often (:mod:`~lightning_det.data.repeat_factor`, the LVIS rule).
        repeat_threshold: with ``"repeat_factor"``, a class found in a smaller share of the training images than
            this has its images repeated ``sqrt(repeat_threshold / share)`` times; ``"auto"``: one over the number
            of classes (:func:`~lightning_det.data.repeat_factor.auto_threshold`).
        min_steps_per_epoch: repeat a small training set within each epoch until an epoch has at least this many
            optimizer steps (:func:`~lightning_det.data.adapt.epoch_repeats`); 0: one pass per epoch.
        seed: the training order, and the ``val_split`` hold-out.
    """

    kind: str | None = None
    repeat_threshold: float | str = 0.001
    min_steps_per_epoch: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SAMPLERS:
            raise ValueError(f"data.sampler.kind must be one of {list(SAMPLERS)}, got {self.kind!r}")
        threshold = self.repeat_threshold
        if threshold != "auto" and not 0 < threshold <= 1:
            raise ValueError(f"data.sampler.repeat_threshold must be a share of images in (0, 1], got {threshold}")
