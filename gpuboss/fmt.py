"""Plain-text formatting for the command line: aligned tables, sizes and durations."""

from __future__ import annotations

import math
from collections.abc import Container, Sequence


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: Container[int] = (), indent: int = 2) -> str:
    """An aligned table; columns whose index is in ``right`` are right-aligned (numbers)."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append((" " * indent + "  ".join(parts)).rstrip())
    return "\n".join(lines)


def gb(mib: int | float) -> str:
    """MiB as gigabytes (GiB, as gpuboss counts them) with one decimal: ``24576`` -> ``"24.0 GB"``."""
    return f"{mib / 1024:.1f} GB"


def seconds(value: float) -> str:
    """A duration for people: ``"850 ms"``, ``"12.3 s"``, ``"4 min 05 s"``, ``"2 h 03 min"``."""
    if not math.isfinite(value):
        return "-"
    sign = "-" if value < 0 else ""
    value = abs(value)
    if value < 1:
        return f"{sign}{value * 1000:.0f} ms"
    if value < 60:
        return f"{sign}{value:.1f} s"
    if value < 3600:
        return f"{sign}{int(value // 60)} min {int(value % 60):02d} s"
    return f"{sign}{int(value // 3600)} h {int(value % 3600 // 60):02d} min"


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def ms(value: float) -> str:
    """Milliseconds as an integer string, ``"-"`` for NaN."""
    return "-" if math.isnan(value) else f"{value:.0f}"
