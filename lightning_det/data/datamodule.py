"""The one LightningDataModule for every dataset: annotation sources in, contract batches out."""

from __future__ import annotations

import logging
import math
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, SequentialSampler

from lightning_det.data.adapt import choose_img_size, epoch_repeats, loader_workers, usable_cores
from lightning_det.data.collate import collate_detection
from lightning_det.data.dataset import (
    AspectRatioBatchSampler,
    DetectionDataset,
    SortedAspectRatioBatchSampler,
    TrainingSampler,
)
from lightning_det.data.options import LoaderOptions, PipelineOptions, ReadingOptions, SamplerOptions
from lightning_det.data.records import AnnotationSource, RecordTable, read_annotations, train_without_val_images
from lightning_det.data.repeat_factor import auto_threshold, class_image_shares, image_repeat_factors, pass_length
from lightning_det.data.transforms import EpochAugment, LetterboxTransform, YoloTrainTransform
from lightning_det.data.transforms.albumentations_hook import AlbumentationsStep

log = logging.getLogger(__name__)
#: INFO on rank 0 through this module's logger, so the run folder's train.log (Hydra's handlers) has it too;
#: Lightning's ``rank_zero_info`` reaches the console only.
info = rank_zero_only(log.info)

ROLES_OF_STAGE = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


