"""One text-table printer for every listing (``results``, sweep summaries, ``cache ls``).

A listing is a header and rows of cells; numbers are right-aligned, text left-aligned, floats
shown with four significant digits. ``csv`` writes the same cells with the csv module; JSON is the
callers' business (they emit their records, not the formatted cells).
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Sequence


def cell(value: Any) -> str:
    """A value as it appears in a table: 0.8123, 1e-05, true, 256,128, '' for missing."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ",".join(cell(v) for v in value)
    return str(value)


def _numeric(text: str) -> bool:
    head = text.split(" ", 1)[0]  # "0.81 ± 0.02" aligns like a number
    try:
        float(head)
    except ValueError:
        return False
    return True


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, fmt: str = "table") -> str:
    """Aligned text (``table``) or ``csv`` of ``rows`` under ``header``; cells go through :func:`cell`."""
    cells = [[c if isinstance(c, str) else cell(c) for c in row] for row in rows]
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        w.writerows(cells)
        return buf.getvalue().rstrip("\n")
    table = [list(header)] + cells
    n = len(header)
    widths = [max(len(r[i]) for r in table) for i in range(n)]
    right = [bool(cells) and all(_numeric(r[i]) or not r[i] for r in cells) and any(r[i] for r in cells)
             for i in range(n)]
    lines = []
    for r in table:
        parts = [c.rjust(w) if ri else c.ljust(w) for c, w, ri in zip(r, widths, right)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)
