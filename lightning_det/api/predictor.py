"""A trained detector in a user's own program: ``load(checkpoint).predict(images)``.

It reads what ``python -m lightning_det.tools.predict`` reads (image files and folders, unreadable files skipped
with a warning) and also images already in memory (PIL images, numpy arrays, tensors), and gives the CLI's
detections for the same images: the same checkpoint loading, batching, decoding and score filter
(``tools/inference.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from lightning_det.data.image_checks import decode_rgb
from lightning_det.models.tta import TestTimeAugmentation
from lightning_det.report.drawing import draw_predictions
from lightning_det.tools.evaluate import coco_results
from lightning_det.tools.inference import decoding, detect, load_detector
from lightning_det.tools.predict import decoded_images, image_files

#: One image: a file or folder path, a PIL image, a numpy ``uint8`` HWC RGB array (a 4-D NHWC array is several),
#: a ``uint8`` CHW RGB tensor (a 4-D NCHW tensor is several); or a list of these.
ImageSource = str | Path | Image.Image | np.ndarray | Tensor
Images = ImageSource | Sequence[ImageSource]

#: ``predict``'s score threshold unless a call gives one: the CLI's (``conf/predict.yaml``; a test holds them equal).
SCORE_THRESH = 0.3


@dataclass(frozen=True, eq=False)
class Prediction:
    """The detections of one image, in its own pixels, best first."""

    source: str  #: the file path; for an image given in memory ``image<i>``, i its place among the call's images
    image_size: tuple[int, int]  #: (height, width)
    boxes: Tensor  #: [N, 4] float xyxy
    scores: Tensor  #: [N]
    labels: Tensor  #: [N] int64 class index
    names: list[str]  #: [N] class names
    pixels: Callable[[], Tensor] = field(repr=False)  #: the image, uint8 [3, H, W] RGB (a file is read again)

    def to_coco(self, image_id: int, category_ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """COCO's results format (``bbox`` as x, y, width, height), as ``evaluate`` writes ``coco_results.json``;
        ``category_ids[label]`` is a class's category id (default: the class index)."""
        labels = self.labels.tolist()
        ids = list(category_ids) if category_ids is not None else list(range(max(labels, default=-1) + 1))
        detections = {"boxes": self.boxes, "scores": self.scores, "labels": self.labels}
        return coco_results([image_id], [detections], ids)

    def plot(self) -> np.ndarray:
        """The image with its detections drawn as ``predict`` draws them: RGB ``uint8`` [H, W, 3] (for
        ``PIL.Image.fromarray`` or matplotlib)."""
        drawn = draw_predictions(self.pixels(), self.boxes, self.names, self.scores.tolist())
        return drawn.permute(1, 2, 0).numpy()


@dataclass(frozen=True)
class Source:
    """One input image: its name and how to get its pixels again (``Prediction.plot`` reads a file anew)."""

    name: str
    pixels: Callable[[], Tensor]


def from_memory(image: Image.Image | np.ndarray | Tensor, name: str) -> Tensor:
    """An in-memory image as a ``uint8`` CHW RGB tensor on the CPU, where the pipeline runs (sharing a numpy array's
    memory)."""
    if isinstance(image, Image.Image):
        image = np.array(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{name}: a numpy image is uint8 [H, W, 3] RGB, got shape {list(image.shape)}")
        image = torch.from_numpy(image if image.flags.writeable else image.copy()).permute(2, 0, 1)
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"{name}: an image is uint8 [3, H, W] RGB pixels (0..255), got a {image.dtype} tensor of "
                         f"shape {list(image.shape)}")
    return image.cpu()


def decoded_sources(images: Images) -> Iterator[tuple[Source, Tensor]]:
    """The images of ``predict``'s argument in order, each file decoded once, as its batch comes: folders listed as
    the CLI lists them, unreadable files left out with a warning, a 4-D array or tensor split into its images (an
    image given in memory is named ``image<i>``, ``i`` its place among the call's images). An argument that is no
    image is refused before anything is decoded."""
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    for item in items:
        if not isinstance(item, ImageSource):
            raise TypeError(f"cannot read an image from a value of type {type(item).__name__}: give a path, a folder, "
                            "a PIL image, a uint8 HWC numpy array or a uint8 CHW tensor, or a list of these")
    place = 0
    for item in items:
        if isinstance(item, (str, Path)):
            for path, image in decoded_images(image_files(Path(item))):
                place += 1
                yield Source(str(path), partial(decode_rgb, path)), image
            continue
        for image in list(item) if isinstance(item, (np.ndarray, Tensor)) and item.ndim == 4 else [item]:
            name = f"image{place}"
            place += 1
            pixels = from_memory(image, name)
            yield Source(name, lambda pixels=pixels: pixels), pixels


class Predictor:
    """A checkpoint's detector, its evaluation pipeline and its classes, on one device."""

    def __init__(self, ckpt_path: str | Path, device: str = "cpu") -> None:
        self.model, self.pipeline = load_detector(ckpt_path, map_location=device)
        self.ckpt_path = Path(ckpt_path)

    @property
    def class_names(self) -> list[str]:
        return list(self.model.class_names)

    def predict(self, images: Images, score_thresh: float = SCORE_THRESH, nms_thresh: float | None = None,
                max_detections: int | None = None, batch_size: int = 8, tta: bool | TestTimeAugmentation = False,
                **decoder: Any) -> list[Prediction]:
        """One ``Prediction`` per image, detections scoring at least ``score_thresh``. ``nms_thresh``,
        ``max_detections`` and any other setting of the model's decoder (``pre_nms_topk``, ``class_agnostic``)
        apply to this call only; None keeps the checkpoint's. ``tta=True`` merges the views of the CLI's ``tta=true``
        (three scales, each also mirrored), or give a ``TestTimeAugmentation`` of your own."""
        checkpoints_tta = self.model.tta
        self.model.tta = TestTimeAugmentation() if tta is True else tta or None
        try:
            with decoding(self.model, nms_thresh=nms_thresh, max_detections=max_detections, **decoder):
                return [self.prediction(source, image, det)
                        for source, image, det in detect(self.model, self.pipeline, decoded_sources(images),
                                                         batch_size, score_thresh)]
        finally:
            self.model.tta = checkpoints_tta

    def prediction(self, source: Source, image: Tensor, det: dict[str, Tensor]) -> Prediction:
        names = [self.model.class_names[i] for i in det["labels"].tolist()]
        return Prediction(source.name, tuple(image.shape[-2:]), det["boxes"], det["scores"], det["labels"], names,
                          source.pixels)

    __call__ = predict


def load(ckpt_path: str | Path, device: str = "cpu") -> Predictor:
    """The detector of a checkpoint written by training (``best-*.ckpt``), ready to ``predict``: ``device`` is
    ``cpu``, ``cuda`` or ``cuda:1``."""
    return Predictor(ckpt_path, device)