class DetectionDataModule(L.LightningDataModule):
    """Reads annotation sources under ``root`` and serves batches of the batch contract.

    Args:
        root: dataset folder; source paths are relative to it.
        train, val, test: annotation sources (:class:`~lightning_det.data.VOCSource`,
            :class:`~lightning_det.data.COCOSource`). ``test`` (also used by ``predict``) defaults to ``val``.
        classes: class names in label order; ``None`` takes the COCO categories, or infers the sorted names
            found in all sources (VOC).
        val_split: ``None`` uses ``val``; a fraction holds out that share of the training images (seeded).
        img_size: network input size; the default transforms use it, given ones must agree with it. ``"auto"``:
            chosen from the training boxes by :func:`~lightning_det.data.adapt.choose_img_size` when they are read.
        pipeline: the transforms, how their samples are batched, the albumentations step (:class:`PipelineOptions`).
        loader: workers, pinned memory, the shared image cache, label padding (:class:`LoaderOptions`).
        reading: image checks, bad-input skipping, EXIF rotation, difficult objects, the generator of generated
            data (:class:`ReadingOptions`).
        sampler: repeat-factor sampling, the epoch's minimum steps, the seed (:class:`SamplerOptions`).
    """

    #: Keys this module took at its top level before they moved into ``loader``, ``reading`` and ``sampler``.
    renamed: ClassVar[dict[str, str]] = {
        **{key: f"loader.{key}" for key in ("num_workers", "pin_memory", "persistent_workers", "cache",
                                             "label_pad_width")},
        **{key: f"reading.{key}" for key in ("skip_invalid", "check_images", "exif_orientation",
                                              "keep_difficult_in_training")},
        **{key: f"sampler.{key}" for key in ("repeat_threshold", "min_steps_per_epoch", "seed")},
        "sampler": "sampler.kind",
        **{key: f"pipeline.{key}" for key in ("train_transform", "val_transform", "close_mosaic", "size_divisor",
                                               "group_aspect_ratio", "rect_eval")},
        "prepare": "reading.prepare",
    }

    def __init__(
        self,
        root: str | Path,
        train: AnnotationSource,
        val: AnnotationSource | None = None,
        test: AnnotationSource | None = None,
        classes: list[str] | None = None,
        val_split: float | None = None,
        batch_size: int = 16,
        img_size: int | str = 416,
        pipeline: PipelineOptions | None = None,
        loader: LoaderOptions | None = None,
        reading: ReadingOptions | None = None,
        sampler: SamplerOptions | None = None,
    ) -> None:
        super().__init__()
        if val is None and val_split is None:
            raise ValueError("no validation data: set data.val to an annotation source, or data.val_split=0.1")
        if val_split is not None and not 0 < val_split < 1:
            raise ValueError(f"data.val_split must be a fraction in (0, 1) or null, got {val_split}")
        self.root = Path(root)
        self.sources = {"train": train, "val": val, "test": test}
        self.classes: list[str] | None = list(classes) if classes is not None else None
        self.label_to_category_id: list[int] | None = None
        self.val_split = val_split
        self.batch_size = batch_size
        self.loader = loader or LoaderOptions()
        self.reading = reading or ReadingOptions()
        self.sampler = sampler or SamplerOptions()
        self._workers: int | None = None
        if img_size != "auto" and (isinstance(img_size, bool) or not isinstance(img_size, int)):
            raise ValueError(f"data.img_size must be a whole number of pixels or auto, got {img_size!r}")
        self.img_size = img_size
        pipeline = pipeline or PipelineOptions()
        self.train_transform = pipeline.train_transform or YoloTrainTransform(img_size=img_size)
        self.val_transform = pipeline.val_transform or LetterboxTransform(img_size=img_size)
        self._check_transforms()
        self.augment = AlbumentationsStep(pipeline.albumentations) if pipeline.albumentations else None
        self.collate = partial(collate_detection, label_pad_width=self.loader.label_pad_width,
                               size_divisor=pipeline.size_divisor)
        self.close_mosaic = pipeline.close_mosaic
        self.full_augment_passes = pipeline.full_augment_passes
        self._passes_per_epoch = 1
        self._strength_logged: float | None = None
        self.group_aspect_ratio = pipeline.group_aspect_ratio
        self.rect_eval = pipeline.rect_eval
        self.records: dict[str, RecordTable] = {}  # per role: train, val, test
        self._source_records: dict[str, RecordTable] = {}  # per configured source
        self._mosaic_override: bool | None = None
        self._mosaic_closed_logged = False

    def _check_transforms(self) -> None:
        for name in ("train_transform", "val_transform"):
            size = getattr(getattr(self, name), "img_size", self.img_size)
            if size != self.img_size:
                raise ValueError(f"data.{name}.img_size={size} differs from data.img_size={self.img_size}")

    @property
    def num_classes(self) -> int:
        if self.classes is None:
            raise RuntimeError("classes are known after prepare_data() and setup(); call them first")
        return len(self.classes)

    # --- reading ---------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.reading.prepare is not None:
            self.reading.prepare(self.root)

    def setup(self, stage: str | None = None) -> None:
        self._ensure_read(ROLES_OF_STAGE.get(stage or "", ("train", "val", "test")))

    def _ensure_read(self, roles: tuple[str, ...]) -> None:
        if self.classes is None:  # inferring classes needs every source, so all splits agree on them
            roles = ("train", "val", "test")
        self._read([role for role in roles if role not in self.records])

    def _source_role(self, role: str) -> str:
        """Which configured source holds a role's images."""
        if role == "test" and self.sources["test"] is None:
            role = "val"
        return "train" if role == "val" and self.val_split is not None else role

    def _read(self, roles: list[str]) -> None:
        """Parse the sources the roles need (each once, against one class list), derive each role's records and
        keep the validation images out of training."""
        unread = sorted({self._source_role(role) for role in roles} - self._source_records.keys())
        if unread and not self.root.is_dir():  # before a source names a file inside it
            raise FileNotFoundError(
                f"data.root={self.root}: no such folder. Point data.root at the dataset (VOC: the folder holding "
                "VOC2007/ or Annotations/ and JPEGImages/; COCO: the folder holding annotations/)"
            )
        if unread:
            reading = self.reading
            result = read_annotations(self.root, [self.sources[r] for r in unread], self.classes, reading.skip_invalid,
                                      reading.check_images, reading.exif_orientation)
            self.classes = result.classes
            if result.label_to_category_id is not None:
                self.label_to_category_id = result.label_to_category_id
            self._source_records.update(zip(unread, result.records))
        for role in roles:
            source_role = self._source_role(role)
            records = self._source_records[source_role]
            if self.val_split is not None and source_role == "train":
                records = self._hold_out(records)[role != "train"]
            if not records:
                raise ValueError(f"the {role} split has no images ({self.sources[source_role]}, root {self.root}); "
                                 "check data.root and the split names")
            self.records[role] = records
        if {"train", "val"} & set(roles) and {"train", "val"} <= self.records.keys():
            sources = (self.sources[self._source_role("train")], self.sources[self._source_role("val")])
            self.records["train"] = train_without_val_images(self.records["train"], self.records["val"], sources,
                                                             self.root, self.reading.skip_invalid)
        for role in roles:
            records = self.records[role]
            info(f"{role}: {len(records)} images, {len(records.labels)} objects, {len(self.classes)} classes")
            if role == "train" and self.img_size == "auto":
                self.use_img_size(choose_img_size(records))

    def use_img_size(self, size: int) -> None:
        """Set the input size of both pipelines (``img_size: auto`` resolved from the training boxes)."""
        self.img_size = size
        for transform in (self.train_transform, self.val_transform):
            transform.img_size = size
        info(f"img_size {size}: the smallest input keeping 95 % of the training boxes' shorter sides "
             "at 8 px or more (data.img_size=<pixels> to set it)")

    def _hold_out(self, records: RecordTable) -> tuple[RecordTable, RecordTable]:
        """Seeded split of the training records into (train, val) for ``val_split``."""
        order = np.random.default_rng(self.sampler.seed).permutation(len(records))
        count = max(1, round(self.val_split * len(records)))
        if records and count >= len(records):  # an empty source is reported as such by the caller
            raise ValueError(f"data.val_split={self.val_split} holds out {count} of the {len(records)} training "
                             f"images, leaving none to train on: it must hold out at most {len(records) - 1} (e.g. "
                             "data.val_split=0.1), or set data.val to a separate validation source")
        return records.take(np.sort(order[count:])), records.take(np.sort(order[:count]))

    # --- the epoch's augmentation ----------------------------------------------------------------------------
    def epoch_augment(self) -> EpochAugment:
        """Asked by the training sampler at the start of every epoch, in the main process."""
        return EpochAugment(mix=self.mosaic_enabled(), strength=self.augment_strength())

    def set_mosaic(self, enabled: bool) -> None:
        """Force mosaic on or off from the next epoch, overriding ``close_mosaic``."""
        self._mosaic_override = enabled

    def mosaic_enabled(self) -> bool:
        """Whether this epoch's samples may be made of several images (``set_mosaic``, else ``close_mosaic``)."""
        if self._mosaic_override is not None:
            return self._mosaic_override
        trainer = self.trainer
        if not self.close_mosaic or trainer is None or trainer.max_epochs is None or trainer.max_epochs < 0:
            return True
        closed = closed_epochs(self.close_mosaic, trainer.max_epochs)
        enabled = trainer.current_epoch < trainer.max_epochs - closed
        if not enabled and not self._mosaic_closed_logged:
            info(f"epoch {trainer.current_epoch}: mosaic off for the last {closed} epochs")
            self._mosaic_closed_logged = True
        return enabled

    def augment_strength(self) -> float:
        """The share of the training transform's random zoom, shift and colour jitter this epoch: planned passes
        over each training image / ``full_augment_passes``, at most 1. The plan is ``max_epochs``, which a time
        budget re-lays every epoch.

        A run too short for its set underfits (aquarium in 12 CPU minutes scores little more on its own training
        images than on validation), and distortions then cost it more than they protect; a long run needs them
        against memorising (BENCHMARKS.md, "augmentation by the run's length")."""
        trainer = self.trainer
        if not self.full_augment_passes or trainer is None or trainer.max_epochs is None or trainer.max_epochs < 0:
            return 1.0
        passes = trainer.max_epochs * self._passes_per_epoch
        strength = min(1.0, passes / self.full_augment_passes)
        if strength < 1 and (self._strength_logged is None or abs(strength - self._strength_logged) >= 0.05):
            info(f"epoch {trainer.current_epoch}: augmentation at {strength:.2f} of its strength (the "
                 f"zoom, shift and colour jitter of train_transform): the run is planned to show each "
                 f"image {passes} times, fewer than data.pipeline.full_augment_passes="
                 f"{self.full_augment_passes:g}")
            self._strength_logged = strength
        return strength

    # --- loaders ---------------------------------------------------------------------------------------------
    def dataset(self, role: str) -> DetectionDataset:
        """The dataset of ``train``, ``val`` or ``test`` (reading its annotations if not done yet)."""
        self._ensure_read((role,))
        records = self.records[role]
        if role == "train":
            if not self.reading.keep_difficult_in_training:
                records = records.select_objects(~records.difficult)
            return DetectionDataset(records, self.train_transform, cache=self.loader.cache, augment=self.augment)
        return DetectionDataset(records, self.val_transform, cache=self.loader.cache)

    def _loader(self, dataset: DetectionDataset, **kwargs: Any) -> DataLoader:
        workers = self.workers()
        return DataLoader(
            dataset,
            **{"batch_size": self.batch_size, **kwargs},
            collate_fn=self.collate,
            num_workers=workers,
            pin_memory=self.pinned(),
            persistent_workers=self.loader.persistent_workers and workers > 0,
        )

    def workers(self) -> int:
        """``loader.num_workers``, or for ``auto`` :func:`~lightning_det.data.adapt.loader_workers` for this
        trainer's accelerator and this machine (printed once)."""
        if self.loader.num_workers != "auto":
            return self.loader.num_workers
        if self._workers is None:
            trainer = self.trainer
            on_cpu = trainer is None or isinstance(trainer.accelerator, CPUAccelerator)
            processes = trainer.num_devices if trainer is not None else 1
            cores = usable_cores()
            threads = torch.get_num_threads()
            self._workers = loader_workers(on_cpu, cores, threads, processes)
            run = f"a CPU run whose step uses {threads} threads" if on_cpu else "an accelerator run"
            info(f"data.loader.num_workers auto: {self._workers} loader workers per process ({cores} cores, "
                 f"{run}; data.loader.num_workers=<n> to set it)")
        return self._workers

    def pinned(self) -> bool:
        """``loader.pin_memory``, or for ``auto`` whether this trainer runs on CUDA: from page-locked memory a batch
        is copied to the GPU asynchronously (Lightning copies with ``non_blocking``); on a CPU pinning is only work."""
        if self.loader.pin_memory == "auto":
            return self.trainer is not None and isinstance(self.trainer.accelerator, CUDAAccelerator)
        return self.loader.pin_memory

    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset("train")
        factors = self.repeat_factors(dataset.records) if self.sampler.kind == "repeat_factor" else None
        per_pass = len(dataset) if factors is None else pass_length(torch.from_numpy(factors))
        self._passes_per_epoch = self.epoch_repeats(per_pass)
        sampler = TrainingSampler(len(dataset), self.epoch_augment, shuffle=True, seed=self.sampler.seed,
                                  repeats=self._passes_per_epoch, repeat_factors=factors)
        if self.group_aspect_ratio:
            landscape = dataset.records.widths >= dataset.records.heights
            batches = AspectRatioBatchSampler(sampler, self.batch_size, landscape=landscape)
            return self._loader(dataset, batch_sampler=batches, batch_size=1)
        return self._loader(dataset, sampler=sampler)

    def repeat_factors(self, records: RecordTable) -> np.ndarray:
        """The training images' repeat factors (``sampler.kind: repeat_factor``), with the class shares they come
        from."""
        threshold = self.sampler.repeat_threshold
        if threshold == "auto":
            threshold = auto_threshold(self.num_classes)
        factors = image_repeat_factors(records, self.num_classes, threshold)
        _, share = class_image_shares(records, self.num_classes)
        shares = ", ".join(f"{name} {value:.3f}" for name, value in zip(self.classes, share))
        info(f"repeat-factor sampling (data.sampler.repeat_threshold={threshold:.3g}): share of training "
             f"images per class: {shares}; {int((factors > 1).sum())} of {len(records)} images repeated "
             f"(up to {factors.max(initial=1.0):.2f} times), {pass_length(torch.from_numpy(factors))} "
             "images a pass")
        return factors

    def epoch_repeats(self, num_images: int) -> int:
        """Passes over the training set per epoch, for ``sampler.min_steps_per_epoch`` steps on every device."""
        trainer = self.trainer
        per_step = self.batch_size * (trainer.world_size * trainer.accumulate_grad_batches if trainer else 1)
        min_steps = self.sampler.min_steps_per_epoch
        repeats = epoch_repeats(num_images, per_step, min_steps)
        if repeats > 1:
            info(f"train: {num_images} images shown {repeats} times per epoch, so that an epoch has "
                 f"at least {min_steps} optimizer steps (data.sampler.min_steps_per_epoch)")
        return repeats

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.dataset("val"))

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.dataset("test"))

    def _eval_loader(self, dataset: DetectionDataset) -> DataLoader:
        if not self.rect_eval:
            return self._loader(dataset, shuffle=False)
        aspect_ratios = dataset.records.heights / dataset.records.widths
        batches = SortedAspectRatioBatchSampler(SequentialSampler(dataset), self.batch_size,
                                                aspect_ratios=aspect_ratios)
        return self._loader(dataset, batch_sampler=batches, batch_size=1)



def closed_epochs(close_mosaic: float, max_epochs: int) -> int:
    """The last epochs trained without mosaic: a share of ``max_epochs`` below 1 (at least one epoch), else a count."""
    if close_mosaic < 1:
        return max(1, math.ceil(close_mosaic * max_epochs))
    return int(close_mosaic)
