"""The Faster R-CNN pipeline: shorter-side resize with exact meta, padded collate, aspect-ratio grouping."""

import pytest
import torch

from lightning_det.data import AspectRatioBatchSampler, TrainingSampler, collate_detection
from lightning_det.data.transforms import EpochAugment, RCNNTransform, Sample


def sample(height: int, width: int, boxes: list[list[float]]) -> Sample:
    return Sample(
        image=torch.randint(0, 256, (3, height, width), dtype=torch.uint8),
        boxes=torch.tensor(boxes, dtype=torch.float32),
        labels=torch.zeros(len(boxes), dtype=torch.long),
        difficult=torch.zeros(len(boxes), dtype=torch.bool),
        image_id=0,
        path=f"{height}x{width}.jpg",
        orig_size=(height, width),
    )


def test_shorter_side_goes_to_min_size_unless_the_longer_exceeds_max_size():
    transform = RCNNTransform(min_size=60, max_size=100)
    wide = transform([sample(30, 45, [[3, 6, 30, 24]])])
    assert tuple(wide.image.shape[-2:]) == (60, 90)
    assert wide.boxes.tolist() == [[6, 12, 60, 48]]
    very_wide = transform([sample(20, 80, [[8, 4, 40, 10]])])  # 60/20 = 3 would make 240 > 100: ratio 100/80
    assert tuple(very_wide.image.shape[-2:]) == (25, 100)
    assert very_wide.scale == (100 / 80, 25 / 20)


def test_eval_meta_maps_boxes_back_to_the_original():
    original = [[5.0, 7.0, 33.0, 21.0]]
    out = RCNNTransform(min_size=50, max_size=200)([sample(30, 41, original)])
    sx, sy = out.scale
    mapped = (out.boxes - torch.tensor(out.pad).repeat(2)) / torch.tensor([sx, sy, sx, sy])
    assert torch.allclose(mapped, torch.tensor(original), atol=1e-4)


def test_flip_mirrors_boxes_in_the_resized_image():
    torch.manual_seed(0)
    out = RCNNTransform(min_size=40, max_size=100, flip=1.0)([sample(40, 50, [[0, 0, 10, 20]])])
    assert out.boxes.tolist() == [[40, 0, 50, 20]]
    assert out.scale == (1.0, 1.0) and out.orig_size == (40, 50)


def test_canvas_holds_the_resized_image_top_left_and_the_fill_elsewhere():
    """The input of an exported model: a 30 x 45 image at min 60 / max 100 is 60 x 90, on a 100 x 100 square of
    the fill pixel; boxes and the mapping back are those of the plain transform."""
    torch.manual_seed(0)
    original = sample(30, 45, [[3, 6, 30, 24]])
    plain = RCNNTransform(min_size=60, max_size=100)([original])
    fill = (1.5, 2.0, 250.0)
    out = RCNNTransform(min_size=60, max_size=100, canvas=100, fill=fill)([original])
    assert tuple(out.image.shape) == (3, 100, 100)
    assert torch.equal(out.image[:, :60, :90], plain.image)
    for channel, value in enumerate(fill):
        assert (out.image[channel, 60:] == value).all() and (out.image[channel, :, 90:] == value).all()
    assert out.boxes.tolist() == plain.boxes.tolist() == [[6, 12, 60, 48]]
    assert out.scale == plain.scale and out.pad == (0.0, 0.0) and out.orig_size == (30, 45)


def test_a_canvas_smaller_than_max_size_is_refused():
    with pytest.raises(ValueError, match="canvas=96 is smaller than max_size=100"):
        RCNNTransform(min_size=60, max_size=100, canvas=96)


def test_collate_pads_bottom_right_to_a_multiple_of_the_divisor():
    transform = RCNNTransform(min_size=40, max_size=100)
    samples = [transform([sample(40, 70, [[1, 1, 9, 9]])]), transform([sample(70, 40, [[2, 2, 8, 8]])])]
    batch = collate_detection(samples, size_divisor=32)
    assert tuple(batch["images"].shape) == (2, 3, 96, 96)
    assert torch.equal(batch["images"][0, :, :40, :70], samples[0].image)
    assert torch.equal(batch["images"][1, :, :70, :40], samples[1].image)
    assert batch["images"][0, :, 40:].abs().sum() == 0 and batch["images"][1, :, :, 40:].abs().sum() == 0
    assert batch["labels"][1, 0, 1:5].tolist() == samples[1].boxes[0].tolist()


def test_collate_keeps_equal_sizes_unpadded_by_default():
    samples = [sample(32, 48, [[1, 1, 5, 5]]) for _ in range(2)]
    for s in samples:
        s.image = s.image.float()
    assert tuple(collate_detection(samples)["images"].shape) == (2, 3, 32, 48)


def test_aspect_ratio_batches_hold_one_orientation_and_cover_every_image_once():
    landscape = [True, False, True, True, False, False, False, True, True]
    sampler = TrainingSampler(len(landscape), EpochAugment, shuffle=True, seed=3)
    batches = list(AspectRatioBatchSampler(sampler, batch_size=2, landscape=landscape))
    assert len(batches) == len(AspectRatioBatchSampler(sampler, batch_size=2, landscape=landscape)) == 3 + 2
    assert sorted(index for batch in batches for index, _ in batch) == list(range(len(landscape)))
    assert all(len({landscape[index] for index, _ in batch}) == 1 for batch in batches)


def test_every_rank_takes_the_same_number_of_aspect_ratio_batches_every_epoch():
    """Under DDP each rank's share splits into the two orientations differently from epoch to epoch; a batch count
    that followed the split would hang the gradient all-reduce (ranks taking different step counts) and make
    epochs longer or shorter than the count Lightning read at the start."""
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    landscape = (torch.rand(23, generator=torch.Generator().manual_seed(0)) < 0.3).tolist()
    sampler = TrainingSampler(len(landscape), EpochAugment, shuffle=True, seed=1)
    for epoch in range(8):
        sampler.set_epoch(epoch)
        for rank in range(2):
            share = DistributedSamplerWrapper(sampler, num_replicas=2, rank=rank, shuffle=False)
            share.set_epoch(epoch)
            batcher = AspectRatioBatchSampler(share, batch_size=4, landscape=landscape)
            batches = list(batcher)
            assert len(batches) == len(batcher) == 3  # 12 images a rank (23 evened to 24), 4 a batch
            assert sorted(i for batch in batches for i, _ in batch) == sorted(i for i, _ in share)
            assert all(len({landscape[i] for i, _ in batch}) == 1 for batch in batches[:-1])  # only the last mixes


def test_lightning_puts_a_distributed_sampler_under_the_aspect_ratio_batches():
    """What Lightning does to a training loader under DDP (its own re-instantiation, as in trainer=ddp)."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import BatchSampler, DataLoader

    landscape = [True, False, True, True, False, False, False, True]
    with _replace_dunder_methods(BatchSampler), _replace_dunder_methods(DataLoader, "dataset"):
        sampler = TrainingSampler(len(landscape), EpochAugment, shuffle=False)
        loader = DataLoader(range(8), batch_sampler=AspectRatioBatchSampler(sampler, 2, landscape=landscape))
    seen = []
    for rank in range(2):
        share = DistributedSamplerWrapper(sampler, num_replicas=2, rank=rank, shuffle=False)
        batches = list(_update_dataloader(loader, share, mode=RunningStage.TRAINING).batch_sampler)
        assert all(len({landscape[i] for i, _ in batch}) == 1 for batch in batches)
        seen += [i for batch in batches for i, _ in batch]
    assert sorted(seen) == list(range(8))  # each rank a half, together every image once
