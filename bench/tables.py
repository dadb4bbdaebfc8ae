"""The plain right-aligned text table every bench script prints."""

from __future__ import annotations

from collections.abc import Sequence


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """``title`` above the columns, each as wide as its longest cell."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [title] + ["  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in (header, *rows)]
    return "\n".join(lines)
