"""The summary tables of many trainings (a multirun, a search): Markdown to read, CSV to load elsewhere. The files are
replaced whole, since the jobs of a sweep may rewrite them while someone reads them."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lightning_det.io import write_atomically


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """The lines of a Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


def write_lines(path: Path, lines: Iterable[str]) -> None:
    """``lines`` as a text file, each ended by a newline."""
    write_text(path, "".join(line + "\n" for line in lines))


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """``header`` and ``rows`` as CSV (``None`` as an empty cell), quoted where a value needs it."""
    text = io.StringIO(newline="")
    csv.writer(text).writerows([header, *([("" if cell is None else cell) for cell in row] for row in rows)])
    write_text(path, text.getvalue())


def write_text(path: Path, text: str) -> None:
    """``text`` as UTF-8, replacing ``path`` only once complete."""
    write_atomically(path, lambda file: file.write(text.encode()))
