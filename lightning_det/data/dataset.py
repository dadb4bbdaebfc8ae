"""A map-style dataset of annotation records, and the sampler that switches mosaic from the main process."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Dataset, Sampler

from lightning_det.data.records import AnnotationRecord, load_image
from lightning_det.data.transforms import DetectionTransform, Sample


class DetectionDataset(Dataset[Sample]):
    """Loads a record's image and applies the transform.

    An item is an index, or ``(index, mosaic_allowed)`` as yielded by :class:`MosaicSampler`. When mosaic is
    allowed, the transform receives four samples (this one and three random others) with probability
    ``transform.mosaic_probability``, else one.
    """

    def __init__(self, records: list[AnnotationRecord], transform: DetectionTransform) -> None:
        self.records = records
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> Sample:
        record = self.records[index]
        return Sample(
            image=load_image(record),
            boxes=torch.from_numpy(record.boxes),
            labels=torch.from_numpy(record.labels),
            difficult=torch.from_numpy(record.difficult),
            image_id=record.image_id,
            path=record.path,
            orig_size=(record.height, record.width),
        )

    def __getitem__(self, item: int | tuple[int, bool]) -> Sample:
        index, mosaic_allowed = item if isinstance(item, tuple) else (item, True)
        samples = [self.load(index)]
        probability = self.transform.mosaic_probability
        if mosaic_allowed and probability > 0 and torch.rand(()) < probability:
            samples += [self.load(int(j)) for j in torch.randint(len(self), (3,))]
        return self.transform(samples)


class MosaicSampler(Sampler[tuple[int, bool]]):
    """Yields ``(index, mosaic_allowed)``; asks ``mosaic_enabled()`` once per epoch, in the main process.

    Because the decision travels with the indices, switching mosaic off (``close_mosaic``) reaches the workers
    even when they are persistent and hold their own copy of the dataset. The order is a permutation seeded by
    ``seed + epoch`` (Lightning calls :meth:`set_epoch`), so it is the same on every DDP rank.
    """

    def __init__(self, size: int, mosaic_enabled: Callable[[], bool], shuffle: bool = True, seed: int = 0) -> None:
        self.size = size
        self.mosaic_enabled = mosaic_enabled
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, bool]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator) if self.shuffle else torch.arange(self.size)
        mosaic = bool(self.mosaic_enabled())
        return iter([(index, mosaic) for index in order.tolist()])


class AspectRatioBatchSampler(Sampler[list[tuple[int, bool]]]):
    """Batches of images on the same side of square (landscape vs portrait), so padding to a common size wastes
    little: fills one batch per group from ``sampler``'s order and yields each batch as soon as it is full;
    the groups' leftovers come last, as smaller batches."""

    def __init__(self, sampler: MosaicSampler, landscape: list[bool], batch_size: int) -> None:
        self.sampler = sampler
        self.landscape = landscape
        self.batch_size = batch_size

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        wide = sum(self.landscape)
        return sum(-(-count // self.batch_size) for count in (wide, len(self.landscape) - wide))

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        pending: dict[bool, list[tuple[int, bool]]] = {True: [], False: []}
        for item in self.sampler:
            group = pending[self.landscape[item[0]]]
            group.append(item)
            if len(group) == self.batch_size:
                yield group.copy()
                group.clear()
        yield from (group for group in pending.values() if group)
