"""``predict`` on a video, stream, camera or folder of frames: an annotated video and one json line per frame.

The lines are written and flushed frame by frame, so a stream's detections can be followed (``tail -f``) and a
stopped run keeps every frame it drew; Ctrl-C stops between frames, with the video finalized.
"""

from __future__ import annotations

import json
import logging
from contextlib import closing
from itertools import takewhile
from pathlib import Path

import torch
from tqdm import tqdm

from lightning_det.data.transforms.common import DetectionTransform
from lightning_det.models.detector import Detector
from lightning_det.report.drawing import draw_predictions
from lightning_det.tools.inference import as_lists, detect
from lightning_det.tools.interrupt import StopOnCtrlC
from lightning_det.tools.video import Frames, VideoWriter

log = logging.getLogger(__name__)
VIDEO_FILE, LINES_FILE = "video.mp4", "detections.jsonl"


def annotated(image: torch.Tensor, found: dict[str, list]) -> torch.Tensor:
    """``image`` with ``found`` (``as_lists`` of its detections) drawn on it."""
    return draw_predictions(image, torch.tensor(found["boxes"]), found["labels"], found["scores"])


def predict_video(model: Detector, pipeline: DetectionTransform, frames: Frames, output: Path, score_thresh: float,
                  batch_size: int) -> int:
    """Write ``video.mp4`` (``frames.fps``) and ``detections.jsonl`` (``frame``, ``time`` in seconds, then
    ``detections``' lists) into ``output``; the number of frames written."""
    log.info("%s: %s frames at %.4g fps -> %s", frames.name, frames.total or "a stream of", frames.fps, output)
    written = found = 0
    with StopOnCtrlC() as stop, VideoWriter(output / VIDEO_FILE, frames.fps) as video, \
            (output / LINES_FILE).open("w") as lines, closing(frames.images) as images, \
            tqdm(total=frames.total, unit="frame", desc="predict") as progress:
        try:
            timed = ((time, image) for image, time in takewhile(lambda _: not stop.requested, images))
            for time, image, det in detect(model, pipeline, timed, batch_size, score_thresh):
                frame_found = as_lists(model, det)
                video.write(annotated(image, frame_found))
                lines.write(json.dumps({"frame": written, "time": round(time, 6), **frame_found}) + "\n")
                lines.flush()
                written += 1
                found += len(frame_found["scores"])
                progress.update()
        except KeyboardInterrupt:
            stop.requested = True
    if stop.requested:
        log.warning("stopped at frame %d (Ctrl-C): %s and %s hold frames 0-%d", written, VIDEO_FILE, LINES_FILE,
                    written - 1)
    log.info("%d frames, %d detections -> %s", written, found, output)
    return written
