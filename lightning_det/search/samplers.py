"""Ultralytics' hyper-parameter evolution as an Optuna sampler: ``hparams_search/sampler=evolve``.

The recipe mirrored is the single-parent one of YOLOv5's ``train.py --evolve`` and Ultralytics' ``Tuner`` before it
switched to crossover: keep the ``top_n`` (5) best finished trials; pick one parent at random with weights
``fitness - min(fitness) + 1e-6``; multiply every numeric gene by
``clip(1 + gain * [u < mutation_prob] * z * r * sigma, 0.3, 3.0)`` with ``u ~ U(0, 1)`` and ``z ~ N(0, 1)`` per
gene and one ``r ~ U(0, 1)`` shared by all genes (``mutation_prob`` 0.8, ``sigma`` 0.2), drawing again until at
least one gene changes; then clip to the declared bounds. Differences: a categorical gene (Ultralytics has none)
switches to another choice with probability ``mutation_prob``; integer genes are rounded, stepped genes snapped to
their grid; values are not rounded to five decimals (that would zero a learning rate of 1e-6). Until a trial has
finished, values are drawn uniformly (the search may enqueue the base config's values first, as Ultralytics
starts from the default hyper-parameters).

Every draw comes from a generator seeded with ``(seed, trial number)``, so a study is reproducible and a resumed
study samples what the uninterrupted one would have.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.search_space import IntersectionSearchSpace
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)

FACTOR_RANGE = (0.3, 3.0)   # Ultralytics' clip of a gene's multiplicative change
WEIGHT_EPS = 1e-6           # keeps the worst parent of the top-n selectable (Ultralytics' epsilon)


class EvolutionSampler(BaseSampler):
    """Mutates one of the best finished trials: a local search around what already works."""

    def __init__(self, seed: int | None = None, top_n: int = 5, mutation_prob: float = 0.8, sigma: float = 0.2,
                 gains: Mapping[str, float] | None = None) -> None:
        """``gains`` scales the mutation of single parameters (0 freezes one; default 1 for all)."""
        if top_n < 1 or not 0.0 <= mutation_prob <= 1.0 or sigma < 0:
            raise ValueError(f"EvolutionSampler needs top_n >= 1, 0 <= mutation_prob <= 1 and sigma >= 0; got "
                             f"top_n={top_n}, mutation_prob={mutation_prob}, sigma={sigma}")
        self.seed = seed
        self.top_n = top_n
        self.mutation_prob = mutation_prob
        self.sigma = sigma
        self.gains = dict(gains or {})
        self._search_space = IntersectionSearchSpace()

    def reseed_rng(self) -> None:
        self.seed = int(np.random.SeedSequence().generate_state(1)[0])

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        self._raise_error_if_multi_objective(study)
        return self._search_space.calculate(study)

    def sample_relative(self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
                        ) -> dict[str, Any]:
        parents = self.top_parents(study, search_space)
        if not search_space or not parents:
            return {}
        unknown = sorted(set(self.gains) - set(search_space))
        if unknown:
            log.warning("EvolutionSampler gains name parameters that are not searched: %s", unknown)
        rng = self._rng(trial.number)
        sign = 1.0 if study.direction == StudyDirection.MAXIMIZE else -1.0
        fitness = np.array([sign * parent.value for parent in parents])
        weights = fitness - fitness.min() + WEIGHT_EPS
        parent = parents[rng.choice(len(parents), p=weights / weights.sum())]
        return self.mutate({name: parent.params[name] for name in search_space}, search_space, rng)

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        """Uniform, from a generator of its own per trial and parameter (so parameters are not correlated)."""
        seed = None if self.seed is None else int(self._seed_sequence(trial.number, param_name).generate_state(1)[0])
        return RandomSampler(seed=seed).sample_independent(study, trial, param_name, param_distribution)

    def top_parents(self, study: Study, search_space: Mapping[str, BaseDistribution]) -> list[FrozenTrial]:
        """The ``top_n`` best finished trials that hold every parameter of the space, best first."""
        finished = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                    if all(name in t.params for name in search_space)]
        best_first = study.direction == StudyDirection.MAXIMIZE
        return sorted(finished, key=lambda t: t.value, reverse=best_first)[: self.top_n]

    def mutate(self, parent: dict[str, Any], search_space: Mapping[str, BaseDistribution],
               rng: np.random.Generator) -> dict[str, Any]:
        """A child of ``parent``: numeric genes scaled by a clipped random factor, categorical ones switched."""
        numeric = [n for n, d in search_space.items() if not isinstance(d, CategoricalDistribution)]
        categorical = [n for n, d in search_space.items()
                       if isinstance(d, CategoricalDistribution) and len(d.choices) > 1]
        gains = np.array([self.gains.get(name, 1.0) for name in numeric])
        can_change = self.mutation_prob > 0 and (bool(np.any(gains * self.sigma > 0)) or bool(categorical))
        while True:
            mutated = rng.random(len(numeric)) < self.mutation_prob
            steps = gains * mutated * rng.standard_normal(len(numeric)) * rng.random() * self.sigma
            factors = np.clip(1.0 + steps, *FACTOR_RANGE)
            switched = rng.random(len(categorical)) < self.mutation_prob
            if not can_change or np.any(factors != 1.0) or np.any(switched):
                break
        child = dict(parent)
        for name, factor in zip(numeric, factors):
            child[name] = within_bounds(parent[name] * factor, search_space[name])
        for name, switch in zip(categorical, switched):
            if switch:
                others = [c for c in search_space[name].choices if c != parent[name]]
                child[name] = others[rng.integers(len(others))]
        return child

    def _seed_sequence(self, trial_number: int, *names: str) -> np.random.SeedSequence:
        return np.random.SeedSequence([self.seed, trial_number, *(zlib.crc32(n.encode()) for n in names)])

    def _rng(self, trial_number: int) -> np.random.Generator:
        return np.random.default_rng(None if self.seed is None else self._seed_sequence(trial_number))


def within_bounds(value: float, distribution: FloatDistribution | IntDistribution) -> float | int:
    """``value`` clipped to the distribution's range and snapped to its step (integers rounded)."""
    low, high, step = distribution.low, distribution.high, distribution.step
    value = min(max(value, low), high)
    if step is not None:
        value = min(low + round((value - low) / step) * step, high)
    return int(round(value)) if isinstance(distribution, IntDistribution) else float(value)
