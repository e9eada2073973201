"""The benchmark is not a test, but its smoke run must keep working: CI runs it here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_smoke_runs_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "perf.md"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for row in (
        "EVALSHA `return 1`",
        "GPUBoss acquire() + release()",
        "GPUBoss, from release() returned",
        "Exclusive handoff between N=8 processes",
        "Weighted throughput",
        "EVALSHA counter, busy retry",
        "handoff to the head",
        "Redis time per script call",
        "used_memory per live lease",
        "Keys left beyond the fixed ones",
        "Targets (issue 9)",
        "pub/sub notice: request → victim's on_evict starts",
    ):
        assert row in result.stdout, row
    # The header says how gpuboss's scripts were called, and the bare-script rows send them the same way.
    header = next(line for line in result.stdout.splitlines() if line.startswith("scripts "))
    command = "FCALL" if "FCALL of library gpuboss_" in header else "EVALSHA"
    assert header.split(None, 1)[1].startswith(command), header
    assert f"bare scripts: acquire {command}" in result.stdout
    assert f"2.0 {command} and " in result.stdout  # the commandstats note counts gpuboss's own calls
    text = out.read_text()
    assert "GPUBoss" in text
    assert "## Targets (issue 9)" in text


@pytest.mark.slow
def test_bench_smoke_eviction_section_alone(tmp_path: Path) -> None:
    """``--only eviction`` runs just the eviction part: both modes, every row with the smoke run's samples, and
    its section in the Markdown; the victims leave no keys behind."""
    out = tmp_path / "perf.md"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--only", "eviction", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[Uncontended acquire and release" not in result.stdout  # the other parts did not run
    assert "[Weighted throughput" not in result.stdout
    text = out.read_text()
    assert "## Cooperative eviction: a high request for the whole 24 GB GPU" in text
    for mode in ("pub/sub notice", "heartbeat fallback only"):
        for what in ("request → victim's on_evict starts", "request → high acquire() returns", "victim resumed"):
            rows = [line for line in text.splitlines() if line.startswith(f"| {mode}: ") and what in line]
            assert len(rows) == 1, (mode, what, text)
            assert rows[0].split("|")[2].strip() == "5", rows[0]  # n: the smoke run's rounds, all measured
    assert "| keys of no gpuboss namespace (peers, barriers) | none |" in text
    assert "|   any other key of theirs | none |" in text
