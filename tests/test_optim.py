"""Learning-rate schedules against hand-computed values, and weight-decay groups."""

import math

import pytest
import torch
from torch import nn

from lightning_det.optim import constant, cosine, multistep, parameter_groups, plateau


def lrs(scheduler_fn, steps: int, base_lr: float = 0.1, **kwargs) -> list[float]:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base_lr)
    scheduler = scheduler_fn(optimizer, **kwargs)
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_burn_in_power_four_then_constant():
    seen = lrs(constant, 6, total_steps=100, steps_per_epoch=10, warmup_steps=4, warmup_power=4.0)
    expected = [0.1 * (i / 4) ** 4 for i in range(4)] + [0.1, 0.1]
    assert seen == pytest.approx(expected)


def test_linear_warmup_from_epochs():
    seen = lrs(constant, 6, total_steps=100, steps_per_epoch=2, warmup_epochs=2.0, warmup_power=1.0)
    assert seen == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1, 0.1])


def test_multistep_fractions_of_the_run():
    seen = lrs(multistep, 10, total_steps=10, steps_per_epoch=5, milestones=[0.8, 0.9], gamma=0.1)
    assert seen == pytest.approx([0.1] * 8 + [0.01, 0.001])


def test_multistep_epoch_milestones():
    seen = lrs(multistep, 8, total_steps=8, steps_per_epoch=2, milestones=[1, 3], unit="epoch", gamma=0.5)
    assert seen == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.05, 0.05, 0.025, 0.025])


def test_cosine_after_warmup_reaches_final_factor():
    seen = lrs(cosine, 11, total_steps=10, steps_per_epoch=5, warmup_steps=2, warmup_power=1.0, final_factor=0.1,
               warmup_share=None)
    assert seen[:2] == pytest.approx([0.0, 0.05])
    # after warm-up: 0.1 * (0.1 + 0.9 * 0.5 * (1 + cos(pi * (i - 2) / 8)))
    expected = [0.1 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (i - 2) / 8))) for i in range(2, 11)]
    assert seen[2:] == pytest.approx(expected)


def test_schedule_state_survives_a_checkpoint_round_trip():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = multistep(optimizer, total_steps=10, steps_per_epoch=5, milestones=[0.5], gamma=0.1)
    for _ in range(6):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    fresh_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    fresh = multistep(fresh_opt, total_steps=10, steps_per_epoch=5, milestones=[0.9], gamma=0.5)
    fresh.load_state_dict(state)
    assert fresh.get_last_lr() == pytest.approx([0.1])
    assert fresh.lr_lambdas[0].milestone_steps == [5]


def test_bad_unit_is_rejected():
    with pytest.raises(ValueError, match="unit"):
        lrs(multistep, 1, total_steps=10, steps_per_epoch=5, milestones=[1], unit="iteration")


def test_no_weight_decay_on_norm_and_bias():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1), nn.Linear(2, 2))
    decay, no_decay = parameter_groups(model, weight_decay=5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert not decay["frozen"] and not no_decay["frozen"]
    decayed = {id(p) for p in decay["params"]}
    assert decayed == {id(model[0].weight), id(model[2].weight), id(model[3].weight)}
    exempt = {id(p) for p in no_decay["params"]}
    assert exempt == {id(model[1].weight), id(model[1].bias), id(model[2].bias), id(model[3].bias)}


def test_frozen_parameters_get_groups_of_their_own():
    model = nn.Conv2d(3, 4, 3)
    model.weight.requires_grad_(False)
    groups = parameter_groups(model, weight_decay=1e-4)
    assert [(g["frozen"], g["weight_decay"], [id(p) for p in g["params"]]) for g in groups] == [
        (False, 0.0, [id(model.bias)]),
        (True, 1e-4, [id(model.weight)]),
    ]


def test_plateau_reduces_after_patience_epochs_without_improvement():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    (config,) = plateau(optimizer, monitor="val/mAP", mode="max", factor=0.1, patience=1)  # no warm-up asked
    assert config["monitor"] == "val/mAP" and config["interval"] == "epoch"
    seen = []
    for value in (0.3, 0.5, 0.5, 0.5, 0.6, 0.6, 0.6):
        config["scheduler"].step(value)
        seen.append(optimizer.param_groups[0]["lr"])
    # 0.5 improves; two epochs without improvement (> patience 1) -> x0.1; 0.6 improves; two more -> x0.1
    assert seen == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001])


def test_plateau_after_burn_in_keeps_a_reduction_made_during_the_warm_up():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    warmup, reduce = plateau(optimizer, monitor="val/mAP", factor=0.1, patience=0, total_steps=100,
                             steps_per_epoch=2, warmup_steps=6, warmup_power=1.0)
    assert (warmup["interval"], reduce["interval"]) == ("step", "epoch")
    seen = []
    for value in (0.5, 0.4, 0.6, 0.6):  # epoch 1 is worse than epoch 0 -> x0.1 (patience 0)
        for _ in range(2):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            warmup["scheduler"].step()
        reduce["scheduler"].step(value)
    # linear warm-up over 6 steps (0.1 * i / 6), the reduction after step 3 scaling the rest of it
    expected = [0.0, 0.1 / 6, 0.2 / 6, 0.3 / 6, 0.01 * 4 / 6, 0.01 * 5 / 6, 0.01, 0.01]
    assert seen == pytest.approx(expected)
