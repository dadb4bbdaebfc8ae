"""Issue 23: the same image in train and val, an id listed twice in one split, a COCO image id given twice."""

import logging

import pytest
from helpers import make_coco, make_voc, make_yolo

from lightning_det.data import (
    COCOSource,
    DetectionDataModule,
    InvalidAnnotationError,
    LoaderOptions,
    ReadingOptions,
    VOCSource,
    YOLOSource,
    read_annotations,
    read_coco,
    read_voc,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CAT = (40, 60, [("cat", (1, 1, 20, 20), False)])


def voc_module(root, train, val, **kwargs):
    return DetectionDataModule(root, VOCSource(train), val and VOCSource(val), classes=["cat"], img_size=64,
                               loader=LoaderOptions(num_workers=0), **kwargs)


def train_ids(datamodule):
    return [path.decode().rsplit("/", 1)[1] for path in datamodule.records["train"].paths]


# --- the same image in train and val -----------------------------------------------------------------------------
@pytest.fixture
def leaking_voc(tmp_path):
    """VOC's classic mistake: training on trainval while validating on val, which trainval holds."""
    return make_voc(tmp_path, {"2007/trainval": {k: CAT for k in "abcdefg"}, "2007/val": {k: CAT for k in "efgh"}})


def test_images_in_train_and_val_are_refused_with_count_ids_splits_and_fix(leaking_voc):
    datamodule = voc_module(leaking_voc, ["2007/trainval"], ["2007/val"])
    with pytest.raises(InvalidAnnotationError) as error:
        datamodule.setup("fit")
    message = str(error.value)
    assert "3 of the 4 val images are also train images" in message
    assert "VOC2007/JPEGImages/e.jpg, VOC2007/JPEGImages/f.jpg, VOC2007/JPEGImages/g.jpg" in message
    assert "2007/trainval" in message and "2007/val" in message
    assert "remove them from one split" in message and "data.reading.skip_invalid=true" in message


def test_skip_invalid_drops_shared_images_from_training_only(leaking_voc, caplog):
    datamodule = voc_module(leaking_voc, ["2007/trainval"], ["2007/val"], reading=ReadingOptions(skip_invalid=True))
    with caplog.at_level(logging.WARNING):
        datamodule.setup("fit")
    assert train_ids(datamodule) == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    assert len(datamodule.records["val"]) == 4
    assert "left 3 images out of training" in caplog.text and "VOC2007/JPEGImages/e.jpg" in caplog.text


def test_skip_invalid_refuses_to_leave_no_training_image(tmp_path):
    root = make_voc(tmp_path, {"train": {"a": CAT, "b": CAT}, "val": {"a": CAT, "b": CAT, "c": CAT}})
    datamodule = voc_module(root, ["train"], ["val"], reading=ReadingOptions(skip_invalid=True))
    with pytest.raises(InvalidAnnotationError, match="2 of the 3 val images .* would leave no training image"):
        datamodule.setup("fit")


def test_validating_on_the_training_images_themselves_is_a_warning(tmp_path, caplog):
    root = make_voc(tmp_path, {"train": {"a": CAT, "b": CAT}})
    datamodule = voc_module(root, ["train"], ["train"], reading=ReadingOptions(skip_invalid=True))
    with caplog.at_level(logging.WARNING):
        datamodule.setup("fit")
    assert len(datamodule.records["train"]) == len(datamodule.records["val"]) == 2
    assert "val holds the same 2 images as train" in caplog.text


def test_a_folder_reached_through_a_link_is_the_same_folder(tmp_path):
    images = [(1, "a.jpg", 40, 60), (2, "b.jpg", 40, 60)]
    make_coco(tmp_path, [(1, "cat")], images, [(1, 1, [1, 1, 9, 9], 0)], name="train.json")
    make_coco(tmp_path, [(1, "cat")], images[1:], [], name="val.json")
    (tmp_path / "linked").symlink_to(tmp_path / "images")
    datamodule = DetectionDataModule(tmp_path, COCOSource("annotations/train.json", "images"),
                                     COCOSource("annotations/val.json", "./linked/"),
                                     loader=LoaderOptions(num_workers=0), img_size=64)
    with pytest.raises(InvalidAnnotationError, match="1 of the 1 val images are also train images: linked/b.jpg"):
        datamodule.setup("fit")


def test_linked_image_files_are_compared_by_their_target(tmp_path):
    make_voc(tmp_path, {"2007/train": {"a": CAT, "b": CAT}})
    (tmp_path / "VOC2012/JPEGImages").mkdir(parents=True)
    (tmp_path / "VOC2012/JPEGImages/v.jpg").symlink_to(tmp_path / "VOC2007/JPEGImages/b.jpg")
    make_voc(tmp_path, {"2012/val": {"v": CAT, "w": CAT}})
    datamodule = voc_module(tmp_path, ["2007/train"], ["2012/val"], reading=ReadingOptions(skip_invalid=True))
    datamodule.setup("fit")
    assert train_ids(datamodule) == ["a.jpg"]


def test_same_names_in_other_folders_hold_out_and_default_test_are_not_leaks(tmp_path, caplog):
    """Two VOC years share ids, COCO's train2017 and val2017 may share file names: other files. A val_split
    hold-out is disjoint, and test defaults to val."""
    make_voc(tmp_path / "voc", {"2007/trainval": {"a": CAT, "b": CAT}, "2012/trainval": {"a": CAT, "c": CAT},
                                "2012/val": {"b": CAT}})
    images = [(1, "a.jpg", 40, 60), (2, "b.jpg", 40, 60)]
    for split in ("train", "val"):
        make_coco(tmp_path / "coco", [(1, "cat")], images, [(1, 1, [1, 1, 9, 9], 0)], name=f"{split}.json",
                  image_dir=split)
    modules = [
        voc_module(tmp_path / "voc", ["2007/trainval"], ["2012/trainval"]),
        voc_module(tmp_path / "voc", ["2007/trainval", "2012/trainval"], None, val_split=0.5),
        DetectionDataModule(tmp_path / "coco", COCOSource("annotations/train.json", "train"),
                            COCOSource("annotations/val.json", "val"), loader=LoaderOptions(num_workers=0),
                            img_size=64),
    ]
    with caplog.at_level(logging.WARNING):
        for datamodule in modules:
            datamodule.setup(None)
            assert len(datamodule.records["train"]) + len(datamodule.records["val"]) == 4
            assert list(datamodule.records["test"].paths) == list(datamodule.records["val"].paths)
    assert "val" not in caplog.text


# --- one id listed several times in a split ----------------------------------------------------------------------
def test_an_id_listed_three_times_is_read_once_with_one_warning(tmp_path, caplog):
    root = make_voc(tmp_path, {"2007/train": {k: CAT for k in "abcd"}})
    (root / "VOC2007/ImageSets/Main/train.txt").write_text("a\nb\na\nc\na\nd\nb\n")
    with caplog.at_level(logging.WARNING):
        records = read_voc(root, ["2007/train"]).records[0]
    assert [r.path[-5:] for r in records] == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    assert [r.image_id for r in records] == [0, 1, 2, 3]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "2 images listed more than once (3 extra lines), kept once: VOC2007/a (3 times), VOC2007/b (2 times)" \
        in warnings[0].getMessage()
    assert "VOC2007/ImageSets/Main/train.txt" in warnings[0].getMessage()


def test_an_image_in_two_lists_of_one_source_is_read_once(tmp_path, caplog):
    root = make_voc(tmp_path, {"train": {"a": CAT, "b": CAT}, "extra": {"b": CAT, "c": CAT}})
    with caplog.at_level(logging.WARNING):
        records = read_voc(root, ["train", "extra"]).records[0]
    assert [r.path[-5:] for r in records] == ["a.jpg", "b.jpg", "c.jpg"]
    assert "1 image listed more than once (1 extra line), kept once: b (2 times)" in caplog.text


def test_a_yolo_list_file_naming_an_image_twice_reads_it_once(tmp_path, caplog):
    data_yaml = make_yolo(tmp_path, {"train": {"a.jpg": (20, 20, ["0 0.5 0.5 0.5 0.5"]), "b.jpg": (20, 20, [])}},
                          ["cat"])
    (tmp_path / "train.txt").write_text("images/train/a.jpg\n./images/train/b.jpg\nimages/train/../train/a.jpg\n")
    data_yaml.write_text(data_yaml.read_text().replace("train: images/train", "train: train.txt"))
    with caplog.at_level(logging.WARNING):
        records = read_annotations(tmp_path, [YOLOSource(str(data_yaml), "train")]).records[0]
    assert [r.path[-5:] for r in records] == ["a.jpg", "b.jpg"] and len(records.labels) == 1
    assert "1 image listed more than once (1 extra line)" in caplog.text and "a.jpg (2 times)" in caplog.text


# --- a COCO image id given to two images -------------------------------------------------------------------------
@pytest.fixture
def twice_given_id(tmp_path):
    images = [(1, "a.jpg", 40, 60), (2, "b.jpg", 30, 30), (2, "c.jpg", 50, 50), (3, "d.jpg", 40, 40)]
    boxes = [(1, 1, [1, 1, 10, 10], 0), (2, 1, [10, 10, 35, 35], 0), (3, 1, [2, 2, 5, 5], 0)]
    return make_coco(tmp_path, [(1, "cat")], images, boxes)


def test_a_coco_image_id_given_twice_is_refused_naming_json_id_and_files(tmp_path, twice_given_id):
    with pytest.raises(InvalidAnnotationError) as error:
        read_coco(tmp_path, "annotations/instances_train.json", "images")
    message = str(error.value)
    assert str(twice_given_id) in message
    assert "image b.jpg shares its id 2 with c.jpg" in message and "data.reading.skip_invalid=true" in message


def test_skip_invalid_drops_every_image_of_a_repeated_id_with_its_annotations(tmp_path, twice_given_id, caplog):
    with caplog.at_level(logging.WARNING):
        records = read_coco(tmp_path, "annotations/instances_train.json", "images", skip_invalid=True).records[0]
    assert [(r.path[-5:], r.image_id, r.boxes.tolist()) for r in records] == [
        ("a.jpg", 1, [[1, 1, 11, 11]]), ("d.jpg", 3, [[2, 2, 7, 7]])]
    assert "skipped 2 images" in caplog.text and "image c.jpg shares its id 2 with b.jpg" in caplog.text
    assert "unknown image id" not in caplog.text
