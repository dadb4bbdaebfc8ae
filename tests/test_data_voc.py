import logging

import numpy as np
import pytest
import torch
from helpers import make_voc, write_image
from PIL import Image
from torchvision.io import decode_image

from lightning_det.data import VOC_CLASSES, ImageLoadError, InvalidAnnotationError, read_voc
from lightning_det.data.records import load_image


@pytest.fixture
def voc_root(tmp_path):
    return make_voc(
        tmp_path,
        {
            "2007/trainval": {
                "000001": (60, 80, [("dog", (1, 1, 40, 30), False), ("person", (11, 21, 80, 60), True)]),
                "000002": (50, 50, []),
            },
            "2012/trainval": {"2012_000001": (40, 70, [("cat", (5, 6, 25, 36), False)])},
        },
    )


def test_reads_two_years_in_order_with_zero_based_boxes_and_difficult_flag(voc_root):
    result = read_voc(voc_root, ["2007/trainval", "2012/trainval"])
    records = result.records[0]
    assert result.classes == list(VOC_CLASSES)
    assert [r.path for r in records] == [
        str(voc_root / "VOC2007/JPEGImages/000001.jpg"),
        str(voc_root / "VOC2007/JPEGImages/000002.jpg"),
        str(voc_root / "VOC2012/JPEGImages/2012_000001.jpg"),
    ]
    assert [r.image_id for r in records] == [0, 1, 2]
    assert [(r.height, r.width) for r in records] == [(60, 80), (50, 50), (40, 70)]
    first = records[0]
    # xmin/ymin are 1-based pixel indices: subtract 1; xmax/ymax (last pixel, 1-based) are the continuous end.
    np.testing.assert_array_equal(first.boxes, [[0, 0, 40, 30], [10, 20, 80, 60]])
    assert first.boxes.dtype == np.float32 and first.labels.dtype == np.int64 and first.difficult.dtype == bool
    assert first.labels.tolist() == [VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")]
    assert first.difficult.tolist() == [False, True]
    assert len(records[1].labels) == 0 and records[1].boxes.shape == (0, 4)
    assert records[2].labels.tolist() == [VOC_CLASSES.index("cat")]


def test_user_class_list_sets_label_order(voc_root):
    result = read_voc(voc_root, ["2007/trainval", "2012/trainval"], classes=["person", "cat", "dog"])
    assert result.records[0][0].labels.tolist() == [2, 0]
    assert result.records[0][2].labels.tolist() == [1]


def test_classes_null_infers_sorted_names_and_logs_them(voc_root, caplog):
    with caplog.at_level(logging.INFO):
        result = read_voc(voc_root, ["2007/trainval", "2012/trainval"], classes=None)
    assert result.classes == ["cat", "dog", "person"]
    assert "['cat', 'dog', 'person']" in caplog.text
    assert result.records[0][0].labels.tolist() == [1, 2]


def test_unknown_class_names_file_class_and_fix(voc_root):
    with pytest.raises(InvalidAnnotationError) as error:
        read_voc(voc_root, ["2007/trainval"], classes=["dog"])
    message = str(error.value)
    assert "000001.xml" in message and "'person'" in message and "['dog']" in message
    assert "data.classes=null" in message


def test_malformed_xml_names_file_and_line(voc_root):
    xml = voc_root / "VOC2007/Annotations/000002.xml"
    xml.write_text("<annotation>\n<size><width>50</width>\n</annotation>")
    with pytest.raises(InvalidAnnotationError, match=r"000002\.xml: malformed XML at line 3"):
        read_voc(voc_root, ["2007/trainval"])


@pytest.mark.parametrize(
    ("box", "reason"),
    [((30, 10, 20, 20), "x2<=x1"), ((10, 12, 20, 10), "y2<=y1"), ((10, 10, 53, 20), "outside the image")],
)
def test_bad_box_is_an_error(tmp_path, box, reason):
    root = make_voc(tmp_path, {"2007/train": {"a": (40, 50, [("dog", box, False)])}})
    with pytest.raises(InvalidAnnotationError, match=reason) as error:
        read_voc(root, ["2007/train"])
    assert "a.xml" in str(error.value) and "skip_invalid" in str(error.value)


def test_box_within_one_pixel_outside_is_clipped(tmp_path):
    root = make_voc(tmp_path, {"2007/train": {"a": (40, 50, [("dog", (0, 1, 51, 41), False)])}})
    (record,) = read_voc(root, ["2007/train"]).records[0]
    np.testing.assert_array_equal(record.boxes, [[0, 0, 50, 40]])


def test_box_of_a_single_pixel_is_valid(tmp_path):
    """VOC indices are inclusive: xmin == xmax is one pixel wide, not an empty box."""
    root = make_voc(tmp_path, {"2007/train": {"a": (40, 50, [("dog", (5, 7, 5, 7), False)])}})
    (record,) = read_voc(root, ["2007/train"]).records[0]
    np.testing.assert_array_equal(record.boxes, [[4, 6, 5, 7]])


def test_skip_invalid_counts_and_reports_once(voc_root, caplog):
    make_voc(
        voc_root,
        {"2007/trainval": {
            "000001": (60, 80, [("dog", (1, 1, 40, 30), False), ("unicorn", (1, 1, 5, 5), False)]),
            "000002": (50, 50, [("cat", (30, 1, 20, 10), False)]),
            "000003": (50, 50, [("cat", (1, 1, 10, 10), False)]),
        }},
    )
    (voc_root / "VOC2007/Annotations/000003.xml").write_text("<annotation><object>")
    with caplog.at_level(logging.WARNING):
        result = read_voc(voc_root, ["2007/trainval"], skip_invalid=True)
    records = result.records[0]
    assert [r.path.rsplit("/", 1)[1] for r in records] == ["000001.jpg", "000002.jpg"]
    assert records[0].labels.tolist() == [VOC_CLASSES.index("dog")]
    assert len(records[1].labels) == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "1 image and 2 objects" in warnings[0].getMessage()
    assert "000003.xml" in warnings[0].getMessage() and "unicorn" in warnings[0].getMessage()


def test_missing_image_is_reported_when_reading(voc_root):
    (voc_root / "VOC2007/JPEGImages/000002.jpg").unlink()
    with pytest.raises(InvalidAnnotationError, match=r"000002\.jpg does not exist"):
        read_voc(voc_root, ["2007/trainval"])


def test_missing_split_list_names_the_path_and_data_root(voc_root):
    with pytest.raises(FileNotFoundError, match=r"VOC2007/ImageSets/Main/test\.txt.*data\.root"):
        read_voc(voc_root, ["2007/test"])


def test_loaded_image_matches_torchvision_and_pil(voc_root):
    record = read_voc(voc_root, ["2007/trainval"]).records[0][0]
    image = load_image(record)
    assert image.dtype == torch.uint8 and image.shape == (3, 60, 80)
    assert torch.equal(image, decode_image(record.path))
    pil = torch.from_numpy(np.array(Image.open(record.path).convert("RGB"))).permute(2, 0, 1)
    assert (image.int() - pil.int()).abs().max() <= 2  # another JPEG decoder: equal up to IDCT rounding


def test_grayscale_png_is_loaded_as_rgb(tmp_path):
    root = make_voc(tmp_path, {"2007/train": {"a": (20, 30, [])}})
    path = root / "VOC2007/JPEGImages/a.jpg"
    Image.fromarray(np.full((20, 30), 77, dtype=np.uint8)).save(path, format="PNG")
    image = load_image(read_voc(root, ["2007/train"]).records[0][0])
    assert image.shape == (3, 20, 30) and bool((image == 77).all())


def test_corrupt_image_fails_when_loaded_naming_the_file(voc_root):
    record = read_voc(voc_root, ["2007/trainval"]).records[0][0]
    with open(record.path, "wb") as file:
        file.write(b"\xff\xd8 not a jpeg")
    with pytest.raises(ImageLoadError, match=r"000001\.jpg"):
        load_image(record)


def test_image_size_differing_from_annotation_fails_when_loaded(voc_root):
    record = read_voc(voc_root, ["2007/trainval"]).records[0][0]
    write_image(voc_root / "VOC2007/JPEGImages/000001.jpg", 30, 80)
    with pytest.raises(ImageLoadError, match="80x30 pixels but its annotation says 80x60"):
        load_image(record)
