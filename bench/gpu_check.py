"""The first thing to run on a GPU machine: how fast the reference models train and what share of the card's bf16
peak that is, then one sample epoch through the real commands (train, evaluate, export; DDP over every GPU when
there are several). Prints one Markdown table for BENCHMARKS.md.

    python bench/gpu_check.py            # planned for 5-8 minutes on one H100: four 40 s batch searches, three
                                         # commands of at most 150 s each (not yet run on a GPU)
    python bench/gpu_check.py --smoke    # tiny sizes, a step or two: under a minute on a CPU; the default without CUDA

Throughput rows: each model is composed from conf/ as ``train.py model=<name> trainer=gpu`` composes it and trained
by Lightning's loop with that trainer (bf16-mixed, gradient clipping, the config's optimizer, schedule and
channels-last callback) on a synthetic batch of the batch contract already on the device, so a row measures the
model and the loop, not the loader. The batch doubles until the card runs out of memory (or a cap, or a time limit);
the largest that fitted is timed. FLOPs are torch.utils.flop_counter's count of matrix products and convolutions
(a multiply-add is two FLOPs): the forward of one image, comparable with Darknet's and torchvision's published
figures, and the training step (forward, loss, backward) per image, which with images/s gives TFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities.memory import garbage_collection_cuda, is_oom_error
from omegaconf import DictConfig
from torch.utils.flop_counter import FlopCounterMode

from lightning_det.data.collate import collate_detection
from lightning_det.data.transforms import Sample
from lightning_det.models.detector import Detector
from lightning_det.search.tables import markdown_table
from lightning_det.tools.train import build_model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))  # a script: its sibling modules, also when a test loads it by path
from configs import compose_config  # noqa: E402

NUM_CLASSES = 20  # Pascal VOC

#: Dense bf16 tensor-core peaks in TFLOP/s (no sparsity), NVIDIA's data sheets, by a part of the device name; the
#: first match counts, so a specific name comes before the general one it contains.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
    ("RTX 4090", 165.0),
)

HEADER = ("check", "model / command", "input", "batch", "images/s", "fwd GFLOP/img", "train GFLOP/img", "TFLOP/s",
          "of bf16 peak", "s", "result")

log = logging.getLogger("gpu_check")


@dataclass(frozen=True)
class Case:
    """One throughput row: ``conf/model/<model>.yaml`` with ``overrides``, on batches of ``size`` (h, w)."""

    model: str
    size: tuple[int, int]
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    """What one run of the check does: the real sizes on a GPU, tiny ones in the smoke test."""

    cases: tuple[Case, ...]
    first_batch: int  # the search doubles the batch from here ...
    max_batch: int  # ... until memory runs out, this cap, or search_seconds have passed
    search_seconds: float
    warmup: int  # untimed steps (cuDNN autotuning, the allocator) before the timed ones
    steps: int  # timed steps at the batch the search found
    sample: tuple[str, ...]  # overrides of the sample epoch's train.py and evaluate
    timeout: int  # seconds for each command
    threads: int | None = None  # torch threads per process; None: torch's default


GPU = Plan(
    cases=(
        Case("yolov3", (416, 416)),  # Darknet's size (img_size auto picks one from the data)
        Case("yolov3_tiny", (416, 416)),
        Case("ssd300", (300, 300)),
        Case("faster_rcnn_r50_fpn", (608, 800)),  # a VOC 4:3 image at shorter side 600, padded to a multiple of 32
    ),
    first_batch=8, max_batch=512, search_seconds=40, warmup=3, steps=10, sample=(), timeout=150,
)
SMOKE = Plan(
    cases=(
        Case("yolov3", (64, 64), ("model.width=0.25",)),
        Case("yolov3_tiny", (64, 64), ("model.width=0.25",)),
        Case("ssd300", (300, 300), ("model.width=0.25",)),  # its extra layers need the full 300 px
        Case("faster_rcnn_r50_fpn", (96, 128), ("model.representation=64",)),  # no width: ResNet-50 is fixed
    ),
    first_batch=2, max_batch=2, search_seconds=10, warmup=1, steps=1,
    sample=("model.width=0.25", "data.img_size=64", "data.batch_size=4", "data.sampler.min_steps_per_epoch=0",
            "data.reading.prepare.num_train=8", "data.reading.prepare.num_val=4", "~callbacks.image_logger", "~callbacks.report"),
    # One thread: the smoke test's times mean nothing, and on a small machine shared with other work a process's
    # two threads wait on each other (a 10-50x slower step, measured on 2 busy cores).
    timeout=120, threads=1,
)


def peak_tflops(device_name: str) -> float | None:
    """The card's dense bf16 peak, or None for a card not in :data:`PEAK_BF16_TFLOPS` (or a CPU)."""
    return next((peak for part, peak in PEAK_BF16_TFLOPS if part in device_name), None)


