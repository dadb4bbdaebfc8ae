"""Optuna hyper-parameter search driven from the training config: ``python train.py hparams_search=<name>``.

Hydra's Optuna sweeper plugin pins an old Optuna that breaks on SQLAlchemy 2, so the loop lives here: each trial
applies the sampled values to a copy of the config, trains it with ``lightning_det.train.run`` in its own
directory and reports the best validation score. The study is stored in a database whose path has no timestamp,
so re-running the same command resumes it until ``n_trials`` trials have completed.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import optuna
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import Trial, TrialState

from lightning_det.models.detector import NonFiniteLossError
from lightning_det.search.tables import markdown_table, write_csv
from lightning_det.tools.train import run

log = logging.getLogger(__name__)

DISTRIBUTIONS = {"float": FloatDistribution, "int": IntDistribution, "categorical": CategoricalDistribution}
ABSENT = object()            # tells a missing config key from one set to null


def search(cfg: DictConfig) -> dict[str, Any]:
    """Run (or resume) the study of ``cfg.hparams_search``; returns the best trial's score and parameters."""
    spec = cfg.hparams_search
    space = declared_space(spec.space)
    check_keys_exist(cfg, space)
    directory = Path(spec.directory)
    directory.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(storage=spec.storage, study_name=spec.study_name, direction=spec.direction,
                                sampler=instantiate(spec.sampler), load_if_exists=True)
    if study.direction.name.lower() != spec.direction:  # Optuna would silently keep the stored direction
        raise ValueError(f"study {spec.study_name!r} in {spec.storage} was created to {study.direction.name.lower()}"
                         f" its score, not {spec.direction}; set another hparams_search.study_name")
    fail_interrupted_trials(study)
    if spec.start_from_config and not study.trials:
        study.enqueue_trial(config_values(cfg, space))

    failures = 0
    while (complete := len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))) < spec.n_trials:
        if failures >= spec.max_failures:
            raise RuntimeError(f"{failures} trials of study {spec.study_name!r} failed or diverged in this run (see "
                               f"the log above); fix the cause or raise hparams_search.max_failures")
        trial = study.ask(space)
        log.info("trial %d (%d of %d complete): %s", trial.number, complete, spec.n_trials, override_line(trial.params))
        if run_trial(cfg, trial, directory / f"trial_{trial.number:03d}") != TrialState.COMPLETE:
            failures += 1
        write_summary(study, space, directory, cfg.monitor)

    write_summary(study, space, directory, cfg.monitor)
    best = study.best_trial
    log.info("best trial %d of study %s: %s %.4f; train with it: python train.py %s", best.number,
             spec.study_name, cfg.monitor, best.value, override_line(best.params))
    return {"best_score": best.value, "best_params": best.params, "summary": str(directory / "search_summary.md")}


def declared_space(space: DictConfig, prefix: str = "") -> dict[str, BaseDistribution]:
    """The nested ``space`` node as Optuna distributions keyed by dotted config key, in declaration order."""
    distributions: dict[str, BaseDistribution] = {}
    for key, node in space.items():
        name = f"{prefix}{key}"
        if not OmegaConf.is_dict(node):
            raise ValueError(f"hparams_search.space.{name}: expected a node like {{type: float, low: 0.1, high: 1}} "
                             f"or a group of them, got {node!r}")
        if "type" not in node:
            distributions.update(declared_space(node, f"{name}."))
            continue
        fields = OmegaConf.to_container(node, resolve=True)
        kind = fields.pop("type")
        if kind not in DISTRIBUTIONS:
            raise ValueError(f"hparams_search.space.{name}: unknown type {kind!r}; use one of {sorted(DISTRIBUTIONS)}")
        try:
            distributions[name] = DISTRIBUTIONS[kind](**fields)
        except (TypeError, ValueError) as error:
            raise ValueError(f"hparams_search.space.{name}: {error} (float and int take low, high, log, step; "
                             f"categorical takes choices)") from error
    return distributions


def check_keys_exist(cfg: DictConfig, space: dict[str, BaseDistribution]) -> None:
    """A misspelt key would otherwise fail every trial, or silently tune nothing."""
    unknown = [name for name in space if OmegaConf.select(cfg, name, default=ABSENT) is ABSENT]
    if unknown:
        raise KeyError(f"hparams_search.space names config keys that do not exist: {unknown}; check the spelling "
                       f"against `python train.py --cfg job`")


