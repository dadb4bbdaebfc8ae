"""Image files checked while the annotations are read, so a bad one stops (or is skipped) before training starts.

The default check reads the header (format, pixel format, size against the annotation; for a JPEG, libjpeg reads
its tables, so a damaged Huffman table shows here rather than in a loader worker) and the file's last bytes, padding
aside (a JPEG or PNG cut short lacks its end marker): well under a millisecond an image. A file that ends early is
decoded as far as it goes and flagged (:data:`CUT_SHORT`); one that does not decode at all is refused. ``decode``
also decodes every image fully. Images that passed are remembered by path, byte size and modification time in a
small json cache (``$LIGHTNING_DET_CACHE``, else ``~/.cache/lightning_det``), so a second run checks only new or
changed files.

Decoding never ends the process: JPEG, WEBP and GIF go through torchvision (libjpeg-turbo: twice PIL's speed),
PNG through PIL, because torchvision's libpng aborts the process (SIGSEGV) on corrupt image data, where PIL raises.

Pixel formats: 16-bit grayscale images (PNG ``I;16``) are scaled to 8 bits (``round(v * 255 / 65535)``, not
``v mod 256``); 48-bit RGB PNGs keep their high byte (PIL's conversion, within one level of that); 32-bit integer
and float images are refused. EXIF orientation is ignored by default, as in VOC and COCO, whose boxes refer to the
stored pixels; ``exif_orientation=True`` applies it, for datasets labelled on the rotated view, and the annotated
size is then compared with the rotated size.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torchvision.io import ImageReadMode, decode_image

from lightning_det.io import collector_paused, write_atomically

CHECK_LEVELS = ("header", "decode")
#: PIL pixel formats that become 8-bit RGB without loss of meaning (16-bit ones are scaled).
READABLE_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I;16B", "I;16L"}
#: Decoded by torchvision; the others (PNG among them: its libpng ends the process on corrupt data) by PIL.
TORCHVISION_FORMATS = {"JPEG", "WEBP", "GIF"}
#: Format -> (end marker, how many final bytes may follow or contain it).
END_MARKERS = {"JPEG": (b"\xff\xd9", 1024), "PNG": (b"IEND", 64)}
#: Bytes that may pad a file after its end: zeros (a download or copy that filled its last block), 0xFF (erased flash).
PADDING = b"\x00\xff"
#: What :func:`image_problem` says of a file whose data ends early but decodes as far as it goes: usable, flagged.
CUT_SHORT = "is cut short: its data ends early and is decoded as far as it goes"
EXIF_ORIENTATION = 274
TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height


def decode_rgb(path: str | Path, exif_orientation: bool = False, cut_short: bool = False) -> torch.Tensor:
    """``uint8 [3, H, W]`` RGB of any readable image; 16-bit images scaled to 8 bits. Raises on a bad file, never
    ends the process. ``cut_short``: the file ends early (the check found it so): decoded as far as it goes, the rest
    left gray (JPEG) or black (PNG)."""
    path = str(path)
    with Image.open(path) as image:
        image_format = image.format
    if image_format in TORCHVISION_FORMATS and not cut_short:
        pixels = decode_image(path, mode=ImageReadMode.RGB, apply_exif_orientation=exif_orientation)
    else:
        pixels = decode_with_pil(path, exif_orientation, cut_short)
    if pixels.dtype == torch.uint16:
        pixels = (pixels.to(torch.float64) * (255 / 65535)).round().to(torch.uint8)
    return pixels.contiguous()


def decode_with_pil(path: str, exif_orientation: bool, cut_short: bool) -> torch.Tensor:
    """``[3, H, W]`` pixels, ``uint16`` for 16-bit grayscale, else ``uint8``."""
    with Image.open(path) as image:
        if cut_short:
            load_as_far_as_it_goes(image)
        if exif_orientation:
            image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L"):
            array = np.asarray(image, dtype=np.uint16)
            return torch.from_numpy(array.astype(np.int32)).to(torch.uint16).expand(3, *array.shape)
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def load_as_far_as_it_goes(image: Image.Image) -> None:
    """Decode what there is of a file that ends early. PIL's ``LOAD_TRUNCATED_IMAGES`` is set for this call only: it
    also silences real decoding errors, so it is used only on files the check found cut short."""
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        image.load()
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def ran_out_of_data(error: Exception) -> bool:
    """Whether PIL stopped decoding because the data ended (its message), not on corrupt data."""
    return str(error).startswith("image file is truncated")


def image_problem(path: str, height: int, width: int, decode: bool = False, exif_orientation: bool = False) -> str:
    """Why the image at ``path`` cannot be used with an annotation of ``height x width``: "" when it can,
    :data:`CUT_SHORT` when it can be decoded only as far as its data goes."""
    try:
        with Image.open(path) as image:
            image_format, mode, (image_width, image_height) = image.format, image.mode, image.size
            data_start = image.fp.tell()  # JPEG: PIL's header read stops where the compressed data begins
            if exif_orientation and image.getexif().get(EXIF_ORIENTATION) in TRANSPOSED_ORIENTATIONS:
                image_width, image_height = image_height, image_width
    except (OSError, ValueError) as error:
        return f"is not a readable image ({error})"
    if mode not in READABLE_MODES:
        return f"has pixel format '{mode}', which is not read; convert it to 8- or 16-bit RGB or grayscale"
    if (image_height, image_width) != (height, width):
        return (f"is {image_width}x{image_height} pixels but its annotation says {width}x{height}; the boxes would "
                "land in the wrong place")
    if image_format == "JPEG" and (problem := jpeg_header_problem(path, data_start)):
        return problem
    if image_format in END_MARKERS and not has_end_marker(path, *END_MARKERS[image_format]):
        return cut_short_problem(path)
    if decode:
        try:
            decode_rgb(path, exif_orientation)
        except (RuntimeError, OSError, ValueError) as error:
            return f"cannot be decoded ({str(error).splitlines()[-1]})"
    return ""


def jpeg_header_problem(path: str, data_start: int) -> str:
    """Why libjpeg refuses the tables of a JPEG's header (PIL's header read skips its Huffman tables), "" when it
    takes them: decoding the bytes before the compressed data, at the smallest scale, must stop for want of data."""
    with open(path, "rb") as file:
        header = file.read(data_start)
    try:
        with Image.open(io.BytesIO(header)) as image:
            image.draft(image.mode, (1, 1))
            image.load()
    except (OSError, ValueError) as error:
        if not ran_out_of_data(error):
            return f"cannot be decoded: libjpeg refuses its header ({error})"
    return ""


def has_end_marker(path: str, marker: bytes, tail: int) -> bool:
    """Whether ``marker`` lies in the last ``tail`` bytes of the file, not counting the :data:`PADDING` after them."""
    with open(path, "rb") as file:
        end = file.seek(0, os.SEEK_END)
        while end > 0:  # step back over the padding, a block at a time
            start = max(end - 4096, 0)
            file.seek(start)
            content = file.read(end - start).rstrip(PADDING)
            end = start + len(content)
            if content:
                break
        file.seek(max(end - tail, 0))
        return marker in file.read(min(end, tail))


def cut_short_problem(path: str) -> str:
    """For a file without its end marker: "" when it decodes whole all the same (other data follows its end),
    :data:`CUT_SHORT` when its data ends early, else why it cannot be decoded. Through PIL: it never crashes."""
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, ValueError) as error:
        return CUT_SHORT if ran_out_of_data(error) else f"cannot be decoded ({error})"
    return ""


def framework_cache() -> Path:
    """The framework's cache folder: ``$LIGHTNING_DET_CACHE``, else ``~/.cache/lightning_det``."""
    return Path(os.environ.get("LIGHTNING_DET_CACHE") or Path.home() / ".cache" / "lightning_det")


class CheckedImages:
    """The images that passed a check, by path, with the byte size and modification time they had then."""

    def __init__(self, level: str, exif_orientation: bool) -> None:
        if level not in CHECK_LEVELS:
            raise ValueError(f"data.reading.check_images={level!r} is not one of {list(CHECK_LEVELS)}")
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
