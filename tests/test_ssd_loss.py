"""MultiBox loss: hard negatives at 3:1 per image, normalisation by the positives, the cross-entropy meter."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_det.models.ssd.loss import MultiBoxLoss


def random_case(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    batch, priors, classes = 3, 40, 5
    conf = torch.randn(batch, priors, classes + 1, generator=generator)
    loc = torch.randn(batch, priors, 4, generator=generator)
    targets = torch.randn(batch, priors, 4, generator=generator)
    labels = torch.zeros(batch, priors, dtype=torch.long)
    labels[0, [1, 5, 9]] = torch.tensor([2, 3, 1])  # 3 positives
    labels[1, 7] = 5  # 1 positive ...
    labels[1, 8] = -1  # ... and an ignored box
    return loc, conf, labels, targets  # image 2 has no positive


def test_each_image_scores_three_hardest_negatives_per_positive():
    loc, conf, labels, targets = random_case()
    criterion = MultiBoxLoss(neg_pos_ratio=3.0)
    ce = F.cross_entropy(conf.permute(0, 2, 1), labels.clamp(min=0), reduction="none")
    negatives = criterion.hard_negatives(ce, labels, (labels > 0).sum(1))
    assert negatives.sum(1).tolist() == [9, 3, 0]
    assert not (negatives & (labels != 0)).any()
    for b in range(2):  # the chosen ones are the background boxes with the highest cross-entropy
        background_ce = ce[b][labels[b] == 0]
        threshold = background_ce.sort(descending=True).values[negatives[b].sum() - 1]
        assert torch.all(ce[b][negatives[b]] >= threshold)


def test_loss_matches_a_per_image_reference_computation():
    loc, conf, labels, targets = random_case(1)
    losses = MultiBoxLoss(neg_pos_ratio=3.0)(loc, conf, labels, targets)
    conf_sum, loc_sum, num_pos, scored = 0.0, 0.0, 0, 0
    for b in range(len(labels)):
        ce = F.cross_entropy(conf[b], labels[b].clamp(min=0), reduction="none")
        pos = labels[b] > 0
        k = int(3 * pos.sum())
        hardest = ce[labels[b] == 0].sort(descending=True).values[:k]
        conf_sum += ce[pos].sum() + hardest.sum()
        loc_sum += F.smooth_l1_loss(loc[b][pos], targets[b][pos], reduction="sum")
        num_pos += int(pos.sum())
        scored += int(pos.sum()) + k
    torch.testing.assert_close(losses["conf"], conf_sum / num_pos)
    torch.testing.assert_close(losses["loc"], loc_sum / num_pos)
    torch.testing.assert_close(losses["loss"], (conf_sum + loc_sum) / num_pos)
    torch.testing.assert_close(losses["ce"], conf_sum / scored)


def test_negatives_are_capped_by_the_background_available():
    conf = torch.randn(1, 6, 3)
    labels = torch.tensor([[1, 2, 0, 0, 0, -1]])
    ce = F.cross_entropy(conf.permute(0, 2, 1), labels.clamp(min=0), reduction="none")
    negatives = MultiBoxLoss(3.0).hard_negatives(ce, labels, torch.tensor([2]))
    assert negatives.tolist() == [[False, False, True, True, True, False]]


def test_a_batch_without_objects_gives_a_finite_zero_loss():
    losses = MultiBoxLoss()(torch.randn(2, 10, 4), torch.randn(2, 10, 3), torch.zeros(2, 10, dtype=torch.long),
                            torch.zeros(2, 10, 4))
    assert losses["loss"].item() == 0.0
