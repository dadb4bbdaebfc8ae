import logging

import numpy as np
import pytest
from helpers import make_coco
from pycocotools.coco import COCO

from lightning_det.data import InvalidAnnotationError, read_coco

CATEGORIES = [(18, "dog"), (1, "person"), (90, "toothbrush")]  # not contiguous and not listed in id order
IMAGES = [(7, "a.jpg", 60, 80), (3, "b.png", 40, 50), (11, "c.jpg", 30, 30)]
ANNOTATIONS = [
    (7, 18, [10.0, 5.0, 20.0, 30.0], 0),
    (7, 1, [0.0, 0.0, 80.0, 60.0], 1),  # crowd
    (3, 90, [1.5, 2.5, 10.0, 4.0], 0),
    (7, 90, [50.0, 40.0, 29.5, 19.0], 0),
]


@pytest.fixture
def coco_json(tmp_path):
    return make_coco(tmp_path, CATEGORIES, IMAGES, ANNOTATIONS)


def test_matches_pycocotools(coco_json, tmp_path):
    result = read_coco(tmp_path, "annotations/instances_train.json", "images")
    reference = COCO(str(coco_json))
    category_ids = sorted(reference.getCatIds())
    assert result.label_to_category_id == category_ids
    assert result.classes == [reference.loadCats(i)[0]["name"] for i in category_ids]

    records = result.records[0]
    assert sorted(r.image_id for r in records) == sorted(reference.getImgIds())
    for record in records:
        info = reference.loadImgs(record.image_id)[0]
        assert (record.height, record.width) == (info["height"], info["width"])
        assert record.path == str(tmp_path / "images" / info["file_name"])
        expected = reference.loadAnns(reference.getAnnIds(imgIds=record.image_id))
        assert len(record.labels) == len(expected)
        by_box = {tuple(np.round(box, 3)): (label, hard)
                  for box, label, hard in zip(record.boxes.tolist(), record.labels.tolist(), record.difficult.tolist())}
        for annotation in expected:
            x, y, w, h = annotation["bbox"]
            label, difficult = by_box[tuple(np.round([x, y, x + w, y + h], 3))]
            assert result.label_to_category_id[label] == annotation["category_id"]
            assert difficult == bool(annotation["iscrowd"])


def test_image_without_annotations_is_kept_empty(coco_json, tmp_path):
    records = read_coco(tmp_path, "annotations/instances_train.json", "images").records[0]
    (empty,) = [r for r in records if r.image_id == 11]
    assert empty.boxes.shape == (0, 4) and len(empty.labels) == 0


def test_user_classes_reorder_labels_and_category_map(coco_json, tmp_path):
    result = read_coco(tmp_path, "annotations/instances_train.json", "images",
                       classes=["toothbrush", "dog", "person"])
    assert result.label_to_category_id == [90, 18, 1]
    (record,) = [r for r in result.records[0] if r.image_id == 3]
    assert record.labels.tolist() == [0]


def test_malformed_json_names_file_and_line(tmp_path, coco_json):
    coco_json.write_text('{"images": [],\n "annotations": [\n oops ]}')
    with pytest.raises(InvalidAnnotationError, match=r"instances_train\.json: malformed JSON at line 3"):
        read_coco(tmp_path, "annotations/instances_train.json", "images")


def test_missing_lists_are_named(tmp_path, coco_json):
    coco_json.write_text('{"images": []}')
    with pytest.raises(InvalidAnnotationError, match="no annotations / categories list"):
        read_coco(tmp_path, "annotations/instances_train.json", "images")


def test_bbox_of_wrong_length_names_the_annotation(tmp_path):
    make_coco(tmp_path, CATEGORIES, IMAGES, [(7, 18, [1.0, 2.0, 3.0], 0)])
    with pytest.raises(InvalidAnnotationError, match=r"annotation #0 \(id 1\) needs .* bbox of 4 numbers"):
        read_coco(tmp_path, "annotations/instances_train.json", "images")


def test_unknown_category_is_an_error_or_a_counted_skip(tmp_path, caplog):
    make_coco(tmp_path, CATEGORIES, IMAGES, ANNOTATIONS + [(7, 55, [1.0, 1.0, 5.0, 5.0], 0)])
    with pytest.raises(InvalidAnnotationError, match="category_id 55, which is not in 'categories'"):
        read_coco(tmp_path, "annotations/instances_train.json", "images")
    with caplog.at_level(logging.WARNING):
        records = read_coco(tmp_path, "annotations/instances_train.json", "images", skip_invalid=True).records[0]
    assert sum(len(r.labels) for r in records) == len(ANNOTATIONS)
    assert "1 object" in caplog.text


def test_degenerate_box_is_an_error_naming_the_image(tmp_path):
    make_coco(tmp_path, CATEGORIES, IMAGES, [(3, 18, [5.0, 5.0, 0.0, 4.0], 0)])
    with pytest.raises(InvalidAnnotationError, match=r"image b\.png.*x2<=x1"):
        read_coco(tmp_path, "annotations/instances_train.json", "images")


def test_missing_image_file_is_skipped_with_its_annotations(tmp_path, coco_json, caplog):
    (tmp_path / "images" / "a.jpg").unlink()
    with pytest.raises(InvalidAnnotationError, match=r"a\.jpg \(id 7\) does not exist"):
        read_coco(tmp_path, "annotations/instances_train.json", "images")
    with caplog.at_level(logging.WARNING):
        records = read_coco(tmp_path, "annotations/instances_train.json", "images", skip_invalid=True).records[0]
    assert sorted(r.image_id for r in records) == [3, 11]
    assert "1 image" in caplog.text and "object" not in caplog.text.split("\n")[0]
