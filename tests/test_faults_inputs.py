"""Bad inputs are refused early, with one message that names the setting or the file and the fix: config values
of the wrong type or outside their range (a val_split that leaves nothing to train on too), checkpoint and weight
files that are broken or of another network or of other classes, images that cannot be read (or are skipped and
counted); and the inputs that look odd but work (a path with spaces, a 16-bit PNG, EXIF rotation, max_epochs=0).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_voc, tiny_checkpoint, write_image
from hydra.utils import instantiate
from runs import quick_run

from lightning_det.data import read_voc
from lightning_det.tools.train import build

# ===================================================================================================================
# Config values
# ===================================================================================================================

@pytest.mark.parametrize("override, message", [
    ("data.reading.skip_invalid=flase", "data.reading.skip_invalid='flase' must be true/false"),
    ("model.loss.box_loss=iou", "model.loss.box_loss='iou' is not one of ['giou', 'xywh']"),
    ("model.variant=big", "model.variant='big' is not one of ['tiny', 'tiny3', 'yolov3']"),
    ("optimizer.lr=fast", "optimizer.lr='fast' must be a number"),
    ("data.batch_size=2.5", "data.batch_size=2.5 must be an integer"),
    ("optimizer._target_=torch.optim.SGDD", "optimizer._target_='torch.optim.SGDD' cannot be imported"),
    ("init_partial=maybe", "init_partial='maybe' must be true/false"),
    ("data.reading.check_images=full", "data.reading.check_images='full' is not one of ['header', 'decode']"),
])
def test_a_mistyped_config_value_is_refused_with_its_key_and_choices(cfg_train, override, message):
    from lightning_det.checks.config import ConfigValueError
    from lightning_det.checks.run import check_run

    check_run(cfg_train())  # the defaults pass
    with pytest.raises(ConfigValueError) as error:
        check_run(cfg_train(override))
    assert message in str(error.value)


@pytest.mark.parametrize("overrides, message", [
    (["data.batch_size=0"], "data.batch_size=0 must be >= 1 (images per batch on each device)"),
    (["optimizer.lr=-1"], "optimizer.lr=-1 must be >= 0"),
    (["data.img_size=100"], "data.img_size=100 must be a positive multiple of 32 for YOLOv3 (its coarsest stride), "
                            "e.g. 96 or 128, or auto"),
    (["model=ssdlite", "data.img_size=0"], "data.img_size=0 must be >= 1 (pixels), or auto"),
    (["trainer.max_epochs=-2"], "trainer.max_epochs=-2 must be >= 1, 0 to validate the model as built without "
                                "training, or -1 for no limit"),
])
def test_a_config_value_outside_its_range_is_refused_naming_the_key_and_the_range(cfg_train, overrides, message):
    from lightning_det.checks.config import ConfigValueError
    from lightning_det.checks.run import check_run

    with pytest.raises(ConfigValueError) as error:
        check_run(cfg_train(*overrides))
    assert str(error.value) == message


@pytest.mark.parametrize("overrides", [["data.img_size=96"], ["optimizer.lr=0"], ["trainer.max_epochs=-1"],
                                       ["model=ssdlite", "data.img_size=100"]])
def test_values_inside_their_range_pass(cfg_train, overrides):
    """SSD builds its default boxes on the feature maps an input gives, so it takes any size; YOLO needs 32."""
    from lightning_det.checks.run import check_run

    check_run(cfg_train(*overrides))


def test_a_val_split_leaving_no_training_image_names_the_share_and_the_count(tmp_path):
    from lightning_det.data import DetectionDataModule, VOCSource

    images = {f"{k:03d}": (64, 64, [("cat", (8, 8, 40, 40), False)]) for k in range(16)}
    make_voc(tmp_path, {"train": images})

    def held_out(share: float) -> DetectionDataModule:
        data = DetectionDataModule(tmp_path, VOCSource(["train"]), val_split=share, img_size=64)
        data.setup("fit")
        return data

    with pytest.raises(ValueError) as error:  # today: "the train split has no images ...; check data.root"
        held_out(0.99)
    assert str(error.value) == (
        "data.val_split=0.99 holds out 16 of the 16 training images, leaving none to train on: it must hold out at "
        "most 15 (e.g. data.val_split=0.1), or set data.val to a separate validation source")
    assert [len(held_out(0.9).records[role]) for role in ("train", "val")] == [2, 14]


def test_max_epochs_0_validates_the_model_as_built_and_says_so(tmp_path):
    done = quick_run(tmp_path, "trainer.max_epochs=0", f"hydra.run.dir={tmp_path / 'run'}")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert re.search(r"trainer\.max_epochs=0: nothing trained; val/mAP of the model as built, with its initial "
                     r"weights: \d\.\d{4}", output), output[-3000:]
    assert "epoch -1" not in output
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final["epoch"] is None and final["checkpoint"] == ""


# ===================================================================================================================
# Checkpoint and weight files
# ===================================================================================================================

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
def test_a_broken_checkpoint_is_refused_by_every_entry_point_naming_the_file(tmp_path, cfg_train, kind):
    from lightning_det.checks.run import CheckpointError, check_run
    from lightning_det.tools.inference import load_detector
    from lightning_det.tools.train import run

    path, message = broken_files(tmp_path)[kind]
    expected = re.escape(f"ckpt_path={path} {message}")
    with pytest.raises(CheckpointError, match=expected):
        check_run(cfg_train(f"ckpt_path={path}"))
    with pytest.raises(CheckpointError, match=expected):  # evaluate, predict and export load through this
        load_detector(path)
    # train.run refuses it before reading data: the data root does not even exist
    with pytest.raises(CheckpointError, match=expected):
        run(cfg_train(f"ckpt_path={path}", f"data.root={tmp_path / 'no data here'}"))
    if kind == "text":  # init_from also reads Darknet files, so it says it is neither
        message = "bytes) is neither a PyTorch checkpoint nor a Darknet .weights file"
    with pytest.raises(ValueError, match=re.escape(f"init_from={path} ") + ".*" + re.escape(message)):
        check_run(cfg_train(f"init_from={path}"))


def test_a_checkpoint_of_another_network_is_described_against_the_run(tmp_path, cfg_train):
    from lightning_det.checks.run import CheckpointError, check_run

    path = tiny_checkpoint(tmp_path / "w05.ckpt", width=0.5, num_classes=2)
    check_run(cfg_train(f"ckpt_path={path}", "model.width=0.5", "data.classes=[cat,dog]"))
    with pytest.raises(CheckpointError) as error:
        check_run(cfg_train(f"ckpt_path={path}", "model.width=0.25", "data.classes=[cat,dog]"))
    assert ("this checkpoint is a YOLOv3 (variant tiny, width 0.5, depth 1.0) for 2 classes; the run builds "
            "width 0.25") in str(error.value)
    with pytest.raises(CheckpointError, match="the run builds a FasterRCNN"):
        check_run(cfg_train(f"ckpt_path={path}", "model=faster_rcnn_mobilenet"))
    with pytest.raises(CheckpointError, match=r"3 classes \['a', 'b', 'c'\] \(the checkpoint's: 2\)"):
        check_run(cfg_train(f"ckpt_path={path}", "model.width=0.5", "data.classes=[a,b,c]"))
    with pytest.raises(CheckpointError, match="set init_partial=true"):
        check_run(cfg_train(f"init_from={path}", "model=yolov3"))
    check_run(cfg_train(f"init_from={path}", "model=yolov3", "init_partial=true"))


@pytest.mark.parametrize("content, message", [
    (b"", "is empty (0 bytes), not a checkpoint"),
    (b"\x00" * 8, "is too short for a Darknet .weights file"),
    (b"<html>not found</html>", "is neither a PyTorch checkpoint nor a Darknet .weights file"),
    (np.array([0, 2, 0], np.int32).tobytes() + b"\x00" * 10, "is not a whole Darknet .weights file"),
])
def test_an_empty_or_tiny_darknet_file_is_refused_naming_it(tmp_path, cfg_train, content, message):
    from lightning_det.checks.run import check_run

    path = tmp_path / "yolov3.weights"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"init_from={path} ") + ".*" + re.escape(message)):
        check_run(cfg_train(f"init_from={path}"))


def test_init_from_that_fills_a_small_share_is_an_error_unless_allowed(tmp_path):
    from lightning_det.models.weights import initialise_from
    from lightning_det.models.yolov3 import YOLOv3

    path = tiny_checkpoint(tmp_path / "tiny.ckpt", width=0.5)
    other = YOLOv3(variant="tiny", width=0.25, num_classes=2)  # same names, other widths: only a few tensors fit
    with pytest.raises(ValueError, match=r"filled only \d+% of the model's values .* set init_partial=true"):
        initialise_from(other, path)
    initialise_from(other, path, partial=True)
    initialise_from(YOLOv3(variant="tiny", width=0.5, num_classes=5), path)  # only the head differs: accepted


#: The network ``checkpoint_of`` saves, built in a moment on ``tiny_voc`` (no loader workers, no image logging).
TINY_BUILD = ["model=yolov3_tiny", "model.width=0.25", "data.img_size=64", "data.loader.num_workers=0",
              "data.loader.persistent_workers=false", "logger=csv", "~callbacks.image_logger"]


def checkpoint_of(path: Path, classes: list[str]) -> Path:
    """What train.py saves for a run on ``classes``: weights, hyper-parameters (class names too), detector class."""
    from lightning_det.models.yolov3 import YOLOv3

    model = YOLOv3(variant="tiny", width=0.25, num_classes=len(classes), class_names=classes)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "epoch": 0,
                "detector_class": "lightning_det.models.yolov3.module.YOLOv3"}, path)
    return path


def test_a_resume_on_data_of_other_classes_is_refused_before_the_model_is_built(tmp_path, tiny_voc, cfg_train):
    from lightning_det.checks.run import CheckpointError

    root, voc = tiny_voc  # cat and dog
    data = [*voc, *TINY_BUILD]
    three = checkpoint_of(tmp_path / "three.ckpt", ["bird", "cat", "dog"])
    with pytest.raises(CheckpointError) as error:  # today: a page of size mismatches, after the data is read
        build(cfg_train(*data, f"ckpt_path={three}"))
    assert str(error.value) == (
        f"ckpt_path={three} was trained on 3 classes [bird, cat, dog], but the data (data.root={root}) "
        f"has 2 classes [cat, dog]: only in the checkpoint: [bird]. A resume continues the same training on the "
        f"same classes: give it the data it was trained on, or fine-tune it on these classes as a new training "
        f"with init_from={three} (init_classes=by_name carries over the rows of the classes both have)")

    vehicles = checkpoint_of(tmp_path / "vehicles.ckpt", ["bus", "car"])  # the same count: today, silent
    with pytest.raises(CheckpointError, match=re.escape("only in the checkpoint: [bus, car]; only in the data: "
                                                        "[cat, dog]. A resume continues")):
        build(cfg_train(*data, f"ckpt_path={vehicles}"))
    swapped = checkpoint_of(tmp_path / "swapped.ckpt", ["dog", "cat"])
    with pytest.raises(CheckpointError, match="the same names in another order"):
        build(cfg_train(*data, f"ckpt_path={swapped}"))

    own = checkpoint_of(tmp_path / "own.ckpt", ["cat", "dog"])
    _, model, _ = build(cfg_train(*data, f"ckpt_path={own}"))
    assert model.class_names == ["cat", "dog"]


# ===================================================================================================================
# Images and paths
# ===================================================================================================================

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
    # ids with spaces work; a JPEG cut short is decoded as far as it goes, not skipped (issue 20)
    assert sorted(Path(r.path).name for r in records) == ["good 1.jpg", "good 2.jpg", "truncated.jpg"]
    assert "skipped 2 images" in caplog.text and "1 image was cut short and decoded as far as it goes" in caplog.text
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
    from lightning_det.tools.predict import predict

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


def test_a_data_root_with_spaces_and_accents_works_with_the_readme_quoting(tmp_path, image_cache, cfg_train):
    root = tmp_path / "my datasets" / "vélos"
    image = (48, 64, [("cat", (5, 5, 30, 30), False)])
    make_voc(root, {"2007/trainval": {"a b": image}, "2012/trainval": {"c": image}, "2007/test": {"d e": image}})
    cfg = cfg_train("data=voc", f'data.root="{root}"', "data.classes=[cat]", "data.loader.num_workers=0")
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    assert [Path(r.path).name for r in datamodule.records["val"]] == ["d e.jpg"]
    assert len(datamodule.records["train"]) == 2
