"""Optuna search (`hparams_search=<name>`): end to end through `train.py`, the loop's bookkeeping with a stand-in
training, and the evolutionary sampler on synthetic objectives."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import create_trial

import lightning_det.search.study as search_module
from lightning_det.models.detector import NonFiniteLossError
from lightning_det.search.samplers import EvolutionSampler
from lightning_det.search.study import declared_space, search

REPO = Path(__file__).resolve().parents[1]
optuna.logging.set_verbosity(optuna.logging.WARNING)

# One epoch of the narrowest tiny YOLOv3 at 64 px on 8 images: about a second per trial.
TINY_SEARCH = [
    "hparams_search=yolov3_tiny_sample",
    "model=yolov3_tiny",
    "model.width=0.125",
    "data.img_size=64",
    "data.batch_size=4",
    "data.loader.num_workers=0", "data.sampler.min_steps_per_epoch=0",
    "data.loader.persistent_workers=false",
    "data.reading.prepare.num_train=8",
    "data.reading.prepare.num_val=4",
    "trainer.max_epochs=1",
    "callbacks.progress_bar.refresh_rate=0",
    "~callbacks.image_logger",
]


def summary_rows(directory: Path) -> list[dict[str, str]]:
    with open(directory / "search_summary.csv", newline="") as file:
        return list(csv.DictReader(file))


def run_search(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "train.py", *TINY_SEARCH, f"data.root={tmp_path / 'sample'}",
            f"paths.log_dir={tmp_path / 'logs'}", f"hydra.run.dir={tmp_path / 'run'}", *overrides]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def test_search_completes_then_resumes_after_an_interrupted_trial(tmp_path):
    run_search(tmp_path, "hparams_search.n_trials=3")
    directory = tmp_path / "logs" / "search" / "yolov3_tiny_sample"
    assert (directory / "study.db").is_file()
    rows = summary_rows(directory)
    assert [(r["trial"], r["state"]) for r in rows] == [("0", "COMPLETE"), ("1", "COMPLETE"), ("2", "COMPLETE")]
    space = declared_space(OmegaConf.load(REPO / "conf" / "hparams_search" / "yolov3_tiny_sample.yaml").space)
    for row in rows:
        assert 0.0 <= float(row["val/mAP"]) <= 1.0 and Path(row["checkpoint"]).is_file()
        trial_config = OmegaConf.load(directory / f"trial_{int(row['trial']):03d}" / "config_resolved.yaml")
        for name, distribution in space.items():  # the sampled values are what the trial trained with
            assert distribution.low <= float(row[name]) <= distribution.high
            assert OmegaConf.select(trial_config, name) == pytest.approx(float(row[name]), rel=1e-12)
    assert "Train with it:" in (directory / "search_summary.md").read_text()

    # A process killed mid-trial leaves that trial RUNNING in the storage.
    study = optuna.load_study(study_name="yolov3_tiny_sample", storage=f"sqlite:///{directory / 'study.db'}")
    killed = study.ask(space)

    done = run_search(tmp_path, "hparams_search.n_trials=4")
    rows = summary_rows(directory)
    assert [r["state"] for r in rows] == ["COMPLETE"] * 3 + ["FAIL", "COMPLETE"]  # exactly one more trial ran
    assert {name: float(rows[4][name]) for name in space} == pytest.approx(killed.params, rel=1e-12)
    assert "trial 3 was interrupted" in done.stdout + done.stderr
    assert "best trial" in done.stdout + done.stderr


def loop_config(tmp_path: Path, **search: object) -> OmegaConf:
    """The parts of a training config the search reads, around a two-parameter space."""
    directory = tmp_path / "study"
    return OmegaConf.create({
        "seed": 0,
        "monitor": "val/mAP",
        "paths": {"log_dir": str(tmp_path), "output_dir": str(tmp_path / "unused")},
        "optimizer": {"lr": 1e-3},
        "model": {"width": 0.5},
        "hparams_search": {
            "sampler": {"_target_": "optuna.samplers.RandomSampler", "seed": 0},
            "study_name": "loop", "directory": str(directory), "storage": f"sqlite:///{directory / 'study.db'}",
            "direction": "maximize", "n_trials": 4, "max_failures": 20, "start_from_config": True,
            "space": {"optimizer": {"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}},
                      "model": {"width": {"type": "categorical", "choices": [0.25, 0.5]}}},
            **search,
        },
    })


class StandInTraining:
    """Records each trial's config; diverges for a large lr, crashes for a small lr with the narrow model."""

    def __init__(self) -> None:
        self.configs: list = []

    def __call__(self, cfg) -> dict:
        self.configs.append(cfg)
        lr, width = cfg.optimizer.lr, cfg.model.width
        if lr > 0.01:
            raise NonFiniteLossError("loss is nan")
        if width == 0.25 and lr < 2e-3:
            raise RuntimeError("out of memory")
        return {"best_score": 1.0 - abs(math.log10(lr) + 2.5) / 3, "best_model_path": f"{cfg.paths.output_dir}/b.ckpt"}


