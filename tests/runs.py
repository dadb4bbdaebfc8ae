"""Short trainings through the real command line (``python train.py ...``) and what they leave behind, shared by
the end-to-end tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[1]

# A network and input small enough for seconds per epoch on a 2-core CPU.
TINY = [
    "model=yolov3_tiny",
    "model.width=0.25",
    "data.img_size=128",
    "data.batch_size=4",
    "data.num_workers=0", "data.min_steps_per_epoch=0",
    "data.persistent_workers=false",
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


def scalars(run_dir: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    values = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    values.update({tag: [] for tag in events.Tags()["images"] + events.Tags()["tensors"]})  # tensors: PR curves
    return values


def small_sample(tmp_path: Path) -> list[str]:
    return [f"data.root={tmp_path / 'sample'}", "data.prepare.num_train=16", "data.prepare.num_val=8"]


#: The PNGs of the results report, written beside the checkpoints and logged as ``report/<name>``.
REPORT_IMAGES = ["results", "pr_curve", "f1_curve", "confusion_matrix", "labels", "val_batch_pred"]


def assert_same_results(one: list[dict], two: list[dict]) -> None:
    """Two COCO result lists (``coco_results.json``) hold the same detections, up to the rounding of batches
    composed differently (one process against two DDP ranks) and of the file (boxes to 0.01 px). Matched as sets
    per image and class: detections of equal scores may come in either order."""
    assert len(one) == len(two) > 0
    groups: dict[tuple[int, int], list[np.ndarray]] = {}
    for r in two:
        groups.setdefault((r["image_id"], r["category_id"]), []).append(np.array(r["bbox"] + [r["score"]]))
    for r in one:
        candidates = groups.get((r["image_id"], r["category_id"]), [])
        found = [i for i, c in enumerate(candidates) if np.allclose(c, r["bbox"] + [r["score"]], rtol=0, atol=0.05)
                 and abs(c[4] - r["score"]) <= 1e-4]
        assert found, f"no match for {r}"
        candidates.pop(found[0])
