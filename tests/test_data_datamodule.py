from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import make_coco, make_voc
from hydra.utils import instantiate
from omegaconf import open_dict
from runs import compose_config
from torch.utils.data import DistributedSampler

from lightning_det.data import (
    COCOSource,
    DetectionDataModule,
    LoaderOptions,
    PipelineOptions,
    ReadingOptions,
    SamplerOptions,
    SortedAspectRatioBatchSampler,
    VOCSource,
    read_voc,
)
from lightning_det.data.transforms import LetterboxTransform, YoloTrainTransform

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CONF = Path(__file__).resolve().parents[1] / "conf"
SIZE = 96
CLASSES = ["dog", "cat", "person"]
TRAIN = {
    f"t{k}": (60 + 10 * k, 90 - 5 * k, [("dog", (1 + k, 2, 30, 40), False), ("person", (20, 10, 50, 50), k % 2 == 0)])
    for k in range(6)
}
VAL = {
    "v0": (50, 80, [("cat", (5, 5, 40, 45), False), ("dog", (41, 1, 80, 50), True), ("person", (1, 1, 9, 9), False)]),
    "v1": (70, 40, []),
    "v2": (45, 45, [("dog", (10, 12, 30, 33), False)]),
}


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    return make_voc(tmp_path_factory.mktemp("voc"), {"2007/train": TRAIN, "2007/val": VAL})


def data_module(root, **kwargs):
    options = dict(
        root=root, train=VOCSource(["2007/train"]), val=VOCSource(["2007/val"]), classes=CLASSES, batch_size=3,
        loader=LoaderOptions(num_workers=0), img_size=SIZE,
    )
    return DetectionDataModule(**{**options, **kwargs})


def test_batches_follow_the_contract(voc_root):
    datamodule = data_module(voc_root)
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert datamodule.classes == CLASSES and datamodule.num_classes == 3
    assert datamodule.label_to_category_id is None
    for batch in (next(iter(datamodule.train_dataloader())), next(iter(datamodule.val_dataloader()))):
        images, labels, meta = batch["images"], batch["labels"], batch["meta"]
        assert images.shape == (3, 3, SIZE, SIZE) and images.dtype == torch.float32
        assert 0 <= images.min() and 1 < images.max() <= 255  # pixels: the model normalises them
        assert labels.dim() == 3 and labels.shape[:1] == (3,) and labels.shape[2] == 6
        assert labels.dtype == torch.float32
        padding = labels[..., 0] == -1
        assert bool((labels[padding][:, 1:] == 0).all())
        real = labels[~padding]
        assert set(real[:, 0].tolist()) <= {0.0, 1.0, 2.0} and set(real[:, 5].tolist()) <= {0.0, 1.0}
        assert bool((real[:, 3:5] > real[:, 1:3]).all())
        assert labels.shape[1] == max(1, int((~padding).sum(1).max()))
        assert meta["image_id"].dtype == torch.long and meta["orig_size"].dtype == torch.long
        assert meta["scale"].shape == meta["pad"].shape == (3, 2) and len(meta["path"]) == 3


def test_val_meta_maps_labels_back_to_the_original_annotations(voc_root):
    datamodule = data_module(voc_root)
    datamodule.setup("validate")
    records = read_voc(voc_root, ["2007/val"], classes=CLASSES).records[0]
    batch = next(iter(datamodule.val_dataloader()))
    labels, meta = batch["labels"], batch["meta"]
    for i, record in enumerate(records):
        rows = labels[i][labels[i, :, 0] >= 0]
        original = (rows[:, 1:5] - meta["pad"][i].repeat(2)) / meta["scale"][i].repeat(2)
        torch.testing.assert_close(original, torch.from_numpy(record.boxes), atol=1e-3, rtol=0)
        assert rows[:, 0].long().tolist() == record.labels.tolist()
        assert rows[:, 5].bool().tolist() == record.difficult.tolist()  # difficult objects are kept in val
        assert meta["orig_size"][i].tolist() == [record.height, record.width]
        assert meta["image_id"][i] == record.image_id and meta["path"][i] == record.path


