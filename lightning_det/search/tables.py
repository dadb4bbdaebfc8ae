"""The summary tables of many trainings (a multirun, a search): Markdown to read, CSV to load elsewhere."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """The lines of a Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """``header`` and ``rows`` as CSV (``None`` as an empty cell), quoted where a value needs it."""
    with open(path, "w", newline="") as file:
        csv.writer(file).writerows([header, *([("" if cell is None else cell) for cell in row] for row in rows)])
