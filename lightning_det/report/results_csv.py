"""``results.csv``: one row per epoch, appended as the run goes, so a killed run keeps every finished epoch."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows written so far (empty when there is no file); a last line cut off by a kill is dropped."""
    if not path.is_file():
        return []
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    return list(csv.DictReader(io.StringIO(text)))


def append_row(path: Path, row: dict[str, float]) -> None:
    """Append ``row`` as one line, flushed to disk. The header is the first row's keys (kept on resume): a later key
    not in it is left out, a missing one left empty, so every line has the header's columns."""
    header: list[str] | None = None
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):  # a line cut off by a kill: drop it before appending
            data = data[: data.rfind(b"\n") + 1]
            os.truncate(path, len(data))
        header = next(csv.reader(io.StringIO(data.decode())), None)
    line = io.StringIO()
    writer = csv.writer(line, lineterminator="\n")
    if not header:
        header = list(row)
        writer.writerow(header)
    writer.writerow(["" if row.get(key) is None else f"{row[key]:.6g}" for key in header])
    with open(path, "a", newline="") as file:
        file.write(line.getvalue())
        file.flush()
        os.fsync(file.fileno())