def config_values(cfg: DictConfig, space: dict[str, BaseDistribution]) -> dict[str, Any]:
    """The config's own values of the searched keys that lie in the space: the baseline trial."""
    values = {name: OmegaConf.select(cfg, name) for name in space}
    return {name: value for name, value in values.items() if contains(space[name], value)}


def contains(distribution: BaseDistribution, value: Any) -> bool:
    if isinstance(distribution, CategoricalDistribution):
        return value in distribution.choices
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and distribution.low <= value <= distribution.high


def fail_interrupted_trials(study: optuna.Study) -> None:
    """A trial still RUNNING when the study is opened belongs to a process that was stopped: mark it failed and
    queue its values again, so the resumed search runs what the interrupted one would have. A retry that is itself
    interrupted is not queued a third time (it may be what kills the process).

    This assumes one process per study; several workers sharing a storage need Optuna's heartbeat instead.
    """
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)
        if "retry_of" in trial.user_attrs:
            log.warning("trial %d (a retry of trial %d) was interrupted; marked failed, not retried again",
                        trial.number, trial.user_attrs["retry_of"])
            continue
        log.warning("trial %d was interrupted; marked failed, its values are run again first", trial.number)
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})


def trial_config(cfg: DictConfig, params: dict[str, Any], output_dir: Path) -> DictConfig:
    """``cfg`` without the search, with the trial's values and its own output directory."""
    trial_cfg = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hparams_search"])
    for name, value in params.items():
        OmegaConf.update(trial_cfg, name, value, merge=False)
    trial_cfg.paths.output_dir = str(output_dir)
    return trial_cfg


def run_trial(cfg: DictConfig, trial: Trial, output_dir: Path) -> TrialState:
    """Train one trial and tell the study how it ended: a diverged or crashed training does not end the search.

    A trial stopped by Ctrl-C (or a kill) stays RUNNING, so the next run of the search retries it.
    """
    study = trial.study
    trial.set_user_attr("output_dir", str(output_dir))
    try:
        result = run(trial_config(cfg, trial.params, output_dir))
    except NonFiniteLossError as error:
        log.warning("trial %d diverged (%s); recorded as pruned", trial.number, error)
        return tell(study, trial, state=TrialState.PRUNED)
    except Exception:
        log.exception("trial %d failed", trial.number)
        return tell(study, trial, state=TrialState.FAIL)
    trial.set_user_attr("checkpoint", result["best_model_path"])
    score = result["best_score"]
    if score is None or not math.isfinite(score):
        log.error("trial %d did not report a finite %s (got %s)", trial.number, cfg.monitor, score)
        return tell(study, trial, state=TrialState.FAIL)
    log.info("trial %d: %s %.4f", trial.number, cfg.monitor, score)
    return tell(study, trial, value=score)


def tell(study: optuna.Study, trial: Trial, value: float | None = None, state: TrialState | None = None
         ) -> TrialState:
    return study.tell(trial, value, state=state).state


def override_line(params: dict[str, Any]) -> str:
    """Parameters as command-line overrides to paste after ``python train.py``."""
    return " ".join(f"{name}={override_value(value)}" for name, value in params.items())


def override_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str) and not re.fullmatch(r"[\w./-]+", value):
        return "'" + value.replace("'", "\\'") + "'"
    return str(value)


def write_summary(study: optuna.Study, space: dict[str, BaseDistribution], directory: Path, monitor: str) -> None:
    """``search_summary.md`` and ``.csv`` beside the study: one row per trial, the best one named on top."""
    header = ["trial", "state", monitor, *space, "checkpoint"]
    trials = study.get_trials(deepcopy=False)
    rows = [[t.number, t.state.name, t.value, *(t.params.get(name) for name in space), t.user_attrs.get("checkpoint")]
            for t in trials]
    write_csv(directory / "search_summary.csv", header, rows)

    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    lines = [f"# Study {study.study_name}: {len(complete)} complete of {len(trials)} trials "
             f"({study.direction.name.lower()} {monitor})", ""]
    if complete:
        best = study.best_trial
        lines += [f"Best: trial {best.number}, {monitor} {best.value:.4f}. Train with it:", "",
                  f"    python train.py {override_line(best.params)}", ""]
    lines += markdown_table(header, (
        [str(number), state, "" if score is None else f"{score:.4f}", *map(markdown_cell, cells)]
        for number, state, score, *cells in rows
    ))
    (directory / "search_summary.md").write_text("\n".join(lines) + "\n")


def markdown_cell(value: Any) -> str:
    """Four significant digits keep the table readable; the CSV and the override line keep every digit."""
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
