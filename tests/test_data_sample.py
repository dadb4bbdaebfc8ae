import filecmp
import json

import numpy as np
import pytest

from lightning_det.data import SAMPLE_CLASSES, VOCSource, generate_sample_data, read_coco, read_voc
from lightning_det.data.records import load_image


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory):
    return generate_sample_data(tmp_path_factory.mktemp("data") / "sample", num_train=40, num_val=8, seed=0)


def all_files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_same_seed_gives_identical_files_and_another_seed_does_not(sample_root, tmp_path):
    again = generate_sample_data(tmp_path / "again", num_train=40, num_val=8, seed=0)
    files = all_files(sample_root)
    assert files == all_files(again) and len(files) == 2 * 48 + 2 + 2 + 1
    match, mismatch, errors = filecmp.cmpfiles(sample_root, again, [str(f) for f in files], shallow=False)
    assert not mismatch and not errors
    other = generate_sample_data(tmp_path / "other", num_train=40, num_val=8, seed=1)
    assert (other / "VOCsample/JPEGImages/000000.jpg").read_bytes() != (
        sample_root / "VOCsample/JPEGImages/000000.jpg").read_bytes()


def test_voc_and_coco_views_describe_the_same_objects(sample_root):
    for split in ("train", "val"):
        voc = read_voc(sample_root, [f"sample/{split}"], classes=SAMPLE_CLASSES).records[0]
        coco = read_coco(sample_root, f"annotations/instances_{split}.json", "VOCsample/JPEGImages")
        assert coco.classes == list(SAMPLE_CLASSES)
        assert [r.path for r in voc] == [r.path for r in coco.records[0]]
        for a, b in zip(voc, coco.records[0]):
            np.testing.assert_array_equal(a.boxes, b.boxes)
            np.testing.assert_array_equal(a.labels, b.labels)
            np.testing.assert_array_equal(a.difficult, b.difficult)
            assert (a.height, a.width) == (b.height, b.width)


def test_content_has_what_training_and_evaluation_need(sample_root):
    records = read_voc(sample_root, ["sample/train", "sample/val"], classes=SAMPLE_CLASSES).records[0]
    labels = np.concatenate([r.labels for r in records])
    boxes = np.concatenate([r.boxes for r in records])
    sides = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    assert set(labels.tolist()) == set(range(len(SAMPLE_CLASSES)))
    assert any(len(r.labels) == 0 for r in records)
    assert any(r.difficult.any() for r in records)
    assert 0.05 < np.mean(sides <= 17) < 0.35  # small objects, but not too many
    assert all(320 <= r.width <= 416 and 240 <= r.height <= 416 for r in records)
    assert len({(r.height, r.width) for r in records}) > len(records) // 2
    record = records[0]
    assert load_image(record).shape == (3, record.height, record.width)


def test_complete_data_is_reused_and_other_content_is_not_overwritten(sample_root, tmp_path):
    info = sample_root / "sample_info.json"
    before = info.stat().st_mtime_ns
    assert generate_sample_data(sample_root, num_train=40, num_val=8, seed=0) == sample_root
    assert info.stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="generated with"):
        generate_sample_data(sample_root, num_train=41, num_val=8, seed=0)
    half_written = tmp_path / "half"
    (half_written / "VOCsample").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not a complete sample dataset"):
        generate_sample_data(half_written, num_train=2, num_val=1)


def test_failed_generation_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr("lightning_det.data.sample._voc_xml", broken)
    with pytest.raises(OSError, match="disk full"):
        generate_sample_data(tmp_path / "sample", num_train=2, num_val=1)
    assert list(tmp_path.iterdir()) == []


def test_split_lists_follow_the_image_order_and_coco_points_at_the_same_files(sample_root):
    source = VOCSource(["sample/val"])
    ids = [file_id for _, file_id in source.image_ids(sample_root)]
    assert ids == [f"{i:06d}" for i in range(40, 48)]
    coco = json.loads((sample_root / "annotations/instances_val.json").read_text())
    assert [image["file_name"] for image in coco["images"]] == [f"{i}.jpg" for i in ids]
