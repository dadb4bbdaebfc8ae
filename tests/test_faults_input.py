"""Fault injection for inputs and metrics (issue 10): bad checkpoints, images and config values are refused
early with one message naming the file or key; the metrics agree with the VOC devkit and pycocotools.

Moves into ``tests/test_faults.py`` (sections "Refused early" and "Exact metrics") once that module exists.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_voc, write_image
from hydra.utils import instantiate
from omegaconf import OmegaConf
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from lightning_det.data import read_coco, read_voc
from lightning_det.evaluate import record_targets, write_voc_results
from lightning_det.metrics import COCOMeanAP, VOCMeanAP

CONF = Path(__file__).resolve().parents[1] / "conf"


# --- Exact metrics ---------------------------------------------------------------------------------------------

def devkit_voc07_ap(annotations: Path, result_files: Path, classes: list[str], image_ids: list[str]) -> list[float]:
    """The VOC07 devkit's rules (VOCevaldet.m), written out here as the independent reference: ground truth from
    the XML as the integer pixels it holds, detections from the comp4 files, widths ``x2 - x1 + 1``, a detection
    matches the best-overlapping box of its image at overlap >= 0.5, difficult boxes are ignored, 11-point AP."""
    import xml.etree.ElementTree as ET

    truth: dict[str, dict[str, list]] = {c: defaultdict(list) for c in classes}
    for image_id in image_ids:
        for node in ET.parse(annotations / f"{image_id}.xml").getroot().iter("object"):
            box = [float(node.find("bndbox").find(tag).text) for tag in ("xmin", "ymin", "xmax", "ymax")]
            truth[node.find("name").text][image_id].append((box, node.find("difficult").text == "1"))
    aps = []
    for name in classes:
        positives = sum(not hard for boxes in truth[name].values() for _, hard in boxes)
        rows = [line.split() for line in (result_files / f"comp4_det_test_{name}.txt").read_text().splitlines()]
        rows.sort(key=lambda row: -float(row[1]))  # stable, as MATLAB's sort
        taken: set[tuple[str, int]] = set()
        tp, fp = [], []
        for image_id, _, *coords in rows:
            bb = [float(v) for v in coords]
            best, best_index = -math.inf, -1
            for index, (gt, _) in enumerate(truth[name].get(image_id, [])):
                iw = min(bb[2], gt[2]) - max(bb[0], gt[0]) + 1
                ih = min(bb[3], gt[3]) - max(bb[1], gt[1]) + 1
                if iw > 0 and ih > 0:
                    union = (bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1) + (gt[2] - gt[0] + 1) * (gt[3] - gt[1] + 1)
                    overlap = iw * ih / (union - iw * ih)
                    if overlap > best:
                        best, best_index = overlap, index
            if best >= 0.5:
                if truth[name][image_id][best_index][1]:
                    continue
                if (image_id, best_index) in taken:
                    tp.append(0), fp.append(1)
                else:
                    taken.add((image_id, best_index))
                    tp.append(1), fp.append(0)
            else:
                tp.append(0), fp.append(1)
        tp_sum, fp_sum = np.cumsum(tp), np.cumsum(fp)
        recall = tp_sum / positives
        precision = tp_sum / np.maximum(tp_sum + fp_sum, 1e-12)
        aps.append(sum(
            (precision[recall >= t].max() if (recall >= t).any() else 0.0) / 11 for t in np.arange(0, 1.1, 0.1)
        ))
    return aps


def voc_scene(root: Path, seed: int = 0) -> tuple[list[str], dict[str, tuple]]:
    """30 images, 3 classes, some difficult boxes; integer devkit pixels."""
    rng = np.random.default_rng(seed)
    classes = ["cat", "dog", "person"]
    images = {}
    for k in range(30):
        objects = []
        for _ in range(rng.integers(1, 5)):
            xmin, ymin = (int(v) for v in rng.integers(1, 120, 2))
            w, h = (int(v) for v in rng.integers(4, 40, 2))
            objects.append((str(rng.choice(classes)), (xmin, ymin, xmin + w - 1, ymin + h - 1), rng.random() < 0.1))
        images[f"img_{k:03d}"] = (180, 180, objects)
    make_voc(root, {"2007/test": images})
    return classes, images


def jittered_detections(records, num_classes: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Boxes near the ground truth (many near IoU 0.5, where one pixel decides) plus strays, on a 0.1 px grid and
    with 6-decimal distinct scores, so the comp4 text files hold them exactly."""
    rng = np.random.default_rng(seed)
    scores = iter(rng.permutation(10**6)[:10_000] / 10**6)
    detections = []
    for record in records:
        boxes = [record.boxes[i] + rng.normal(0, 3.0, 4) for i in range(len(record.boxes)) for _ in range(2)]
        labels = [int(record.labels[i]) for i in range(len(record.boxes)) for _ in range(2)]
        stray = rng.uniform(0, 140, 2)
        boxes.append(np.concatenate([stray, stray + 20]))
        labels.append(int(rng.integers(num_classes)))
        boxes = np.round(np.clip(np.stack(boxes), 0, 179), 1)
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        detections.append({"boxes": torch.tensor(boxes, dtype=torch.float64),
                           "scores": torch.tensor([next(scores) for _ in labels], dtype=torch.float64),
                           "labels": torch.tensor(labels)})
    return detections


