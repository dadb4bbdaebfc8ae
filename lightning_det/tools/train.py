"""Build every object of a run from its Hydra config, train, and report the best validation score."""

from __future__ import annotations

import copy
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from typing import IO, Any

import lightning as L
import torch
from hydra.utils import get_class, instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_det.callbacks.ranks import end_with_launcher, peer_failure
from lightning_det.callbacks.run_end import RunEnd
from lightning_det.checks.run import check_resumed_classes, check_run
from lightning_det.data.adapt import usable_cores
from lightning_det.data.records import write_cut_short_list
from lightning_det.io import write_atomically
from lightning_det.models.detector import NonFiniteLossError
from lightning_det.models.weights import initialise_from, recorded_settings
from lightning_det.tools.batch_size import AUTO, DEFAULT_BATCH_SIZE, keep_default, largest_batch_size, searches_on_cuda
from lightning_det.tools.precision import resolve_precision

log = logging.getLogger(__name__)


def hyperparameters(cfg: DictConfig) -> dict[str, Any]:
    """The run's settings as flat scalars for TensorBoard's hparams tab, so runs compare by best score."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        elif isinstance(node, (int, float, str, bool)):
            flat[prefix] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return {k: v for k, v in flat.items() if k.split(".")[0] in ("model", "optimizer", "scheduler", "data", "trainer")}


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    return [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None and "_target_" in c]


def build_loggers(cfg: DictConfig) -> list[Any]:
    return [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None and "_target_" in c]


def build_model(
    cfg: DictConfig, num_classes: int, class_names: list[str], records: list | None = None, img_size: int = 416
) -> L.LightningModule:
    """The detector from ``cfg.model``; its parts (``loss``, ``decoder`` ...), optimizer, scheduler and metric go
    in as plain configs.

    The model saves them as hyper-parameters, so a checkpoint holds only plain data and can rebuild its
    detector with ``load_from_checkpoint`` alone. Settings fixed by the ``init_from`` weights (YOLO's anchors) are
    resolved first; then, given the training ``records``, data-dependent settings (YOLO's ``anchors: auto`` at
    ``img_size``) from them, so the checkpoint holds the values.
    """
    arguments = OmegaConf.to_container(cfg.model, resolve=True)
    model_class = get_class(arguments.pop("_target_"))
    if cfg.get("init_from") and not cfg.get("init_cutoff"):  # a backbone alone fixes no head setting
        arguments = model_class.fit_to_weights(arguments, recorded_settings(cfg.init_from))
    if records is not None:
        arguments = model_class.fit_to_data(arguments, records, img_size, seed=cfg.seed)
    configured = OmegaConf.to_container(cfg.model, resolve=True)
    with open_dict(cfg.model):  # what was resolved ("auto" anchors ...) goes back, for config_resolved.yaml
        cfg.model.update({key: value for key, value in arguments.items() if configured.get(key) != value})
    plain = {key: OmegaConf.to_container(cfg[key], resolve=True) if cfg.get(key) else None
             for key in ("optimizer", "scheduler", "metric")}
    return model_class(**arguments, num_classes=num_classes, class_names=class_names, **plain)


def load_init_from(model: L.LightningModule, cfg: DictConfig) -> None:
    """The run's ``init_from`` weights into ``model``, with its ``init_*`` settings (training and evaluate)."""
    initialise_from(model, cfg.init_from, list(cfg.get("init_exclude") or []), cfg.get("init_cutoff"),
                    partial=bool(cfg.get("init_partial")), classes=cfg.get("init_classes") or "auto")


def apply_nominal_batch_size(cfg: DictConfig) -> None:
    """Accumulate gradients up to ``nominal_batch_size`` images per optimizer step, scaling weight decay to match.

    With gradients summed over ``accumulate`` batches, one step sees ``batch * devices * accumulate`` images; the
    decay is multiplied by that over the nominal size so its strength per image stays the recipe's (Ultralytics).
    """
    nominal = cfg.get("nominal_batch_size")
    if not nominal:
        return
    devices = cfg.trainer.get("devices", 1)
    world = (devices if isinstance(devices, int) and devices > 0 else 1) * cfg.trainer.get("num_nodes", 1)
    per_step = cfg.data.batch_size * world
    accumulate = max(round(nominal / per_step), 1)
    cfg.trainer.accumulate_grad_batches = accumulate
    if cfg.optimizer.get("weight_decay"):
        cfg.optimizer.weight_decay = cfg.optimizer.weight_decay * per_step * accumulate / nominal
    log.info("nominal batch %d: accumulating %d batches of %d", nominal, accumulate, per_step)


def resolve_batch_size(cfg: DictConfig) -> None:
    """``data.batch_size=auto`` as a number before anything reads it (``tools/batch_size.py``): on one CUDA device
    the largest that trains, searched on a throwaway copy of the run's data and model; elsewhere the default."""
    if cfg.data.batch_size != AUTO:
        return
    if not searches_on_cuda(cfg.trainer):
        keep_default(cfg.data, "no CUDA device to search on")
        return
    devices = requested_devices(cfg.trainer.get("devices", "auto")) or torch.cuda.device_count()
    if devices > 1 or cfg.trainer.get("num_nodes", 1) > 1:
        raise ValueError("data.batch_size=auto searches on one GPU, and each of several processes would search "
                         "alone and could pick another size: find it with trainer.devices=1 (it is logged), then "
                         "set data.batch_size=<that number> for the run on several devices")
    cfg.data.batch_size = DEFAULT_BATCH_SIZE
    trial = copy.deepcopy(cfg)
    datamodule = instantiate(trial.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = build_model(trial, num_classes=datamodule.num_classes, class_names=list(datamodule.classes),
                        records=datamodule.records["train"], img_size=datamodule.img_size)
    cfg.data.batch_size = largest_batch_size(model, datamodule, trial.trainer)
    log.info("data.batch_size=auto: %d images per batch fit on one GPU (Lightning's batch-size finder)",
             cfg.data.batch_size)
    del model, datamodule  # the copy's memory, before the run builds its own
    torch.cuda.empty_cache()


def requested_devices(devices: Any) -> int | None:
    """How many devices ``trainer.devices`` asks for (``2``, ``"2"``, ``[0, 1]``, ``"0,1"``); None for auto/-1."""
    if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        return len(devices)
    text = str(devices).strip()
    if "," in text:
        return len([part for part in text.split(",") if part.strip()])
    if text in ("auto", "-1") or not text.isdigit():
        return None
    return int(text)


def check_devices(trainer_cfg: DictConfig) -> None:
    """More CPU processes than cores, or more GPUs than are visible, fails late and leaves ranks running: refuse it
    before anything is built."""
    wanted = requested_devices(trainer_cfg.get("devices", "auto"))
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if wanted is None or accelerator not in ("auto", "cpu", "gpu", "cuda"):
        return
    key = f"trainer.devices={trainer_cfg.get('devices')}"
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        visible = torch.cuda.device_count()
        if wanted > visible:
            raise ValueError(f"{key} asks for {wanted} GPUs but {visible} are visible (CUDA_VISIBLE_DEVICES="
                             f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); set trainer.devices={visible} or "
                             f"fewer" + (", or trainer.accelerator=cpu" if visible == 0 else ""))
        return
    cores = usable_cores()
    if wanted > cores:
        raise ValueError(f"{key} asks for {wanted} CPU processes but this machine gives the run {cores} cores; set "
                         f"trainer.devices={cores} or fewer (each process is one DDP rank with a copy of the model)")


def check_launch(trainer_cfg: DictConfig) -> None:
    """torchrun or srun started this process as one of several, but the trainer asks for one process: Lightning
    would then train each alone, every one writing its own checkpoints and logs. Refuse before any data is read."""
    if requested_devices(trainer_cfg.get("devices", "auto")) != 1 or trainer_cfg.get("num_nodes", 1) != 1:
        return
    if TorchElasticEnvironment.detect():
        launcher, started = "torchrun", os.environ["WORLD_SIZE"]
        nodes, per_node = os.environ.get("GROUP_WORLD_SIZE", "?"), os.environ.get("LOCAL_WORLD_SIZE", "?")
    elif SLURMEnvironment.detect():
        launcher, started = "srun", os.environ["SLURM_NTASKS"]
        nodes, per_node = os.environ.get("SLURM_NNODES", "?"), os.environ.get("SLURM_NTASKS_PER_NODE", "?")
    else:
        return
    if int(started) > 1:
        alone = " (or run a single process with srun --ntasks=1)" if launcher == "srun" else ""
        raise ValueError(f"{launcher} started {started} processes ({nodes} nodes x {per_node}) but trainer.num_nodes=1 "
                         f"trainer.devices=1 would train each alone: set trainer.num_nodes={nodes} "
                         f"trainer.devices={per_node}{alone}")


class RunFolderInUse(OSError):
    """Another training is writing into the run folder (its lock is taken: an ``OSError`` as ``lockf``'s own)."""


#: The run folder's lock file, naming the process that holds it.
RUN_LOCK = "run.lock"
#: Variables through which launchers give a process its rank (torchrun, Lightning, SLURM, LSF).
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
_held_locks: dict[Path, IO[str]] = {}  # this process's run folder lock, kept open while it holds it


def lock_run_folder(folder: Path) -> None:
    """Refuse a second training into ``folder`` while one runs there: their ``results.csv`` rows would interleave
    and their checkpoints replace each other's.

    A POSIX record lock (``lockf``) on ``run.lock``, taken by global rank 0 alone (every rank variable a launcher
    set is 0; the other ranks write nothing there). The kernel releases it when the process ends, however it ends,
    so a killed run leaves no stale lock, and forked loader workers do not inherit it. A process holds the lock of
    its current run only: taking the next (a multirun's next job, a search's next trial) releases the previous.
    """
    if any(os.environ.get(name, "0") != "0" for name in RANK_VARIABLES):
        return
    path = folder.resolve() / RUN_LOCK
    if path in _held_locks:  # a second run in the same folder, after the first, from the same process
        return
    file = open(path, "a+")  # kept open for as long as the lock is held
    try:
        fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        file.close()
        holder = path.read_text().strip() or "a process that has just started"
        raise RunFolderInUse(
            f"run folder {folder} is in use by another training ({holder}): two runs in one folder would interleave "
            f"results.csv and replace each other's checkpoints. Give this run its own folder with "
            f"hydra.run.dir=<another folder>, or wait until that run ends (resuming into this folder works then)"
        ) from None
    file.seek(0)
    file.truncate()
    file.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
    file.flush()
    for previous in _held_locks.values():
        previous.close()
    _held_locks.clear()
    _held_locks[path] = file


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """Data first: the class list (possibly inferred from the annotations) sizes the model's head."""
    check_devices(cfg.trainer)
    check_launch(cfg.trainer)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    if cfg.get("ckpt_path"):  # the data's classes are known now, and nothing is built from them yet
        check_resumed_classes(cfg.ckpt_path, list(datamodule.classes), datamodule.root)
    if cfg.data.get("img_size") == "auto":  # resolved from the training boxes: the checkpoint keeps the number
        cfg.data.img_size = datamodule.img_size
    model = build_model(cfg, num_classes=datamodule.num_classes, class_names=list(datamodule.classes),
                        records=datamodule.records["train"], img_size=datamodule.img_size)
    model.inference_pipeline = OmegaConf.to_container(cfg.data.pipeline.val_transform, resolve=True)
    if cfg.get("init_from"):
        load_init_from(model, cfg)
    resolve_precision(cfg.trainer, cfg.model.get("_target_"))  # a run did it already (run_stage); a caller of build not
    trainer = instantiate(cfg.trainer, callbacks=build_callbacks(cfg), logger=build_loggers(cfg) or False)
    return datamodule, model, trainer


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train as configured; with ``stages`` (e.g. ``experiment=yolov3_two_stage``), one training per stage, each
    starting from the previous stage's best weights. Returns the last stage's result."""
    if not cfg.get("stages"):
        return run_stage(cfg)
    result: dict[str, Any] = {}
    for number, overrides in enumerate(cfg.stages, start=1):
        stage = stage_config(cfg, overrides, Path(cfg.paths.output_dir) / f"stage{number}")
        if result.get("best_model_path"):
            stage.init_from = result["best_model_path"]
        log.info("stage %d of %d", number, len(cfg.stages))
        result = run_stage(stage)
    return result


def stage_config(cfg: DictConfig, overrides: DictConfig, output_dir: Path) -> DictConfig:
    """``cfg`` with one stage's overrides: an object with its own ``_target_`` replaces the node, other values
    merge into it (so a stage can switch the scheduler or change only ``optimizer.lr``)."""
    stage = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "stages"])
    for key, value in overrides.items():
        if OmegaConf.is_dict(value) and "_target_" in value:
            stage[key] = value
        elif OmegaConf.is_dict(value) and OmegaConf.is_dict(stage.get(key)):
            stage[key] = OmegaConf.merge(stage[key], value)
        else:
            stage[key] = value
    stage.paths.output_dir = str(output_dir)
    return stage


def run_stage(cfg: DictConfig) -> dict[str, Any]:
    """One training run: fit, then validate the best checkpoint."""
    end_with_launcher()
    check_run(cfg)  # config types and checkpoint files, before any data is read
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    lock_run_folder(output_dir)  # before anything is written into it
    resolve_precision(cfg.trainer, cfg.model.get("_target_"))
    resolve_batch_size(cfg)  # at the run's precision; before the nominal batch divides by it
    apply_nominal_batch_size(cfg)
    write_resolved_config(cfg, output_dir)  # as composed: a run that fails reading its data still leaves it
    L.seed_everything(cfg.seed, workers=True)

    datamodule, model, trainer = build(cfg)
    write_resolved_config(cfg, output_dir)  # with what the data decided: the input size, the anchors
    if trainer.is_global_zero:  # the images decoded only as far as their files go, for the user to replace
        write_cut_short_list(output_dir, datamodule.records.values())
    if trainer.is_global_zero and (line := cluster_summary(trainer)):
        log.info(line)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except Exception as error:
        failure = peer_failure(trainer, error, output_dir)
        if failure:
            raise RuntimeError(failure) from None
        raise
    if model.nonfinite_loss:
        raise NonFiniteLossError(f"{model.nonfinite_loss} {resume_advice(trainer)}")

    checkpoint = trainer.checkpoint_callback if isinstance(trainer.checkpoint_callback, ModelCheckpoint) else None
    best_path = checkpoint.best_model_path if checkpoint else ""
    best_epoch = saved_epoch(best_path) if best_path else trainer.current_epoch - 1
    if trainer.max_epochs == 0 and not best_path:  # nothing trained: the model as built is validated
        best_epoch = None
    final = trainer.validate(model, datamodule=datamodule, ckpt_path=best_path or None, verbose=False)
    metrics = {k: float(v) for k, v in (final[0] if final else {}).items()}
    best_score = metrics.get(cfg.monitor)
    if best_score is not None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):  # the hparams tab: each run's settings with its best score
                logger.log_hyperparams(hyperparameters(cfg), metrics={f"best/{cfg.monitor}": best_score})
            else:  # MLflow, W&B, CSV: the settings, and the best score as a metric runs can be sorted by
                logger.log_hyperparams(hyperparameters(cfg))
                logger.log_metrics({f"best/{cfg.monitor}": best_score}, step=trainer.global_step)
    if trainer.is_global_zero:
        ending = next((c.summary() for c in trainer.callbacks if isinstance(c, RunEnd)), {})  # why fit stopped
        summary = json.dumps({"checkpoint": best_path, "epoch": best_epoch, **ending, **metrics}, indent=1)
        write_atomically(output_dir / "final_metrics.json", lambda file: file.write(summary.encode()))
        score = "n/a" if best_score is None else f"{best_score:.4f}"
        if best_epoch is None:
            weights = f"the weights of init_from={cfg.init_from}" if cfg.get("init_from") else "its initial weights"
            log.info("trainer.max_epochs=0: nothing trained; %s of the model as built, with %s: %s", cfg.monitor,
                     weights, score)
        else:
            log.info("best checkpoint: %s (epoch %d)", best_path or "(none saved; the last weights)", best_epoch)
            log.info("%s of the best checkpoint: %s", cfg.monitor, score)
    return {"best_score": best_score, "best_model_path": best_path, "metrics": metrics}


def write_resolved_config(cfg: DictConfig, output_dir: Path) -> None:
    """``config_resolved.yaml``: the run's config with every interpolation and every ``auto`` resolved so far."""
    resolved = OmegaConf.to_yaml(cfg, resolve=True)
    write_atomically(output_dir / "config_resolved.yaml", lambda file: file.write(resolved.encode()))


def cluster_summary(trainer: L.Trainer) -> str | None:
    """Which of Lightning's cluster environments (torchrun, SLURM, its own variables ...) the run was launched
    under and the world it sees, so a wrong launch shows at start-up; None for a one-device strategy."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if environment is None:
        return None
    nodes, devices = trainer.num_nodes, trainer.num_devices
    return (f"cluster environment: {type(environment).__name__}, {nodes} node{'s' * (nodes != 1)} x {devices} "
            f"device{'s' * (devices != 1)}, world size {trainer.world_size}")


def saved_epoch(checkpoint: str) -> int:
    """The (0-based) epoch a checkpoint was saved at, read without loading its tensors."""
    return int(torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)["epoch"])


def resume_advice(trainer: L.Trainer) -> str:
    """Which checkpoint to continue from after a non-finite loss: checkpoints with non-finite weights are never
    saved (``SafeCheckpointIO``), so the every-epoch ``last.ckpt`` is the last finite state."""
    last = next((c.best_model_path for c in trainer.checkpoint_callbacks
                 if isinstance(c, ModelCheckpoint) and not c.monitor and Path(c.best_model_path or "").is_file()), "")
    if not last:
        return "No checkpoint was saved before it."
    return (f"The last finite checkpoint is {last} (epoch {saved_epoch(last)}): resume from it with "
            f"ckpt_path={last}, or start from its weights with a fresh optimizer (e.g. a lower optimizer.lr) "
            f"with init_from={last}.")
