"""Defaults that follow the training data and the machine instead of constants: the input size from the object
sizes, how often a small training set is repeated in one epoch, and how many loader workers the machine can feed.

The rules were chosen by measuring real datasets (BENCHMARKS.md, "Real data", "Data loader"), not fitted to one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from lightning_det.data.records import AnnotationRecord, as_table


def relative_short_sides(records: Sequence[AnnotationRecord]) -> np.ndarray:
    """Each box's shorter side over its image's longer side: its size in pixels at input size 1 (letterbox)."""
    table = as_table(records)
    boxes = table.boxes
    return np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) / table.object_image_sizes().max(1)


def choose_img_size(
    records: Sequence[AnnotationRecord], min_object_px: float = 8.0, quantile: float = 0.05,
    bounds: tuple[int, int] = (256, 640), multiple: int = 32,
) -> int:
    """The smallest square input (a multiple of ``multiple`` within ``bounds``, and no larger than the images'
    own median longer side) at which all but the smallest ``quantile`` of the training boxes keep a shorter side
    of ``min_object_px`` pixels or more.

    Small objects get the pixels they need; large ones do not pay for pixels they do not need, so a CPU run
    sees more epochs in the same time.
    """
    low, high = bounds
    table = as_table(records)
    native = np.median(np.maximum(table.heights, table.widths)) if len(table) else high
    high = max(low, min(high, math.ceil(native / multiple) * multiple))
    sides = relative_short_sides(table)
    if not len(sides):
        return high
    needed = min_object_px / max(float(np.quantile(sides, quantile)), 1e-6)
    return int(min(max(math.ceil(needed / multiple) * multiple, low), high))


def epoch_repeats(num_images: int, images_per_step: int, min_steps: int) -> int:
    """How many passes over a training set of ``num_images`` make one epoch of at least ``min_steps`` optimizer
    steps of ``images_per_step`` images (batch x devices x accumulation): 1 for any set that already does."""
    if min_steps <= 0 or num_images <= 0:
        return 1
    return max(1, math.ceil(min_steps * images_per_step / num_images))


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, which a container or ``taskset`` narrows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def loader_workers(on_cpu: bool, cores: int, step_threads: int, processes: int = 1, cap: int = 8) -> int:
    """Loader worker processes per training process for ``num_workers: auto``.

    On a CPU run the step's threads already use the cores (torch takes them all by default), so a worker can only
    take time from the step: the workers get the cores the ``processes`` x ``step_threads`` leave free, none by
    default (on BCCD, 2 cores: 0.90x of the pre-loaded loop with no worker, 0.78x with two). On an accelerator
    the cores are free: one worker per core of this process's share, less one for the process itself, at most
    ``cap``.
    """
    if on_cpu:
        return max(0, (cores - processes * step_threads) // max(processes, 1))
    return max(0, min(cap, cores // max(processes, 1) - 1))
