"""Export a trained checkpoint to ONNX or TorchScript, with box decoding and NMS inside the graph.

    python -m lightning_det.tools.export ckpt_path=<checkpoint> format=onnx          # or format=torchscript

The exported model takes ``images [B, 3, H, W]`` float32 RGB pixels (0..255): the tensor the checkpoint's
evaluation pipeline makes (resize or letterbox to ``img_size``). The model's own normalisation,
``(pixel - mean) / std``, is inside the graph (its values are printed and stored in the file's metadata). It
returns fixed-shape detections in input-image pixels:

- ``boxes [B, K, 4]`` float32 xyxy, ``scores [B, K]`` float32, ``labels [B, K]`` int64 (class index),
- ``num_detections [B]`` int64,

with ``K`` the model's maximum detections per image. Image ``b``'s detections are its first ``num_detections[b]``
rows, best first; the rows after them are padding: boxes and scores 0, label -1.

H = W = ``img_size`` is fixed at export. The batch size is fixed in ONNX (``batch_size``) unless
``dynamic_batch=true``; a TorchScript trace accepts any batch size. ONNX goes through torch's TorchScript-based
exporter (torchvision's NMS becomes ``NonMaxSuppression``, RoIAlign ``RoiAlign``). Map boxes back to the original
image with the pipeline's scale and padding and clip them to the image, as ``predict`` does.

Faster R-CNN exports whole: backbone, RPN with its proposal NMS, RoI head, decoding and NMS. Two things differ:

- Its pipeline keeps each image's aspect ratio, so the input is a square canvas: the image resized as in
  evaluation (``min_size`` / ``max_size``), at the top-left of an ``img_size`` square (default ``max_size``)
  filled with the model's mean pixel, which normalises to the zero padding of a training batch. The metadata's
  ``pipeline`` is ``RCNNTransform(..., canvas=img_size, fill=mean)``: the transform that makes this input.
- Its graph takes one batch size, ``batch_size`` (``dynamic_batch=true`` is refused; another batch size fails
  when run): the RoI head pools the proposals of each image in turn, because torchvision's ``MultiScaleRoIAlign``
  takes one box list per image, and a trace unrolls that loop over the batch.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.utils import get_class
from lightning.pytorch.core.module import _jit_is_scripting
from omegaconf import DictConfig
from torch import Tensor, nn

from lightning_det.checks.config import check_config
from lightning_det.data.transforms import DetectionTransform
from lightning_det.models.detector import Detector
from lightning_det.models.postprocess import PAD_LABEL
from lightning_det.tools.errors import report_errors
from lightning_det.tools.inference import load_detector

log = logging.getLogger(__name__)

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript"}
INPUT_NAMES = ["images"]
OUTPUT_NAMES = ["boxes", "scores", "labels", "num_detections"]


class ExportableDetector(nn.Module):
    """A detector, its normalisation and its decoding as one module of fixed input size: pixels in, padded
    detections out.

    ``batch_size``: the only batch size the graph takes, for a detector whose trace unrolls a loop over the
    batch (``Detector.export_batch_fixed``). The reshape to it is traced with that constant, so another batch
    size fails loudly at run time instead of decoding only the first images."""

    def __init__(self, detector: Detector, image_size: tuple[int, int], batch_size: int | None = None) -> None:
        super().__init__()
        self.detector = detector
        self.image_size = image_size
        self.batch_size = batch_size

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if self.batch_size is not None:
            images = images.reshape(self.batch_size, 3, *self.image_size)
        return tuple(self.detector.decode_padded(self.detector(self.detector.normalise(images)), self.image_size))


def export_pipeline(detector: Detector, img_size: int | None) -> dict[str, Any]:
    """The checkpoint's evaluation pipeline config as it makes the exported input: a fixed square, at ``img_size``
    when given; each transform says how (``DetectionTransform.export_settings``)."""
    pipeline = dict(detector.inference_pipeline or {})
    transform = get_class(pipeline["_target_"]) if "_target_" in pipeline else DetectionTransform
    pipeline = transform.export_settings(pipeline, img_size, float32_values(detector.pixel_mean))
    if not isinstance(input_side(pipeline), int):
        raise ValueError(
            f"the checkpoint's pipeline ({pipeline.get('_target_')}) has no fixed img_size: give img_size=<pixels>"
        )
    return pipeline


def float32_values(tensor: Tensor) -> list[float]:
    """A float32 tensor's values as the shortest decimals that read back as the same float32s (123.675, not
    123.67500305175781)."""
    return [float(str(np.float32(value))) for value in tensor.flatten().tolist()]


def input_side(pipeline: dict[str, Any]) -> int | None:
    """The square side of the images a pipeline makes: its ``img_size``, or the ``canvas`` they are pasted on."""
    return pipeline.get("canvas", pipeline.get("img_size"))


def metadata(detector: Detector, pipeline: dict[str, Any], max_detections: int) -> dict[str, str]:
    """What a user of the exported file needs to feed it and read it, as strings (ONNX ``metadata_props``)."""
    return {
        "producer": "lightning_det",
        "detector": type(detector).__name__,
        "class_names": json.dumps(detector.class_names),
        "img_size": str(input_side(pipeline)),
        "pipeline": json.dumps(pipeline),
        "mean": json.dumps(float32_values(detector.pixel_mean)),
        "std": json.dumps(float32_values(detector.pixel_std)),
        "normalization": "inside the model: (pixel - mean) / std per RGB channel",
        "inputs": "images [B, 3, img_size, img_size] float32 RGB pixels 0..255",
        "outputs": "boxes [B, K, 4] xyxy input pixels, scores [B, K], labels [B, K] int64, num_detections [B] int64",
        "max_detections": str(max_detections),
        "padding": f"rows past num_detections: boxes 0, scores 0, labels {PAD_LABEL}",
    }


def summary(props: dict[str, str], batch: str) -> str:
    """The exported model's input and output contract, for the console."""
    side, k = props["img_size"], props["max_detections"]
    pipeline = json.loads(props["pipeline"])
    transform = str(pipeline.pop("_target_", None)).rsplit(".", 1)[-1]
    arguments = ", ".join(f"{key}={value}" for key, value in pipeline.items())
    return (
        f"  input  images [{batch}, 3, {side}, {side}] float32 pixels 0..255 as {transform}({arguments}) makes"
        f" them; normalised inside: mean {props['mean']}, std {props['std']}\n"
        f"  output boxes [B, {k}, 4] xyxy input pixels, scores [B, {k}], labels [B, {k}] int64,"
        f" num_detections [B] int64; {props['padding']}\n"
        f"  classes {props['class_names']}"
    )