def test_voc07_metric_matches_the_devkit_rules_on_comp4_files(tmp_path):
    classes, images = voc_scene(tmp_path)
    records = read_voc(tmp_path, ["2007/test"], classes).records[0]
    detections = jittered_detections(records, len(classes), seed=1)
    write_voc_results(tmp_path / "results", classes, list(images), detections)
    expected = devkit_voc07_ap(tmp_path / "VOC2007" / "Annotations", tmp_path / "results", classes, list(images))

    metric = instantiate(OmegaConf.load(CONF / "metric" / "voc07.yaml"))(num_classes=len(classes))
    metric.update(detections, record_targets(records))
    assert metric.compute()["AP_per_class"].tolist() == pytest.approx(expected, abs=1e-6)
    twice = VOCMeanAP(len(classes), use_07_metric=True, plus_one=True)  # the old setting: a pixel counted twice
    twice.update(detections, record_targets(records))
    assert twice.compute()["AP_per_class"].tolist() != pytest.approx(expected, abs=1e-3)


def coco_with_mask_areas(root: Path) -> tuple[Path, Path]:
    """A json whose ``area`` (as for masks) is about half of w*h, moving objects between the small / medium /
    large ranges; some annotations have no ``area``. Returns it and the same json with w*h filled in there, the
    input pycocotools needs."""
    rng = np.random.default_rng(3)
    images, annotations = [], []
    for k in range(12):
        images.append({"id": k + 1, "file_name": f"image {k}.png", "height": 300, "width": 300})
        write_image(root / "images" / f"image {k}.png", 300, 300, seed=k)
        for _ in range(4):
            side = float(rng.choice([28, 40, 60, 90, 120, 150]))
            x, y = (float(v) for v in rng.uniform(0, 300 - side, 2))
            annotation = {"id": len(annotations) + 1, "image_id": k + 1, "category_id": int(rng.integers(1, 3)),
                          "bbox": [x, y, side, side * 0.9], "iscrowd": 0}
            if len(annotations) % 5:
                annotation["area"] = round(side * side * 0.9 * rng.uniform(0.4, 0.7), 1)
            annotations.append(annotation)
    categories = [{"id": 1, "name": "cell"}, {"id": 2, "name": "platelet"}]
    ours = root / "annotations.json"
    ours.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    filled = [{**a, "area": a.get("area", a["bbox"][2] * a["bbox"][3])} for a in annotations]
    reference = root / "reference.json"
    reference.write_text(json.dumps({"images": images, "annotations": filled, "categories": categories}))
    return ours, reference


def test_coco_area_ranges_use_the_annotation_area_like_pycocotools(tmp_path):
    ours, reference = coco_with_mask_areas(tmp_path)
    result = read_coco(tmp_path, ours.name, "images")
    records = result.records[0]
    detections = jittered_detections(records, 2, seed=4)
    metric = COCOMeanAP(2)
    metric.update(detections, record_targets(records))
    values = metric.compute()

    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(reference))
        found = truth.loadRes([
            {"image_id": record.image_id, "category_id": result.label_to_category_id[label], "score": score,
             "bbox": [x1, y1, x2 - x1, y2 - y1]}
            for record, det in zip(records, detections)
            for (x1, y1, x2, y2), score, label in zip(det["boxes"].tolist(), det["scores"].tolist(),
                                                      det["labels"].tolist())
        ])
        evaluation = COCOeval(truth, found, "bbox")
        evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
    expected = dict(zip(("mAP", "AP50", "AP75", "APs", "APm", "APl"), evaluation.stats[:6]))
    for key, value in expected.items():
        assert values[key].item() == pytest.approx(value, abs=1e-6), key

    by_box = COCOMeanAP(2)  # without the area: w*h bins the objects differently here
    by_box.update(detections, [{k: v for k, v in t.items() if k != "area"} for t in record_targets(records)])
    assert any(abs(by_box.compute()[k].item() - expected[k]) > 1e-3 for k in ("APs", "APm", "APl"))


