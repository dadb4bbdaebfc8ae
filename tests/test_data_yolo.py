"""The Ultralytics / YOLO-format reader: data.yaml, the label-path rule, normalised boxes, and bad input."""

import logging
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import make_yolo, write_image
from hydra.utils import instantiate
from runs import compose_config

from lightning_det.data import InvalidAnnotationError, LoaderOptions, YOLOSource, read_annotations
from lightning_det.data.yolo_format import label_path

CONF = Path(__file__).resolve().parents[1] / "conf"
NAMES = {1: "dog", 0: "cat"}  # an {id: name} map, not written in id order


def read(data_yaml: Path, split: str = "train", skip_invalid: bool = False):
    return read_annotations(data_yaml.parent, [YOLOSource(str(data_yaml), split)], skip_invalid=skip_invalid)


def test_normalised_centre_boxes_become_pixel_corners(tmp_path):
    # 80 px wide, 40 high: cx 0.25 -> 20 px, w 0.25 -> 20 px; cy 0.5 -> 20 px, h 0.5 -> 20 px
    data_yaml = make_yolo(tmp_path, {"train": {"a.jpg": (40, 80, ["1 0.25 0.5 0.25 0.5", "0 0.9 0.1 0.2 0.2"])}},
                          NAMES)
    result = read(data_yaml)
    assert result.classes == ["cat", "dog"] and result.label_to_category_id is None
    (record,) = result.records[0]
    assert record.path == str(tmp_path / "images/train/a.jpg") and (record.height, record.width) == (40, 80)
    np.testing.assert_allclose(record.boxes, [[10, 10, 30, 30], [64, 0, 80, 8]], atol=1e-4)
    assert record.labels.tolist() == [1, 0] and not record.difficult.any()


def test_names_as_a_list_give_the_label_order(tmp_path):
    data_yaml = make_yolo(tmp_path, {"train": {"a.jpg": (40, 80, ["1 0.5 0.5 0.5 0.5"])}}, ["zebra", "ant"])
    result = read(data_yaml)
    assert result.classes == ["zebra", "ant"] and result.records[0][0].labels.tolist() == [1]


def test_label_path_replaces_the_last_images_folder():
    assert label_path("/d/images/train/a.b.jpg") == "/d/labels/train/a.b.txt"
    assert label_path("/images/x/images/train/a.png") == "/images/x/labels/train/a.txt"
    assert label_path("/d/pictures/a.jpg") == "/d/pictures/a.txt"  # no images folder: beside the image


def test_empty_label_file_and_missing_label_file_are_images_without_objects(tmp_path, caplog):
    data_yaml = make_yolo(tmp_path, {"train": {
        "a.jpg": (40, 80, ["0 0.5 0.5 0.5 0.5"]), "empty.jpg": (30, 30, []), "unlabelled.png": (20, 30, None),
    }}, NAMES)
    with caplog.at_level(logging.INFO):
        records = read(data_yaml).records[0]
    assert [Path(r.path).name for r in records] == ["a.jpg", "empty.jpg", "unlabelled.png"]
    assert [len(r.labels) for r in records] == [1, 0, 0]
    assert records[1].boxes.shape == (0, 4) and (records[2].height, records[2].width) == (20, 30)
    assert "1 of 3 images have no label file" in caplog.text


def test_no_label_file_at_all_is_refused_naming_where_they_should_be(tmp_path):
    data_yaml = make_yolo(tmp_path, {"train": {"a.jpg": (40, 80, None), "b.jpg": (40, 80, None)}}, NAMES)
    with pytest.raises(InvalidAnnotationError, match=r"none of the 2 'train' images.*labels/train/a\.txt"):
        read(data_yaml)


def test_label_file_without_its_image(tmp_path, caplog):
    data_yaml = make_yolo(tmp_path, {"train": {"a.jpg": (40, 80, ["0 0.5 0.5 0.5 0.5"])}}, NAMES)
    (tmp_path / "labels/train/ghost.txt").write_text("1 0.5 0.5 0.1 0.1\n")
    with pytest.raises(InvalidAnnotationError, match=r"labels/train/ghost\.txt has no image.*skip_invalid"):
        read(data_yaml)
    with caplog.at_level(logging.WARNING):
        (record,) = read(data_yaml, skip_invalid=True).records[0]
    assert Path(record.path).name == "a.jpg" and "skipped 1 image" in caplog.text


