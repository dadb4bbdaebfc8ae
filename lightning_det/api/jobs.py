"""``train``, ``evaluate`` and ``export`` from Python, each one job of the command it stands for.

A call composes ``conf/`` with Hydra's compose API, as ``python train.py <overrides>`` would, after the same checks
of the overrides (renamed keys, group options), and runs the same task in a run folder where the command would
put it: ``hydra.run.dir`` under ``paths.log_dir``, relative to the caller's working directory as the command's is
to the directory it is launched from. The folder gets what Hydra's job gives it (``.hydra/config.yaml``,
``hydra.yaml``, ``overrides.yaml`` and ``<task>.log``), and ``${hydra:...}`` resolves during the call. Hydra's
global state (an application of the caller's own that uses Hydra) is restored afterwards. Errors are raised as
they are, without the command line's short form.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from lightning_det.checks.config import CONF, check_config, check_group_options, check_renamed_overrides
from lightning_det.search.study import search
from lightning_det.tools import evaluate as evaluate_tool
from lightning_det.tools.export import export_from_config
from lightning_det.tools.quiet import silence_library_noise
from lightning_det.tools.train import run

#: Overrides as on the command line (``["model=yolov3", "trainer.max_epochs=5"]``) or as a mapping
#: (``{"model": "yolov3", "trainer.max_epochs": 5}``).
Overrides = Sequence[str] | Mapping[str, Any]
Result = TypeVar("Result")

#: Hydra's format of a job's log file (its ``job_logging`` default).
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


@dataclass(frozen=True)
class TrainResult:
    """What a training (or a ``hparams_search``) left: its folder, its best checkpoint and score."""

    run_dir: Path
    best_model_path: Path | None  #: None when no checkpoint was saved (and for a search: see its summary)
    best_score: float | None  #: the ``monitor`` value (val/mAP) of the best checkpoint
    metrics: dict[str, float]  #: every validation value of the best checkpoint


def override_list(overrides: Overrides) -> list[str]:
    """``key=value`` strings as Hydra parses them; a mapping's values written in its grammar (lists, null, quoted
    strings where a character would be read as syntax)."""
    if isinstance(overrides, str):
        raise TypeError(f"overrides are a list of key=value strings or a mapping, not the string {overrides!r}")
    if not isinstance(overrides, Mapping):
        return [str(item) for item in overrides]
    return [key if key.startswith("~") and value is None else f"{key}={hydra_value(value)}"  # ~key: delete it
            for key, value in overrides.items()]


def hydra_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{key}:{hydra_value(item)}" for key, item in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(item) for item in value) + "]"
    text = str(value)
    plain = text and all(c.isalnum() or c in "_-./:+@%~" for c in text)
    return text if plain else "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def config_folder() -> Path:
    """``conf/``, beside the package in a clone (an editable install); a wheel does not ship it."""
    if not (CONF / "train.yaml").is_file():
        raise FileNotFoundError(f"no Hydra configs at {CONF}: lightning_det's API reads the conf/ folder of a clone; "
                                "install it with pip install -e <clone>")
    return CONF


@contextmanager
def hydra_job(config_name: str, overrides: list[str]) -> Iterator[DictConfig]:
    """The task config of ``config_name`` with ``overrides``, inside a Hydra job as the command runs it."""
    check_renamed_overrides(overrides)
    check_group_options(overrides, config_folder())
    previous_hydra = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    previous_config = HydraConfig.instance().cfg
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(config_folder()), version_base="1.3", job_name=config_name):
            cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # the run folder interpolates ${hydra:runtime.cwd}
        run_dir = Path(str(cfg.hydra.run.dir)).absolute()
        with read_write(cfg.hydra.runtime):
            cfg.hydra.runtime.output_dir = str(run_dir)
        HydraConfig.instance().set_config(cfg)
        task = copy.deepcopy(cfg)
        with read_write(task), open_dict(task):
            del task["hydra"]
        save_job_files(cfg, task, run_dir)
        with job_log(run_dir / f"{config_name}.log"):
            silence_library_noise()
            yield task
    finally:
        GlobalHydra.instance().clear()
        if previous_hydra is not None:
            GlobalHydra.instance().initialize(previous_hydra)
        HydraConfig.instance().cfg = previous_config


def save_job_files(cfg: DictConfig, task: DictConfig, run_dir: Path) -> None:
    """``.hydra/config.yaml``, ``hydra.yaml`` and ``overrides.yaml``, as Hydra's job writes them."""
    folder = run_dir / str(cfg.hydra.output_subdir)
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(task, folder / "config.yaml")
    OmegaConf.save(OmegaConf.masked_copy(cfg, ["hydra"]), folder / "hydra.yaml")
    OmegaConf.save(cfg.hydra.overrides.task, folder / "overrides.yaml")


@contextmanager
def job_log(path: Path) -> Iterator[None]:
    """The package's INFO messages (the per-class table, the best checkpoint) into the run's log file for the call,
    as the command's log has them; what the console shows stays the caller's logging setup."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    package = logging.getLogger("lightning_det")
    level = package.level
    package.setLevel(logging.INFO)
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
        package.setLevel(level)


def in_job(config_name: str, overrides: Overrides, task: Callable[[DictConfig], Result]) -> Result:
    with hydra_job(config_name, override_list(overrides)) as cfg:
        return task(cfg)


def train_or_search(cfg: DictConfig) -> dict[str, Any]:
    """``train.py``'s task: one training, or with ``hparams_search=<name>`` that Optuna search."""
    return search(cfg) if cfg.get("hparams_search") else run(cfg)


def train(overrides: Overrides = ()) -> TrainResult:
    """``python train.py <overrides>`` in this process: e.g. ``train(["data=yolo", "data.yaml=my/data.yaml"])``."""

    def task(cfg: DictConfig) -> TrainResult:
        result = train_or_search(cfg)
        best = result.get("best_model_path")
        return TrainResult(Path(cfg.paths.output_dir), Path(best) if best else None, result.get("best_score"),
                           dict(result.get("metrics", {})))

    return in_job("train", overrides, task)


def plain(value: torch.Tensor) -> float | list[float]:
    return value.item() if value.numel() == 1 and value.ndim == 0 else value.tolist()


def evaluate(ckpt_path: str | Path, overrides: Overrides = ()) -> dict[str, dict[str, float | list[float]]]:
    """``python -m lightning_det.tools.evaluate ckpt_path=<ckpt_path> <overrides>``: the metrics by name (``voc07``,
    ``voc``, ``coco``), each a dict of values (``mAP``, ``AP_per_class`` in class order, COCO's ``AP50`` ...); the
    result files are written in the run folder as the command writes them."""

    def task(cfg: DictConfig) -> dict[str, dict[str, float | list[float]]]:
        check_config(cfg)
        results = evaluate_tool.evaluate(cfg)
        return {name: {key: plain(value) for key, value in values.items()} for name, values in results.items()}

    return in_job("evaluate", [f"ckpt_path={hydra_value(str(ckpt_path))}", *override_list(overrides)], task)


def export(ckpt_path: str | Path, overrides: Overrides = ()) -> Path:
    """``python -m lightning_det.tools.export ckpt_path=<ckpt_path> <overrides>``: the file written (ONNX unless
    ``format=torchscript``; beside the checkpoint unless ``output=<file>``)."""
    return in_job("export", [f"ckpt_path={hydra_value(str(ckpt_path))}", *override_list(overrides)],
                  export_from_config)
