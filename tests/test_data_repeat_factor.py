"""Repeat-factor sampling (data.sampler.kind=repeat_factor): the LVIS rule, fixed-length passes with the expected
counts, and the same epoch cut into equal shares when Lightning slips its distributed sampler underneath."""

import logging
import math

import numpy as np
import pytest
import torch
from helpers import make_voc

from lightning_det.data import (
    DetectionDataModule,
    LoaderOptions,
    PipelineOptions,
    SamplerOptions,
    TrainingSampler,
    VOCSource,
)
from lightning_det.data.records import AnnotationRecord
from lightning_det.data.repeat_factor import image_repeat_factors, pass_length, repeated_indices
from lightning_det.data.transforms import EpochAugment


def record(labels: list[int]) -> AnnotationRecord:
    n = len(labels)
    return AnnotationRecord("x.jpg", 0, 10, 10, np.zeros((n, 4), np.float32), np.array(labels, np.int64),
                            np.zeros(n, bool))


def test_lvis_rule_by_hand():
    # class 0 in 3 of 4 images, class 1 in 1 of 4, class 2 in none
    records = [record([0]), record([0, 0]), record([1, 0]), record([])]
    np.testing.assert_allclose(image_repeat_factors(records, 3, threshold=0.5), [1, 1, math.sqrt(0.5 / 0.25), 1])
    # t = 0.9: class 0 gets sqrt(0.9 / 0.75) too; an image takes its rarest class's factor; no objects: 1
    np.testing.assert_allclose(image_repeat_factors(records, 3, threshold=0.9),
                               [math.sqrt(1.2), math.sqrt(1.2), math.sqrt(3.6), 1])
    np.testing.assert_array_equal(image_repeat_factors(records, 3, threshold=0.001), [1, 1, 1, 1])


def counts_over_epochs(factors: torch.Tensor, epochs: int = 4000) -> torch.Tensor:
    return torch.stack([torch.bincount(repeated_indices(factors, torch.Generator().manual_seed(seed)),
                                       minlength=len(factors)) for seed in range(epochs)])


def test_a_pass_has_a_fixed_length_and_the_factors_as_expected_counts():
    factors = torch.tensor([1.5, 1.5, 1.2, 1.8, 2.0], dtype=torch.float64)  # fractions sum to 2: two extras a pass
    counts = counts_over_epochs(factors)
    assert pass_length(factors) == 8 and bool((counts.sum(1) == 8).all())
    assert bool((counts >= factors.floor()).all() and (counts <= factors.ceil()).all())
    torch.testing.assert_close(counts.double().mean(0), factors, atol=0.03, rtol=0)


def test_fractions_are_rounded_to_whole_extras_in_proportion():
    factors = torch.tensor([1.0, 2.5, 1.25, 3.0], dtype=torch.float64)  # fractions sum to 0.75: one extra a pass
    counts = counts_over_epochs(factors)
    assert pass_length(factors) == 8 and bool((counts.sum(1) == 8).all())
    # the extra goes to image 1 with probability 0.5 / 0.75 and to image 2 with 0.25 / 0.75
    torch.testing.assert_close(counts.double().mean(0), torch.tensor([1, 2 + 2 / 3, 1 + 1 / 3, 3.0],
                                                                     dtype=torch.float64), atol=0.03, rtol=0)


def test_the_sampler_draws_anew_each_epoch_and_the_same_on_every_rank():
    factors = [1.0, 2.5, 1.25, 3.0, 1.6]  # 8 whole repeats + round(1.35) = 9 a pass
    sampler = TrainingSampler(5, EpochAugment, seed=7, repeats=2, repeat_factors=factors)
    epochs = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        epochs.append([index for index, _ in sampler])
        again = TrainingSampler(5, EpochAugment, seed=7, repeats=2, repeat_factors=factors)  # another rank's copy
        again.set_epoch(epoch)
        assert [index for index, _ in again] == epochs[-1]
    assert len(sampler) == 18 and all(len(order) == 18 for order in epochs) and epochs[0] != epochs[1]


@pytest.fixture(scope="module")
def rare_class_root(tmp_path_factory):
    """8 training images: 'common' in all of them, 'rare' in one."""
    images = {f"t{k}": (40, 40, [("common", (1, 1, 20, 20), False)] + ([("rare", (21, 21, 39, 39), False)] if k == 3
                                                                        else [])) for k in range(8)}
    return make_voc(tmp_path_factory.mktemp("voc"), {"train": images, "val": {"v0": images["t0"]}})


def data_module(root, **kwargs) -> DetectionDataModule:
    return DetectionDataModule(root, VOCSource(["train"]), VOCSource(["val"]), classes=["common", "rare"],
                               batch_size=2, loader=LoaderOptions(num_workers=0), img_size=32, **kwargs)