@pytest.mark.parametrize("line", ["0 0.5 0.5 0.5", "0 0.5 0.5 0.5 0.5 0.7", "0 0.1 0.1 0.2 0.2 0.3 0.3 0.1"])
def test_line_with_the_wrong_number_of_fields(tmp_path, line, caplog):
    data_yaml = make_yolo(tmp_path, {"train": {"a.jpg": (40, 80, ["1 0.5 0.5 0.2 0.2", line]),
                                               "b.jpg": (40, 80, ["0 0.5 0.5 0.2 0.2"])}}, NAMES)
    with pytest.raises(InvalidAnnotationError, match=rf"labels/train/a\.txt: line 2 .* has {len(line.split())} "
                                                     "fields, not the 5 of 'class cx cy w h'"):
        read(data_yaml)
    with caplog.at_level(logging.WARNING):
        records = read(data_yaml, skip_invalid=True).records[0]
    assert [Path(r.path).name for r in records] == ["b.jpg"]  # a file with a broken line cannot be trusted


def test_fields_that_are_not_numbers_or_a_fractional_class(tmp_path):
    for k, line in enumerate(["cat 0.5 0.5 0.2 0.2", "1.5 0.5 0.5 0.2 0.2"]):
        data_yaml = make_yolo(tmp_path / str(k), {"train": {"a.jpg": (40, 80, [line])}}, NAMES)
        with pytest.raises(InvalidAnnotationError, match=r"a\.txt: line 1 .*(not a number|not a whole number)"):
            read(data_yaml)


def test_coordinate_outside_the_tolerance_is_refused_and_inside_it_clipped(tmp_path, caplog):
    data_yaml = make_yolo(tmp_path, {"train": {"a.jpg": (40, 80, [
        "0 0.1 0.5 0.2008 0.5",  # x1 = -0.0004: within 1e-3 of the edge, clipped to 0
        "1 0.5 0.9 0.2 0.2024",  # y2 = 1.0012: beyond it
    ])}}, NAMES)
    with pytest.raises(InvalidAnnotationError, match=r"a\.txt: line 2: box .* outside \[0, 1\] by more than 0\.001"):
        read(data_yaml)
    with caplog.at_level(logging.WARNING):
        (record,) = read(data_yaml, skip_invalid=True).records[0]
    # x2 = (0.1 + 0.1004) * 80 = 16.032; y from (0.5 -+ 0.25) * 40
    np.testing.assert_allclose(record.boxes, [[0, 10, 16.032, 30]], atol=1e-4)
    assert "skipped 1 object" in caplog.text


def test_class_id_beyond_names(tmp_path, caplog):
    data_yaml = make_yolo(tmp_path, {"train": {"a.jpg": (40, 80, ["2 0.5 0.5 0.2 0.2", "1 0.5 0.5 0.4 0.4"])}},
                          NAMES)
    with pytest.raises(InvalidAnnotationError, match=r"a\.txt: line 1: class id 2 is not in names \(ids 0\.\.1\)"):
        read(data_yaml)
    with caplog.at_level(logging.WARNING):
        (record,) = read(data_yaml, skip_invalid=True).records[0]
    assert record.labels.tolist() == [1]  # the image stays, with its valid object


def test_list_files_lists_of_entries_and_roboflow_parent_paths(tmp_path):
    make_yolo(tmp_path, {"train": {"a.jpg": (40, 80, ["0 0.5 0.5 0.5 0.5"]), "b.jpg": (40, 80, [])}}, NAMES)
    write_image(tmp_path / "valid/images/c.jpg", 20, 20)  # Roboflow's layout: <split>/images, <split>/labels
    (tmp_path / "valid/labels").mkdir()
    (tmp_path / "valid/labels/c.txt").write_text("1 0.5 0.5 0.5 0.5\n")
    (tmp_path / "train.txt").write_text("./images/train/b.jpg\n\nimages/train/a.jpg\n")
    # no 'path': the yaml's own folder; '../valid/images' does not exist beside it, 'valid/images' does
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"train": ["train.txt", "../valid/images"],
                                                        "names": ["cat", "dog"]}))
    records = read(tmp_path / "data.yaml").records[0]
    assert [Path(r.path).name for r in records] == ["b.jpg", "a.jpg", "c.jpg"]  # list order, then the folder
    assert [r.labels.tolist() for r in records] == [[], [0], [1]]
    assert [r.image_id for r in records] == [0, 1, 2]


