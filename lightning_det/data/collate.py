"""Batch samples into the batch contract: images, padded labels ``[B, P, 6]`` and meta."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_det.data.transforms import Sample


class Labels(NamedTuple):
    """The columns of label rows ``[..., 6]`` = ``(class, x1, y1, x2, y2, difficult)``, the batch contract's layout
    written once: views of the rows (in-place changes reach them), for a padded batch ``[B, P, 6]`` or flat rows."""

    classes: Tensor  # [...]: the class index as a float, -1 on padding rows
    boxes: Tensor  # [..., 4]: xyxy in batch-image pixels
    difficult: Tensor  # [...]: 1.0 for an object the metrics ignore, else 0.0

    @classmethod
    def of(cls, rows: Tensor) -> Labels:
        return cls(rows[..., 0], rows[..., 1:5], rows[..., 5])

    @classmethod
    def present(cls, rows: Tensor) -> Labels:
        """The objects of label rows without their padding, flattened to ``[N]`` (a copy: boolean indexing)."""
        return cls.of(rows[cls.of(rows).valid])

    @property
    def valid(self) -> Tensor:
        """True on the rows that hold an object (not padding)."""
        return self.classes >= 0


def collate_detection(
    samples: list[Sample], label_pad_width: int | None = None, size_divisor: int = 1
) -> dict[str, Any]:
    """Stack images and pad label rows ``(class, x1, y1, x2, y2, difficult)`` with ``class = -1``.

    ``label_pad_width`` fixes ``P`` (useful for static shapes, e.g. compiled models); ``None`` pads to the
    batch's largest object count (at least 1). Images of different sizes (Faster R-CNN keeps aspect ratios) are
    padded at the bottom/right to the batch's largest height and width, rounded up to a multiple of
    ``size_divisor``; pixel coordinates do not move, so each image's ``scale``/``pad`` stays valid. ``meta``'s
    ``image_size`` (h, w) tells the model where each image ends, so the padding is zero after its normalisation.
    """
    counts = torch.tensor([len(s.labels) for s in samples])
    width = label_pad_width if label_pad_width is not None else max(1, int(counts.max()))
    if int(counts.max()) > width:
        crowded = samples[int(counts.argmax())]
        raise ValueError(
            f"image {crowded.path} has {int(counts.max())} objects after augmentation but data.loader.label_pad_width="
            f"{width}. Raise data.loader.label_pad_width, or set it to null to pad to each batch's maximum."
        )
    rows = torch.cat(
        (
            torch.cat([s.labels for s in samples]).float().unsqueeze(1),
            torch.cat([s.boxes for s in samples]).float(),
            torch.cat([s.difficult for s in samples]).float().unsqueeze(1),
        ),
        dim=1,
    )
    labels = torch.zeros(len(samples), width, 6)
    Labels.of(labels).classes.fill_(-1)
    labels[torch.arange(width) < counts.unsqueeze(1)] = rows
    return {
        "images": pad_and_stack([s.image for s in samples], size_divisor, [s.colour for s in samples]),
        "labels": labels,
        "meta": {
            "image_id": torch.tensor([s.image_id for s in samples], dtype=torch.long),
            "orig_size": torch.tensor([s.orig_size for s in samples], dtype=torch.long),
            "scale": torch.tensor([s.scale for s in samples], dtype=torch.float32),
            "pad": torch.tensor([s.pad for s in samples], dtype=torch.float32),
            "image_size": torch.tensor([tuple(s.image.shape[-2:]) for s in samples], dtype=torch.long),
            "path": [s.path for s in samples],
            "mosaic": torch.tensor([s.mosaic for s in samples], dtype=torch.bool),
            **({"area": [s.area for s in samples]} if any(s.area is not None for s in samples) else {}),
        },
    }


def pad_and_stack(
    images: list[Tensor], size_divisor: int = 1, colours: list[Tensor | None] | None = None
) -> Tensor:
    """``[3, H_i, W_i]`` images -> float ``[B, 3, H, W]``, zero-padded bottom/right to the rounded-up largest size.

    ``uint8`` images are stacked as they are and converted once, as a batch; each of ``colours`` that is not
    ``None`` (a 3 x 3 matrix) is then applied to its image, all in one product, and the pixels clipped to 0..255.
    The zero padding stays zero under a matrix."""
    height, width = (max(sizes) for sizes in zip(*(image.shape[-2:] for image in images)))
    height, width = (-(-side // size_divisor) * size_divisor for side in (height, width))
    dtype = torch.uint8 if all(image.dtype == torch.uint8 for image in images) else torch.float32
    batch = torch.zeros(len(images), images[0].shape[0], height, width, dtype=dtype)
    for target, image in zip(batch, images):  # a copy per image: the sizes differ, so it cannot be one op
        target[:, : image.shape[-2], : image.shape[-1]] = image
    batch = batch.float()
    if colours is None or all(colour is None for colour in colours):
        return batch
    matrices = torch.stack([torch.eye(3) if colour is None else colour for colour in colours])
    return torch.einsum("bij,bjhw->bihw", matrices, batch).clamp_(0, 255)
