"""A summary of a Hydra multirun: one row per job with its overrides, best score and best checkpoint; and, when the
jobs differ in their seed, one row per setting with the spread of its best score over the seeds."""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from lightning_det.search.tables import markdown_table, write_csv, write_lines, write_text

log = logging.getLogger(__name__)
RESULT_FILE = "job_result.json"


class SweepSummary(Callback):
    """Each job leaves ``job_result.json`` in its own directory (so remote launchers work too). The results gathered
    so far are written to ``summary.md`` and ``summary.csv`` in the sweep directory after every job, because Hydra's
    basic sweeper raises on a failed job before ``on_multirun_end``, and once more at the end.

    When a swept key is one of ``seed_keys``, jobs whose other overrides agree repeat one setting: per setting,
    ``summary_by_seed.csv`` and a second table in ``summary.md`` give the number of seeds, the mean ± sample standard
    deviation, min and max of the best score, and the jobs left out of them (failed, or no finite score)."""

    def __init__(self, seed_keys: Sequence[str] = ("seed", "data.sampler.seed")) -> None:
        self.seed_keys = list(seed_keys)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if rank_zero_only.rank != 0:  # a job of several tasks (srun): every task ends the job, rank 0 reports it
            return
        runtime = job_return.hydra_cfg.hydra
        output = Path(runtime.runtime.output_dir)
        completed = job_return.status == JobStatus.COMPLETED
        best = sorted((output / "checkpoints").glob("best-*.ckpt"))
        result = {
            "job": runtime.job.get("num", 0),
            "overrides": list(job_return.overrides or []),
            "status": job_return.status.name,
            "best_score": job_return.return_value if completed else None,
            "checkpoint": str(best[-1]) if best else "",
        }
        write_text(output / RESULT_FILE, json.dumps(result))  # read by other jobs' summaries
        if runtime.mode == RunMode.MULTIRUN:
            self.write_summary(Path(runtime.sweep.dir), config.get("monitor", "score"))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        summary = self.write_summary(Path(config.hydra.sweep.dir), config.get("monitor", "score"))
        log.info("sweep summary (%s):\n%s", Path(config.hydra.sweep.dir) / "summary.md", "\n".join(summary))

    def write_summary(self, sweep_dir: Path, monitor: str) -> list[str]:
        """Write the summary files from the job results in ``sweep_dir``; returns the lines of ``summary.md``."""
        rows = sorted((json.loads(p.read_text()) for p in sweep_dir.glob(f"*/{RESULT_FILE}")), key=lambda r: r["job"])
        overrides = [keyed_overrides(row["overrides"]) for row in rows]
        swept = varying_keys(overrides)
        header = ["job", "overrides", f"best {monitor}", "status", "checkpoint"]

        def table(keys: Sequence[str] | None, score: Callable[[float | None], Any]) -> list[list[Any]]:
            return [[str(r["job"]), joined(o, keys), score(r["best_score"]), r["status"], r["checkpoint"]]
                    for r, o in zip(rows, overrides)]

        markdown = markdown_table(header, table(swept, number))  # the CSV keeps every digit and every override
        write_csv(sweep_dir / "summary.csv", header, table(None, lambda score: score))
        seeds = [key for key in swept if key in self.seed_keys]
        if seeds:
            spreads = seed_spreads(rows, overrides, [key for key in swept if key not in seeds])
            markdown += ["", f"best {monitor} over {' and '.join(seeds)} (mean ± sample std):", ""]
            markdown += markdown_table(["overrides", "seeds", f"best {monitor}", "min", "max", "failed"], (
                [setting, str(s.seeds), s.mean_std(), number(s.min), number(s.max), str(s.failed)]
                for setting, s in spreads.items()))
            write_csv(sweep_dir / "summary_by_seed.csv", ["overrides", "seeds", "mean", "std", "min", "max", "failed"],
                      ([setting, s.seeds, s.mean, s.std, s.min, s.max, s.failed] for setting, s in spreads.items()))
        write_lines(sweep_dir / "summary.md", markdown)
        return markdown


@dataclass(frozen=True)
class SeedSpread:
    """The best scores of one setting over its seeds; ``None`` where there are too few scores for the value."""

    seeds: int
    failed: int
    mean: float | None
    std: float | None
    min: float | None
    max: float | None

    @classmethod
    def of(cls, rows: list[dict]) -> SeedSpread:
        scores = [r["best_score"] for r in rows if r["status"] == JobStatus.COMPLETED.name and finite(r["best_score"])]
        return cls(seeds=len(scores), failed=len(rows) - len(scores),
                   mean=statistics.mean(scores) if scores else None,
                   std=statistics.stdev(scores) if len(scores) > 1 else None,
                   min=min(scores, default=None), max=max(scores, default=None))

    def mean_std(self) -> str:
        return number(self.mean) + ("" if self.std is None else f" ± {self.std:.4f}")


def seed_spreads(rows: list[dict], overrides: list[dict[str, str]], settings: Sequence[str]) -> dict[str, SeedSpread]:
    """The jobs grouped by their overrides of ``settings`` (every other swept key is a seed), each group's spread."""
    groups: dict[str, list[dict]] = {}
    for row, keyed in zip(rows, overrides):
        groups.setdefault(joined(keyed, settings) or "(all jobs)", []).append(row)
    return {setting: SeedSpread.of(group) for setting, group in groups.items()}


def keyed_overrides(overrides: list[str]) -> dict[str, str]:
    """Each override under its key (``+seed=1`` under ``seed``), kept as written."""
    return {item.partition("=")[0].lstrip("+"): item for item in overrides}


def varying_keys(overrides: list[dict[str, str]]) -> list[str]:
    """The keys whose override differs between jobs: the sweep's own parameters."""
    keys = dict.fromkeys(key for keyed in overrides for key in keyed)
    return [key for key in keys if len({keyed.get(key) for keyed in overrides}) > 1]


def joined(keyed: dict[str, str], keys: Sequence[str] | None) -> str:
    """The overrides of ``keys`` (all with ``None``) as one command-line string."""
    return " ".join(item for key, item in keyed.items() if keys is None or key in keys)


def finite(score: float | None) -> bool:
    return score is not None and math.isfinite(score)


def number(score: float | None) -> str:
    return "" if score is None else f"{score:.4f}"
