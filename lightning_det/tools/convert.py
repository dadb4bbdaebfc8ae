"""Convert a detection dataset between Pascal VOC, COCO and Ultralytics YOLO, any to any.

    python -m lightning_det.tools.convert /data/BCCD --to yolo --out /data/BCCD_yolo

The source is read by the same readers training uses (same checks, same boxes), then written by
:mod:`lightning_det.data.writers` into a hidden folder beside ``--out`` that is renamed to ``--out`` when complete,
so an interrupted conversion leaves nothing that looks like a dataset.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

from lightning_det.data.coco import COCOSource
from lightning_det.data.records import AnnotationSource, ImageLoadError, read_annotations
from lightning_det.data.voc import VOCSource
from lightning_det.data.writers import IMAGE_MODES, WRITERS, SplitRecords
from lightning_det.data.yolo_format import SPLIT_KEYS, YOLOSource, load_data_yaml

FORMATS = tuple(WRITERS)


def detect_format(source: Path) -> str:
    """``yolo`` for a yaml file, ``coco`` for a folder with ``annotations/instances_*.json``, ``voc`` for one with
    ``Annotations/`` (or ``VOC<year>/Annotations/``)."""
    if source.is_file() and source.suffix in (".yaml", ".yml"):
        return "yolo"
    if any(source.glob("annotations/instances_*.json")):
        return "coco"
    if (source / "Annotations").is_dir() or any(source.glob("VOC*/Annotations")):
        return "voc"
    raise FileNotFoundError(
        f"{source} is neither a YOLO data.yaml, nor a COCO folder (annotations/instances_*.json), nor a VOC folder "
        "(Annotations/); check the path, or name the format with --from"
    )


def voc_sources(root: Path, specs: dict[str, str]) -> dict[str, AnnotationSource]:
    """The given split lists, else the ``ImageSets/Main/{train,val,test}.txt`` present, else every annotation."""
    if specs:
        return {role: VOCSource(spec.split(",")) for role, spec in specs.items()}
    found = {role: VOCSource([role]) for role in SPLIT_KEYS if (root / "ImageSets" / "Main" / f"{role}.txt").is_file()}
    if found:
        return found
    if (root / "Annotations").is_dir():
        return {"train": VOCSource(None)}
    raise FileNotFoundError(f"{root}: no ImageSets/Main/{{train,val,test}}.txt; name the split lists, e.g. "
                            "--train 2007/trainval,2012/trainval --val 2007/test")


def coco_sources(root: Path, specs: dict[str, str]) -> dict[str, AnnotationSource]:
    """The given ``json:image_dir`` pairs, else ``annotations/instances_<split>[2017].json`` with ``<split>[2017]/``."""
    if specs:
        pairs = {role: spec.rsplit(":", 1) for role, spec in specs.items()}
        bad = [f"--{role} {spec}" for role, spec in specs.items() if len(pairs[role]) != 2]
        if bad:
            raise ValueError(f"{', '.join(bad)}: a COCO split is JSON:IMAGE_DIR, e.g. annotations/x.json:train2017")
        return {role: COCOSource(json_file, image_dir) for role, (json_file, image_dir) in pairs.items()}
    found = {}
    for role in SPLIT_KEYS:
        for name in (role, f"{role}2017"):
            if (root / "annotations" / f"instances_{name}.json").is_file():
                found[role] = COCOSource(f"annotations/instances_{name}.json", name)
                break
    if not found:
        raise FileNotFoundError(f"{root}: no annotations/instances_{{train,val,test}}[2017].json; name the splits, "
                                "e.g. --train annotations/instances_train.json:images")
    return found


def yolo_sources(data_yaml: Path, specs: dict[str, str]) -> dict[str, AnnotationSource]:
    if specs:
        raise ValueError("a YOLO source takes its splits from data.yaml; leave out --train/--val/--test")
    dataset = load_data_yaml(data_yaml)
    return {role: YOLOSource(str(dataset.file), role) for role in dataset.splits}


SOURCES = {"voc": voc_sources, "coco": coco_sources, "yolo": yolo_sources}


def read_dataset(source: Path, source_format: str, specs: dict[str, str], classes: list[str] | None,
                 skip_invalid: bool) -> SplitRecords:
    sources = SOURCES[source_format](source, specs)
    result = read_annotations(source, list(sources.values()), classes, skip_invalid)
    return SplitRecords(result.classes, dict(zip(sources, result.records)), result.label_to_category_id)


def write_dataset(dataset: SplitRecords, target_format: str, out: Path, images: str, keep_difficult: bool) -> None:
    """Write into a hidden folder beside ``out`` and rename it to ``out`` when complete."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} exists and is not empty; choose a new folder or delete it")
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    extra = {"final_path": out, "keep_difficult": keep_difficult} if target_format == "yolo" else {}
    try:
        WRITERS[target_format](partial, dataset, images, **extra)
        if out.exists():
            out.rmdir()
        os.rename(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def train_command(target_format: str, out: Path, splits: list[str]) -> str | None:
    """The ``train.py`` command that reads the written dataset (None without train and val splits)."""
    if not {"train", "val"} <= set(splits):
        return None
    if target_format == "yolo":
        return f"python train.py data=yolo data.yaml={out / 'data.yaml'}"
    if target_format == "voc":
        return (f"python train.py data=voc data.root={out} data.classes=null 'data.train.splits=[train]' "
                "'data.val.splits=[val]'")
    return (f"python train.py data=coco data.root={out} data.train.annotation_file=annotations/instances_train.json "
            "data.train.image_dir=train data.val.annotation_file=annotations/instances_val.json data.val.image_dir=val")


def summary(dataset: SplitRecords, source: Path, source_format: str, target_format: str, out: Path, images: str,
            keep_difficult: bool) -> str:
    lines = [f"read {source_format} {source}: {len(dataset.classes)} classes {dataset.classes}"]
    for split, records in dataset.splits.items():
        lines.append(f"  {split}: {len(records)} images, {sum(len(r.labels) for r in records)} objects")
    lines.append(f"wrote {target_format} {out} (images as {images}s)" if images != "copy"
                 else f"wrote {target_format} {out} (images copied)")
    difficult = sum(int(r.difficult.sum()) for records in dataset.splits.values() for r in records)
    if target_format == "yolo" and difficult and not keep_difficult:
        lines.append(f"left out {difficult} difficult objects (YOLO labels have no such flag; --keep-difficult "
                     "writes them as ordinary objects)")
    command = train_command(target_format, out, list(dataset.splits))
    if command:
        lines.append(f"train on it: {command}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(
        prog="python -m lightning_det.tools.convert",
        description="Convert a detection dataset between Pascal VOC, COCO and Ultralytics YOLO.",
        epilog="example: python -m lightning_det.tools.convert /data/BCCD --to yolo --out /data/BCCD_yolo",
    )
    parse.add_argument("source", metavar="SOURCE", type=Path, help="a VOC folder (Annotations/, JPEGImages/, "
                       "ImageSets/Main/), a COCO folder (annotations/instances_<split>.json, <split>/) or a data.yaml")
    parse.add_argument("--to", required=True, choices=FORMATS, help="the format to write")
    parse.add_argument("--out", required=True, type=Path, help="a new (or empty) folder for the result")
    parse.add_argument("--from", dest="source_format", choices=FORMATS, help="the source's format (default: "
                       "recognised from SOURCE)")
    splits = parse.add_argument_group("splits", "default: the train/val/test the source has. VOC: split lists, "
                                      "e.g. 2007/trainval,2012/trainval; COCO: JSON:IMAGE_DIR under SOURCE")
    for role in SPLIT_KEYS:
        splits.add_argument(f"--{role}", metavar="SPEC")
    parse.add_argument("--classes", help="label order, comma-separated (default: COCO's categories, YOLO's names, "
                       "VOC's sorted names)")
    parse.add_argument("--images", choices=IMAGE_MODES, default="symlink", help="link or copy, never re-encode "
                       "(default: symlink)")
    parse.add_argument("--keep-difficult", action="store_true", help="to YOLO: write difficult objects as "
                       "ordinary ones instead of leaving them out")
    parse.add_argument("--skip-invalid", action="store_true", help="skip and count bad images and objects")
    return parse


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parse = parser()
    args = parse.parse_args(argv)
    specs = {role: getattr(args, role) for role in SPLIT_KEYS if getattr(args, role)}
    classes = args.classes.split(",") if args.classes else None
    try:
        source_format = args.source_format or detect_format(args.source)
        dataset = read_dataset(args.source, source_format, specs, classes, args.skip_invalid)
        write_dataset(dataset, args.to, args.out, args.images, args.keep_difficult)
    except (OSError, ValueError, ImageLoadError) as error:
        parse.exit(2, f"convert: error: {error}\n")
    print(summary(dataset, args.source, source_format, args.to, args.out, args.images, args.keep_difficult))


if __name__ == "__main__":
    main(sys.argv[1:])
