"""Image files as scraped data holds them: padded after their end, cut short, or corrupt behind a valid header.

Decoders that crash on a corrupt file (torchvision's libpng ends the process) are run in a subprocess here, so a
crash fails the test instead of ending the test run.
"""

from __future__ import annotations

import re
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_coco, make_voc, write_image
from PIL import Image

CAT = [("cat", (5, 5, 30, 30), False)]


@pytest.fixture
def image_cache(tmp_path, monkeypatch) -> Path:
    """The checked-images cache of these tests lives in their temp dir (subprocesses inherit the variable)."""
    monkeypatch.setenv("LIGHTNING_DET_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def smooth_image(path: Path, height: int, width: int) -> None:
    """Gradients with some noise: compresses like a photo, so a cut lands inside the image data."""
    y, x = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(0).integers(0, 40, size=(height, width, 3))
    pixels = np.stack([x * 200 // width, y * 200 // height, (x + y) * 100 // (width + height)], -1) + noise
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path, format="JPEG" if path.suffix == ".jpg" else "PNG")


def corrupt_png_data(path: Path) -> None:
    """Flip bytes in the middle of the first IDAT chunk and write its CRC anew: the header and chunk checks pass,
    the compressed data does not."""
    data = bytearray(path.read_bytes())
    position = 8
    while data[position + 4: position + 8] != b"IDAT":
        position += 12 + struct.unpack(">I", data[position: position + 4])[0]
    length = struct.unpack(">I", data[position: position + 4])[0]
    middle = position + 8 + length // 2
    data[middle: middle + 64] = bytes(b ^ 0x5A for b in data[middle: middle + 64])
    checksum = zlib.crc32(data[position + 4: position + 8 + length])
    data[position + 8 + length: position + 12 + length] = struct.pack(">I", checksum)
    path.write_bytes(bytes(data))


def damage_huffman_table(path: Path) -> None:
    """Set the 16 code-length counts of the first Huffman table (DHT segment) to 255: libjpeg refuses it."""
    data = bytearray(path.read_bytes())
    table = data.index(b"\xff\xc4")
    data[table + 5: table + 21] = b"\xff" * 16
    path.write_bytes(bytes(data))


def run_python(code: str, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def voc_image(root: Path, name: str) -> Path:
    return root / "VOC2007" / "JPEGImages" / f"{name}.jpg"


def read(root: Path, **kwargs):
    from lightning_det.data.records import read_annotations
    from lightning_det.data.voc import VOCSource

    return read_annotations(root, [VOCSource(["2007/train"])], ["cat"], **kwargs).records[0]


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_a_file_padded_after_its_end_marker_passes_and_decodes_whole(tmp_path, image_cache, suffix):
    from lightning_det.data.image_checks import decode_rgb
    from lightning_det.data.records import load_image

    whole = tmp_path / f"whole{suffix}"
    smooth_image(whole, 96, 128)
    make_voc(tmp_path, {"2007/train": {"padded": (96, 128, CAT)}})
    padded = voc_image(tmp_path, "padded")  # a .png's bytes under this name too: PIL reads the format from them
    padded.write_bytes(whole.read_bytes() + b"\x00" * 1188)  # the 164-image web set's 00021.jpg: a filled last block
    (record,) = read(tmp_path)
    assert not record.cut_short
    assert torch.equal(load_image(record), decode_rgb(whole))


def test_cut_short_jpegs_are_decoded_as_far_as_they_go_warned_once_and_listed(tmp_path, image_cache, caplog):
    from lightning_det.data.image_checks import decode_rgb
    from lightning_det.data.records import load_image

    make_voc(tmp_path, {"2007/train": {name: (96, 128, CAT) for name in ("good", "cut 1", "cut 2")}})
    whole = tmp_path / "whole.jpg"
    smooth_image(whole, 96, 128)
    data = whole.read_bytes()
    for name, share in (("cut 1", 0.6), ("cut 2", 0.8)):
        voc_image(tmp_path, name).write_bytes(data[: int(len(data) * share)])
    for _ in range(2):  # cut-short files are not cached as passed: the second read flags them again
        caplog.clear()
        records = read(tmp_path)
        assert [Path(r.path).stem for r in records if r.cut_short] == ["cut 1", "cut 2"]
        assert len(records) == 3 and caplog.text.count("2 images were cut short and decoded as far as they go") == 1
    restored, full = load_image(records[1]), decode_rgb(whole)
    assert restored.shape == full.shape
    assert torch.equal(restored[:, :24], full[:, :24])  # what the file holds is the photo
    assert (restored[:, -8:] == 128).all()  # the rest is gray

    from lightning_det.data.records import CUT_SHORT_LIST, write_cut_short_list

    write_cut_short_list(tmp_path / "run", [records, records[1:]])  # train and val may share an image
    assert (tmp_path / "run" / CUT_SHORT_LIST).read_text().splitlines() == [
        str(voc_image(tmp_path, "cut 1")), str(voc_image(tmp_path, "cut 2"))]


def test_every_image_that_cannot_be_decoded_is_named_in_one_error_or_skipped(tmp_path, image_cache, caplog):
    from lightning_det.data.records import InvalidAnnotationError

    make_voc(tmp_path, {"2007/train": {name: (96, 128, CAT) for name in ("good", "text", "huffman", "cut")}})
    voc_image(tmp_path, "text").write_text("<html>not found</html>")
    smooth_image(voc_image(tmp_path, "huffman"), 96, 128)
    damage_huffman_table(voc_image(tmp_path, "huffman"))
    smooth_image(voc_image(tmp_path, "cut"), 96, 128)
    voc_image(tmp_path, "cut").write_bytes(voc_image(tmp_path, "cut").read_bytes()[:-500])
    with pytest.raises(InvalidAnnotationError) as error:
        read(tmp_path)
    message = str(error.value)
    assert message.startswith("2 image files cannot be used")
    assert f"image {voc_image(tmp_path, 'text')} is not a readable image" in message
    assert f"image {voc_image(tmp_path, 'huffman')} cannot be decoded" in message
    assert "cut.jpg" not in message and "data.reading.skip_invalid=true" in message

    records = read(tmp_path, skip_invalid=True)
    assert [Path(r.path).stem for r in records] == ["good", "cut"]
    assert "skipped 2 images" in caplog.text


def test_a_jpeg_with_a_damaged_huffman_table_is_found_by_the_header_check(tmp_path, image_cache):
    """PIL's header read skips the Huffman tables, so before the check decoded the header too, such a file passed
    and stopped training mid-epoch even with skip_invalid."""
    from lightning_det.data.records import AnnotationRecord, ImageLoadError, InvalidAnnotationError, load_image

    make_voc(tmp_path, {"2007/train": {"good": (96, 128, CAT), "bad": (96, 128, CAT)}})
    path = voc_image(tmp_path, "bad")
    damage_huffman_table(path)
    empty = np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, bool)
    with pytest.raises(ImageLoadError, match=re.escape(str(path))):  # it really cannot be decoded
        load_image(AnnotationRecord(str(path), 0, 96, 128, *empty))
    with pytest.raises(InvalidAnnotationError, match=re.escape(f"image {path} cannot be decoded")):
        read(tmp_path)
    assert [Path(r.path).stem for r in read(tmp_path, skip_invalid=True)] == ["good"]


def corrupt_png_set(root: Path) -> list[Path]:
    """A COCO set of three PNGs, the second with corrupt image data behind a valid header."""
    names = ["a.png", "corrupt.png", "c.png"]
    make_coco(root, [(1, "cat")], [(k + 1, name, 48, 64) for k, name in enumerate(names)],
              [(k + 1, 1, [5.0, 5.0, 20.0, 20.0], 0) for k in range(len(names))])
    paths = [root / "images" / name for name in names]
    for path in paths:
        smooth_image(path, 48, 64)
    corrupt_png_data(paths[1])
    return paths


READ_COCO = """
    import sys
    from lightning_det.data.coco import COCOSource
    from lightning_det.data.records import read_annotations

    def read(**kwargs):
        source = COCOSource("annotations/instances_train.json", "images")
        return read_annotations(sys.argv[1], [source], ["cat"], **kwargs).records[0]
"""


def test_a_png_with_corrupt_data_is_named_instead_of_crashing_the_decode_check(tmp_path, image_cache):
    paths = corrupt_png_set(tmp_path)
    result = run_python(READ_COCO + """
    from lightning_det.data.image_checks import decode_rgb
    from lightning_det.data.records import InvalidAnnotationError

    try:
        decode_rgb(sys.argv[2])
    except OSError as error:
        print("decode raised:", error)
    try:
        read(check_level="decode")
    except InvalidAnnotationError as error:
        print("check raised:", error)
    print("skipped to", [r.path for r in read(check_level="decode", skip_invalid=True)])
    """, tmp_path, paths[1])
    assert result.returncode == 0, result.stderr[-2000:]  # before: -11 (SIGSEGV in libpng)
    assert "decode raised:" in result.stdout
    assert f"check raised: 1 image file cannot be used:\n  image {paths[1]} cannot be decoded" in result.stdout
    assert f"skipped to {[str(paths[0]), str(paths[2])]}" in result.stdout


def test_training_with_skip_invalid_replaces_an_image_that_fails_to_decode_in_the_loader(tmp_path, image_cache):
    """The header check cannot see corrupt PNG data: the dataset replaces the image (skip_invalid) or names it."""
    paths = corrupt_png_set(tmp_path)
    result = run_python(READ_COCO + """
    from torch.utils.data import DataLoader
    from lightning_det.data.dataset import DetectionDataset
    from lightning_det.data.records import ImageLoadError
    from lightning_det.data.transforms import LetterboxTransform

    dataset = DetectionDataset(read(skip_invalid=True), LetterboxTransform(img_size=64), cache_bytes=0)
    loader = DataLoader(dataset, batch_size=None, num_workers=1)  # decoded in a worker, as in training
    print("epoch:", [sample.path for sample in loader])
    try:
        DetectionDataset(read(), LetterboxTransform(img_size=64), cache_bytes=0)[1]
    except ImageLoadError as error:
        print("without skip_invalid:", error)
    """, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"epoch: {[str(p) for p in (paths[0], paths[2], paths[2])]}" in result.stdout
    assert f"skip_invalid: cannot read image {paths[1]}" in result.stderr  # the warning names it
    assert "1 image replaced in this process" in result.stderr
    assert f"without skip_invalid: cannot read image {paths[1]}" in result.stdout


def test_predict_skips_a_png_with_corrupt_data_and_goes_on(tmp_path):
    paths = corrupt_png_set(tmp_path)
    result = run_python("""
    import logging, sys
    from pathlib import Path
    from lightning_det.tools.predict import decoded_images

    logging.basicConfig()
    print("readable:", [str(p) for p, _ in decoded_images([Path(p) for p in sys.argv[1:]])])
    """, *paths)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"readable: {[str(paths[0]), str(paths[2])]}" in result.stdout
    assert f"skipped {paths[1]}: not a readable image" in result.stderr


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P"])
def test_png_through_pil_gives_torchvision_s_pixels(tmp_path, mode):
    """PNG is decoded by PIL (torchvision's libpng crashes on corrupt data): good files keep the same pixels."""
    from torchvision.io import ImageReadMode, decode_image

    from lightning_det.data.image_checks import decode_rgb

    write_image(tmp_path / "rgb.png", 40, 56)
    Image.open(tmp_path / "rgb.png").convert(mode).save(tmp_path / "image.png")
    assert torch.equal(decode_rgb(tmp_path / "image.png"), decode_image(str(tmp_path / "image.png"), ImageReadMode.RGB))
