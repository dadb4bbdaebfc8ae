"""A map-style dataset of annotation records, the training sampler that carries each epoch's augmentation settings
from the main process, and the batch samplers that keep images of similar shape together."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, Dataset, Sampler
from torchvision.transforms.v2 import functional as F

from lightning_det.data.cache import image_bytes, shared_image_cache
from lightning_det.data.records import AnnotationRecord, ImageLoadError, as_table, load_image
from lightning_det.data.repeat_factor import pass_length, repeated_indices
from lightning_det.data.transforms import DetectionTransform, EpochAugment, Sample
from lightning_det.data.transforms.common import NO_MIX
from lightning_det.data.transforms.mix import MAX_PASTED, Donor, crop_object, mixup, paste_objects

# Decoded images a dataset without a shared cache keeps in memory (per loader worker, each holding its own copy),
# when all of them fit: a small set is then decoded and resized once per process instead of every epoch. A larger
# set is decoded on every access.
CACHE_BUDGET_BYTES = 512 * 2**20
log = logging.getLogger(__name__)


class DetectionDataset(Dataset[Sample]):
    """Loads a record's image and applies the transform.

    An item is an index, or ``(index, EpochAugment)`` as yielded by :class:`TrainingSampler`: the epoch's
    settings choose whether mixing is allowed and how wide the transform's zoom is. When mixing is allowed, the
    transform's ``mix`` settings (:class:`~lightning_det.data.transforms.common.MixAugment`) apply: with
    probability ``copy_paste`` the image first gets 1 to ``MAX_PASTED`` objects of other images, chosen
    class-balanced (each class as likely); with probability ``mosaic`` the transform receives four samples (this
    one and three random others), else one; with probability ``mixup`` the result is blended with the transformed
    sample of a random other image.

    A transform with a ``decode_size`` (a training pipeline that first resizes every image so its longer side is
    that size, and describes its own canvas) gets images already at that size, their boxes scaled with them; the
    result is the same, the resize is done once.

    ``cache="ram"`` or ``"disk"`` reads the decoded images from one file shared by every process on the machine
    (:mod:`~lightning_det.data.cache`), built here unless a current one exists. Without it, when the whole set's
    decoded images fit ``cache_bytes``, each process keeps each image after its first decoding (in persistent
    workers, across epochs): a copy per loader worker and rank.

    ``augment`` (the training set's :class:`~lightning_det.data.transforms.albumentations_hook.AlbumentationsStep`)
    changes each loaded image and its boxes before the transform.

    With ``records.skip_unreadable`` (``data.reading.skip_invalid``), an image that fails to decode here (corrupt data
    behind a valid header: the default check decodes nothing) is replaced by the next one that decodes, named in a
    warning once per process and counted; without it, the error names the file.
    """

    def __init__(
        self, records: Sequence[AnnotationRecord], transform: DetectionTransform, cache_bytes: int = CACHE_BUDGET_BYTES,
        cache: str | None = None, augment: Callable[[Sample], Sample] | None = None,
    ) -> None:
        self.records = as_table(records)  # flat arrays: forked workers share them (records.py)
        self.transform = transform
        self.decode_size: int | None = getattr(transform, "decode_size", None)
        self.shapes = decoded_sizes(self.records.heights, self.records.widths, self.decode_size)
        self.shared_cache = None if cache is None else shared_image_cache(cache, self.records, self.shapes, self.decode)
        private = self.shared_cache is None and image_bytes(self.shapes) <= cache_bytes
        self.cache: dict[int, tuple[Tensor, Tensor]] | None = {} if private else None
        self.unreadable: set[int] = set()  # images this process failed to decode, replaced (skip_unreadable)
        self.mix = transform.mix
        self.augment = augment  # a step before the transform, e.g. the albumentations hook
        self.donor_weights = class_balanced_weights(self.records.labels, self.records.difficult) \
            if self.mix.copy_paste > 0 else None

    def __len__(self) -> int:
        return len(self.records)

    def decode(self, index: int) -> Tensor:
        """The record's ``uint8`` image, decoded and (with ``decode_size``) reduced."""
        record = self.records[index]
        image = load_image(record)
        height, width = self.shapes[index].tolist()
        if (height, width) != (record.height, record.width):
            image = F.resize(image, [height, width], antialias=True)
        return image

    def image_and_boxes(self, index: int) -> tuple[Tensor, Tensor]:
        """The decoded (and, with ``decode_size``, reduced) ``uint8`` image and its boxes in its pixels."""
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        record = self.records[index]
        image = self.decode(index) if self.shared_cache is None else self.shared_cache[index]
        height, width = image.shape[-2:]
        boxes = torch.from_numpy(record.boxes)
        if (height, width) != (record.height, record.width):
            boxes = boxes * boxes.new_tensor([width / record.width, height / record.height] * 2)
        if self.cache is not None:
            self.cache[index] = image, boxes
        return image, boxes

    def readable(self, index: int) -> tuple[int, Tensor, Tensor]:
        """``index`` (or, when its image fails to decode and ``skip_unreadable``, the next that decodes) with
        :meth:`image_and_boxes`."""
        while True:
            while index in self.unreadable:
                index = (index + 1) % len(self)
            try:
                return index, *self.image_and_boxes(index)
            except ImageLoadError as error:
                if not self.records.skip_unreadable or len(self.unreadable) == len(self) - 1:
                    raise
                self.unreadable.add(index)
                log.warning("skip_invalid: %s The next image is used in its place (%d image%s replaced in this "
                            "process)", error, len(self.unreadable), "s" * (len(self.unreadable) > 1))

    def load(self, index: int) -> Sample:
        index, image, boxes = self.readable(index)
        record = self.records[index]
        sample = Sample(
            image=image,
            boxes=boxes,
            labels=torch.from_numpy(record.labels),
            difficult=torch.from_numpy(record.difficult),
            image_id=record.image_id,
            path=record.path,
            orig_size=(record.height, record.width),
            area=None if record.area is None else torch.from_numpy(record.area),
        )
        return sample if self.augment is None else self.augment(sample)

    def __getitem__(self, item: int | tuple[int, EpochAugment]) -> Sample:
        index, epoch = item if isinstance(item, tuple) else (item, EpochAugment())
        mix = self.mix if epoch.mix else NO_MIX
        transform = self.transform.with_strength(epoch.strength)
        sample = self.transformed(index, transform, mix.mosaic, mix.copy_paste)
        if mix.mixup > 0 and torch.rand(()) < mix.mixup:
            partner = self.transformed(int(torch.randint(len(self), ())), transform, mix.mosaic, mix.copy_paste)
            sample = mixup(sample, partner, transform.fill)
        return sample

    def transformed(self, index: int, transform: DetectionTransform, mosaic: float, copy_paste: float) -> Sample:
        """``transform``'s sample of image ``index``: with probability ``copy_paste`` with objects pasted in, with
        probability ``mosaic`` in a mosaic with three random others."""
        samples = [self.load(index)]
        if copy_paste > 0 and torch.rand(()) < copy_paste:
            samples[0] = paste_objects(samples[0], self.donors())
        if mosaic > 0 and torch.rand(()) < mosaic:
            samples += [self.load(int(j)) for j in torch.randint(len(self), (3,))]
        return transform(samples)

    def donors(self) -> list[Donor]:
        """1 to ``MAX_PASTED`` objects drawn by ``donor_weights``, each cut from its decoded image."""
        if self.donor_weights is None or not self.donor_weights.any():
            return []
        count = int(torch.randint(1, MAX_PASTED + 1, ()))
        donors = []
        for obj in torch.multinomial(self.donor_weights, count, replacement=True).tolist():
            image_index = int(np.searchsorted(self.records.offsets, obj, side="right")) - 1
            index, image, boxes = self.readable(image_index)
            if index != image_index:  # replaced by another image (skip_invalid): its objects are elsewhere
                continue
            within = obj - int(self.records.offsets[index])
            donors.append(Donor(crop_object(image, boxes[within]), int(self.records.labels[obj])))
        return donors


def class_balanced_weights(labels: np.ndarray, difficult: np.ndarray) -> Tensor:
    """Per object, a weight that makes every class as likely to be drawn, whatever its count (difficult objects:
    never)."""
    usable = ~difficult
    counts = np.bincount(labels[usable], minlength=int(labels.max(initial=-1)) + 1)
    weights = np.where(usable, 1.0 / np.maximum(counts[labels], 1), 0.0)
    return torch.from_numpy(weights)


class TrainingSampler(Sampler[tuple[int, EpochAugment]]):
    """Yields ``(index, EpochAugment)``; asks ``epoch_augment()`` once per epoch, in the main process.

    Because the settings travel with the indices, switching mosaic off (``close_mosaic``) or weakening the
    augmentation (``full_augment_passes``) reaches the workers even when they are persistent and hold their own
    copy of the dataset. The order is a permutation seeded by ``seed + epoch`` (Lightning calls
    :meth:`set_epoch`), so it is the same on every DDP rank. With ``repeat_factors``
    (:mod:`~lightning_det.data.repeat_factor`) a pass shows image ``i`` about ``factors[i]`` times, drawn anew
    each epoch, in a pass of fixed length.
    """

    def __init__(self, size: int, epoch_augment: Callable[[], EpochAugment], shuffle: bool = True, seed: int = 0,
                 repeats: int = 1, repeat_factors: Sequence[float] | None = None) -> None:
        self.size = size
        self.epoch_augment = epoch_augment
        self.shuffle = shuffle
        self.seed = seed
        self.repeats = repeats  # passes over the dataset per epoch, each in its own order (small sets)
        self.repeat_factors = None if repeat_factors is None else torch.as_tensor(repeat_factors, dtype=torch.float64)
        self.pass_length = size if self.repeat_factors is None else pass_length(self.repeat_factors)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.pass_length * self.repeats

    def _one_pass(self, generator: torch.Generator) -> Tensor:
        if self.repeat_factors is None:
            return torch.randperm(self.size, generator=generator) if self.shuffle else torch.arange(self.size)
        indices = repeated_indices(self.repeat_factors, generator)
        return indices[torch.randperm(len(indices), generator=generator)] if self.shuffle else indices

    def __iter__(self) -> Iterator[tuple[int, EpochAugment]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.cat([self._one_pass(generator) for _ in range(self.repeats)])
        epoch = self.epoch_augment()
        return iter([(index, epoch) for index in order.tolist()])


class AspectRatioBatchSampler(BatchSampler):
    """Batches of images on the same side of square (landscape vs portrait), so padding to a common size wastes
    little: fills one batch per group from ``sampler``'s order and yields each batch as soon as it is full;
    the groups' leftovers come last, in one batch when they fit in one. A ``BatchSampler`` with a ``sampler``
    argument, so Lightning can put a distributed sampler under it.

    An epoch is always ``ceil(len(sampler) / batch_size)`` batches, as torchvision's ``GroupedBatchSampler``
    keeps its count: under DDP each rank's share splits into the two orientations differently every epoch, and
    a count that followed the split would give ranks different step counts (the gradient all-reduce waits for a
    step one rank never takes) and epochs of another length than the one Lightning read at the start (it
    validates after that many batches: a shorter epoch would skip its validation)."""

    def __init__(self, sampler: Sampler, batch_size: int, drop_last: bool = False,
                 landscape: Sequence[bool] = ()) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.landscape = landscape

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self) -> Iterator[list]:
        pending: dict[bool, list] = {True: [], False: []}
        for item in self.sampler:
            group = pending[self.landscape[index(item)]]
            group.append(item)
            if len(group) == self.batch_size:
                yield group.copy()
                group.clear()
        wide, tall = pending.values()
        if len(wide) + len(tall) <= self.batch_size:  # the one batch len() counts for them
            wide, tall = wide + tall, []
        yield from (group for group in (wide, tall) if group)


class SortedAspectRatioBatchSampler(BatchSampler):
    """Evaluation batches of images with nearly the same shape (Ultralytics' rectangular evaluation): the indices
    ``sampler`` yields (this process's share under DDP) sorted by height / width and cut into consecutive
    batches, so aspect-preserving inputs pad to a common size with few extra pixels."""

    def __init__(self, sampler: Sampler, batch_size: int, drop_last: bool = False,
                 aspect_ratios: Sequence[float] = ()) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.aspect_ratios = aspect_ratios

    def __iter__(self) -> Iterator[list]:
        order = sorted(self.sampler, key=lambda item: self.aspect_ratios[index(item)])
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        yield from (order[start : start + self.batch_size] for start in range(0, stop, self.batch_size))


def index(item: int | tuple[int, EpochAugment]) -> int:
    """The dataset index of a sampler item (an index, or ``(index, EpochAugment)`` from TrainingSampler)."""
    return item[0] if isinstance(item, tuple) else item


def decoded_sizes(heights: np.ndarray, widths: np.ndarray, decode_size: int | None) -> np.ndarray:
    """``int64 [N, 2]``: each image's ``(h, w)`` as :meth:`DetectionDataset.decode` delivers it: at most
    ``decode_size`` on the longer side (rounded as ``resize_to_fit`` rounds), never enlarged."""
    longer = np.maximum(heights, widths)
    ratio = np.ones(len(longer)) if decode_size is None else np.minimum(1.0, decode_size / np.maximum(longer, 1))
    return np.maximum(1, np.round(np.stack((heights * ratio, widths * ratio), axis=1))).astype(np.int64)
