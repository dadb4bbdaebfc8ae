"""Repeat-factor sampling for class-imbalanced data: the LVIS rule (Gupta et al. 2019; Detectron2's
``RepeatFactorTrainingSampler``).

A class seen in a share ``f(c)`` of the training images has the factor ``r(c) = max(1, sqrt(t / f(c)))``; an image
takes the largest factor of its classes (1 without objects) and appears about ``r`` times a pass: ``floor(r)``
times, plus extra copies drawn anew each epoch in proportion to the fractions ``r - floor(r)``.

Every pass has the same length, as Lightning's distributed sampler needs (it cuts one list, the same on every rank
since it is seeded by the epoch, into equal shares, and its length is fixed when it is built): the extras number
``round(sum of fractions)``, drawn by systematic sampling (one uniform offset over the running sum of the fractions
scaled to that whole number). An image's expected count is thus ``floor(r)`` plus its fraction times
``round(S) / S``: its repeat factor up to rounding the pass's sum of fractions ``S`` to a whole number of images.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lightning_det.data.records import AnnotationRecord


def class_image_shares(records: list[AnnotationRecord], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``present [images, classes]`` (the image holds an object of the class) and each class's share of images."""
    counts = [len(record.labels) for record in records]
    present = np.zeros((len(records), num_classes), dtype=bool)
    present[np.repeat(np.arange(len(records)), counts), np.concatenate([r.labels for r in records])] = True
    return present, present.mean(0)


def auto_threshold(num_classes: int) -> float:
    """``repeat_threshold: auto``: ``1 / num_classes``, the share of the images each class would hold if every image
    held one class and the classes were balanced. A class below it is rare for this set: on aquarium (7 classes,
    0.143) jellyfish in 7 % of the images is repeated 1.4 times; BCCD's 3 classes are each in most images and
    nothing repeats; on COCO (0.0125) only the classes in under 1.25 % of the images do."""
    return 1.0 / max(num_classes, 1)


def image_repeat_factors(records: list[AnnotationRecord], num_classes: int, threshold: float) -> np.ndarray:
    """The LVIS repeat factor of every image (float64 ``[images]``)."""
    present, share = class_image_shares(records, num_classes)
    class_factor = np.maximum(1.0, np.sqrt(threshold / np.maximum(share, np.finfo(float).tiny)))
    return np.where(present, class_factor, 1.0).max(1, initial=1.0)


def pass_length(factors: Tensor) -> int:
    """Images in one pass: every whole repeat, and the sum of the fractions rounded."""
    whole = factors.floor()
    return int(whole.sum().item()) + round((factors - whole).sum().item())


def repeated_indices(factors: Tensor, generator: torch.Generator) -> Tensor:
    """One pass of dataset indices (in index order), index ``i`` about ``factors[i]`` times; ``pass_length`` long."""
    whole = factors.floor()
    fraction = factors - whole
    extras = pass_length(factors) - int(whole.sum().item())
    counts = whole.clone()
    if extras:
        order = torch.randperm(len(factors), generator=generator)
        end = fraction[order].cumsum(0) * (extras / fraction.sum())
        end[-1] = extras  # exactly, so exactly `extras` points fall below it
        start = torch.cat((end.new_zeros(1), end[:-1]))
        offset = 1 - torch.rand((), generator=generator, dtype=end.dtype)  # in (0, 1]
        counts[order] += torch.floor(end - offset) - torch.floor(start - offset)  # points offset + k in (start, end]
    return torch.repeat_interleave(torch.arange(len(factors)), counts.long())