def build_detector(cfg: DictConfig) -> Detector:
    """The detector ``train.py`` builds from ``cfg``, for Pascal VOC's class count."""
    return build_model(cfg, num_classes=NUM_CLASSES, class_names=[f"class{i}" for i in range(NUM_CLASSES)])


def synthetic_batch(batch_size: int, size: tuple[int, int], objects: int = 4) -> dict[str, Any]:
    """Random pixels (0..255) with ``objects`` random boxes per image, through the loader's own collate, so the
    batch is what training gets: images ``[B, 3, H, W]``, labels ``[B, P, 6]`` padded with class -1, meta."""
    generator = torch.Generator().manual_seed(0)
    height, width = size
    extent = torch.tensor([width, height])
    samples = []
    for index in range(batch_size):
        sides = (0.1 + 0.4 * torch.rand(objects, 2, generator=generator)) * extent
        corners = torch.rand(objects, 2, generator=generator) * (extent - sides)
        samples.append(Sample(
            image=torch.rand(3, height, width, generator=generator) * 255,
            boxes=torch.cat((corners, corners + sides), 1),
            labels=torch.randint(NUM_CLASSES, (objects,), generator=generator),
            difficult=torch.zeros(objects, dtype=torch.bool), image_id=index, path=f"synthetic{index}", orig_size=size,
        ))
    return collate_detection(samples)


def forward_flops(model: Detector, images: torch.Tensor) -> int:
    """FLOPs of the network's forward on ``images`` (pixels), the figure Darknet prints and torchvision publishes
    (its ``_ops`` count a multiply-add once: half of this). Meta tensors give it from the shapes alone."""
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(model.normalise(images))
    return counter.get_total_flops()


def train_step_flops(model: Detector, batch: dict[str, Any]) -> int:
    """FLOPs of one training step's forward, loss and backward on ``batch`` (the optimizer's few are left out)."""
    model.train()
    with FlopCounterMode(display=False) as counter:
        model.loss(model.network_outputs(batch), batch)["loss"].backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


class Repeated:
    """The same batch ``times`` over: a loader that costs nothing, so the loop and the model are what is timed."""

    def __init__(self, batch: dict[str, Any], times: int) -> None:
        self.batch, self.times = batch, times

    def __len__(self) -> int:
        return self.times

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter([self.batch] * self.times)


class StepTimer(L.Callback):
    """Wall time of the steps after the first ``warmup``; the device is synchronised at both ends, so the work a
    step queued counts in that step."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = self.seconds = 0.0
        self.steps = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
                             ) -> None:
        if batch_idx == self.warmup:
            synchronize(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if batch_idx >= self.warmup:
            synchronize(pl_module.device)
            self.steps += 1
            self.seconds = time.perf_counter() - self.start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(model: Detector, cfg: DictConfig, batch: dict[str, Any], warmup: int, steps: int) -> float:
    """Training images per second of Lightning's loop with ``cfg.trainer`` on ``batch`` (on the device)."""
    timer = StepTimer(warmup)
    trainer = instantiate(
        cfg.trainer, max_steps=warmup + steps, max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[instantiate(cfg.callbacks.channels_last), timer],
    )
    try:
        trainer.fit(model, train_dataloaders=Repeated(batch, warmup + steps))
    finally:
        model.trainer = None  # the trainer holds the optimizer state; let it go with the trainer
        model.zero_grad(set_to_none=True)
    if timer.steps < steps:
        raise RuntimeError(f"training stopped after {timer.steps} of {steps} timed steps (a non-finite loss?)")
    return batch["images"].shape[0] * timer.steps / timer.seconds


