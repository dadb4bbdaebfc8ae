"""A small, learnable detection dataset generated on first use, so the framework runs without downloads.

Six shape classes in random colours (so the shape, not the colour, decides the class) on a smooth, noisy
background with thin distractor clutter. Objects vary in size (about 15% are tiny, 8-16 px), may overlap
(every object keeps at least a third of its pixels visible), and are marked ``difficult`` when mostly hidden or
under 10 px. Some images hold no object.

The same files are described twice: in the VOC layout (``VOCsample/`` read with the split ``sample/train``)
and as COCO json (``annotations/instances_{train,val}.json``, difficult objects as ``iscrowd``), so both readers
can be exercised on identical data. Generation is deterministic for a seed and writes into a temporary folder
that is renamed into place when complete, so an interrupted run never leaves a half-written dataset behind.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

SAMPLE_CLASSES = ("circle", "square", "triangle", "ring", "cross", "star")
VOC_FOLDER = "VOCsample"  # read with VOCSource(["sample/train"])
INFO_FILE = "sample_info.json"  # written last: its presence marks a complete dataset
GENERATOR_VERSION = 1

TINY_FRACTION = 0.15
EMPTY_FRACTION = 0.06
MIN_VISIBLE = 0.35  # a placement that would hide more of an existing object is redrawn
DIFFICULT_VISIBLE = 0.6  # objects less visible than this are difficult
DIFFICULT_SIZE = 10  # and so are objects whose longer side is below this many pixels


@dataclass
class SampleObject:
    name: str
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in continuous pixel coordinates (x2 = last column + 1)
    difficult: bool


def _polygon(kind: str, cx: float, cy: float, size: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape whose unrotated extent is about ``size``."""
    if kind == "square":
        radii, turns = [size / math.sqrt(2)] * 4, np.arange(4) / 4 + 1 / 8
    elif kind == "triangle":
        radii, turns = [size * 0.6] * 3, np.arange(3) / 3 + 1 / 4
    elif kind == "star":
        radii, turns = [size / 2, size * 0.21] * 5, np.arange(10) / 10 + 1 / 4
    else:  # cross: a plus sign with arms 0.36 * size thick, outlined by three corners per quarter turn
        half, arm = size / 2, size * 0.18
        corners = np.array([(arm, half), (arm, arm), (half, arm)])
        quarter_turns = [np.array([[c, -s], [s, c]]) for c, s in ((1, 0), (0, 1), (-1, 0), (0, -1))]
        outline = np.concatenate([corners @ turn for turn in quarter_turns])
        radii, turns = np.hypot(*outline.T), np.arctan2(outline[:, 1], outline[:, 0]) / (2 * math.pi)
    theta = 2 * math.pi * np.asarray(turns) + angle
    xs = cx + np.asarray(radii) * np.cos(theta)
    ys = cy - np.asarray(radii) * np.sin(theta)  # image rows grow downwards
    return list(zip(xs.tolist(), ys.tolist()))

