"""Detect objects in images with a trained checkpoint: drawn images and a json of detections.

    python -m lightning_det.tools.predict ckpt_path=<checkpoint> input=<image or folder>

Boxes are in original-image pixels; the json lists, per image, ``boxes`` (xyxy), ``scores`` and class ``labels``
(names). Everything the checkpoint needs (classes, image pipeline, decoding settings) is stored in it; ``tta=true``
merges test-time augmented views (``conf/test_time_augmentation.yaml``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torchvision.io import write_png

from lightning_det.checks.config import check_config
from lightning_det.data.image_checks import decode_rgb
from lightning_det.models.tta import TestTimeAugmentation, from_config
from lightning_det.report.drawing import draw_predictions
from lightning_det.tools.errors import report_errors
from lightning_det.tools.inference import batches, detections, load_detector, tensor_batch

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}


def image_files(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            return files
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {source}")
    raise FileNotFoundError(f"input {source} is neither an image file nor a folder")


def decoded_images(paths: list[Path]) -> Iterator[tuple[Path, torch.Tensor]]:
    """Each path that decodes as an image, with its pixels; each other one is named in a warning and left out, so
    one bad file does not stop a folder."""
    skipped = 0
    for path in paths:
        try:
            image = decode_rgb(path)
        except (RuntimeError, OSError, ValueError) as error:
            log.warning("skipped %s: not a readable image (%s)", path, str(error).splitlines()[-1])
            skipped += 1
            continue
        yield path, image
    if skipped:
        log.warning("skipped %d of %d images that could not be read", skipped, len(paths))


def readable_images(paths: list[Path]) -> list[Path]:
    """The paths that decode as images; each other one is named in a warning and left out."""
    return [path for path, _ in decoded_images(paths)]


def predict(ckpt_path: str, paths: list[Path], score_thresh: float, batch_size: int, device: str,
            tta: TestTimeAugmentation | None = None) -> dict[str, dict]:
    """Detections per image path, in original-image pixels, above ``score_thresh`` (merged over ``tta``'s views
    when given); unreadable images are skipped with a warning naming each."""
    model, pipeline = load_detector(ckpt_path, device)
    model.tta = tta
    results = {}
    for chunk in batches(decoded_images(paths), batch_size):
        names = [str(path) for path, _ in chunk]
        results.update(zip(names, detections(model, tensor_batch([image for _, image in chunk], names, pipeline),
                                             score_thresh)))
    return results


@hydra.main(version_base="1.3", config_path="../../conf", config_name="predict")
@report_errors
def main(cfg: DictConfig) -> None:
    check_config(cfg)
    paths = image_files(Path(cfg.input))
    results = predict(cfg.ckpt_path, paths, cfg.score_thresh, cfg.batch_size, cfg.device, from_config(cfg))
    output = Path(cfg.paths.output_dir)
    for path, det in results.items():
        drawn = draw_predictions(decode_rgb(path), torch.tensor(det["boxes"]), det["labels"], det["scores"])
        write_png(drawn, str(output / f"{Path(path).stem}.png"))
    (output / "detections.json").write_text(json.dumps(results, indent=1))
    log.info("%d images, %d detections -> %s", len(results), sum(len(d["scores"]) for d in results.values()), output)


if __name__ == "__main__":
    main()
