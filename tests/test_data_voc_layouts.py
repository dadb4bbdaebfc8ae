"""The VOC layouts datasets come in: the devkit with year folders, one folder without a year, no ImageSets."""

from __future__ import annotations

import shutil

import pytest
from helpers import make_voc, write_image

from lightning_det.data import DetectionDataModule, SamplerOptions, VOCSource

IMAGES = {
    "a 1": (40, 60, [("cell", (5, 6, 20, 30), False)]),  # an id with a space
    "b2": (50, 50, [("cell", (1, 1, 10, 10), False), ("dot", (20, 20, 30, 40), False)]),
    "c3": (30, 40, [("dot", (2, 3, 12, 13), False)]),
    "d4": (30, 40, []),
    "e5": (45, 35, [("cell", (3, 3, 33, 40), False)]),
}


def boxes_by_path(datamodule: DetectionDataModule, role: str) -> dict[str, list]:
    return {r.path.rsplit("/", 1)[1]: r.boxes.tolist() for r in datamodule.records[role]}


def test_folder_without_year_reads_like_the_devkit(tmp_path):
    devkit = make_voc(tmp_path / "devkit", {"2007/train": dict(list(IMAGES.items())[:3]),
                                            "2007/val": dict(list(IMAGES.items())[3:])})
    flat = make_voc(tmp_path / "flat", {"train": dict(list(IMAGES.items())[:3]), "val": dict(list(IMAGES.items())[3:])})
    assert not (flat / "VOC").exists() and (flat / "ImageSets" / "Main" / "train.txt").is_file()
    read = {}
    for root, train, val in ((devkit, "2007/train", "2007/val"), (flat, "train", "val")):
        datamodule = DetectionDataModule(root, VOCSource([train]), VOCSource([val]), classes=None)
        datamodule.setup("fit")
        read[root.name] = (datamodule.classes, boxes_by_path(datamodule, "train"), boxes_by_path(datamodule, "val"))
    assert read["flat"] == read["devkit"]
    classes, train, val = read["flat"]
    assert classes == ["cell", "dot"] and sorted(train) == ["a 1.jpg", "b2.jpg", "c3.jpg"]
    assert train["a 1.jpg"] == [[4.0, 5.0, 20.0, 30.0]]  # 1-based inclusive -> 0-based edges
    assert sorted(val) == ["d4.jpg", "e5.jpg"]


def test_folder_without_image_sets_holds_out_a_seeded_share(tmp_path):
    root = make_voc(tmp_path / "bare", {"all": IMAGES})
    shutil.rmtree(root / "ImageSets")
    datamodule = DetectionDataModule(root, VOCSource(None), None, classes=None, val_split=0.4,
                                     sampler=SamplerOptions(seed=3))
    datamodule.setup("fit")
    train, val = boxes_by_path(datamodule, "train"), boxes_by_path(datamodule, "val")
    assert len(train) == 3 and len(val) == 2 and not set(train) & set(val)
    assert set(train) | set(val) == {f"{name}.jpg" for name in IMAGES}


def test_png_images_are_found_beside_their_annotations(tmp_path):
    root = make_voc(tmp_path / "png", {"train": {"p1": (20, 30, [("cell", (2, 2, 9, 9), False)])}})
    (root / "JPEGImages" / "p1.jpg").unlink()
    write_image(root / "JPEGImages" / "p1.png", 20, 30)
    datamodule = DetectionDataModule(root, VOCSource(["train"]), VOCSource(["train"]), classes=None)
    datamodule.setup("fit")
    assert datamodule.records["train"][0].path.endswith("p1.png")


@pytest.mark.parametrize("split", ["a/b/c", "/"])
def test_malformed_split_names_say_both_forms(split):
    with pytest.raises(ValueError, match="'<split>'.*'<year>/<split>'"):
        VOCSource([split])


def test_missing_annotations_folder_without_splits_names_it(tmp_path):
    datamodule = DetectionDataModule(tmp_path, VOCSource(None), None, classes=None, val_split=0.2)
    with pytest.raises(FileNotFoundError, match="Annotations"):
        datamodule.setup("fit")