# --- Refused early ---------------------------------------------------------------------------------------------

def compose_train(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("override, message", [
    ("data.skip_invalid=flase", "data.skip_invalid='flase' must be true/false"),
    ("model.box_loss=iou", "model.box_loss='iou' is not one of ['giou', 'xywh']"),
    ("model.variant=big", "model.variant='big' is not one of ['tiny', 'yolov3']"),
    ("optimizer.lr=fast", "optimizer.lr='fast' must be a number"),
    ("data.batch_size=2.5", "data.batch_size=2.5 must be an integer"),
    ("optimizer._target_=torch.optim.SGDD", "optimizer._target_='torch.optim.SGDD' cannot be imported"),
    ("init_partial=maybe", "init_partial='maybe' must be true/false"),
    ("data.check_images=full", "data.check_images='full' is not one of ['header', 'decode']"),
])
def test_a_mistyped_config_value_is_refused_with_its_key_and_choices(override, message):
    from lightning_det.checks import check_run
    from lightning_det.config_checks import ConfigValueError

    check_run(compose_train())  # the defaults pass
    with pytest.raises(ConfigValueError) as error:
        check_run(compose_train(override))
    assert message in str(error.value)


def tiny_checkpoint(path: Path, width: float = 0.5, num_classes: int = 2) -> Path:
    """A checkpoint as train.py writes it (weights, hyper-parameters, detector class, pipeline)."""
    from lightning_det.models.yolov3 import YOLOv3

    model = YOLOv3(variant="tiny", width=width, num_classes=num_classes)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "detector_class": "lightning_det.models.yolov3.module.YOLOv3",
                "inference_pipeline": {"_target_": "lightning_det.data.transforms.LetterboxTransform",
                                       "img_size": 64}}, path)
    return path


