"""The shared image cache (``data.loader.cache=ram|disk``): the same samples as decoding, one file per machine that
every process maps, rebuilt when an image changes, never used half-written, refused when it would not fit."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch
from helpers import make_voc, write_image
from hydra.utils import instantiate
from torch.utils.data import DataLoader, Dataset

from lightning_det.checks.config import check_config
from lightning_det.data import DetectionDataModule, LoaderOptions, VOCSource
from lightning_det.data import cache as cache_module
from lightning_det.data import dataset as dataset_module
from lightning_det.data.cache import ImageCacheError
from lightning_det.data.dataset import DetectionDataset
from lightning_det.data.transforms import EpochAugment, LetterboxTransform, YoloTrainTransform

REPO = Path(__file__).resolve().parents[1]
# 300 x 400 and 350 x 210 are reduced to 160 on the longer side by the training pipeline, 90 x 120 is kept.
IMAGES = {
    "wide": (300, 400, [("a", (41, 31, 200, 150), False)]),
    "tall": (350, 210, [("b", (11, 21, 150, 300), False)]),
    "small": (90, 120, [("a", (5, 5, 60, 80), False)]),
}
REDUCED_BYTES = 3 * (120 * 160 + 160 * 96 + 90 * 120)
FULL_BYTES = 3 * (300 * 400 + 350 * 210 + 90 * 120)


@pytest.fixture()
def root(tmp_path, monkeypatch):
    """A VOC folder, with the disk cache in the test's folder and the ram cache in a /dev/shm folder of its own."""
    monkeypatch.setenv("LIGHTNING_DET_CACHE", str(tmp_path / "cache"))
    ram = Path("/dev/shm") / f"lightning_det_test_{uuid.uuid4().hex}"
    monkeypatch.setattr(cache_module, "RAM_FOLDER", ram)
    yield make_voc(tmp_path / "voc", {"train": IMAGES})
    shutil.rmtree(ram, ignore_errors=True)


@pytest.fixture()
def decodings(monkeypatch):
    """The paths of the images decoded from their files, in order."""
    decoded = []
    original = dataset_module.load_image
    monkeypatch.setattr(dataset_module, "load_image", lambda record: decoded.append(record.path) or original(record))
    return decoded


def records_of(root):
    data = DetectionDataModule(root, VOCSource(["train"]), VOCSource(["train"]), loader=LoaderOptions(num_workers=0))
    data.setup("fit")
    return data.records["train"]


def cache_files(kind):
    return sorted(cache_module.cache_folder(kind).glob("*.u8"))


def decoded_image(records, transform, index):
    return DetectionDataset(records, transform, cache_bytes=0).load(index).image


@pytest.mark.parametrize("kind", ["ram", "disk"])
@pytest.mark.parametrize("transform", [YoloTrainTransform(img_size=160), LetterboxTransform(img_size=160)])
def test_cached_samples_are_the_decoded_ones(root, kind, transform, decodings):
    records = records_of(root)
    cached = DetectionDataset(records, transform, cache=kind)
    assert len(decodings) == 3 and cached.cache is None  # built once; no private copy besides it
    (file,) = cache_files(kind)
    assert file.stat().st_size == (REDUCED_BYTES if cached.decode_size else FULL_BYTES)
    uncached = DetectionDataset(records, transform, cache_bytes=0)
    mixed, single = EpochAugment(), EpochAugment(mix=False)
    items = [(0, mixed), (1, mixed), (2, single), (1, single)]
    expected = [torch.manual_seed(3) and uncached[item] for item in items]
    decodings.clear()
    actual = [torch.manual_seed(3) and cached[item] for item in items]
    assert not decodings  # every image read from the file
    for mine, theirs in zip(actual, expected):
        torch.testing.assert_close(mine.image, theirs.image, rtol=0, atol=0)
        torch.testing.assert_close(mine.boxes, theirs.boxes, rtol=0, atol=0)


