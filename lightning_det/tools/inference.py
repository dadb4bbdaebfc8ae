"""Load a trained detector from its checkpoint alone, with the image pipeline it was validated with."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from hydra.utils import get_class, instantiate

from lightning_det.data import collate_detection
from lightning_det.data.image_checks import decode_rgb
from lightning_det.data.transforms.common import DetectionTransform, Sample
from lightning_det.io import CheckpointError, read_checkpoint
from lightning_det.models.detector import Detector

Item = TypeVar("Item")
Key = TypeVar("Key")


def load_detector(path: str | Path, map_location: str = "cpu") -> tuple[Detector, DetectionTransform]:
    """The detector of a checkpoint written by ``train.py`` (weights, classes, decoding settings) in eval mode,
    and its evaluation transform."""
    checkpoint = read_checkpoint(path, "ckpt_path")
    if "detector_class" not in checkpoint or not checkpoint.get("inference_pipeline"):
        raise CheckpointError(
            f"ckpt_path={path} was not written by lightning_det's train.py (no detector class or pipeline in it)"
        )
    detector_class = get_class(checkpoint["detector_class"])
    arguments, pipeline = upgraded(detector_class, checkpoint["hyper_parameters"], checkpoint["inference_pipeline"])
    model = detector_class(**arguments)
    model.load_state_dict(checkpoint["state_dict"])
    model.to(map_location)
    model.inference_pipeline = pipeline
    return model.eval(), instantiate(pipeline)


def upgraded(detector_class: type[Detector], arguments: dict[str, Any], pipeline: dict[str, Any]
             ) -> tuple[dict[str, Any], dict[str, Any]]:
    """A checkpoint's settings in today's layout: keys a family has since moved or renamed go to their new place
    (``Detector.renamed``: a flat key into its part, ``assigner.iou_t`` to ``assigner.positive_iou``), and a
    pipeline's mean/std, from before the model normalised its own input, become the detector's
    ``pixel_mean``/``pixel_std``. A current checkpoint passes through unchanged; nested dicts are copied, not
    changed in place."""
    arguments, pipeline = dict(arguments), dict(pipeline)
    for old, new in detector_class.renamed.items():
        *old_parts, old_key = old.split(".")
        node = arguments
        for part in old_parts:
            if not isinstance(node.get(part), dict):
                break
            node[part] = node = dict(node[part])
        else:
            if old_key in node:
                value = node.pop(old_key)
                *parts, key = new.split(".")
                node = arguments
                for part in parts:
                    node[part] = node = dict(node.get(part) or {})
                node[key] = value
    for statistic in ("mean", "std"):
        if statistic in pipeline:
            arguments.setdefault(f"pixel_{statistic}", pipeline.pop(statistic))
    return arguments, pipeline


def image_batch(paths: list[Path], pipeline: DetectionTransform, size_divisor: int = 1) -> dict[str, Any]:
    """Raw image files -> a batch in the contract (no labels), for prediction; see ``tensor_batch``."""
    return tensor_batch([decode_rgb(path) for path in paths], [str(path) for path in paths], pipeline, size_divisor)


def tensor_batch(images: list[torch.Tensor], names: list[str], pipeline: DetectionTransform, size_divisor: int = 1
                 ) -> dict[str, Any]:
    """RGB ``uint8`` CHW images (decoded files, video frames, arrays) -> a batch in the contract (no labels), each
    named for the detections it gets; images of different sizes are padded bottom/right to the largest, rounded up
    to ``size_divisor``."""
    samples = []
    for index, (image, name) in enumerate(zip(images, names, strict=True)):
        empty = torch.zeros(0, 4)
        sample = Sample(image, empty, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool), index,
                        name, tuple(image.shape[-2:]))
        samples.append(pipeline([sample]))
    return collate_detection(samples, size_divisor=size_divisor)


def batches(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    """``items`` in lists of ``size`` (the last may be shorter), drawn as they come: a stream has no end to wait
    for, and a folder is never decoded whole."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.inference_mode()
def found_in(model: Detector, batch: dict[str, Any], score_thresh: float) -> list[dict[str, torch.Tensor]]:
    """Each image's detections scoring at least ``score_thresh`` (boxes in original-image pixels), on the CPU: what
    images, video frames and the Python API all take from a batch, so they cannot disagree."""
    batch = model.transfer_batch_to_device(batch, model.device, 0)
    found = []
    for det in model.predict_step(batch, 0):
        keep = det["scores"] >= score_thresh
        found.append({key: value[keep].cpu() for key, value in det.items()})
    return found


def as_lists(model: Detector, det: dict[str, torch.Tensor]) -> dict[str, list]:
    """One image's ``found_in`` detections as plain lists, as the files are written: ``boxes`` xyxy, ``scores`` and
    class names as ``labels``."""
    return {"boxes": det["boxes"].tolist(), "scores": det["scores"].tolist(),
            "labels": [model.class_names[i] for i in det["labels"].tolist()]}


def detect(model: Detector, pipeline: DetectionTransform, images: Iterable[tuple[Key, torch.Tensor]], batch_size: int,
           score_thresh: float) -> Iterator[tuple[Key, torch.Tensor, dict[str, torch.Tensor]]]:
    """Each RGB ``uint8`` CHW image of ``(key, image)`` pairs (a path, a frame's time) with its ``found_in``
    detections, in ``batch_size`` batches on the model's device, drawn from ``images`` as they come. Image files,
    video frames and the Python API all predict through it."""
    for chunk in batches(images, batch_size):
        keys, tensors = zip(*chunk)
        found = found_in(model, tensor_batch(list(tensors), [str(key) for key in keys], pipeline), score_thresh)
        yield from zip(keys, tensors, found)


@contextmanager
def decoding(model: Detector, **settings: Any) -> Iterator[None]:
    """The model's decoder with ``settings`` (``nms_thresh=0.5``; None leaves one as it is) for the block, restored
    after it: a per-call change that the checkpoint's own settings survive."""
    decoder = model.decoder
    given = {key: value for key, value in settings.items() if value is not None}
    unknown = sorted(key for key in given if not hasattr(decoder, key))
    if unknown:
        raise ValueError(f"{type(decoder).__name__} has no decoding setting {', '.join(unknown)}; it has "
                         f"{', '.join(sorted(k for k in vars(decoder) if not k.startswith('_')))}")
    saved = {key: getattr(decoder, key) for key in given}
    try:
        for key, value in given.items():
            setattr(decoder, key, value)
        yield
    finally:
        for key, value in saved.items():
            setattr(decoder, key, value)