def throughput_row(case: Case, plan: Plan, trainer_overrides: Sequence[str], device: torch.device,
                   peak: float | None) -> list[str]:
    """The largest batch that fits (doubling until out of memory), its training images/s and FLOP rate."""
    start = time.perf_counter()
    cfg = compose_config([f"model={case.model}", *case.overrides, *trainer_overrides])
    model = build_detector(cfg).to(device)
    small = move_data_to_device(synthetic_batch(2, case.size), device)
    forward = forward_flops(model, small["images"][:1])
    step = train_step_flops(model, small) / 2
    del small
    fitted, reason, batch_size = 0, f"cap {plan.max_batch}", plan.first_batch
    while batch_size <= plan.max_batch:
        if fitted and time.perf_counter() - start > plan.search_seconds:
            reason = f"search stopped at {plan.search_seconds:.0f} s"
            break
        try:
            images_per_second(model, cfg, move_data_to_device(synthetic_batch(batch_size, case.size), device), 1, 1)
        except Exception as error:  # noqa: BLE001 - out of memory ends the search; anything else is the row's error
            if not is_oom_error(error):
                raise
            reason = f"{batch_size} out of memory"
            break
        fitted, batch_size = batch_size, batch_size * 2
    garbage_collection_cuda()  # out here: the error's traceback held the failed step's tensors
    if not fitted:
        raise RuntimeError(f"batch {plan.first_batch} does not fit: {reason}")
    batch = move_data_to_device(synthetic_batch(fitted, case.size), device)
    rate = images_per_second(model, cfg, batch, plan.warmup, plan.steps)
    achieved = step * rate / 1e12
    share = f"{100 * achieved / peak:.1f} %" if peak else ""
    height, width = case.size
    return ["throughput", " ".join((case.model, *case.overrides)), f"{height}x{width}", str(fitted), f"{rate:.1f}",
            f"{forward / 1e9:.2f}", f"{step / 1e9:.2f}", f"{achieved:.1f}", share,
            f"{time.perf_counter() - start:.0f}", f"largest batch; {reason}"]


def cell(text: str, limit: int = 300) -> str:
    """``text`` as one Markdown table cell: one line, no column separator, an error message cut short."""
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def failure(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    return f"FAILED (exit {done.returncode}): {lines[-1] if lines else 'no output'}"


def command_row(check: str, command: Sequence[str], extra: Sequence[str], plan: Plan, result: Any
                ) -> tuple[list[str], Any]:
    """Run ``python <command> <extra>`` in the repository, where the table shows ``command`` (``extra``: temporary
    paths, the smoke test's sizes); ``result(done)`` reads what it left into (cell, value) on success."""
    environment = {**os.environ, **({"OMP_NUM_THREADS": str(plan.threads)} if plan.threads else {})}
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, *command, *extra], cwd=REPO, capture_output=True, text=True,
                              timeout=plan.timeout, env=environment)
        cell, value = result(done) if done.returncode == 0 else (failure(done), None)
    except subprocess.TimeoutExpired:
        cell, value = f"FAILED: still running after {plan.timeout} s", None
    except (OSError, KeyError, ValueError) as error:  # it ran, but left no result where it should
        cell, value = f"FAILED: {type(error).__name__}: {error}", None
    shown = " ".join(re.sub(r"=/\S+", "=<best>", arg) for arg in command)
    return [check, shown, "", "", "", "", "", "", "", f"{time.perf_counter() - start:.0f}", cell], value


def trained(run_dir: Path) -> Any:
    """What train.py reported: its best checkpoint and score (final_metrics.json)."""
    def read(done: subprocess.CompletedProcess) -> tuple[str, str]:
        final = json.loads((run_dir / "final_metrics.json").read_text())
        return f"val/mAP {final['val/mAP']:.4f}, {Path(final['checkpoint']).name}", final["checkpoint"]
    return read


def evaluated(done: subprocess.CompletedProcess) -> tuple[str, float]:
    """The VOC (area) mAP from evaluate's table (columns voc07, voc, coco)."""
    found = re.search(r"^mAP\s+(\S+)\s+(\S+)\s+(\S+)\s*$", done.stdout + done.stderr, re.MULTILINE)
    if not found:
        raise ValueError("evaluate printed no mAP row")
    voc07, voc, coco = (float(value) for value in found.groups())
    return f"mAP {voc:.4f} VOC area, {voc07:.4f} VOC07, {coco:.4f} COCO", voc


