"""The multirun summary (``SweepSummary``): the per-job table, and the spread over seeds of each setting, from job
directories written here by hand, and once through ``train.py -m``."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import OmegaConf
from runs import REPO, TINY, small_sample

from lightning_det.search.sweep import RESULT_FILE, SweepSummary


def fake_job(sweep: Path, job: int, overrides: list[str], score: float | None, status: str = "COMPLETED") -> None:
    (sweep / str(job)).mkdir(parents=True)
    result = {"job": job, "overrides": overrides, "status": status, "best_score": score, "checkpoint": ""}
    (sweep / str(job) / RESULT_FILE).write_text(json.dumps(result))


def summarise(sweep: Path) -> list[str]:
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}, "monitor": "val/mAP"}))
    return (sweep / "summary.md").read_text().splitlines()


def by_seed(sweep: Path) -> dict[str, dict[str, str]]:
    with open(sweep / "summary_by_seed.csv", newline="") as file:
        return {row["overrides"]: row for row in csv.DictReader(file)}


def test_jobs_differing_in_seed_and_width_give_one_row_per_width(tmp_path):
    scores = {("0.25", 0): 0.10, ("0.25", 1): 0.20, ("0.25", 2): 0.60, ("0.5", 0): 0.40, ("0.5", 1): 0.50}
    for job, (width, seed) in enumerate((w, s) for w in ("0.25", "0.5") for s in (0, 1, 2)):
        status = "COMPLETED" if (width, seed) in scores else "FAILED"
        fake_job(tmp_path, job, [f"seed={seed}", f"model.width={width}", "trainer.max_epochs=2"],
                 scores.get((width, seed)), status)
    fake_job(tmp_path, 6, ["seed=3", "model.width=0.5", "trainer.max_epochs=2"], math.nan)  # no validation objects
    lines = summarise(tmp_path)

    # by hand: 0.25 -> mean 0.3, deviations -0.2 -0.1 0.3, sample variance 0.14 / 2; 0.5 -> 0.45, 0.005 / 1
    rows = by_seed(tmp_path)
    assert list(rows) == ["model.width=0.25", "model.width=0.5"]
    wide, narrow = rows["model.width=0.5"], rows["model.width=0.25"]
    assert (narrow["seeds"], narrow["failed"], wide["seeds"], wide["failed"]) == ("3", "0", "2", "2")
    assert float(narrow["mean"]) == pytest.approx(0.3) and float(narrow["std"]) == pytest.approx(math.sqrt(0.07))
    assert (float(narrow["min"]), float(narrow["max"])) == (0.1, 0.6)
    assert float(wide["mean"]) == pytest.approx(0.45) and float(wide["std"]) == pytest.approx(math.sqrt(0.005))

    assert lines[:2] == ["| job | overrides | best val/mAP | status | checkpoint |", "|---|---|---|---|---|"]
    assert lines[2] == "| 0 | seed=0 model.width=0.25 | 0.1000 | COMPLETED |  |"  # only the swept keys
    assert lines[7] == "| 5 | seed=2 model.width=0.5 |  | FAILED |  |"
    with open(tmp_path / "summary.csv", newline="") as file:
        first = next(csv.DictReader(file))
    assert (first["overrides"], first["best val/mAP"]) == ("seed=0 model.width=0.25 trainer.max_epochs=2", "0.1")
    seed_table = lines[lines.index("best val/mAP over seed (mean ± sample std):") + 2:]
    assert seed_table == [
        "| overrides | seeds | best val/mAP | min | max | failed |", "|---|---|---|---|---|---|",
        "| model.width=0.25 | 3 | 0.3000 ± 0.2646 | 0.1000 | 0.6000 | 0 |",
        "| model.width=0.5 | 2 | 0.4500 ± 0.0707 | 0.4000 | 0.5000 | 2 |",
    ]


def test_a_sweep_over_seeds_alone_is_one_group(tmp_path):
    for job, score in enumerate([0.5, 0.7]):
        fake_job(tmp_path, job, [f"+seed={job}", "trainer.max_epochs=2"], score)
    lines = summarise(tmp_path)
    assert lines[-1] == "| (all jobs) | 2 | 0.6000 ± 0.1414 | 0.5000 | 0.7000 | 0 |"
    assert float(by_seed(tmp_path)["(all jobs)"]["std"]) == pytest.approx(math.sqrt(0.02))


def test_without_a_swept_seed_there_is_only_the_job_table(tmp_path):
    for job, lr in enumerate(["1e-3", "2e-3"]):
        fake_job(tmp_path, job, ["seed=0", f"optimizer.lr={lr}"], 0.5)
    assert len(summarise(tmp_path)) == 4
    assert not (tmp_path / "summary_by_seed.csv").exists()


def job_return(sweep: Path, job: int, overrides: list[str], status: JobStatus, value: object) -> JobReturn:
    hydra = {"runtime": {"output_dir": str(sweep / str(job))}, "job": {"num": job}, "mode": RunMode.MULTIRUN,
             "sweep": {"dir": str(sweep)}}
    (sweep / str(job)).mkdir(parents=True)
    return JobReturn(overrides=overrides, status=status, _return_value=value,
                     hydra_cfg=OmegaConf.create({"hydra": hydra}))


def test_each_job_end_rewrites_the_summary_so_a_failed_job_still_leaves_one(tmp_path):
    """Hydra's basic sweeper raises on a failed job before ``on_multirun_end``: the summary must exist already."""
    callback, config = SweepSummary(), OmegaConf.create({"monitor": "val/mAP"})
    callback.on_job_end(config, job_return(tmp_path, 0, ["seed=0"], JobStatus.COMPLETED, 0.25))
    callback.on_job_end(config, job_return(tmp_path, 1, ["seed=1"], JobStatus.FAILED, RuntimeError("diverged")))
    lines = (tmp_path / "summary.md").read_text().splitlines()
    assert lines[2:4] == ["| 0 | seed=0 | 0.2500 | COMPLETED |  |", "| 1 | seed=1 |  | FAILED |  |"]
    assert lines[-1] == "| (all jobs) | 1 | 0.2500 | 0.2500 | 0.2500 | 1 |"


