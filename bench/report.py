"""The results table, as aligned text for the terminal and as Markdown for ``docs/performance.md``.

A section holds either latency rows (:class:`Row`: p50/p99 of samples, each also as a multiple of floor A and
of the floor it is compared with) or a free-form :class:`Table` (rates, utilisation, microseconds, bytes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.stats import Summary

HEADERS = (
    "measurement",
    "n",
    "p50 ms",
    "p99 ms",
    "mean ms",
    "p50 x A",
    "p99 x A",
    "vs",
    "p50 x vs",
    "p99 x vs",
    "same holder",
    "ahead of a waiter",
    "p99 wait ms",
    "longest wait ms",
)
NUMERIC = {1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13}
#: Columns from this index on are shown in Markdown only where a row of the section fills them.
OPTIONAL_COLUMNS = 7


@dataclass(frozen=True)
class Row:
    """One latency measurement; ``floor`` is what it is compared with besides floor A (named ``floor_name``)."""

    name: str
    summary: Summary | None
    floor_name: str = ""
    floor: Summary | None = None
    same_holder: float | None = None
    wait: Summary | None = None  # contention: acquire called -> acquire returned, every grant
    retakes: float | None = None  # contention: share of grants retaken by the releaser ahead of a waiter
    floor_a: Summary | None = None  # floor A sampled alongside this row, when not the run's first one


@dataclass
class Table:
    """A free-form table: ``numeric`` names the right-aligned columns."""

    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    numeric: set[int] = field(default_factory=set)


@dataclass
class Section:
    title: str
    rows: list[Row] = field(default_factory=list)
    table: Table | None = None


@dataclass
class Report:
    title: str
    environment: list[tuple[str, str]]
    parameters: list[tuple[str, str]]
    sections: list[Section]
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    floor_a: Summary | None = None
    targets: Table | None = None


def ms(value: float) -> str:
    if abs(value) < 10:
        return f"{value:.3f}"
    if abs(value) < 100:
        return f"{value:.2f}"
    return f"{value:.1f}"


#: No ratio against a floor below this (ms): a handoff floor of ~0 says "simultaneous", not "fast".
MIN_FLOOR_MS = 0.01


def times(value: float, base: float) -> str:
    if base < MIN_FLOOR_MS or value < 0:
        return "-"
    ratio = value / base
    return f"{ratio:.1f}x" if abs(ratio) < 100 else f"{ratio:.0f}x"


def share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def cells(row: Row, floor_a: Summary | None) -> list[str]:
    s, f = row.summary, row.floor
    floor_a = row.floor_a or floor_a
    tail = [
        share(row.same_holder),
        share(row.retakes),
        "-" if row.wait is None else ms(row.wait.p99),
        "-" if row.wait is None else ms(row.wait.max),
    ]
    if s is None:
        return [row.name, "0", "-", "-", "-", "-", "-", row.floor_name or "-", "-", "-", *tail]
    return [
        row.name,
        str(s.n),
        ms(s.p50),
        ms(s.p99),
        ms(s.mean),
        times(s.p50, floor_a.p50) if floor_a is not None else "-",
        times(s.p99, floor_a.p99) if floor_a is not None else "-",
        row.floor_name or "-",
        times(s.p50, f.p50) if f is not None else "-",
        times(s.p99, f.p99) if f is not None else "-",
        *tail,
    ]


def aligned(headers: list[str], rows: list[list[str]], numeric: set[int]) -> tuple[str, list[str]]:
    """The header line and the body lines of a table, in aligned columns."""
    widths = [max(len(line[i]) for line in [headers, *rows]) for i in range(len(headers))]

    def line(values: list[str]) -> str:
        parts = [
            v.rjust(w) if i in numeric else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return line(headers), [line(r) for r in rows]


def render_text(report: Report) -> str:
    latency = [cells(r, report.floor_a) for sec in report.sections for r in sec.rows]
    head, _ = aligned(list(HEADERS), latency, NUMERIC)
    widths_source = [list(HEADERS), *latency]
    label = max(len(k) for k, _ in report.environment + report.parameters)
    out = [report.title, "=" * len(report.title), ""]
    out += [f"{k.ljust(label)}  {v}" for k, v in report.environment]
    out += [f"{k.ljust(label)}  {v}" for k, v in report.parameters]
    rule = "-" * len(head)
    header_due = True
    for sec in report.sections:
        if sec.table is not None:
            t_head, t_body = aligned(sec.table.headers, sec.table.rows, sec.table.numeric)
            out += ["", f"[{sec.title}]", t_head, "-" * len(t_head), *t_body]
            header_due = True
            continue
        if header_due:
            out += ["", head, rule]
            header_due = False
        out.append(f"[{sec.title}]")
        _, body = aligned(list(HEADERS), [*widths_source, *(cells(r, report.floor_a) for r in sec.rows)], NUMERIC)
        out += body[len(widths_source) :]
    if report.targets is not None:
        t_head, t_body = aligned(report.targets.headers, report.targets.rows, report.targets.numeric)
        out += ["", "[Targets (issue 9)]", t_head, "-" * len(t_head), *t_body]
    out.append("")
    out += [f"* {n}" for n in report.notes]
    if report.errors:
        out += ["", "FAILURES:"] + [f"  - {e}" for e in report.errors]
    return "\n".join(out)


def render_markdown(report: Report, command: str) -> str:
    def md_row(values: list[str]) -> str:
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

    def md_table(headers: list[str], rows: list[list[str]], numeric: set[int], cols: list[int]) -> list[str]:
        align = ["---:" if i in numeric else ":---" for i in cols]
        return [md_row([headers[i] for i in cols]), md_row(align)] + [md_row([r[i] for i in cols]) for r in rows]

    def keep(rows: list[list[str]]) -> list[int]:
        """The columns to show: the optional ones only where a row fills them."""
        return [i for i in range(len(HEADERS)) if i < OPTIONAL_COLUMNS or any(r[i] != "-" for r in rows)]

    out = [
        f"# {report.title}",
        "",
        f"Generated by `{command}` (the `bench/` package); rerun it to refresh this page.",
        "",
        "| | |",
        "| :--- | :--- |",
    ]
    out += [md_row([f"**{k}**", v]) for k, v in report.environment + report.parameters]
    if report.targets is not None:
        t = report.targets
        out += ["", "## Targets (issue 9)", "", *md_table(t.headers, t.rows, t.numeric, list(range(len(t.headers))))]
    for sec in report.sections:
        out += ["", f"## {sec.title}", ""]
        if sec.table is not None:
            t = sec.table
            out += md_table(t.headers, t.rows, t.numeric, list(range(len(t.headers))))
            continue
        rows = [cells(r, report.floor_a) for r in sec.rows]
        out += md_table(list(HEADERS), rows, NUMERIC, keep(rows))
    if report.notes:
        out += ["", "## How to read this", ""] + [f"- {n}" for n in report.notes]
    if report.errors:
        out += ["", "## Failures", ""] + [f"- {e}" for e in report.errors]
    return "\n".join(out) + "\n"
