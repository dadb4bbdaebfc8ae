"""Short trainings through the real command line (``python train.py ...``) and what they leave behind, shared by
the end-to-end tests; and the configs of ``conf/`` composed in the test's process, as those commands compose them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict, read_write
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[1]

# A network and input small enough for seconds per epoch on a 2-core CPU.
TINY = [
    "model=yolov3_tiny",
    "model.width=0.25",
    "data.img_size=128",
    "data.batch_size=4",
    "data.loader.num_workers=0", "data.sampler.min_steps_per_epoch=0",
    "data.loader.persistent_workers=false",
    "trainer.max_epochs=2",
    "trainer.log_every_n_steps=1",
    "callbacks.progress_bar.refresh_rate=0",
]


def train_arguments(tmp_path: Path, *overrides: str, run: str = "run") -> list[str]:
    """``train.py`` and its arguments for a tiny run in ``tmp_path / run`` (logs under ``tmp_path / "logs"``)."""
    return ["train.py", *TINY, *overrides, f"paths.log_dir={tmp_path / 'logs'}", f"hydra.run.dir={tmp_path / run}"]


def train(tmp_path: Path, *overrides: str, run: str = "run", expect_ok: bool = True, env: dict | None = None
          ) -> subprocess.CompletedProcess:
    args = [sys.executable, *train_arguments(tmp_path, *overrides, run=run)]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    if expect_ok:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def command(*args: str) -> subprocess.CompletedProcess:
    """``python <args>`` in the clone (a tool: ``-m lightning_det.tools.predict ...``), which must succeed."""
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


#: About a second per epoch on 16 sample images, without image logging: the runs a test breaks on purpose.
QUICK_RUN = ["model=yolov3_tiny", "model.width=0.25", "data.img_size=64", "data.batch_size=4",
             "data.loader.num_workers=0", "data.sampler.min_steps_per_epoch=0", "data.loader.persistent_workers=false",
             "data.reading.prepare.num_train=16", "data.reading.prepare.num_val=4", "trainer.log_every_n_steps=1",
             "callbacks.progress_bar.refresh_rate=0", "~callbacks.image_logger", "logger=csv"]


def with_test_modules() -> dict[str, str]:
    """The environment with ``tests/`` importable, so a run can take a test module's callback
    (``+callbacks.x._target_=test_module.Callback``)."""
    return {**os.environ, "PYTHONPATH": str(REPO / "tests")}


def quick_run_command(tmp_path: Path, *overrides: str) -> list[str]:
    """``python train.py`` on ``QUICK_RUN``, with the sample data and the logs under ``tmp_path``."""
    return [sys.executable, "train.py", *QUICK_RUN, f"data.root={tmp_path / 'sample'}",
            f"paths.log_dir={tmp_path / 'logs'}", *overrides]


def quick_run(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``quick_run_command`` to its end, with the test modules importable; success or failure is the test's to
    check."""
    return subprocess.run(quick_run_command(tmp_path, *overrides), cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=with_test_modules())


def compose_config(name: str, *overrides: str, run_dir: Path | None = None) -> DictConfig:
    """The primary config ``name`` of ``conf/`` (train, evaluate, browse, predict, export) with ``overrides``. With
    ``run_dir``, as a run in that folder sees it: ``${hydra:...}`` resolves (``paths.output_dir`` is ``run_dir``)
    and the ``hydra`` node is gone; without, the composed settings alone (to build a model or check a value): its
    ``paths`` need a run."""
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        if run_dir is None:
            return compose(name, overrides=list(overrides))
        cfg = compose(name, overrides=[*overrides, f"hydra.run.dir={run_dir}"], return_hydra_config=True)
    with read_write(cfg.hydra.runtime):
        cfg.hydra.runtime.output_dir = str(run_dir)  # set by Hydra when it starts the job, as here
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra
    return cfg


def scalars(run_dir: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    values = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    values.update({tag: [] for tag in events.Tags()["images"] + events.Tags()["tensors"]})  # tensors: PR curves
    return values


def small_sample(tmp_path: Path) -> list[str]:
    return [f"data.root={tmp_path / 'sample'}", "data.reading.prepare.num_train=16", "data.reading.prepare.num_val=8"]


#: The PNGs of the results report, written beside the checkpoints and logged as ``report/<name>``.
REPORT_IMAGES = ["results", "pr_curve", "f1_curve", "confusion_matrix", "labels", "val_batch_pred"]


def assert_same_results(one: list[dict], two: list[dict], cap: int | None = None) -> None:
    """Two COCO result lists (``coco_results.json``) hold the same detections, up to the rounding of batches
    composed differently (one process against two DDP ranks) and of the file (boxes to 0.01 px). Matched as sets
    per image and class: detections of equal scores may come in either order.

    ``cap``: the decoder's ``max_detections``. An image that holds ``cap`` detections was cut at its ``cap``-th
    score; where many scores tie there (a barely trained model), a rounding of 1e-7 decides which of them are
    kept, so a detection within 1e-4 of that cut may be another one in the other list."""
    assert len(one) == len(two) > 0
    groups: dict[tuple[int, int], list[np.ndarray]] = {}
    for r in two:
        groups.setdefault((r["image_id"], r["category_id"]), []).append(np.array(r["bbox"] + [r["score"]]))
    per_image: dict[int, list[float]] = {}
    for r in one:
        per_image.setdefault(r["image_id"], []).append(r["score"])
    cut = {image: min(scores) for image, scores in per_image.items() if len(scores) == cap}
    for r in one:
        candidates = groups.get((r["image_id"], r["category_id"]), [])
        found = [i for i, c in enumerate(candidates) if np.allclose(c, r["bbox"] + [r["score"]], rtol=0, atol=0.05)
                 and abs(c[4] - r["score"]) <= 1e-4]
        if not found and r["score"] <= cut.get(r["image_id"], -1.0) + 1e-4:
            continue
        assert found, f"no match for {r}"
        candidates.pop(found[0])
