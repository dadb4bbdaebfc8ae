"""What both metrics share: input checks (a wrong class count or a broken target box must fail loudly, not score
quietly) and the shape of the result."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import Tensor


class PerClassVector:
    """Mixin for a torchmetrics ``Metric``: keep ``AP_per_class`` one-dimensional.

    torchmetrics squeezes every one-element tensor a ``compute`` returns, which would turn the per-class AP of a
    single-class detector into a scalar and break code that iterates over classes.
    """

    def _wrap_compute(self, compute: Callable) -> Callable:
        squeezing = super()._wrap_compute(compute)  # type: ignore[misc]

        @functools.wraps(compute)
        def compute_keeping_classes(*args: Any, **kwargs: Any) -> dict[str, Tensor]:
            results = squeezing(*args, **kwargs)
            return {**results, "AP_per_class": results["AP_per_class"].reshape(-1)}

        return compute_keeping_classes


def check_labels(labels: Tensor, num_classes: int, kind: str) -> None:
    """Raise if a ``kind`` ("prediction" or "target") label is outside ``0 .. num_classes - 1``."""
    outside = (labels < 0) | (labels >= num_classes)
    if outside.any():
        raise ValueError(
            f"{kind} label {labels[outside][0].item():g} is outside 0..{num_classes - 1}: the metric's "
            "num_classes must match the dataset and model (labels are foreground classes only, no background)"
        )


def check_target_boxes(boxes: Tensor) -> None:
    """Raise if a ground-truth box ``[M, 4]`` is not finite xyxy with ``x2 >= x1`` and ``y2 >= y1``."""
    broken = ~boxes.isfinite().all(1) | (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if broken.any():
        raise ValueError(
            f"target box {boxes[broken][0].tolist()} is not finite xyxy with x2 >= x1 and y2 >= y1; "
            "check the dataset's box conversion (targets must be x1, y1, x2, y2 in pixels)"
        )