def test_relative_yaml_path_finds_the_labels(tmp_path, monkeypatch):
    make_yolo(tmp_path, {"train": {"a.jpg": (40, 80, ["1 0.5 0.5 0.5 0.5"])}}, NAMES)
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"train": "images/train", "names": ["cat", "dog"]}))
    monkeypatch.chdir(tmp_path)
    (record,) = read(Path("data.yaml")).records[0]
    assert record.path == str(tmp_path / "images/train/a.jpg") and record.labels.tolist() == [1]


def test_listed_image_that_does_not_exist(tmp_path):
    make_yolo(tmp_path, {"train": {"a.jpg": (40, 80, ["0 0.5 0.5 0.5 0.5"])}}, NAMES)
    (tmp_path / "train.txt").write_text("images/train/a.jpg\nimages/train/gone.jpg\n")
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"train": "train.txt", "names": ["cat", "dog"]}))
    with pytest.raises(InvalidAnnotationError, match=r"images/train/gone\.jpg \(listed in .*train\.txt, line 2\)"):
        read(tmp_path / "data.yaml")


@pytest.mark.parametrize(("content", "message"), [
    ({"train": "images/train", "names": {0: "cat", 2: "dog"}}, r"names ids \[0, 2\] must be the whole numbers 0\.\.1"),
    ({"train": "images/train", "names": ["cat", "dog"], "nc": 3}, "nc is 3 but names lists 2 classes"),
    ({"train": "images/train", "names": ["cat", "cat"]}, "lists a class twice"),
    ({"val": "images/train", "names": ["cat"]}, "no 'train' entry"),
    ({"train": "images/nowhere", "names": ["cat"]}, r"train entry 'images/nowhere' not found"),
])
def test_data_yaml_problems_name_the_file_and_the_key(tmp_path, content, message):
    make_yolo(tmp_path, {"train": {"a.jpg": (40, 80, [])}}, NAMES)
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(content))
    with pytest.raises((InvalidAnnotationError, FileNotFoundError), match=message) as error:
        read(tmp_path / "data.yaml")
    assert "data.yaml" in str(error.value)


def test_data_config_serves_contract_batches_from_the_yaml(tmp_path):
    data_yaml = make_yolo(tmp_path, {
        "train": {"a.jpg": (64, 64, ["1 0.5 0.5 0.5 0.25"]), "b.jpg": (64, 64, [])},
        "val": {"c.jpg": (64, 128, ["0 0.25 0.5 0.25 0.5"])},
    }, NAMES)
    data = compose_config("train", "data=yolo", f"data.yaml={data_yaml}", "data.loader.num_workers=0",
                          "data.batch_size=2",
                          "data.sampler.min_steps_per_epoch=0", "data.img_size=64").data
    datamodule = instantiate(data)
    datamodule.setup("fit")
    assert datamodule.classes == ["cat", "dog"] and datamodule.sources["test"] is None  # evaluate: val
    batch = next(iter(datamodule.val_dataloader()))
    assert batch["images"].shape == (1, 3, 64, 64)
    # 128x64 letterboxed into 64x64: scale 0.5, 16 px of padding above; the box 16..48 x 16..48 becomes 8..24 x 24..40
    np.testing.assert_allclose(batch["labels"][0, 0].tolist(), [0, 8, 24, 24, 40, 0], atol=1e-4)
    assert len(datamodule.records["train"]) == 2


def test_config_checks_reach_the_forwarded_settings(tmp_path):
    from lightning_det.checks.config import ConfigValueError, check_config

    cfg = compose_config("train", "data=yolo", f"data.yaml={tmp_path / 'data.yaml'}")
    check_config(cfg)
    cfg.data.reading.skip_invalid = "flase"  # a typo Hydra passes through as a (truthy) string
    with pytest.raises(ConfigValueError, match="data.reading.skip_invalid='flase' must be true/false"):
        check_config(cfg)


def test_test_key_is_what_evaluate_scores_when_asked(tmp_path):
    from lightning_det.data import YOLODataModule

    data_yaml = make_yolo(tmp_path, {"train": {"a.jpg": (32, 32, ["0 0.5 0.5 0.5 0.5"])},
                                     "val": {"b.jpg": (32, 32, [])}, "test": {"c.jpg": (32, 32, [])}}, NAMES)
    for test, expected in ((None, "b.jpg"), ("test", "c.jpg")):
        datamodule = YOLODataModule(str(data_yaml), test=test, loader=LoaderOptions(num_workers=0), img_size=32)
        datamodule.setup("test")
        assert [Path(r.path).name for r in datamodule.records["test"]] == [expected]