def test_search_loop_records_diverged_and_crashed_trials_and_keeps_going(tmp_path, monkeypatch):
    training = StandInTraining()
    monkeypatch.setattr(search_module, "run", training)
    result = search(loop_config(tmp_path, n_trials=8))

    rows = summary_rows(tmp_path / "study")
    states = [r["state"] for r in rows]
    assert states.count("COMPLETE") == 8 and len(rows) == len(training.configs)
    for row, cfg in zip(rows, training.configs):
        lr, width = float(row["optimizer.lr"]), float(row["model.width"])
        assert cfg.optimizer.lr == lr and cfg.model.width == width and "hparams_search" not in cfg
        assert cfg.paths.output_dir == str(tmp_path / "study" / f"trial_{int(row['trial']):03d}")
        expected = "PRUNED" if lr > 0.01 else "FAIL" if width == 0.25 and lr < 2e-3 else "COMPLETE"
        assert row["state"] == expected
        assert (row["checkpoint"] != "") == (expected == "COMPLETE")
    assert "PRUNED" in states and "FAIL" in states  # the seed draws both kinds of bad trial
    assert (float(rows[0]["optimizer.lr"]), float(rows[0]["model.width"])) == (1e-3, 0.5)  # the config's values
    assert result["best_score"] == pytest.approx(max(float(r["val/mAP"]) for r in rows if r["state"] == "COMPLETE"))

    assert search(loop_config(tmp_path, n_trials=8))["best_score"] == result["best_score"]  # nothing left to run
    assert len(training.configs) == len(rows)


def test_search_loop_stops_after_max_failures(tmp_path, monkeypatch):
    def always_crashes(cfg):
        raise RuntimeError("broken")

    monkeypatch.setattr(search_module, "run", always_crashes)
    with pytest.raises(RuntimeError, match="3 trials of study 'loop' failed"):
        search(loop_config(tmp_path, max_failures=3))
    assert [r["state"] for r in summary_rows(tmp_path / "study")] == ["FAIL"] * 3


