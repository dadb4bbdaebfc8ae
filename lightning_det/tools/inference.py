"""Load a trained detector from its checkpoint alone, with the image pipeline it was validated with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class, instantiate

from lightning_det.checks.run import CheckpointError, read_checkpoint
from lightning_det.data import collate_detection
from lightning_det.data.image_checks import decode_rgb
from lightning_det.data.transforms.common import DetectionTransform, Sample
from lightning_det.models.detector import Detector


def load_detector(path: str | Path, map_location: str = "cpu") -> tuple[Detector, DetectionTransform]:
    """The detector of a checkpoint written by ``train.py`` (weights, classes, decoding settings) in eval mode,
    and its evaluation transform."""
    checkpoint = read_checkpoint(path, "ckpt_path")
    if "detector_class" not in checkpoint or not checkpoint.get("inference_pipeline"):
        raise CheckpointError(
            f"ckpt_path={path} was not written by lightning_det's train.py (no detector class or pipeline in it)"
        )
    detector_class = get_class(checkpoint["detector_class"])
    model = detector_class(**checkpoint["hyper_parameters"])
    model.load_state_dict(checkpoint["state_dict"])
    model.to(map_location)
    model.inference_pipeline = checkpoint["inference_pipeline"]
    return model.eval(), instantiate(checkpoint["inference_pipeline"])


def image_batch(paths: list[Path], pipeline: DetectionTransform) -> dict[str, Any]:
    """Raw image files -> a batch in the contract (no labels), for prediction."""
    samples = []
    for index, path in enumerate(paths):
        image = decode_rgb(path)
        empty = torch.zeros(0, 4)
        sample = Sample(image, empty, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool), index,
                        str(path), tuple(image.shape[-2:]))
        samples.append(pipeline([sample]))
    return collate_detection(samples)