def test_only_global_rank_zero_of_a_job_of_several_tasks_reports_it(tmp_path, monkeypatch):
    """Under srun every task of a job runs Hydra's job end in the same folder; rank 1 must not overwrite rank 0's."""
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    SweepSummary().on_job_end(OmegaConf.create({"monitor": "val/mAP"}),
                              job_return(tmp_path, 0, ["seed=0"], JobStatus.COMPLETED, 0.25))
    assert not (tmp_path / "0" / RESULT_FILE).exists() and not (tmp_path / "summary.md").exists()


@pytest.mark.slow
def test_multirun_over_seeds_reports_the_spread_and_counts_a_failed_setting(tmp_path):
    """Two seeds of a tiny training, and two jobs whose config is refused: Hydra exits with the error, and the
    summary written at each job's end holds all four jobs."""
    args = [sys.executable, "train.py", "-m", *TINY, *small_sample(tmp_path), "trainer.max_epochs=1",
            "seed=0,1", "data.batch_size=4,four", f"paths.log_dir={tmp_path / 'logs'}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "batch_size" in done.stderr
    with open(tmp_path / "sweep" / "summary.csv", newline="") as file:
        jobs = list(csv.DictReader(file))
    assert len(jobs) == 4 and all((job["status"] == "FAILED") == ("data.batch_size=four" in job["overrides"].split())
                                  for job in jobs)
    results = [json.loads(path.read_text()) for path in (tmp_path / "sweep").glob(f"*/{RESULT_FILE}")]
    scores = [result["best_score"] for result in results if result["status"] == "COMPLETED"]
    rows = by_seed(tmp_path / "sweep")
    trained, refused = rows["data.batch_size=4"], rows["data.batch_size=four"]
    assert (trained["seeds"], trained["failed"], refused["seeds"], refused["failed"]) == ("2", "0", "0", "2")
    assert float(trained["mean"]) == pytest.approx(sum(scores) / 2)
    assert float(trained["std"]) == pytest.approx(abs(scores[0] - scores[1]) / math.sqrt(2))