def test_rect_eval_batches_similar_shapes_at_their_own_aspect_ratio(voc_root):
    transform = LetterboxTransform(img_size=SIZE, rect=True, stride=32)
    datamodule = data_module(voc_root, batch_size=1,
                             pipeline=PipelineOptions(rect_eval=True, val_transform=transform, size_divisor=32))
    datamodule.setup("validate")
    batches = list(datamodule.val_dataloader())
    # v0 50x80 -> 60x96 padded to 64x96; v2 45x45 -> 96x96; v1 70x40 -> 96x55 padded to 96x64: by height / width
    assert [Path(b["meta"]["path"][0]).stem for b in batches] == ["v0", "v2", "v1"]
    assert [tuple(b["images"].shape[-2:]) for b in batches] == [(64, 96), (96, 96), (96, 64)]
    assert batches[0]["meta"]["pad"][0].tolist() == [0, 2] and batches[2]["meta"]["pad"][0].tolist() == [4, 0]
    records = {Path(r.path).stem: r for r in read_voc(voc_root, ["2007/val"], classes=CLASSES).records[0]}
    for batch in batches:
        rows, meta = batch["labels"][0], batch["meta"]
        rows = rows[rows[:, 0] >= 0]
        original = (rows[:, 1:5] - meta["pad"][0].repeat(2)) / meta["scale"][0].repeat(2)
        expected = torch.from_numpy(records[Path(meta["path"][0]).stem].boxes).reshape(-1, 4)
        torch.testing.assert_close(original, expected, atol=1e-3, rtol=0)


def test_sorted_batches_cover_each_process_share_once():
    aspect_ratios = [1.5, 0.5, 1.0, 0.75, 2.0]
    seen = []
    for rank in range(2):
        share = DistributedSampler(range(5), num_replicas=2, rank=rank, shuffle=False)
        batches = list(SortedAspectRatioBatchSampler(share, 2, aspect_ratios=aspect_ratios))
        flat = [i for batch in batches for i in batch]
        assert [aspect_ratios[i] for i in flat] == sorted(aspect_ratios[i] for i in share)
        assert len(batches) == len(SortedAspectRatioBatchSampler(share, 2, aspect_ratios=aspect_ratios))
        seen += flat
    assert sorted(seen) == [0, 0, 1, 2, 3, 4]  # DistributedSampler repeats one index to even the shares


def test_difficult_objects_leave_training_unless_kept(voc_root):
    dropped = data_module(voc_root).dataset("train").records
    kept = data_module(voc_root, reading=ReadingOptions(keep_difficult_in_training=True)).dataset("train").records
    assert not any(r.difficult.any() for r in dropped)
    assert sum(len(r.labels) for r in dropped) == 6 + 3
    assert sum(int(r.difficult.sum()) for r in kept) == 3 and sum(len(r.labels) for r in kept) == 12


def test_val_split_is_a_seeded_disjoint_hold_out(voc_root):
    def split(seed):
        datamodule = data_module(voc_root, val=None, val_split=0.34, sampler=SamplerOptions(seed=seed))
        datamodule.setup("fit")
        return [r.path for r in datamodule.records["train"]], [r.path for r in datamodule.records["val"]]

    train, val = split(0)
    assert len(val) == 2 and len(train) == 4 and not set(train) & set(val)
    assert sorted(train + val) == sorted(str(voc_root / f"VOC2007/JPEGImages/{i}.jpg") for i in TRAIN)
    assert split(0) == (train, val)
    assert any(split(seed)[1] != val for seed in range(1, 6))


def test_inferred_classes_cover_every_split(voc_root):
    datamodule = data_module(voc_root, classes=None)
    datamodule.setup("validate")
    assert datamodule.classes == ["cat", "dog", "person"]  # "cat" only appears in val
    assert set(datamodule.records) == {"train", "val", "test"}