def shape_mask(kind: str, width: int, height: int, cx: float, cy: float, size: float, angle: float) -> np.ndarray:
    """Boolean ``[H, W]`` mask of one shape, drawn crisp (no anti-aliasing) so its box is exact."""
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    r = size / 2
    if kind in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if kind == "ring":
            inner = r * 0.55
            draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    else:
        draw.polygon(_polygon(kind, cx, cy, size, angle), fill=255)
    return np.asarray(mask) > 0


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth random colour field with finer blotches, then thin lines, dots and arcs as clutter."""
    coarse = rng.uniform(30, 225, size=(rng.integers(2, 5), rng.integers(2, 5), 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    blotches = rng.normal(0, 18, size=(height // 12 + 1, width // 12 + 1, 3))
    blotches = np.asarray(
        Image.fromarray(np.clip(blotches + 128, 0, 255).astype(np.uint8)).resize((width, height), Image.BILINEAR),
        dtype=np.float32,
    ) - 128
    image = Image.fromarray(np.clip(field + blotches, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)

    def colour() -> tuple[int, ...]:
        return tuple(int(c) for c in rng.integers(0, 256, 3))

    for _ in range(rng.integers(3, 9)):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        length, direction = rng.uniform(40, 160), rng.uniform(0, 2 * math.pi)
        end = (x + length * math.cos(direction), y + length * math.sin(direction))
        draw.line([(x, y), end], fill=colour(), width=int(rng.integers(1, 3)))
    for _ in range(rng.integers(10, 40)):
        x, y, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.5, 2)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour())
    for _ in range(rng.integers(1, 5)):
        x, y, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(10, 40)
        start = rng.uniform(0, 360)
        draw.arc([x - r, y - r, x + r, y + r], start, start + rng.uniform(60, 200), fill=colour(), width=1)
    return image


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> tuple[int, int, int]:
    """A random colour far enough from the pixels it will cover to be seen."""
    mean = under.reshape(-1, 3).mean(0)
    for _ in range(20):
        colour = rng.integers(0, 256, 3)
        if np.linalg.norm(colour - mean) > 100:
            break
    else:
        colour = 255 - mean.astype(int)
    return tuple(int(c) for c in colour)


def render_image(rng: np.random.Generator) -> tuple[Image.Image, list[SampleObject]]:
    """One image and its objects."""
    width, height = int(rng.integers(320, 417)), int(rng.integers(240, 417))
    image = _background(rng, width, height)
    count = 0 if rng.random() < EMPTY_FRACTION else int(rng.integers(1, 7))
    owner = np.full((height, width), -1, dtype=np.int64)  # index of the object that shows at each pixel
    placed: list[tuple[str, np.ndarray]] = []
    for _ in range(count * 4):
        if len(placed) == count:
            break
        kind = SAMPLE_CLASSES[rng.integers(len(SAMPLE_CLASSES))]
        tiny = rng.random() < TINY_FRACTION
        size = rng.uniform(8, 16) if tiny else math.exp(rng.uniform(math.log(20), math.log(0.45 * min(width, height))))
        margin = size * 0.75
        cx, cy = rng.uniform(margin, width - margin), rng.uniform(margin, height - margin)
        mask = shape_mask(kind, width, height, cx, cy, size, rng.uniform(0, 2 * math.pi))
        if placed:
            area = np.array([m.sum() for _, m in placed])
            visible = np.bincount(owner[~mask & (owner >= 0)], minlength=len(placed))
            if (visible / area < MIN_VISIBLE).any():
                continue
        image.paste(_contrasting_colour(rng, np.asarray(image)[mask]), mask=Image.fromarray(mask))
        owner[mask] = len(placed)
        placed.append((kind, mask))
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 7, size=(height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))

    visible = np.bincount(owner[owner >= 0], minlength=len(placed))
    objects = []
    for k, (kind, mask) in enumerate(placed):
        ys, xs = np.nonzero(mask)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        longer = max(box[2] - box[0], box[3] - box[1])
        difficult = visible[k] / mask.sum() < DIFFICULT_VISIBLE or longer < DIFFICULT_SIZE
        objects.append(SampleObject(kind, box, bool(difficult)))
    return image, objects


def _voc_xml(file_name: str, width: int, height: int, objects: list[SampleObject]) -> ET.ElementTree:
    """VOC annotation: 1-based inclusive pixel indices, so ``xmin = x1 + 1`` and ``xmax = x2``."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = VOC_FOLDER
    ET.SubElement(root, "filename").text = file_name
    size = ET.SubElement(root, "size")
    for tag, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    for obj in objects:
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = obj.name
        ET.SubElement(node, "difficult").text = str(int(obj.difficult))
        box = ET.SubElement(node, "bndbox")
        x1, y1, x2, y2 = obj.box
        for tag, value in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(box, tag).text = str(value)
    tree = ET.ElementTree(root)
    ET.indent(tree)
    return tree


def _write_dataset(folder: Path, num_train: int, num_val: int, seed: int) -> None:
    voc = folder / VOC_FOLDER
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    (folder / "annotations").mkdir()
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SAMPLE_CLASSES)]
    splits = {"train": range(num_train), "val": range(num_train, num_train + num_val)}
    for split, indices in splits.items():
        coco: dict = {"images": [], "annotations": [], "categories": categories}
        for index in indices:
            image, objects = render_image(np.random.default_rng([seed, index]))
            file_id = f"{index:06d}"
            image.save(voc / "JPEGImages" / f"{file_id}.jpg", quality=92)
            _voc_xml(f"{file_id}.jpg", image.width, image.height, objects).write(
                voc / "Annotations" / f"{file_id}.xml", encoding="unicode"
            )
            coco["images"].append({"id": index + 1, "file_name": f"{file_id}.jpg", "width": image.width,
                                   "height": image.height})
            for obj in objects:
                x1, y1, x2, y2 = obj.box
                coco["annotations"].append({
                    "id": len(coco["annotations"]) + 1, "image_id": index + 1,
                    "category_id": SAMPLE_CLASSES.index(obj.name) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1), "iscrowd": int(obj.difficult),
                })
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i:06d}\n" for i in indices))
        (folder / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))


def generate_sample_data(root: str | Path, num_train: int = 300, num_val: int = 60, seed: int = 0) -> Path:
    """Write the sample dataset to ``root`` unless a complete one with the same settings is already there."""
    root = Path(root)
    settings = {"version": GENERATOR_VERSION, "num_train": num_train, "num_val": num_val, "seed": seed,
                "classes": list(SAMPLE_CLASSES)}
    info = root / INFO_FILE
    if info.is_file():
        existing = json.loads(info.read_text())
        if existing == settings:
            return root
        raise FileExistsError(
            f"{root} holds sample data generated with {existing}, not {settings}. "
            "Delete the folder to regenerate it, or point data.root elsewhere."
        )
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(
            f"{root} exists but is not a complete sample dataset (no {INFO_FILE}). "
            "Delete it, or point data.root elsewhere."
        )
    log.info("generating the sample dataset (%d train / %d val images) in %s", num_train, num_val, root)
    root.parent.mkdir(parents=True, exist_ok=True)
    partial = root.parent / f".{root.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write_dataset(partial, num_train, num_val, seed)
        (partial / INFO_FILE).write_text(json.dumps(settings))
        if root.exists():
            root.rmdir()
        os.rename(partial, root)
    except OSError:
        if not (info.is_file() and json.loads(info.read_text()) == settings):
            raise
        log.info("another process finished generating %s first; using it", root)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return root
