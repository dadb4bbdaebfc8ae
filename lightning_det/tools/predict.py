"""Detect objects in images or video with a trained checkpoint: drawn images and a json of detections, or an
annotated video and a json line per frame.

    python -m lightning_det.tools.predict ckpt_path=<checkpoint> input=<image, folder, video, camera index or URL>

Boxes are in original-image pixels; the json lists, per image, ``boxes`` (xyxy), ``scores`` and class ``labels``
(names). A video file, stream URL or camera index gives ``video.mp4`` and ``detections.jsonl``
(``tools/predict_video.py``), and so does a folder of frames with ``video=true``. Everything the checkpoint needs
(classes, image pipeline, decoding settings) is stored in it; ``tta=true`` merges test-time augmented views
(``conf/test_time_augmentation.yaml``).
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
from lightning_det.tools.errors import report_errors
from lightning_det.tools.inference import as_lists, detect, load_detector
from lightning_det.tools.predict_video import annotated, predict_video
from lightning_det.tools.video import Frames, frame_rate, is_video, open_video

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


def predict(ckpt_path: str, paths: list[Path], score_thresh: float, batch_size: int, device: str,
            tta: TestTimeAugmentation | None = None) -> dict[str, dict]:
    """Detections per image path, in original-image pixels, above ``score_thresh`` (merged over ``tta``'s views
    when given); unreadable images are skipped with a warning naming each."""
    model, pipeline = load_detector(ckpt_path, device)
    model.tta = tta
    return {str(path): as_lists(model, det)
            for path, _, det in detect(model, pipeline, decoded_images(paths), batch_size, score_thresh)}


def folder_frames(name: str, paths: list[Path], fps: float) -> Frames:
    """Image files, in the order given, as the frames of a video at ``fps``; unreadable ones are skipped."""
    rate = frame_rate(fps)
    images = ((image, float(index / rate)) for index, (_, image) in enumerate(decoded_images(paths)))
    return Frames(name, images, rate, len(paths))


def video_frames(cfg: DictConfig) -> Frames | None:
    """The frames of a video file, stream or camera, or of a folder of images with ``video=true``; None for
    images."""
    source = str(cfg.input)
    if is_video(source):
        return open_video(source, cfg.fps)
    if cfg.video:
        return folder_frames(source, image_files(Path(source)), cfg.fps)
    return None


def run(cfg: DictConfig) -> None:
    """The command: images -> drawn PNGs and ``detections.json``; video -> ``video.mp4`` and ``detections.jsonl``."""
    check_config(cfg)
    output, frames = Path(cfg.paths.output_dir), video_frames(cfg)
    if frames is not None:
        model, pipeline = load_detector(cfg.ckpt_path, cfg.device)
        model.tta = from_config(cfg)
        predict_video(model, pipeline, frames, output, cfg.score_thresh, cfg.batch_size)
        return
    results = predict(cfg.ckpt_path, image_files(Path(cfg.input)), cfg.score_thresh, cfg.batch_size, cfg.device,
                      from_config(cfg))
    for path, det in results.items():
        write_png(annotated(decode_rgb(path), det), str(output / f"{Path(path).stem}.png"))
    (output / "detections.json").write_text(json.dumps(results, indent=1))
    log.info("%d images, %d detections -> %s", len(results), sum(len(d["scores"]) for d in results.values()), output)


@hydra.main(version_base="1.3", config_path="../../conf", config_name="predict")
@report_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
