"""Per-iteration learning-rate factors: a burn-in warm-up multiplied by a decay rule.

Each schedule is a picklable callable object so ``LambdaLR`` saves its state in checkpoints and a resumed
run continues the same curve. The Hydra configs in ``conf/scheduler/`` build them as partials; the detector
supplies ``total_steps`` and ``steps_per_epoch`` once the trainer knows them.
"""

from __future__ import annotations

import bisect
import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, ReduceLROnPlateau


class Schedule:
    """Warm-up ``(step / warmup) ** power`` (linear: power 1; Darknet's burn-in: power 4) times a decay rule.

    The warm-up lasts the longer of ``warmup_steps`` and ``warmup_epochs``, but never more than ``warmup_share``
    of the whole run: on a small dataset a fixed step count would otherwise outlast the learning (Ultralytics'
    ``max(3 epochs, 100 steps)`` is 20 epochs of a 70-image set at batch 16).
    """

    def __init__(
        self, total_steps: int, steps_per_epoch: int, warmup_steps: int = 0, warmup_epochs: float = 0.0,
        warmup_power: float = 1.0, warmup_share: float | None = 0.1,
    ) -> None:
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.requested_warmup = max(warmup_steps, round(warmup_epochs * self.steps_per_epoch))
        self.warmup_share = warmup_share
        self.warmup_power = warmup_power
        self.fit_to(total_steps)

    def fit_to(self, total_steps: int) -> None:
        """Lay the schedule over ``total_steps`` optimizer steps (the time budget re-estimates them as it goes)."""
        self.total_steps = max(1, total_steps)
        cap = self.total_steps if self.warmup_share is None else round(self.warmup_share * self.total_steps)
        self.warmup_steps = min(self.requested_warmup, cap, self.total_steps)

    def __call__(self, step: int) -> float:
        return self.warmup(step) * self.decay(step)

    def warmup(self, step: int) -> float:
        if step >= self.warmup_steps:
            return 1.0
        return (step / self.warmup_steps) ** self.warmup_power

    def decay(self, step: int) -> float:
        return 1.0


class MultiStep(Schedule):
    """Multiply by ``gamma`` at each milestone, given in epochs or as fractions of the whole run."""

    def __init__(self, milestones: list[float], gamma: float = 0.1, unit: str = "fraction", **kwargs) -> None:
        super().__init__(**kwargs)
        if unit not in ("fraction", "epoch"):
            raise ValueError(f"scheduler unit must be 'fraction' or 'epoch', got {unit!r}")
        per_unit = self.total_steps if unit == "fraction" else self.steps_per_epoch
        self.milestone_steps = sorted(round(m * per_unit) for m in milestones)
        self.gamma = gamma

    def decay(self, step: int) -> float:
        return self.gamma ** bisect.bisect_right(self.milestone_steps, step)


class Cosine(Schedule):
    """Half a cosine from 1 down to ``final_factor`` over the run (after the warm-up)."""

    def __init__(self, final_factor: float = 0.01, **kwargs) -> None:
        super().__init__(**kwargs)
        self.final_factor = final_factor

    def decay(self, step: int) -> float:
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, max(0, step - self.warmup_steps) / span)
        return self.final_factor + (1 - self.final_factor) * 0.5 * (1 + math.cos(math.pi * progress))


class Exponential(Schedule):
    """Multiply by ``gamma`` every epoch (applied smoothly per iteration)."""

    def __init__(self, gamma: float = 0.95, **kwargs) -> None:
        super().__init__(**kwargs)
        self.gamma = gamma

    def decay(self, step: int) -> float:
        return self.gamma ** (step / self.steps_per_epoch)


class Polynomial(Schedule):
    """``(1 - progress) ** power`` down to zero at the end of the run (MXNet SSD's and DeepLab's "poly")."""

    def __init__(self, power: float = 0.9, **kwargs) -> None:
        super().__init__(**kwargs)
        self.power = power

    def decay(self, step: int) -> float:
        return (1 - min(step, self.total_steps) / self.total_steps) ** self.power


def multistep(optimizer: Optimizer, **kwargs) -> LambdaLR:
    return LambdaLR(optimizer, MultiStep(**kwargs))


def cosine(optimizer: Optimizer, **kwargs) -> LambdaLR:
    return LambdaLR(optimizer, Cosine(**kwargs))


def exponential(optimizer: Optimizer, **kwargs) -> LambdaLR:
    return LambdaLR(optimizer, Exponential(**kwargs))


def polynomial(optimizer: Optimizer, **kwargs) -> LambdaLR:
    return LambdaLR(optimizer, Polynomial(**kwargs))


def constant(optimizer: Optimizer, **kwargs) -> LambdaLR:
    """No decay; the warm-up still applies."""
    return LambdaLR(optimizer, Schedule(**kwargs))


class BurnIn(LRScheduler):
    """The warm-up of ``schedule`` alone, applied on top of whatever else sets the rate.

    Each step scales the current lr by the warm-up's growth since the last step instead of setting it from the
    base lr, so a reduction made meanwhile by another scheduler (``ReduceLROnPlateau``) is kept. After the
    warm-up it leaves the lr alone.
    """

    def __init__(self, optimizer: Optimizer, schedule: Schedule) -> None:
        self.schedule = schedule
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        step = self.last_epoch
        now = self.schedule.warmup(step)
        before = self.schedule.warmup(step - 1) if step > 0 else 0.0
        if before == 0.0:  # the start (the lr is 0 there: nothing to keep)
            return [group["initial_lr"] * now for group in self.optimizer.param_groups]
        return [group["lr"] * now / before for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        """Plain data only (the schedule as its attributes), so checkpoints load with ``weights_only``."""
        state = {key: value for key, value in self.__dict__.items() if key not in ("optimizer", "schedule")}
        return {**state, "schedule": dict(vars(self.schedule))}

    def load_state_dict(self, state_dict: dict) -> None:
        state = dict(state_dict)
        vars(self.schedule).update(state.pop("schedule"))
        self.__dict__.update(state)


def plateau(
    optimizer: Optimizer, monitor: str, mode: str = "max", factor: float = 0.1, patience: int = 3,
    min_lr: float = 0.0, total_steps: int = 1, steps_per_epoch: int = 1, **warmup: float,
) -> list[dict]:
    """``ReduceLROnPlateau`` on a validation value, checked after every validation epoch (keras-yolo3's stage 2),
    after the burn-in warm-up when one is configured (``warmup_epochs``/``warmup_steps``, as the other schedules).

    Returned as Lightning scheduler configs: the per-step warm-up, if any, then the per-epoch reduction, which
    needs the monitored value.
    """
    schedule = Schedule(total_steps, steps_per_epoch, **warmup)
    burn_in = [{"scheduler": BurnIn(optimizer, schedule), "interval": "step"}] if schedule.warmup_steps else []
    scheduler = ReduceLROnPlateau(optimizer, mode=mode, factor=factor, patience=patience, min_lr=min_lr)
    return [*burn_in, {"scheduler": scheduler, "interval": "epoch", "monitor": monitor, "strict": True}]