def test_coco_sources_give_category_ids(tmp_path):
    images = [(1, "a.jpg", 40, 60), (2, "b.jpg", 50, 50)]
    make_coco(tmp_path, [(5, "b"), (2, "a")], images, [(1, 5, [1.0, 1.0, 9.0, 9.0], 0)], name="train.json")
    make_coco(tmp_path, [(5, "b"), (2, "a")], images, [(2, 2, [3.0, 1.0, 9.0, 9.0], 1)], name="val.json")
    datamodule = DetectionDataModule(
        tmp_path, COCOSource("annotations/train.json", "images"), COCOSource("annotations/val.json", "images"),
        loader=LoaderOptions(num_workers=0), img_size=SIZE,
    )
    datamodule.setup("fit")
    assert datamodule.classes == ["a", "b"] and datamodule.label_to_category_id == [2, 5]
    assert [r.labels.tolist() for r in datamodule.records["train"]] == [[1], []]
    assert [r.difficult.tolist() for r in datamodule.records["val"]] == [[], [True]]
    assert sum(len(r.labels) for r in datamodule.dataset("train").records) == 1


def test_val_and_test_loaders_are_deterministic(voc_root):
    datamodule = data_module(voc_root)
    datamodule.setup("test")
    first, second = list(datamodule.test_dataloader()), list(datamodule.test_dataloader())
    assert [b["meta"]["path"] for b in first] == [[str(voc_root / f"VOC2007/JPEGImages/{i}.jpg") for i in VAL]]
    assert all(torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
               for a, b in zip(first, second))


def test_set_mosaic_switches_the_next_epoch(voc_root):
    datamodule = data_module(voc_root, pipeline=PipelineOptions(YoloTrainTransform(img_size=SIZE, mix={"mosaic": 1.0})))
    loader = datamodule.train_dataloader()
    assert all(next(iter(loader))["meta"]["mosaic"].tolist())
    datamodule.set_mosaic(False)
    assert not any(b["meta"]["mosaic"].any() for b in loader)


class MetaRecorder(L.LightningModule):
    """Records, per epoch, the set of values one ``meta`` entry of the training batches took."""

    def __init__(self, key):
        super().__init__()
        self.key = key
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: dict[int, set] = {}

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, set()).update(batch["meta"][self.key].tolist())
        return self.weight * batch["images"].mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_close_mosaic_turns_mosaic_off_for_the_last_epochs_with_persistent_workers(voc_root):
    datamodule = data_module(voc_root, loader=LoaderOptions(num_workers=1, persistent_workers=True), batch_size=2,
                             pipeline=PipelineOptions(YoloTrainTransform(img_size=SIZE, mix={"mosaic": 1.0}),
                                                      close_mosaic=2))
    model = MetaRecorder("mosaic")
    trainer = L.Trainer(
        max_epochs=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_train_batches=2, limit_val_batches=0, num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=datamodule)
    assert trainer.train_dataloader.persistent_workers
    assert model.seen == {0: {True}, 1: {True}, 2: {False}, 3: {False}}


class ZoomRecorder(YoloTrainTransform):
    """Hands each sample's zoom width over as its image id, in thousandths (the shift and colour jitter follow the
    same strength: tests/test_data_transforms.py)."""

    def __call__(self, samples):
        sample = super().__call__(samples)
        sample.image_id = round(self.scale * 1000)
        return sample


class ReplanTo(L.Callback):
    """Re-plans the run to ``epochs`` after its first epoch, as the time budget does."""

    def __init__(self, epochs):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.fit_loop.max_epochs = self.epochs


