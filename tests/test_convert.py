"""python -m lightning_det.tools.convert: each format written with its own conventions, read back to the same boxes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import make_voc, make_yolo
from hydra.utils import instantiate
from runs import compose_config

from lightning_det.data import COCOSource, VOCSource, YOLOSource, read_annotations
from lightning_det.tools.convert import main as convert

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
BCCD = REPO.parent / "shared" / "datasets" / "bccd" / "BCCD"


@pytest.fixture
def voc_root(tmp_path):
    return make_voc(tmp_path / "voc", {
        "train": {"a": (60, 80, [("dog", (1, 1, 40, 30), False), ("cat", (11, 21, 80, 60), True)]),
                  "b": (50, 50, [])},
        "val": {"c": (40, 70, [("cat", (5, 6, 25, 36), False)])},
    })


def read_voc_folder(root: Path):
    return read_annotations(root, [VOCSource(["train"]), VOCSource(["val"])])


def read_coco_folder(root: Path):
    return read_annotations(root, [COCOSource(f"annotations/instances_{s}.json", s) for s in ("train", "val")])


def read_yolo_folder(data_yaml: Path):
    return read_annotations(data_yaml.parent, [YOLOSource(str(data_yaml), s) for s in ("train", "val")])


def by_stem(result) -> dict[str, tuple]:
    """Every image of every split as ``stem -> (split, size, boxes, labels as names, difficult)``."""
    return {
        Path(r.path).stem: (split, (r.height, r.width), r.boxes, [result.classes[i] for i in r.labels], r.difficult)
        for split, records in enumerate(result.records) for r in records
    }


def assert_same_images(first, second, *, difficult: bool = True) -> None:
    a, b = by_stem(first), by_stem(second)
    assert a.keys() == b.keys()
    for stem in a:
        assert a[stem][:2] == b[stem][:2], stem
        np.testing.assert_allclose(a[stem][2], b[stem][2], atol=1e-3, err_msg=stem)
        assert a[stem][3] == b[stem][3], stem
        if difficult:
            assert a[stem][4].tolist() == b[stem][4].tolist(), stem


def test_voc_to_yolo_writes_normalised_centres_and_leaves_difficult_out(voc_root, tmp_path, capsys):
    out = tmp_path / "yolo"
    convert([str(voc_root), "--to", "yolo", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "train: 2 images, 2 objects" in printed and "left out 1 difficult objects" in printed
    assert f"data=yolo data.yaml={out / 'data.yaml'}" in printed
    content = yaml.safe_load((out / "data.yaml").read_text())
    assert content == {"path": str(out), "train": "images/train", "val": "images/val", "names": {0: "cat", 1: "dog"}}
    # VOC (1, 1, 40, 30) in an 80x60 image is [0, 40) x [0, 30): centre (20, 15) / (80, 60), size 40x30 / (80, 60)
    assert (out / "labels/train/a.txt").read_text() == "1 0.25 0.25 0.5 0.5\n"
    assert (out / "labels/train/b.txt").read_text() == ""  # an image without objects keeps an empty label file
    assert os.readlink(out / "images/train/a.jpg") == str(voc_root / "JPEGImages/a.jpg")
    result = read_yolo_folder(out / "data.yaml")
    np.testing.assert_allclose(result.records[1][0].boxes, [[4, 5, 25, 36]], atol=1e-4)


def test_keep_difficult_writes_them_as_ordinary_objects(voc_root, tmp_path):
    convert([str(voc_root), "--to", "yolo", "--out", str(tmp_path / "yolo"), "--keep-difficult"])
    # VOC (11, 21, 80, 60): [10, 80) x [20, 60), centre (45, 40), size 70x40
    assert (tmp_path / "yolo/labels/train/a.txt").read_text().splitlines()[1] == "0 0.5625 0.66666667 0.875 0.66666667"
    assert_same_images(read_voc_folder(voc_root), read_yolo_folder(tmp_path / "yolo/data.yaml"), difficult=False)


def test_voc_to_coco_writes_xywh_area_categories_and_crowd_for_difficult(voc_root, tmp_path):
    out = tmp_path / "coco"
    convert([str(voc_root), "--to", "coco", "--out", str(out), "--images", "copy"])
    content = json.loads((out / "annotations/instances_train.json").read_text())
    assert content["categories"] == [{"id": 1, "name": "cat", "supercategory": ""},
                                     {"id": 2, "name": "dog", "supercategory": ""}]
    assert content["images"] == [{"id": 1, "file_name": "a.jpg", "height": 60, "width": 80},
                                 {"id": 2, "file_name": "b.jpg", "height": 50, "width": 50}]
    assert content["annotations"] == [
        {"id": 1, "image_id": 1, "category_id": 2, "bbox": [0, 0, 40, 30], "area": 1200, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [10, 20, 70, 40], "area": 2800, "iscrowd": 1},
    ]
    copied = out / "train/a.jpg"
    assert not copied.is_symlink() and copied.read_bytes() == (voc_root / "JPEGImages/a.jpg").read_bytes()
    assert_same_images(read_voc_folder(voc_root), read_coco_folder(out))


def test_round_trip_through_every_format_keeps_boxes_classes_and_flags(voc_root, tmp_path):
    convert([str(voc_root), "--to", "coco", "--out", str(tmp_path / "coco")])
    convert([str(tmp_path / "coco"), "--to", "yolo", "--out", str(tmp_path / "yolo"), "--keep-difficult"])
    convert([str(tmp_path / "yolo/data.yaml"), "--to", "voc", "--out", str(tmp_path / "back")])
    back = read_voc_folder(tmp_path / "back")
    assert_same_images(read_voc_folder(voc_root), back, difficult=False)
    xml = ET.parse(tmp_path / "back/Annotations/a.xml").getroot()
    assert [int(xml.findtext(f"object/bndbox/{tag}")) for tag in ("xmin", "ymin", "xmax", "ymax")] == [1, 1, 40, 30]
    assert (xml.findtext("size/width"), xml.findtext("size/height")) == ("80", "60")
    assert (tmp_path / "back/ImageSets/Main/val.txt").read_text() == "c\n"


def test_fractional_yolo_boxes_survive_voc_and_coco(tmp_path):
    data_yaml = make_yolo(tmp_path / "yolo", {
        "train": {"a.jpg": (37, 53, ["0 0.123457 0.654321 0.111111 0.222222", "1 0.5 0.5 0.3 0.7"])},
        "val": {"b.jpg": (29, 31, ["1 0.4 0.6 0.2 0.2"])},
    }, ["cat", "dog"])
    convert([str(data_yaml), "--to", "voc", "--out", str(tmp_path / "voc")])
    convert([str(tmp_path / "voc"), "--to", "coco", "--out", str(tmp_path / "coco")])
    original = read_yolo_folder(data_yaml)
    assert_same_images(original, read_voc_folder(tmp_path / "voc"))
    assert_same_images(original, read_coco_folder(tmp_path / "coco"))


def test_images_with_the_same_name_get_distinct_ids(tmp_path):
    data_yaml = make_yolo(tmp_path / "yolo", {"train": {"x.jpg": (20, 20, ["0 0.5 0.5 0.5 0.5"])},
                                              "val": {"x.jpg": (30, 30, ["0 0.5 0.5 0.2 0.2"])}}, ["cat"])
    convert([str(data_yaml), "--to", "voc", "--out", str(tmp_path / "voc")])
    ids = {split: (tmp_path / f"voc/ImageSets/Main/{split}.txt").read_text().split() for split in ("train", "val")}
    assert ids == {"train": ["x"], "val": ["x_2"]}
    sizes = {Path(r.path).stem: r.height for records in read_voc_folder(tmp_path / "voc").records for r in records}
    assert sizes == {"x": 20, "x_2": 30}


def test_voc_and_yolo_configs_serve_identical_batches(voc_root, tmp_path):
    convert([str(voc_root), "--to", "yolo", "--out", str(tmp_path / "yolo"), "--keep-difficult"])
    common = ["data.loader.num_workers=0", "data.batch_size=2", "data.img_size=64",
              "data.sampler.min_steps_per_epoch=0"]
    voc = compose_config("train", "data=voc", f"data.root={voc_root}", "data.classes=null",
                         "data.train.splits=[train]", "data.val.splits=[val]", *common).data
    yolo = compose_config("train", "data=yolo", f"data.yaml={tmp_path / 'yolo/data.yaml'}", *common).data
    batches = []
    for config in (voc, yolo):
        datamodule = instantiate(config)
        datamodule.setup("validate")
        batches.append(next(iter(datamodule.val_dataloader())))
    torch.testing.assert_close(batches[0]["images"], batches[1]["images"])
    torch.testing.assert_close(batches[0]["labels"], batches[1]["labels"], atol=1e-3, rtol=0)
    for key in ("orig_size", "scale", "pad"):
        torch.testing.assert_close(batches[0]["meta"][key], batches[1]["meta"][key])


def test_refusals_are_one_clear_line(voc_root, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full/keep.txt").write_text("mine")
    for args, message in [
        ([str(voc_root), "--to", "yolo", "--out", str(tmp_path / "full")], "exists and is not empty"),
        ([str(tmp_path / "nothing"), "--to", "coco", "--out", str(tmp_path / "o")], "neither a YOLO data.yaml"),
        ([str(voc_root), "--to", "coco", "--out", str(tmp_path / "o"), "--train", "nosuch"], "nosuch.txt not found"),
    ]:
        with pytest.raises(SystemExit) as stop:
            convert(args)
        assert stop.value.code == 2 and message in capsys.readouterr().err
    assert (tmp_path / "full/keep.txt").read_text() == "mine" and not (tmp_path / "o").exists()


def test_help_is_short_and_names_the_formats():
    done = subprocess.run([sys.executable, "-m", "lightning_det.tools.convert", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "{voc,coco,yolo}" in done.stdout and len(done.stdout.splitlines()) <= 45


# --- BCCD: a real VOC folder, converted to YOLO and COCO, scored from one checkpoint ----------------------------
@pytest.mark.skipif(not BCCD.is_dir(), reason=f"the BCCD dataset is not at {BCCD} (../shared/datasets/bccd)")
def test_bccd_in_three_formats_gives_the_same_boxes_and_the_same_map(tmp_path, cfg_eval):
    from lightning_det.tools.evaluate import evaluate

    for target in ("yolo", "coco"):
        done = subprocess.run([sys.executable, "-m", "lightning_det.tools.convert", str(BCCD), "--to", target, "--out",
                               str(tmp_path / target)], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "val: 87 images, 1138 objects" in done.stdout
    voc = read_annotations(BCCD, [VOCSource([s]) for s in ("train", "val", "test")])
    splits = ("train", "val", "test")
    yolo = read_annotations(tmp_path, [YOLOSource(str(tmp_path / "yolo/data.yaml"), s) for s in splits])
    coco = read_annotations(tmp_path / "coco", [COCOSource(f"annotations/instances_{s}.json", s) for s in splits])
    assert sum(len(r.labels) for records in voc.records for r in records) == 4888
    assert_same_images(voc, yolo)
    assert_same_images(voc, coco)

    data = {
        "voc": ["data=voc", f"data.root={BCCD}", "data.classes=null", "data.train.splits=[train]",
                "data.val.splits=[val]"],
        "yolo": ["data=yolo", f"data.yaml={tmp_path / 'yolo/data.yaml'}"],
        "coco": ["data=coco", f"data.root={tmp_path / 'coco'}",
                 "data.train.annotation_file=annotations/instances_train.json", "data.train.image_dir=train",
                 "data.val.annotation_file=annotations/instances_val.json", "data.val.image_dir=val"],
    }
    trained = subprocess.run([
        sys.executable, "train.py", *data["yolo"], "model=yolov3_tiny", "model.width=0.25", "data.img_size=128",
        "data.batch_size=8", "data.loader.num_workers=0", "data.sampler.min_steps_per_epoch=0",
        "data.loader.persistent_workers=false",
        "trainer.max_epochs=2", "callbacks.progress_bar.refresh_rate=0", f"paths.log_dir={tmp_path / 'logs'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert trained.returncode == 0, trained.stderr[-5000:]
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    results = {name: evaluate(cfg_eval(f"ckpt_path={checkpoint}", *overrides, "data.loader.num_workers=0", run=name))
               for name, overrides in data.items()}
    assert results["voc"]["voc"]["mAP"] > 0.01  # the comparison is between real, non-zero scores (0.036 measured)
    for name in ("yolo", "coco"):
        for metric in ("voc07", "voc", "coco"):
            for key in ("mAP", "AP_per_class"):
                torch.testing.assert_close(results[name][metric][key], results["voc"][metric][key], atol=1e-4,
                                           rtol=0, msg=f"{name} {metric} {key}")
