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
    ):
        assert row in result.stdout, row
    text = out.read_text()
    assert "GPUBoss" in text
    assert "## Targets (issue 9)" in text