@contextmanager
def tracer_notes_silenced() -> Iterator[None]:
    """Warnings of a trace that say nothing to the user: tracing itself is deprecated, Python values become
    constants (the fixed input size), and torchvision's box clipping copies the traced image size."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.* is deprecated.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="To copy construct from a tensor", module="torchvision")
        yield


def export_onnx(
    module: nn.Module, example: Tensor, path: Path, opset: int, dynamic_batch: bool, props: dict[str, str]
) -> None:
    """ONNX through the TorchScript-based exporter: torchvision registers NMS (NonMaxSuppression) and RoIAlign
    for it, while the newer torch.export-based exporter would need onnxscript and custom translations."""
    import onnx  # a dependency; imported here, as only ONNX export needs it

    dynamic_axes = {name: {0: "batch"} for name in INPUT_NAMES + OUTPUT_NAMES} if dynamic_batch else None
    with tracer_notes_silenced():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        # Notes about the exporter's own graph passes (constant folding of strided slices; advanced indexing,
        # whose indices here are never negative).
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.onnx")
        torch.onnx.export(
            module, (example,), str(path), dynamo=False, opset_version=opset, input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES, dynamic_axes=dynamic_axes,
        )
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, props)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def export_torchscript(module: nn.Module, example: Tensor, path: Path, props: dict[str, str]) -> None:
    """A trace (the decoding has no data-dependent Python branches); metadata in the archive's ``metadata.json``."""
    with tracer_notes_silenced():
        # The tests compare the trace with the eager decoding; the built-in check would trace a second time.
        with _jit_is_scripting():  # Lightning's switch that lets a LightningModule be traced without a Trainer
            traced = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={"metadata.json": json.dumps(props)})


@torch.no_grad()
def export(
    ckpt_path: str | Path,
    format: str = "onnx",
    output: str | Path | None = None,
    img_size: int | None = None,
    batch_size: int = 1,
    dynamic_batch: bool = False,
    opset: int = 17,
) -> Path:
    """Write the checkpoint's detector with decoding and NMS as ``format``; returns the file written."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}: use one of {sorted(FORMATS)}")
    detector, _ = load_detector(ckpt_path)
    fixed_batch = detector.export_batch_fixed
    if fixed_batch and dynamic_batch:
        raise ValueError(f"dynamic_batch=true: {ckpt_path} holds a {type(detector).__name__}, whose graph takes one"
                         f" batch size, because {fixed_batch}; export with batch_size=<the batch you will run>")
    pipeline = export_pipeline(detector, img_size)
    side = input_side(pipeline)
    module = ExportableDetector(detector, (side, side), batch_size if fixed_batch else None).eval()
    example = torch.randn(batch_size, 3, side, side)
    max_detections = module(example)[0].shape[1]  # an eager run: a detector that cannot export says why here
    props = metadata(detector, pipeline, max_detections)
    path = Path(output) if output else Path(ckpt_path).with_suffix(FORMATS[format])
    path.parent.mkdir(parents=True, exist_ok=True)
    if format == "onnx":
        export_onnx(module, example, path, opset, dynamic_batch, props)
    else:
        export_torchscript(module, example, path, props)
    batch = "any" if not fixed_batch and (dynamic_batch or format == "torchscript") else str(batch_size)
    log.info("exported %s -> %s\n%s", ckpt_path, path, summary(props, batch))
    return path


def export_from_config(cfg: DictConfig) -> Path:
    """``export`` with the settings of ``conf/export.yaml`` (the command line's, and ``lightning_det.export``'s)."""
    check_config(cfg)
    return export(cfg.ckpt_path, cfg.format, cfg.output, cfg.img_size, cfg.batch_size, cfg.dynamic_batch, cfg.opset)


@hydra.main(version_base="1.3", config_path="../../conf", config_name="export")
@report_errors
def main(cfg: DictConfig) -> None:
    export_from_config(cfg)


if __name__ == "__main__":
    main()
