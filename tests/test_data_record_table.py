"""Records as flat arrays (``RecordTable``): the same records as the per-image objects they replace, and loader
workers whose memory stays flat over an epoch, where a list of record objects is copied into each of them."""


import numpy as np
import pytest
import torch
from helpers import bench_script

from lightning_det.data.records import AnnotationRecord, RecordTable

coco_scale = bench_script("coco_scale")


def record(path: str, image_id: int, labels: list[int], area: bool = True) -> AnnotationRecord:
    n = len(labels)
    boxes = np.arange(4 * n, dtype=np.float32).reshape(n, 4) + 10 * image_id
    return AnnotationRecord(path, image_id, 100 + image_id, 200 + image_id, boxes, np.array(labels, np.int64),
                            np.array([label % 2 == 1 for label in labels], bool),
                            np.full(n, 7.0 + image_id, np.float32) if area else None)


def assert_same(one: AnnotationRecord, two: AnnotationRecord) -> None:
    assert (one.path, one.image_id, one.height, one.width, one.exif_orientation) == (
        two.path, two.image_id, two.height, two.width, two.exif_orientation)
    for name in ("boxes", "labels", "difficult", "area"):
        np.testing.assert_array_equal(getattr(one, name), getattr(two, name))


RECORDS = [record("a/ü.jpg", 0, [0, 1]), record("b.jpg", 1, []), record("c.png", 2, [3, 2, 1])]


def test_a_table_gives_back_the_records_it_was_made_of():
    table = RecordTable.from_records(RECORDS)
    assert len(table) == 3 and len(table.labels) == 5
    for original, row in zip(RECORDS, table):
        assert_same(original, row)
    assert_same(table[-1], RECORDS[2])
    with pytest.raises(IndexError):
        table[3]
    np.testing.assert_array_equal(table.object_image, [0, 0, 2, 2, 2])
    assert RecordTable.from_records([record("x.jpg", 0, [1], area=False)]).area is None


def test_take_and_select_objects_by_hand():
    table = RecordTable.from_records(RECORDS)
    taken = table.take(np.array([2, 0]))
    assert [r.path for r in taken] == ["c.png", "a/ü.jpg"]
    assert_same(taken[0], RECORDS[2])
    assert_same(taken[1], RECORDS[0])
    assert [r.path for r in table[1:]] == ["b.jpg", "c.png"]

    kept = table.select_objects(~table.difficult)  # odd labels are difficult: keeps 0 of image 0; 2 of image 2
    assert [r.labels.tolist() for r in kept] == [[0], [], [2]]
    np.testing.assert_array_equal(kept[2].boxes, RECORDS[2].boxes[[1]])
    np.testing.assert_array_equal(kept[2].area, [9.0])


@pytest.mark.skipif(not hasattr(torch.multiprocessing, "get_all_start_methods")
                    or "fork" not in torch.multiprocessing.get_all_start_methods(), reason="needs fork")
def test_forked_workers_share_a_table_where_they_copy_a_list_of_records():
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 14, 60_000)  # ~7 objects an image, as COCO
    offsets = np.concatenate(([0], np.cumsum(counts)))
    xy = rng.uniform(0, 400, (offsets[-1], 2)).astype(np.float32)
    table = RecordTable(
        paths=np.array([f"train2017/{i:012d}.jpg".encode() for i in range(len(counts))]),
        image_ids=np.arange(len(counts)), heights=np.full(len(counts), 480), widths=np.full(len(counts), 640),
        exif_orientation=np.zeros(len(counts), bool), offsets=offsets, boxes=np.concatenate((xy, xy + 20), 1),
        labels=rng.integers(0, 80, offsets[-1]), difficult=np.zeros(offsets[-1], bool),
        area=np.full(offsets[-1], 400, np.float32),
    )
    _, _, growth_of_objects = coco_scale.worker_memory(list(table), workers=2)  # private memory, MiB
    _, _, growth_of_table = coco_scale.worker_memory(table, workers=2)
    # A list of 60k records is copied into a worker as it reads them (reference counts are writes): ~18 MiB here.
    assert growth_of_objects > 10, growth_of_objects
    assert growth_of_table < 3, growth_of_table