def test_a_short_run_zooms_narrower_in_proportion_to_its_passes_with_persistent_workers(voc_root):
    """6 images, batches of 2 and at least 4 steps an epoch: 2 passes an epoch. Planned 4 epochs = 8 passes of
    full_augment_passes 16: half of scale 0.5, 250 thousandths; re-planned to 3 epochs = 6 passes: 0.1875."""
    datamodule = data_module(voc_root, loader=LoaderOptions(num_workers=1, persistent_workers=True), batch_size=2,
                             sampler=SamplerOptions(min_steps_per_epoch=4),
                             pipeline=PipelineOptions(ZoomRecorder(img_size=SIZE, scale=0.5), full_augment_passes=16))
    model = MetaRecorder("image_id")
    trainer = L.Trainer(
        max_epochs=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_train_batches=2, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[ReplanTo(3)],
    )
    trainer.fit(model, datamodule=datamodule)
    assert trainer.train_dataloader.persistent_workers
    assert model.seen == {0: {250}, 1: {188}, 2: {188}}


def test_a_run_of_full_augment_passes_or_more_keeps_the_full_zoom(voc_root):
    for passes in (0, 8):  # 0: off; 8: as many as 4 epochs of 2 passes
        datamodule = data_module(voc_root, batch_size=2, sampler=SamplerOptions(min_steps_per_epoch=4),
                                 pipeline=PipelineOptions(ZoomRecorder(img_size=SIZE, scale=0.5),
                                                          full_augment_passes=passes))
        model = MetaRecorder("image_id")
        trainer = L.Trainer(max_epochs=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_train_batches=1,
                            limit_val_batches=0, num_sanity_val_steps=0)
        trainer.fit(model, datamodule=datamodule)
        assert model.seen == {epoch: {500} for epoch in range(4)}


def test_wrong_settings_fail_at_construction(voc_root):
    with pytest.raises(ValueError, match="data.val_split"):
        data_module(voc_root, val=None)
    with pytest.raises(ValueError, match="img_size=128 differs"):
        data_module(voc_root, pipeline=PipelineOptions(YoloTrainTransform(img_size=128)))
    with pytest.raises(ValueError, match="full_augment_passes"):
        PipelineOptions(full_augment_passes=-1)


def compose_data(name, data_dir, **overrides):
    """``data=<name>`` as ``train.py`` composes it (the default model brings ``conf/pipeline/yolo.yaml``), with the
    data folder under ``data_dir`` and ``overrides`` merged into the node."""
    data = compose_config("train", f"data={name}", f"paths.data_dir={data_dir}").data
    with open_dict(data):
        data.merge_with(overrides)
    return data


@pytest.mark.parametrize("name", ["sample", "sample_coco"])
def test_sample_configs_generate_and_serve_data(tmp_path, name):
    config = compose_data(name, tmp_path, reading={"prepare": {"num_train": 4, "num_val": 2}}, loader={"num_workers": 0},
                          batch_size=2, sampler={"min_steps_per_epoch": 0}, img_size=SIZE)
    datamodule = instantiate(config)
    assert isinstance(datamodule.train_transform, YoloTrainTransform) and datamodule.close_mosaic == 0.1
    assert datamodule.train_transform.img_size == SIZE == datamodule.val_transform.img_size
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert datamodule.classes == ["circle", "square", "triangle", "ring", "cross", "star"]
    assert (tmp_path / "sample" / "sample_info.json").is_file()
    assert next(iter(datamodule.val_dataloader()))["images"].shape == (2, 3, SIZE, SIZE)


@pytest.mark.parametrize("name", ["voc", "coco"])
def test_dataset_configs_build_their_sources(tmp_path, name):
    datamodule = instantiate(compose_data(name, tmp_path))
    assert datamodule.root == tmp_path / ("VOCdevkit" if name == "voc" else "coco")
    assert datamodule.batch_size == 8 and datamodule.loader.num_workers == "auto" and datamodule.img_size == "auto"
    assert datamodule.sampler.min_steps_per_epoch == 50 and datamodule.sampler.kind == "repeat_factor"
    if name == "voc":
        assert datamodule.sources["train"].splits == ["2007/trainval", "2012/trainval"]
        assert datamodule.sources["val"].splits == ["2007/test"] and len(datamodule.classes) == 20
    else:
        assert datamodule.sources["train"].annotation_file == "annotations/instances_train2017.json"
        assert datamodule.sources["val"].image_dir == "val2017" and datamodule.classes is None
