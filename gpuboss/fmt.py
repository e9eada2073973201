"""Formatting for the command line: aligned tables (plain text, or rich on a terminal), sizes and durations.

A view is a list of blocks: a :class:`Line` of text, or a :class:`Table` (with its title). :func:`plain`
renders them as stable, aligned text (pipes, scripts, tests); :func:`rich_view` as a rich renderable for a
terminal, where the ``styles`` of the columns colour the cells. ``rich`` is imported only for the latter.
"""

from __future__ import annotations

import math
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import RenderableType


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


# ---------------------------------------------------------------- views: plain text or rich


@dataclass(frozen=True)
class Column:
    """A table column: its header, alignment, and (rich only) a style for the column and one per cell value,
    chosen by the cell's first word (``{"evicting": "yellow"}`` colours ``"evicting (for 3f2b9c1e)"``)."""

    header: str
    right: bool = False
    style: str = ""
    styles: Mapping[str, str] = field(default_factory=dict)

    def style_of(self, cell: str) -> str:
        word = cell.split(" ", 1)[0] if cell else ""
        return self.styles.get(word, self.style)


@dataclass(frozen=True)
class Table:
    """A titled table; ``empty`` is printed instead when there are no rows."""

    title: str
    columns: Sequence[Column]
    rows: Sequence[Sequence[object]]
    empty: str = "(none)"


@dataclass(frozen=True)
class Line:
    """A line of text; ``style`` applies with rich only."""

    text: str = ""
    style: str = ""


Block = Line | Table


def plain_table(t: Table, indent: int = 2) -> str:
    """The rows of a table as aligned text, without its title (``empty``, indented, when it has none)."""
    if not t.rows:
        return " " * indent + t.empty
    right = {i for i, c in enumerate(t.columns) if c.right}
    return table([c.header for c in t.columns], t.rows, right=right, indent=indent)


def plain(blocks: Sequence[Block]) -> str:
    """A view as plain text: each table under its title line."""
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Table):
            if block.title:
                out.append(block.title)
            out.append(plain_table(block))
        else:
            out.append(block.text)
    return "\n".join(out)


def rich_table(t: Table) -> RenderableType:
    """A table as a rich renderable (its title above it, left-aligned and bold)."""
    from rich import box
    from rich.console import Group
    from rich.table import Table as RichTable
    from rich.text import Text

    if not t.rows:
        return Group(Text(t.title, style="bold"), Text("  " + t.empty, style="dim"))
    out = RichTable(
        title=t.title or None,
        title_justify="left",
        title_style="bold",
        box=box.SIMPLE_HEAD,
        header_style="bold cyan",
        pad_edge=False,
        show_edge=False,
        expand=False,
    )
    for col in t.columns:
        out.add_column(col.header, justify="right" if col.right else "left", no_wrap=col.right)
    for row in t.rows:
        cells = [str(c) for c in row]
        out.add_row(*(Text(c, style=col.style_of(c)) for c, col in zip(cells, t.columns, strict=True)))
    return out


def rich_view(blocks: Sequence[Block]) -> RenderableType:
    """A view as one rich renderable."""
    from rich.console import Group
    from rich.text import Text

    parts: list[RenderableType] = []
    for block in blocks:
        if isinstance(block, Table):
            parts.append(rich_table(block))
        else:
            parts.append(Text(block.text, style=block.style))
    return Group(*parts)


def bar(fraction: float, width: int = 10) -> str:
    """A text gauge: ``bar(0.5, 4)`` -> ``"██░░"`` (clamped to 0..1)."""
    if not math.isfinite(fraction):
        fraction = 0.0
    full = round(min(1.0, max(0.0, fraction)) * width)
    return "█" * full + "░" * (width - full)