def broken_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Each kind of bad checkpoint file, with what its message must say."""
    good = tiny_checkpoint(tmp_path / "good.ckpt").read_bytes()
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "notes.ckpt").write_text("epoch 3 was the best\n")
    (tmp_path / "truncated.ckpt").write_bytes(good[: len(good) // 2])
    return {
        "empty": (tmp_path / "empty.ckpt", "is empty (0 bytes), not a checkpoint"),
        "text": (tmp_path / "notes.ckpt", "is not a PyTorch checkpoint"),
        "truncated": (tmp_path / "truncated.ckpt", "is truncated or damaged"),
    }


@pytest.mark.parametrize("kind", ["empty", "text", "truncated"])
def test_a_broken_checkpoint_is_refused_by_every_entry_point_naming_the_file(tmp_path, kind):
    from lightning_det.checks import CheckpointError, check_run
    from lightning_det.inference import load_detector
    from lightning_det.train import run

    path, message = broken_files(tmp_path)[kind]
    expected = re.escape(f"ckpt_path={path} {message}")
    with pytest.raises(CheckpointError, match=expected):
        check_run(compose_train(f"ckpt_path={path}"))
    with pytest.raises(CheckpointError, match=expected):  # evaluate, predict and export load through this
        load_detector(path)
    # train.run refuses it before reading data: the data root does not even exist
    with pytest.raises(CheckpointError, match=expected):
        run(compose_train(f"ckpt_path={path}", f"data.root={tmp_path / 'no data here'}"))
    if kind == "text":  # init_from also reads Darknet files, so it says it is neither
        message = "bytes) is neither a PyTorch checkpoint nor a Darknet .weights file"
    with pytest.raises(ValueError, match=re.escape(f"init_from={path} ") + ".*" + re.escape(message)):
        check_run(compose_train(f"init_from={path}"))


def test_a_checkpoint_of_another_network_is_described_against_the_run(tmp_path):
    from lightning_det.checks import CheckpointError, check_run

    path = tiny_checkpoint(tmp_path / "w05.ckpt", width=0.5, num_classes=2)
    check_run(compose_train(f"ckpt_path={path}", "model.width=0.5", "data.classes=[cat,dog]"))
    with pytest.raises(CheckpointError) as error:
        check_run(compose_train(f"ckpt_path={path}", "model.width=0.25", "data.classes=[cat,dog]"))
    assert ("this checkpoint is a YOLOv3 (variant tiny, width 0.5, depth 1.0) for 2 classes; the run builds "
            "width 0.25") in str(error.value)
    with pytest.raises(CheckpointError, match="the run builds a FasterRCNN"):
        check_run(compose_train(f"ckpt_path={path}", "model=faster_rcnn_mobilenet"))
    with pytest.raises(CheckpointError, match=r"3 classes \['a', 'b', 'c'\] \(the checkpoint's: 2\)"):
        check_run(compose_train(f"ckpt_path={path}", "model.width=0.5", "data.classes=[a,b,c]"))
    with pytest.raises(CheckpointError, match="set init_partial=true"):
        check_run(compose_train(f"init_from={path}", "model=yolov3"))
    check_run(compose_train(f"init_from={path}", "model=yolov3", "init_partial=true"))


@pytest.mark.parametrize("content, message", [
    (b"", "is empty (0 bytes), not a checkpoint"),
    (b"\x00" * 8, "is too short for a Darknet .weights file"),
    (b"<html>not found</html>", "is neither a PyTorch checkpoint nor a Darknet .weights file"),
    (np.array([0, 2, 0], np.int32).tobytes() + b"\x00" * 10, "is not a whole Darknet .weights file"),
])
def test_an_empty_or_tiny_darknet_file_is_refused_naming_it(tmp_path, content, message):
    from lightning_det.checks import check_run

    path = tmp_path / "yolov3.weights"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"init_from={path} ") + ".*" + re.escape(message)):
        check_run(compose_train(f"init_from={path}"))


def test_init_from_that_fills_a_small_share_is_an_error_unless_allowed(tmp_path):
    from lightning_det.models.weights import initialise_from
    from lightning_det.models.yolov3 import YOLOv3

    path = tiny_checkpoint(tmp_path / "tiny.ckpt", width=0.5)
    other = YOLOv3(variant="tiny", width=0.25, num_classes=2)  # same names, other widths: only a few tensors fit
    with pytest.raises(ValueError, match=r"filled only \d+% of the model's values .* set init_partial=true"):
        initialise_from(other, path)
    initialise_from(other, path, partial=True)
    initialise_from(YOLOv3(variant="tiny", width=0.5, num_classes=5), path)  # only the head differs: accepted


@pytest.fixture
def image_cache(tmp_path, monkeypatch) -> Path:
    """The checked-images cache of these tests lives in their temp dir."""
    monkeypatch.setenv("LIGHTNING_DET_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def voc_with_bad_images(root: Path) -> dict[str, Path]:
    """Five listed images: two good, a text file named .jpg, a truncated JPEG, one smaller than its XML says."""
    images = {f"{name}": (48, 64, [("cat", (5, 5, 30, 30), False)])
              for name in ("good 1", "good 2", "text", "truncated", "small")}
    make_voc(root, {"2007/train": images})
    folder = root / "VOC2007" / "JPEGImages"
    (folder / "text.jpg").write_text("not an image\n")
    data = (folder / "truncated.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    write_image(folder / "small.jpg", 40, 64)
    return {name: folder / f"{name}.jpg" for name in images}


def test_bad_images_stop_the_read_naming_the_file_or_are_skipped_and_counted(tmp_path, image_cache, caplog):
    from lightning_det.data.records import InvalidAnnotationError

    files = voc_with_bad_images(tmp_path)
    with pytest.raises(InvalidAnnotationError, match=re.escape(f"image {files['text']} is not a readable image")):
        read_voc(tmp_path, ["2007/train"], ["cat"])
    records = read_voc(tmp_path, ["2007/train"], ["cat"], skip_invalid=True).records[0]
    assert sorted(Path(r.path).name for r in records) == ["good 1.jpg", "good 2.jpg"]  # ids with spaces work
    assert "skipped 3 images" in caplog.text
    assert f"image {files['truncated']} is truncated: the JPEG file ends without its end marker" in caplog.text
    assert f"image {files['small']} is 64x40 pixels but its annotation says 64x48" in caplog.text


def test_a_corrupt_image_with_a_valid_header_is_caught_by_the_decode_check(tmp_path, image_cache):
    from lightning_det.data.records import InvalidAnnotationError, read_annotations
    from lightning_det.data.voc import VOCSource

    make_voc(tmp_path, {"2007/train": {"a": (48, 64, [("cat", (5, 5, 30, 30), False)])}})
    path = tmp_path / "VOC2007" / "JPEGImages" / "a.jpg"
    data = path.read_bytes()
    scan = data.index(b"\xff\xda") + 40
    path.write_bytes(data[:scan] + b"\xff\xc0\x00\x11" + data[scan + 4:])  # a second frame header in the data
    source = [VOCSource(["2007/train"])]
    assert len(read_annotations(tmp_path, source, ["cat"]).records[0]) == 1  # its header is fine
    with pytest.raises(InvalidAnnotationError, match=re.escape(f"image {path} cannot be decoded")):
        read_annotations(tmp_path, source, ["cat"], check_level="decode")


def test_checked_images_are_cached_and_a_changed_file_is_checked_again(tmp_path, image_cache, monkeypatch):
    import lightning_det.data.records as records_module

    make_voc(tmp_path, {"2007/train": {f"{k}": (48, 64, []) for k in range(4)}})
    checked = []
    real = records_module.image_problem
    monkeypatch.setattr(records_module, "image_problem", lambda path, *a: checked.append(path) or real(path, *a))
    read_voc(tmp_path, ["2007/train"], ["cat"])
    assert len(checked) == 4
    read_voc(tmp_path, ["2007/train"], ["cat"])
    assert len(checked) == 4  # the second read checked nothing again
    write_image(tmp_path / "VOC2007" / "JPEGImages" / "2.jpg", 48, 64, seed=9)
    read_voc(tmp_path, ["2007/train"], ["cat"])
    assert checked[4:] == [str(tmp_path / "VOC2007" / "JPEGImages" / "2.jpg")]


def test_a_16_bit_png_is_scaled_to_8_bits(tmp_path):
    from PIL import Image

    from lightning_det.data.image_checks import decode_rgb

    values = np.array([[0, 257, 32896, 65535], [128, 383, 65278, 65400]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    pixels = decode_rgb(tmp_path / "deep.png")
    expected = np.round(values.astype(np.float64) * 255 / 65535)  # 0, 1, 128, 255 / 0, 1, 254, 254
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 2, 4)
    assert (pixels.numpy() == expected[None]).all()


def test_exif_orientation_is_ignored_by_default_and_applied_on_request(tmp_path, image_cache):
    from PIL import Image

    from lightning_det.data.records import InvalidAnnotationError, load_image, read_annotations
    from lightning_det.data.voc import VOCSource

    make_voc(tmp_path, {"2007/train": {"a": (40, 60, [("cat", (5, 5, 30, 20), False)])}})
    path = tmp_path / "VOC2007" / "JPEGImages" / "a.jpg"
    exif = Image.Exif()
    exif[274] = 6  # stored 60 wide, 40 high; shown rotated by 90 degrees
    Image.open(path).save(path, exif=exif)
    stored = read_voc(tmp_path, ["2007/train"], ["cat"]).records[0][0]
    assert load_image(stored).shape == (3, 40, 60)
    with pytest.raises(InvalidAnnotationError, match="is 40x60 pixels but its annotation says 60x40"):
        read_annotations(tmp_path, [VOCSource(["2007/train"])], ["cat"], exif_orientation=True)


def test_predict_on_a_folder_names_each_bad_image_and_finishes_the_others(tmp_path, caplog):
    from lightning_det.predict import predict

    checkpoint = tiny_checkpoint(tmp_path / "model.ckpt")
    folder = tmp_path / "photos"
    write_image(folder / "first.jpg", 50, 70)
    write_image(folder / "second photo.png", 64, 64)
    (folder / "notes.jpg").write_text("hello")
    (folder / "cut.png").write_bytes((folder / "second photo.png").read_bytes()[:200])
    paths = sorted(folder.iterdir())
    results = predict(str(checkpoint), paths, score_thresh=0.0, batch_size=2, device="cpu")
    assert sorted(Path(p).name for p in results) == ["first.jpg", "second photo.png"]
    assert f"skipped {folder / 'notes.jpg'}" in caplog.text and f"skipped {folder / 'cut.png'}" in caplog.text
    assert "skipped 2 of 4 images" in caplog.text


def test_a_data_root_with_spaces_and_accents_works_with_the_readme_quoting(tmp_path, image_cache):
    root = tmp_path / "my datasets" / "vélos"
    image = (48, 64, [("cat", (5, 5, 30, 30), False)])
    make_voc(root, {"2007/trainval": {"a b": image}, "2012/trainval": {"c": image}, "2007/test": {"d e": image}})
    cfg = compose_train("data=voc", f'data.root="{root}"', "data.classes=[cat]", "data.num_workers=0")
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    assert [Path(r.path).name for r in datamodule.records["val"]] == ["d e.jpg"]
    assert len(datamodule.records["train"]) == 2