def test_an_image_changed_on_disk_rebuilds_the_cache(root, decodings):
    records = records_of(root)
    transform = YoloTrainTransform(img_size=160)
    first = DetectionDataset(records, transform, cache="disk")
    (old,) = cache_files("disk")
    before = first.load(0).image
    write_image(Path(records[0].path), 300, 400, seed=99)  # same size in pixels, other content
    decodings.clear()
    second = DetectionDataset(records, transform, cache="disk")
    (new,) = cache_files("disk")
    assert new != old and len(decodings) == 3  # rebuilt; the stale version is gone
    assert not torch.equal(second.load(0).image, before)
    assert torch.equal(second.load(0).image, decoded_image(records, transform, 0))
    stat = os.stat(records[1].path)
    os.utime(records[1].path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # only the modification time
    decodings.clear()
    DetectionDataset(records, transform, cache="disk")
    assert cache_files("disk") != [new] and len(cache_files("disk")) == 1 and len(decodings) == 3
    decodings.clear()
    DetectionDataset(records, transform, cache="disk")
    assert not decodings  # nothing changed: mapped as it is


class WorkerProbe(Dataset):
    """Which process read an item, and whether that process maps the cache file."""

    def __init__(self, dataset: DetectionDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, bool, torch.Tensor]:
        image = self.dataset.load(index).image
        return os.getpid(), str(self.dataset.shared_cache.path) in Path("/proc/self/maps").read_text(), image


def test_loader_workers_read_the_one_file(root, monkeypatch):
    records = records_of(root)
    transform = YoloTrainTransform(img_size=160)
    dataset = DetectionDataset(records, transform, cache="ram")
    expected = [decoded_image(records, transform, index) for index in range(3)]

    def no_decoding(record):
        raise AssertionError(f"{record.path} decoded in a worker")

    monkeypatch.setattr(dataset_module, "load_image", no_decoding)  # the forked workers inherit it
    loader = DataLoader(WorkerProbe(dataset), batch_size=1, num_workers=2, collate_fn=lambda batch: batch[0])
    items = list(loader)
    assert len({pid for pid, _, _ in items} - {os.getpid()}) == 2 and all(mapped for _, mapped, _ in items)
    for (_, _, image), decoded in zip(items, expected):
        assert torch.equal(image, decoded)
    assert len(cache_files("ram")) == 1


CHILD = textwrap.dedent("""
    import os, sys, time
    from lightning_det.data import DetectionDataModule, LoaderOptions, VOCSource
    from lightning_det.data import cache
    from lightning_det.data.dataset import DetectionDataset
    from lightning_det.data.transforms import YoloTrainTransform

    root, log, pause = sys.argv[1], sys.argv[2], float(sys.argv[3])
    data = DetectionDataModule(root, VOCSource(["train"]), VOCSource(["train"]), loader=LoaderOptions(num_workers=0))
    data.setup("fit")
    build = cache.build

    def slow_build(path, count, decode):
        with open(log, "a") as file:
            file.write(f"build {os.getpid()}\\n")
        build(path, count, lambda index: time.sleep(pause) or decode(index))

    cache.build = slow_build
    dataset = DetectionDataset(data.records["train"], YoloTrainTransform(img_size=160), cache="disk")
    with open(log, "a") as file:
        file.write(f"mapped {os.stat(dataset.shared_cache.path).st_ino} {float(dataset.load(1).image.sum())}\\n")
""")


def start_child(root, log, pause):
    """A process that builds (or maps) the disk cache of ``root``, each image of its build taking ``pause`` s."""
    return subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(log), str(pause)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def test_two_processes_build_once_and_map_one_file(root, tmp_path):
    log = tmp_path / "children.log"
    children = [start_child(root, log, pause=0.3) for _ in range(2)]
    assert [child.wait(timeout=120) for child in children] == [0, 0]
    lines = log.read_text().splitlines()
    builds = [line for line in lines if line.startswith("build")]
    mapped = {tuple(line.split()[1:]) for line in lines if line.startswith("mapped")}
    assert len(builds) == 1 and len(mapped) == 1  # one build; both mapped the same inode and read the same pixels
    (file,) = cache_files("disk")
    assert int(next(iter(mapped))[0]) == file.stat().st_ino


def test_a_killed_build_is_never_used(root, tmp_path, decodings):
    child = start_child(root, tmp_path / "children.log", pause=5.0)
    folder = cache_module.cache_folder("disk")
    deadline = time.monotonic() + 60
    while not list(folder.glob(".*.tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert list(folder.glob(".*.tmp-*")) and not cache_files("disk")  # killed half-way: nothing under the name
    records = records_of(root)
    transform = YoloTrainTransform(img_size=160)
    dataset = DetectionDataset(records, transform, cache="disk")
    assert len(decodings) == 3 and not list(folder.glob(".*.tmp-*"))  # built anew, the remains removed
    assert torch.equal(dataset.load(2).image, decoded_image(records, transform, 2))
    (file,) = cache_files("disk")
    whole = file.read_bytes()
    file.unlink()  # (the dataset above keeps its mapping of the complete file)
    file.write_bytes(whole[:-1])  # the final name but the wrong size: not trusted
    decodings.clear()
    DetectionDataset(records, transform, cache="disk")
    assert len(decodings) == 3 and file.stat().st_size == REDUCED_BYTES


def test_a_cache_that_would_not_fit_is_refused(root, monkeypatch):
    records = records_of(root)
    transform = YoloTrainTransform(img_size=160)
    monkeypatch.setattr(cache_module, "available_memory", lambda: 2 * REDUCED_BYTES - 2)
    with pytest.raises(ImageCacheError, match=r"data.loader.cache=ram would hold 3 decoded images in 0.00 GB.*"
                                              r"memory available.*use data.loader.cache=disk .* or "
                                              r"data.loader.cache=null"):
        DetectionDataset(records, transform, cache="ram")
    monkeypatch.setattr(cache_module, "DISK_RESERVE_BYTES", shutil.disk_usage(root).free)
    with pytest.raises(ImageCacheError, match=r"data.loader.cache=disk would hold 3 decoded images.*free in .*use "
                                              r"data.loader.cache=null"):
        DetectionDataset(records, transform, cache="disk")
    assert not cache_files("ram") and not cache_files("disk")
    monkeypatch.setattr(cache_module, "available_memory", lambda: 2 * REDUCED_BYTES)
    DetectionDataset(records, transform, cache="ram")  # exactly half of the available memory fits
    assert len(cache_files("ram")) == 1


def test_the_data_module_passes_the_cache_to_every_split(root):
    data = DetectionDataModule(root, VOCSource(["train"]), VOCSource(["train"]), img_size=160,
                               loader=LoaderOptions(num_workers=0, cache="ram"))
    data.setup("fit")
    train, val = data.dataset("train"), data.dataset("val")
    assert train.shared_cache.path != val.shared_cache.path  # reduced for training, full size for evaluation
    assert len(cache_files("ram")) == 2
    with pytest.raises(ValueError, match=r"data.loader.cache must be one of \['ram', 'disk'\] or null, got 'gpu'"):
        LoaderOptions(cache="gpu")


def test_the_command_line_option_reaches_the_datasets(root, cfg_train):
    cfg = cfg_train("data=voc", f"data.root={root}", "data.classes=null", "data.train.splits=[train]",
                    "data.val.splits=[train]", "data.loader.num_workers=0", "data.img_size=160",
                    "data.loader.cache=disk")
    check_config(cfg)
    data = instantiate(cfg.data)
    assert data.dataset("train").shared_cache.path.parent == cache_module.cache_folder("disk")
    assert len(cache_files("disk")) == 1
