"""Video in and out through PyAV: files, stream URLs and cameras go through one reader, and the annotated video is
written as H.264 MP4, which browsers and players open.

Why PyAV: torchvision 0.29's ``torchvision.io`` has no video functions left (``read_video``, ``VideoReader`` and
``write_video`` were deprecated in favour of torchcodec, then removed), and torchcodec needs FFmpeg installed on the
system and reads no cameras. PyAV's wheel brings its own FFmpeg (the decoders, rtsp/http, v4l2 and avfoundation
capture, libx264), so ``pip install 'lightning_det[video]'`` is the whole set-up. It is imported only when a video is
read or written: images need none of it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

import torch

VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".mts",
                            ".m2ts", ".wmv", ".flv", ".3gp", ".ogv"})
#: Seconds to wait for a stream or camera to open, and then for each packet, before giving up with an error.
TIMEOUT = 10.0
#: A camera index per platform: FFmpeg's capture device and its name for camera N.
CAMERAS = {"linux": ("v4l2", "/dev/video{}"), "darwin": ("avfoundation", "{}")}


class VideoError(OSError):
    """An input that cannot be opened or decoded as video; the message names it and the fix."""


@dataclass
class Frames:
    """Frames to predict on, in order: RGB ``uint8 [3, H, W]`` with their time in seconds. ``total`` is None for a
    stream or camera, which has no known end."""

    name: str
    images: Iterator[tuple[torch.Tensor, float]]
    fps: Fraction
    total: int | None


def is_video(source: str) -> bool:
    """Whether ``input`` names a video (a stream URL, a camera index, a file with a video suffix) rather than an
    image or a folder of images."""
    return "://" in source or source.isdigit() or Path(source).suffix.lower() in VIDEO_SUFFIXES


def pyav() -> ModuleType:
    try:
        import av
    except ImportError as error:
        raise ImportError("video input needs PyAV: pip install 'lightning_det[video]' (or pip install av)") from error
    return av


def reader_arguments(source: str) -> dict[str, Any]:
    """``av.open``'s arguments for ``input``: a camera index becomes the platform's capture device."""
    if not source.isdigit():
        return {"file": source}
    if sys.platform not in CAMERAS:
        raise VideoError(f"input={source}: camera indices are read through v4l2 (Linux) or avfoundation (macOS), not "
                         f"on {sys.platform}; serve the camera as a stream and pass its URL (input=rtsp://...)")
    device, name = CAMERAS[sys.platform]
    return {"file": name.format(source), "format": device}


def open_error(source: str, arguments: dict[str, Any], reason: str) -> VideoError:
    """The error for an input FFmpeg could not open, with the fix for its kind (stream, camera, file)."""
    if "://" in source:
        fix = ("check the address and credentials, and that the camera or server is running and reachable from "
               "this machine (firewall, VPN)")
    elif "format" in arguments:
        fix = f"check that camera {source} ({arguments['file']}) is connected and not in use by another program"
    elif not Path(source).exists():
        fix = "no such file; check the path"
    else:
        fix = "check that a video player opens it (it may be incomplete or damaged), or re-encode it"
    return VideoError(f"input={source} could not be opened as a video ({reason}): {fix}")


def frame_rate(fps: float) -> Fraction:
    """``fps`` as the exact rate a container takes (29.97 as 2997/100, not a float's binary fraction)."""
    if fps <= 0:
        raise ValueError(f"fps={fps} must be a frame rate above 0")
    return Fraction(fps).limit_denominator(1001)


def open_video(source: str, fallback_fps: float) -> Frames:
    """The frames of a video file, stream URL or camera index; ``fallback_fps`` for a stream that states no rate."""
    av = pyav()
    arguments = reader_arguments(source)
    try:
        container = av.open(**arguments, timeout=TIMEOUT)
    except av.error.FFmpegError as error:
        raise open_error(source, arguments, error.strerror) from None
    if not container.streams.video:
        container.close()
        raise open_error(source, arguments, "it holds no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    fps = stream.average_rate or stream.guessed_rate or frame_rate(fallback_fps)
    return Frames(source, decoded(container, stream, fps, source), fps, stream.frames or None)


def decoded(container: Any, stream: Any, fps: Fraction, source: str) -> Iterator[tuple[torch.Tensor, float]]:
    """The stream's frames with their times (the source's own, else index / fps); the container is closed when
    they end or the caller stops (closes this generator)."""
    av = pyav()
    index = 0
    try:
        for frame in container.decode(stream):
            time = frame.time if frame.time is not None else index / fps
            yield torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1), float(time)
            index += 1
    except av.error.FFmpegError as error:
        raise VideoError(f"input={source}: decoding failed after {index} frames ({error.strerror}); the outputs "
                         "hold those frames") from None
    finally:
        container.close()


class VideoWriter:
    """An H.264 MP4 at ``fps``, opened at the first frame: its size is the video's (odd sides rounded up to even,
    as the yuv420p players expect; a frame of another size is scaled to it). Closing flushes the encoder and writes
    the index, so a run stopped early leaves a playable file."""

    def __init__(self, path: Path, fps: Fraction) -> None:
        self.path, self.fps = path, fps
        self.container: Any = None
        self.stream: Any = None

    def write(self, image: torch.Tensor) -> None:
        """Append an RGB ``uint8 [3, H, W]`` frame."""
        av = pyav()
        frame = av.VideoFrame.from_ndarray(image.permute(1, 2, 0).contiguous().numpy(), format="rgb24")
        if self.container is None:
            self.container = av.open(str(self.path), mode="w")
            self.stream = self.container.add_stream("libx264", rate=self.fps)
            self.stream.width, self.stream.height = frame.width + frame.width % 2, frame.height + frame.height % 2
            self.stream.pix_fmt = "yuv420p"
        if (frame.width, frame.height) != (self.stream.width, self.stream.height):
            frame = frame.reformat(width=self.stream.width, height=self.stream.height)
        self.container.mux(self.stream.encode(frame))

    def close(self) -> None:
        if self.container is not None:
            self.container.mux(self.stream.encode(None))
            self.container.close()
            self.container = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
                 ) -> None:
        self.close()
