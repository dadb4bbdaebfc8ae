"""A summary table of a Hydra multirun: one row per job with its overrides, best score and best checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from lightning_det.search.tables import markdown_table, write_csv

log = logging.getLogger(__name__)
RESULT_FILE = "job_result.json"


class SweepSummary(Callback):
    """Each job leaves ``job_result.json`` in its own directory (so remote launchers work too); at the end of the
    multirun the rows are gathered into ``summary.md`` and ``summary.csv`` in the sweep directory."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        runtime = job_return.hydra_cfg.hydra
        output = Path(runtime.runtime.output_dir)
        completed = job_return.status == JobStatus.COMPLETED
        best = sorted((output / "checkpoints").glob("best-*.ckpt"))
        result = {
            "job": runtime.job.get("num", 0),
            "overrides": " ".join(job_return.overrides or []),
            "status": job_return.status.name,
            "best_score": job_return.return_value if completed else None,
            "checkpoint": str(best[-1]) if best else "",
        }
        (output / RESULT_FILE).write_text(json.dumps(result))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = sorted((json.loads(p.read_text()) for p in sweep_dir.glob(f"*/{RESULT_FILE}")), key=lambda r: r["job"])
        monitor = config.get("monitor", "score")
        header = ["job", "overrides", f"best {monitor}", "status", "checkpoint"]

        def score(row: dict) -> str:
            return "" if row["best_score"] is None else f"{row['best_score']:.4f}"

        def table(overrides: list[str]) -> list[list[str]]:
            return [[str(r["job"]), o, score(r), r["status"], r["checkpoint"]] for r, o in zip(rows, overrides)]

        markdown = markdown_table(header, table(swept_overrides(rows)))
        (sweep_dir / "summary.md").write_text("\n".join(markdown) + "\n")
        write_csv(sweep_dir / "summary.csv", header, table([r["overrides"] for r in rows]))
        log.info("sweep summary (%s):\n%s", sweep_dir / "summary.md", "\n".join(markdown))


def swept_overrides(rows: list[dict]) -> list[str]:
    """Per job, only the overrides whose value differs between jobs: the grid's own parameters."""
    parsed = [dict(item.split("=", 1) for item in row["overrides"].split()) for row in rows]
    varying = [key for key in parsed[0] if len({p.get(key) for p in parsed}) > 1] if parsed else []
    return [" ".join(f"{key}={p[key]}" for key in varying) for p in parsed]