def test_a_trial_interrupted_in_process_is_retried_on_resume(tmp_path, monkeypatch):
    calls: list[float] = []

    def interrupted_once(cfg):
        calls.append(cfg.optimizer.lr)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return {"best_score": 0.5, "best_model_path": ""}

    monkeypatch.setattr(search_module, "run", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        search(loop_config(tmp_path, n_trials=3))
    search(loop_config(tmp_path, n_trials=3))
    rows = summary_rows(tmp_path / "study")
    assert [r["state"] for r in rows] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert calls[2] == calls[1]  # the interrupted values ran first after the resume


def test_resuming_with_the_other_direction_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(search_module, "run", lambda cfg: {"best_score": 0.5, "best_model_path": ""})
    search(loop_config(tmp_path, n_trials=1))
    with pytest.raises(ValueError, match="created to maximize its score, not minimize"):
        search(loop_config(tmp_path, n_trials=2, direction="minimize"))


def test_space_errors_name_the_key(tmp_path, monkeypatch):
    monkeypatch.setattr(search_module, "run", lambda cfg: pytest.fail("no trial may start"))
    typo = {"optimizer": {"lrr": {"type": "float", "low": 1e-4, "high": 1e-2}}}
    with pytest.raises(KeyError, match="optimizer.lrr"):
        search(loop_config(tmp_path, space=typo))
    with pytest.raises(ValueError, match="optimizer.lr: unknown type 'uniform'"):
        declared_space(OmegaConf.create({"optimizer": {"lr": {"type": "uniform", "low": 0, "high": 1}}}))
    with pytest.raises(ValueError, match="optimizer.lr: .*low"):
        declared_space(OmegaConf.create({"optimizer": {"lr": {"type": "float", "lo": 0, "high": 1}}}))


# The evolutionary sampler, on synthetic objectives.

MIXED_SPACE = {
    "x": FloatDistribution(0.5, 2.0),
    "lr": FloatDistribution(1e-4, 1e-1, log=True),
    "n": IntDistribution(1, 10),
    "w": FloatDistribution(0.0, 2.0, step=0.25),
    "c": CategoricalDistribution(["a", "b", "c"]),
}


def study_with_parents(sampler: EvolutionSampler, scores: list[float]) -> tuple[optuna.Study, list[dict]]:
    """A study holding finished trials with the given scores and distinct random parameters."""
    study = optuna.create_study(direction="maximize", sampler=sampler)
    draw = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    parents = [draw.ask(MIXED_SPACE).params for _ in scores]
    for params, score in zip(parents, scores):
        study.add_trial(create_trial(params=params, distributions=MIXED_SPACE, value=score))
    return study, parents


def test_children_stay_in_bounds_on_their_grids(tmp_path):
    study, _ = study_with_parents(EvolutionSampler(seed=0, sigma=5.0), [0.0, 1.0])
    children = [study.ask(MIXED_SPACE).params for _ in range(200)]
    for child in children:
        for name, distribution in MIXED_SPACE.items():
            if isinstance(distribution, CategoricalDistribution):
                assert child[name] in distribution.choices
            else:
                assert distribution.low <= child[name] <= distribution.high
        assert isinstance(child["n"], int) and (child["w"] / 0.25).is_integer()
    # sigma=5 pushes genes to both bounds (the factor's clip to [0.3, 3] still lets them get there)
    assert {0.5, 2.0} <= {child["x"] for child in children}


def test_without_mutation_a_child_copies_a_top_parent_chosen_by_fitness():
    sampler = EvolutionSampler(seed=0, top_n=3, mutation_prob=0.0)
    study, parents = study_with_parents(sampler, [0.1, 1.0, 0.5, 0.9])
    children = [study.ask(MIXED_SPACE).params for _ in range(100)]
    picked = [parents.index(child) for child in children]  # raises if a child is not an exact parent copy
    # weights fitness - min + 1e-6 over the top 3 (1.0, 0.9, 0.5): 0.5 : 0.4 : 1e-6
    assert set(picked) == {1, 3}
    assert 0.4 < picked.count(1) / len(picked) < 0.72


def test_mutation_factor_follows_the_ultralytics_recipe():
    """Factor 1 + z * r * sigma with z ~ N(0,1) per gene and one r ~ U(0,1): std = sigma * sqrt(E[r^2])."""
    space = {f"g{i}": FloatDistribution(1e-3, 1e3, log=True) for i in range(4)}
    parent = {name: 1.0 for name in space}
    sampler = EvolutionSampler(mutation_prob=1.0, sigma=0.2, gains={"g3": 0.0})
    rng = np.random.default_rng(0)
    factors = np.array([list(sampler.mutate(parent, space, rng).values()) for _ in range(4000)])
    assert factors[:, :3].std() == pytest.approx(0.2 / math.sqrt(3), rel=0.05)
    assert factors[:, :3].mean() == pytest.approx(1.0, abs=0.01)
    assert np.all(factors[:, 3] == 1.0)  # gain 0 freezes a gene
    # one shared r per child: the genes' deviations are correlated in size
    sizes = np.abs(factors[:, :3] - 1.0)
    assert np.corrcoef(sizes[:, 0], sizes[:, 1])[0, 1] > 0.1


def evolve(sampler: optuna.samplers.BaseSampler, n_trials: int) -> optuna.Study:
    """A quadratic in log space over 8 parameters, started from a base point, as `start_from_config` does."""
    target = np.exp(np.random.default_rng(0).uniform(math.log(0.3), math.log(3.0), 8))

    def objective(trial: optuna.Trial) -> float:
        x = np.array([trial.suggest_float(f"x{i}", 0.1, 10.0, log=True) for i in range(8)])
        return -float(np.sum(np.log(x / target) ** 2))

    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.enqueue_trial({f"x{i}": 1.0 for i in range(8)})
    study.optimize(objective, n_trials=n_trials)
    return study


def test_evolution_beats_random_search_on_a_quadratic_and_is_reproducible():
    for seed in range(3):
        evolved = evolve(EvolutionSampler(seed=seed), 40)
        random = evolve(optuna.samplers.RandomSampler(seed=seed), 40)
        assert evolved.best_value > random.best_value
        assert evolved.best_value > 0.5 * evolved.trials[0].value  # at least halved the start's distance
    again = evolve(EvolutionSampler(seed=2), 40)
    assert [t.params for t in again.trials] == [t.params for t in evolved.trials]
    assert [t.params for t in evolve(EvolutionSampler(seed=3), 40).trials] != [t.params for t in evolved.trials]
