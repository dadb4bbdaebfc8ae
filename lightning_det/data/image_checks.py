"""Image files checked while the annotations are read, so a bad one stops (or is skipped) before training starts.

The default check reads the header only (format, pixel format, size against the annotation) and the file's last
bytes (a JPEG or PNG cut short lacks its end marker): about a millisecond an image. ``decode`` also decodes every
image fully. Images that passed are remembered by path, byte size and modification time in a small json cache
(``$LIGHTNING_DET_CACHE``, else ``~/.cache/lightning_det``), so a second run checks only new or changed files.

Pixel formats: 16-bit images (PNG ``I;16``, 48-bit RGB) are scaled to 8 bits (``round(v * 255 / 65535)``, not
``v mod 256``); 32-bit integer and float images are refused. EXIF orientation is ignored by default, as in VOC and
COCO, whose boxes refer to the stored pixels; ``exif_orientation=True`` applies it, for datasets labelled on the
rotated view, and the annotated size is then compared with the rotated size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_image

from lightning_det.io import collector_paused, write_atomically

CHECK_LEVELS = ("header", "decode")
#: PIL pixel formats that become 8-bit RGB without loss of meaning (16-bit ones are scaled).
READABLE_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I;16B", "I;16L"}
TORCHVISION_FORMATS = {"JPEG", "PNG", "WEBP", "GIF"}
#: Format -> (end marker, how many final bytes may follow or contain it).
END_MARKERS = {"JPEG": (b"\xff\xd9", 1024), "PNG": (b"IEND", 64)}
EXIF_ORIENTATION = 274
TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height


def decode_rgb(path: str | Path, exif_orientation: bool = False) -> torch.Tensor:
    """``uint8 [3, H, W]`` RGB of any readable image; 16-bit images scaled to 8 bits. Raises on a bad file."""
    path = str(path)
    with Image.open(path) as image:
        image_format = image.format
    if image_format in TORCHVISION_FORMATS:
        pixels = decode_image(path, mode=ImageReadMode.RGB, apply_exif_orientation=exif_orientation)
    else:  # e.g. BMP, TIFF: through PIL
        with Image.open(path) as image:
            if exif_orientation:
                image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L"):
                array = np.asarray(image, dtype=np.uint16)
                pixels = torch.from_numpy(array.astype(np.int32)).to(torch.uint16).expand(3, *array.shape)
            else:
                pixels = torch.from_numpy(np.asarray(image.convert("RGB"))).permute(2, 0, 1)
    if pixels.dtype == torch.uint16:
        pixels = (pixels.to(torch.float64) * (255 / 65535)).round().to(torch.uint8)
    return pixels.contiguous()


def image_problem(path: str, height: int, width: int, decode: bool = False, exif_orientation: bool = False) -> str:
    """Why the image at ``path`` cannot be used with an annotation of ``height x width`` ("" when it can)."""
    try:
        with Image.open(path) as image:
            image_format, mode, (image_width, image_height) = image.format, image.mode, image.size
            if exif_orientation and image.getexif().get(EXIF_ORIENTATION) in TRANSPOSED_ORIENTATIONS:
                image_width, image_height = image_height, image_width
    except (OSError, ValueError) as error:
        return f"is not a readable image ({error})"
    if mode not in READABLE_MODES:
        return f"has pixel format '{mode}', which is not read; convert it to 8- or 16-bit RGB or grayscale"
    if image_format in END_MARKERS:
        marker, tail = END_MARKERS[image_format]
        with open(path, "rb") as file:
            file.seek(max(os.path.getsize(path) - tail, 0))
            if marker not in file.read():
                return f"is truncated: the {image_format} file ends without its end marker"
    if (image_height, image_width) != (height, width):
        return (f"is {image_width}x{image_height} pixels but its annotation says {width}x{height}; the boxes would "
                "land in the wrong place")
    if decode:
        try:
            decode_rgb(path, exif_orientation)
        except (RuntimeError, OSError, ValueError) as error:
            return f"cannot be decoded ({str(error).splitlines()[-1]})"
    return ""


def framework_cache() -> Path:
    """The framework's cache folder: ``$LIGHTNING_DET_CACHE``, else ``~/.cache/lightning_det``."""
    return Path(os.environ.get("LIGHTNING_DET_CACHE") or Path.home() / ".cache" / "lightning_det")


class CheckedImages:
    """The images that passed a check, by path, with the byte size and modification time they had then."""

    def __init__(self, level: str, exif_orientation: bool) -> None:
        if level not in CHECK_LEVELS:
            raise ValueError(f"data.check_images={level!r} is not one of {list(CHECK_LEVELS)}")
        self.level = level
        self.exif_orientation = exif_orientation
        self.path = framework_cache() / "checked_images.json"
        try:
            with collector_paused():  # one entry per image: 118k lists for COCO
                self.entries: dict[str, list] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.changed = False

    def _stamp(self, path: str, height: int, width: int) -> list:
        stat = os.stat(path)
        return [stat.st_size, stat.st_mtime_ns, height, width, self.exif_orientation]

    def passed(self, path: str, height: int, width: int) -> bool:
        """Whether ``path`` passed this check (or a stricter one) unchanged since."""
        entry = self.entries.get(os.path.abspath(path))
        try:
            return entry is not None and entry[:5] == self._stamp(path, height, width) and (
                self.level == "header" or entry[5] == "decode"
            )
        except OSError:
            return False

    def remember(self, path: str, height: int, width: int) -> None:
        self.entries[os.path.abspath(path)] = [*self._stamp(path, height, width), self.level]
        self.changed = True

    def save(self) -> None:
        """Written atomically, so a reader never sees half a file."""
        if not self.changed:
            return
        self.entries = {path: entry for path, entry in self.entries.items() if os.path.exists(path)}
        text = json.dumps(self.entries).encode()
        try:
            write_atomically(self.path, lambda file: file.write(text))
        except OSError:  # a read-only home only costs the next run the same check again
            return