def test_data_module_repeats_the_rare_class_image_and_reports_it(rare_class_root, caplog):
    datamodule = data_module(rare_class_root, sampler=SamplerOptions("repeat_factor", repeat_threshold=0.5))
    datamodule.setup("fit")
    with caplog.at_level(logging.INFO):
        sampler = datamodule.train_dataloader().sampler
    # 'rare' is in 1 / 8 of the images: its image repeated sqrt(0.5 / 0.125) = 2 times, the others once
    np.testing.assert_allclose(sampler.repeat_factors.numpy(), [1, 1, 1, 2, 1, 1, 1, 1])
    assert len(sampler) == 9 and sorted(index for index, _ in sampler) == [0, 1, 2, 3, 3, 4, 5, 6, 7]
    assert "common 1.000, rare 0.125; 1 of 8 images repeated (up to 2.00 times), 9 images a pass" in caplog.text


def test_auto_threshold_is_one_over_the_class_count(rare_class_root, caplog):
    """Two classes: auto is 0.5, so the image of 'rare' (1 / 8 of the images) repeats sqrt(0.5 / 0.125) = 2 times;
    a class in at least half of the images would repeat nothing."""
    datamodule = data_module(rare_class_root, sampler=SamplerOptions("repeat_factor", repeat_threshold="auto"))
    datamodule.setup("fit")
    with caplog.at_level(logging.INFO):
        sampler = datamodule.train_dataloader().sampler
    np.testing.assert_allclose(sampler.repeat_factors.numpy(), [1, 1, 1, 2, 1, 1, 1, 1])
    assert "(data.sampler.repeat_threshold=0.5)" in caplog.text


def test_unknown_sampler_and_bad_threshold_are_refused(rare_class_root):
    with pytest.raises(ValueError, match="data.sampler.kind must be one of"):
        SamplerOptions("weighted")
    with pytest.raises(ValueError, match=r"data.sampler.repeat_threshold must be a share of images in \(0, 1\]"):
        SamplerOptions("repeat_factor", repeat_threshold=0)


@pytest.mark.parametrize("group_aspect_ratio", [False, True])
def test_under_ddp_each_rank_takes_an_equal_share_of_the_same_epoch(rare_class_root, group_aspect_ratio):
    """What Lightning does to the training loader under DDP: a DistributedSamplerWrapper under the loader's sampler
    (or under the aspect-ratio batch sampler), one per rank, each told the epoch."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import BatchSampler, DataLoader

    datamodule = data_module(rare_class_root, sampler=SamplerOptions("repeat_factor", repeat_threshold=0.9),
                             pipeline=PipelineOptions(group_aspect_ratio=group_aspect_ratio))
    datamodule.setup("fit")
    with _replace_dunder_methods(BatchSampler), _replace_dunder_methods(DataLoader, "dataset"):  # as the Trainer
        loader = datamodule.train_dataloader()
    sampler = loader.batch_sampler.sampler if group_aspect_ratio else loader.sampler
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        whole = [index for index, _ in sampler]
        shares = []
        for rank in (0, 1):
            share = DistributedSamplerWrapper(sampler, num_replicas=2, rank=rank, shuffle=False)
            share.set_epoch(epoch)
            rank_loader = _update_dataloader(loader, share, mode=RunningStage.TRAINING)
            shares.append([int(i) for batch in rank_loader.batch_sampler for i, _ in batch]
                          if group_aspect_ratio else [i for i, _ in rank_loader.sampler])
        assert len(shares[0]) == len(shares[1]) == math.ceil(len(whole) / 2)
        padded = whole + whole[: len(shares[0]) * 2 - len(whole)]  # DistributedSampler evens the shares
        assert sorted(shares[0] + shares[1]) == sorted(padded)


def test_a_two_process_ddp_run_trains_on_equal_shares(tmp_path):
    """Through train.py with trainer=ddp on two gloo processes: both ranks must take the same number of steps
    (unequal shares would hang the gradient all-reduce), the number an epoch of round(sum r) images gives."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([
        sys.executable, "train.py", "model=yolov3_tiny", "model.width=0.125", "data.img_size=64", "data.batch_size=2",
        f"data.root={tmp_path / 'sample'}", "data.reading.prepare.num_train=12", "data.reading.prepare.num_val=4",
        "data.loader.num_workers=0",
        "data.sampler.min_steps_per_epoch=0", "data.loader.persistent_workers=false", "data.sampler.kind=repeat_factor",
        "data.sampler.repeat_threshold=0.9", "data.pipeline.train_transform.rect=false", "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_epochs=2", "callbacks.progress_bar.refresh_rate=0", f"paths.log_dir={tmp_path / 'logs'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ], cwd=repo, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    per_pass = int(re.search(r"(\d+) images a pass", done.stdout + done.stderr).group(1))
    assert per_pass > 12  # the rule repeated some images
    checkpoint = torch.load(tmp_path / "run/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2 * math.ceil(math.ceil(per_pass / 2) / 2)