def exported(path: Path) -> Any:
    def read(done: subprocess.CompletedProcess) -> tuple[str, int]:
        size = path.stat().st_size
        return f"{path.name} {size / 2**20:.1f} MiB", size
    return read


def sample_rows(plan: Plan, trainer_overrides: Sequence[str], folder: Path) -> list[list[str]]:
    """One sample epoch through the commands a user types: train, evaluate its checkpoint, export it; then the same
    training over every GPU with DDP when there are several."""
    data = [f"data.root={folder / 'sample'}", *plan.sample] if plan.sample else []  # the smoke test's own set
    quiet = ["callbacks.progress_bar.refresh_rate=0", f"paths.log_dir={folder / 'logs'}"]
    row, checkpoint = command_row("sample train", ["train.py", *trainer_overrides, "trainer.max_epochs=1"],
                                  [*data, *quiet, f"hydra.run.dir={folder / 'train'}"], plan,
                                  trained(folder / "train"))
    rows = [row]
    if checkpoint:
        evaluate = ["-m", "lightning_det.tools.evaluate", f"ckpt_path={checkpoint}", *trainer_overrides]
        rows.append(command_row("sample evaluate", evaluate, [*data, f"hydra.run.dir={folder / 'evaluate'}"],
                                plan, evaluated)[0])
        onnx = folder / "best.onnx"
        export = ["-m", "lightning_det.tools.export", f"ckpt_path={checkpoint}"]
        rows.append(command_row("sample export", export, [f"output={onnx}", f"hydra.run.dir={folder / 'export'}"],
                                plan, exported(onnx))[0])
    gpus = torch.cuda.device_count()
    if gpus > 1:
        ddp = ["train.py", "trainer=ddp", f"trainer.devices={gpus}", "trainer.max_epochs=1"]
        rows.append(command_row("sample train, DDP", ddp, [*data, *quiet, f"hydra.run.dir={folder / 'ddp'}"],
                                plan, trained(folder / "ddp"))[0])
    return rows


def describe(device: torch.device, peak: float | None) -> str:
    """The machine, in the words a reader of BENCHMARKS.md needs to compare a row."""
    if device.type == "cuda":
        name = f"{torch.cuda.get_device_name(device)} x{torch.cuda.device_count()}"
        versions = f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    else:
        name = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
        versions = "no CUDA"
    bound = f"dense bf16 peak {peak:.0f} TFLOP/s" if peak else "bf16 peak unknown: no share of it"
    return f"{name}; torch {torch.__version__}, {versions}, Lightning {L.__version__}; {bound}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and a step or two (the default without CUDA)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(val_dataloader|LeafSpec)")  # no validation here; Lightning's own

    start = time.perf_counter()
    cuda = torch.cuda.is_available()
    plan = SMOKE if args.smoke or not cuda else GPU
    if plan.threads:
        torch.set_num_threads(plan.threads)
    device = torch.device("cuda" if cuda else "cpu")
    peak = peak_tflops(torch.cuda.get_device_name(device)) if cuda else None
    # The GPU trainer config, also on a CPU (where only its accelerator is replaced), so the smoke test runs it too.
    trainer_overrides = ["trainer=gpu", *([] if cuda else ["trainer.accelerator=cpu"])]
    precision = compose_config(trainer_overrides).trainer.precision
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for case in plan.cases:
            try:
                rows.append(throughput_row(case, plan, [*trainer_overrides, f"trainer.default_root_dir={folder}"],
                                           device, peak))
            except Exception as error:  # noqa: BLE001 - one model's failure is its row; the others still run
                rows.append(["throughput", case.model, *[""] * 8, f"FAILED: {type(error).__name__}: {error}"])
            garbage_collection_cuda()  # the next model gets the whole card
            log.info("%s", " | ".join(rows[-1]))
        for row in sample_rows(plan, trainer_overrides, Path(folder)):
            rows.append(row)
            log.info("%s", " | ".join(row))
    failed = any("FAILED" in row[-1] for row in rows)
    command = "python bench/gpu_check.py" + (" --smoke" if plan is SMOKE else "")
    print(f"GPU check {date.today()}: {describe(device, peak)}")
    print(f"`{command}`, {time.perf_counter() - start:.0f} s; throughput at {precision}")
    print()
    print("\n".join(markdown_table(HEADER, [[cell(value) for value in row] for row in rows])))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
