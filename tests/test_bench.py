"""The benchmark is not a test, but its smoke run must keep working: CI runs it here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import raw_client

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
        "reference, not gpuboss: minimal Lua lease, acquire + release",
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
    assert "minimal Lua lease: 2.0 EVALSHA and " in result.stdout
    assert "a minimal Lua lease (bench/minimal.py), sent as floor A: " in result.stdout  # in the targets
    text = out.read_text()
    assert "GPUBoss" in text
    assert "## Targets (issue 9)" in text
    check_python_side(text)


def check_python_side(text: str) -> None:
    """The py-spy section: a row per front end whose wall time is its CPU time plus its time off the CPU, and
    whose CPU split covers all of its CPU time; or, where py-spy may not sample, the note that says why."""
    title = "## Where one uncontended acquire() + release() spends its time, Python side (py-spy)"
    if title not in text:
        assert "The Python side was not profiled: " in text, text[-2000:]
        return
    lines = text.split(title, 1)[1].split("\n## ", 1)[0].splitlines()
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in lines if line.startswith("| ")}
    assert set(rows) >= {"GPUBoss", "AsyncGPUBoss"}, rows
    for cells in (rows["GPUBoss"], rows["AsyncGPUBoss"]):
        cycles, wall, cpu, off = (float(c) for c in cells[:4])
        split = [c.strip() for c in cells[4:9]]
        sampled_wall, samples = float(cells[9]), float(cells[10])
        assert cycles > 0 and samples > 0 and sampled_wall > 0 and cpu > 0, cells
        assert off > 0, cells  # every cycle waits for Redis
        assert abs(wall - cpu - off) <= 0.15, cells
        us = sum(float(c.split(" (")[0]) for c in split)
        shares = sum(int(c.split("(")[1].rstrip("%)")) for c in split)
        assert abs(us - cpu) <= 0.1 * len(split), (us, cpu, cells)
        assert 97 <= shares <= 103, cells  # (each share rounded to a whole percent)
        assert 0 < int(cells[11].strip().rstrip("%")) <= 100, cells


def test_python_side_files_each_sample_by_its_innermost_frame() -> None:
    """The py-spy split: a sample counts for its thread only, by its innermost frame: redis-py's socket read
    and the event loop's select are waiting for Redis, other frames go by the file they are in."""
    from bench.pyside import GPUBOSS, JSON, LOOP, OTHER, REDIS_PY, WAIT, categorize, split

    assert categorize("_HiredisParser.read_from_socket (redis/_parsers/hiredis.py:192)") == WAIT
    assert categorize("EpollSelector.select (selectors.py:468)") == WAIT
    assert categorize("EpollSelector.select (/usr/lib/python3.11/selectors.py:468)") == WAIT
    assert categorize("_HiredisParser.read_response (redis/_parsers/hiredis.py:238)") == REDIS_PY
    assert categorize("direct_command (gpuboss/redis_io.py:464)") == GPUBOSS
    assert categorize("JSONDecoder.raw_decode (json/decoder.py:353)") == JSON
    assert categorize("Handle._run (asyncio/events.py:80)") == LOOP
    assert categorize("BaseSelector.select (gpuboss/selectors.py:1)") == GPUBOSS  # not the event loop's
    assert categorize("timed_sync (bench/pyside.py:120)") == OTHER
    assert categorize("<module> (<frozen importlib._bootstrap>:241)") == OTHER
    raw = "\n".join(
        [
            "thread (7): bench-timed;timed_sync (bench/pyside.py:120);_HiredisParser.read_from_socket "
            "(redis/_parsers/hiredis.py:192) 30",
            "thread (7): bench-timed;timed_sync (bench/pyside.py:120);direct_command (gpuboss/redis_io.py:464) 5",
            "thread (7): bench-timed;Lease.from_record (gpuboss/lease.py:326) 4",  # a stack read only in part
            "thread (9): gpuboss-heartbeat;Condition.wait (threading.py:331) 500",
            "thread (1): MainThread;Thread.join (threading.py:1119) 70",
            "not a sample line",
            "thread (7): bench-timed 3",  # no frame at all
        ]
    )
    assert split(raw, "bench-timed") == {WAIT: 30, GPUBOSS: 9}
    assert split(raw, "gpuboss-heartbeat") == {OTHER: 500}


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


def test_uncontended_target_says_what_a_client_costing_nothing_would_reach() -> None:
    """The targets table gives, next to the uncontended p50, the ratio that two floor-A round trips plus the
    scripts' Redis time (INFO commandstats) reach: the part of the miss no client could save. Without that
    time, or against a floor too small to divide by, it says nothing more."""
    from bench.stats import Summary
    from bench.targets import Results, build_targets, no_client_beats

    floor = Summary(n=100, p50=0.020, p99=0.030, mean=0.021, max=0.05)
    cycle = Summary(n=100, p50=0.140, p99=0.200, mean=0.145, max=0.3)
    rows = {
        row[0]: row
        for row in build_targets(Results(floor_a=floor, sync_cycle=cycle, cycle_redis_us={"sync": 60.0})).rows
    }
    p50 = rows["Uncontended GPUBoss acquire()+release() p50"]
    # (0.040 + 0.060) / 0.040 = 2.5x; measured 0.140 / 0.040 = 3.5x
    assert p50[1] == (
        "0.140 ms vs 2 x 0.020 ms = 3.50x; the scripts' Redis time (mean) 0.060 ms: "
        "a client costing nothing would be at 2.5x"
    ), p50
    assert p50[3] == "missed by 40%"
    assert "costing nothing" not in rows["Uncontended GPUBoss acquire()+release() p99"][1]
    assert "costing nothing" not in build_targets(Results(floor_a=floor, sync_cycle=cycle)).rows[0][1]
    assert no_client_beats(0.005, 60.0, "x") == ""  # a floor below 0.01 ms gives no ratio


def test_weighted_utilisation_target_gives_the_utilisation_at_the_hold_asked() -> None:
    """Next to the time-averaged utilisation (its verdict), the targets table gives grants/s x mean GB x hold /
    capacity: what the grants allowed, which holders waking late from their sleep (a busy-retry loop keeps
    the CPUs busy) cannot raise."""
    from bench.stats import Summary
    from bench.targets import Results, build_targets
    from bench.weighted import Phase, Weighted

    def weighted(kind: str, rate: float, held_ms: float, utilisation: float) -> Weighted:
        phase = Phase(1.0, rate=rate, size_mean_gb=4.8, held_mean_ms=held_ms, utilisation=utilisation)
        return Weighted(kind=kind, label=kind, procs=16, phases=[phase])

    floor = Summary(n=100, p50=0.020, p99=0.030, mean=0.021, max=0.05)
    mine, counter = weighted("gpuboss", 3000, 1.1, 0.66), weighted("counter", 2500, 1.4, 0.70)
    rows = {row[0]: row for row in build_targets(Results(floor_a=floor, weighted=[mine, counter])).rows}
    row = rows["Weighted, 1 ms hold: utilisation"]
    # 3000 x 4.8 x 0.001 / 24 = 60.0%; 2500 x 4.8 x 0.001 / 24 = 50.0%
    assert row[1].endswith(
        "66.0% vs EVALSHA counter 70.0%; at the hold asked (grants/s x mean GB x 1 ms / "
        "capacity: a late wake-up of a holder does not count) 60.0% vs 50.0%"
    ), row
    assert row[3] == "missed by 6%"  # the verdict stays on the utilisation the issue asks for
    assert Phase(0.0, rate=3000, size_mean_gb=4.8).asked_utilisation is None  # no hold: nothing asked


def test_instruction_counts_give_a_scaling_verdict_without_the_noise() -> None:
    """The callgrind counts at the fewest and the most waiting requests give a scaling row of their own."""
    from bench.instructions import Counts
    from bench.targets import Results, build_targets

    flat = Counts(10, 0, 100, fit=850_000, handoff=1_960_000, minimal=200_000, floor=25_000)
    grown = Counts(10_000, 0, 100, fit=1_800_000, handoff=4_100_000, minimal=200_000, floor=25_000)
    rows = {row[0]: row for row in build_targets(Results(instructions={10: flat, 10_000: grown})).rows}
    fit = rows[
        "Scaling, Redis instructions (callgrind): acquire granted at once + its release, 10,000 waiting vs 10 waiting"
    ]
    assert fit[1:] == ["1800.0 k vs 850.0 k = 2.12x", "<= 2x", "missed by 6%"]
    handoff = rows["Scaling, Redis instructions (callgrind): handoff cycle, 10,000 waiting vs 10 waiting"]
    assert handoff[3] == "missed by 5%"
    rows = {row[0]: row for row in build_targets(Results(instructions={10: flat, 10_000: flat})).rows}
    assert rows["Scaling, Redis instructions (callgrind): handoff cycle, 10,000 waiting vs 10 waiting"][3] == "met"
    assert not any("callgrind" in name for name in {r[0] for r in build_targets(Results()).rows})


@pytest.mark.skipif(not shutil.which("valgrind"), reason="valgrind is not on PATH")
def test_instruction_counts_of_a_short_run() -> None:
    """bench/instructions.py counts a few cycles of each kind on its own server under callgrind; gpuboss's fit
    cycle costs more than the minimal lease, which costs more than two `return 1`."""
    from bench.instructions import count

    counts = count(waiting=3, cycles=5)
    assert counts.fit > counts.minimal > counts.floor > 0
    assert counts.handoff > counts.fit


def test_a_failing_profile_worker_is_an_error_not_a_skipped_section(tmp_path: Path) -> None:
    """Only py-spy being unable to sample leaves the Python-side section out with a note (RuntimeError); a worker
    that fails is an error of the run, with the worker's own last words."""
    from bench.pyside import ProfileFailed, run_alone

    assert not issubclass(ProfileFailed, RuntimeError)
    with pytest.raises(ProfileFailed, match="unreachable"):
        run_alone("sync", f"unix://{tmp_path}/no-redis.sock", 0.1, tmp_path)


def test_minimal_lease_reference_is_a_correct_lease(real_url: str) -> None:
    """bench/minimal.py, the reference the uncontended target is set against, must be a real lease: it grants
    what fits, refuses what does not or while anybody waits, gives the MiB back on release, reclaims a lease
    whose TTL ran out at the next acquire, and leaves no keys behind."""
    from bench.minimal import MinimalLease

    least = MinimalLease(real_url)
    client = raw_client(real_url)
    keys = least.keys
    gpu_key, queue_key = keys[0], keys[3]
    acquire, release = least.acquire_sha, least.release_sha

    def take(rid: str, mib: int, ttl_ms: int = 30_000) -> list[object]:
        return list(client.evalsha(acquire, len(keys), *keys, rid, mib, ttl_ms, "test", 1))

    try:
        assert len(least.cycles.total) == 0  # (the warm-up is not sampled)
        least.sample(3)
        assert len(least.cycles.total) == 3
        assert client.hget(gpu_key, "used") == "0"
        granted = take("a", 16 * 1024)
        assert granted[0] == 1
        record = json.loads(str(granted[1]))
        assert record["vram_mib"] == 16 * 1024 and record["id"] == "a"
        assert take("b", 9 * 1024) == [0]  # 16 + 9 GB > 24 GB
        assert take("c", 8 * 1024)[0] == 1
        assert client.hget(gpu_key, "used") == str(24 * 1024)
        assert client.evalsha(release, len(keys), *keys, "a") == 1
        assert client.evalsha(release, len(keys), *keys, "a") == 0  # twice: no such lease
        client.zadd(queue_key, {"someone": 1})
        assert take("d", 1024) == [0]  # it fits, but somebody waits
        client.delete(queue_key)
        short = take("e", 16 * 1024, ttl_ms=50)
        assert short[0] == 1 and json.loads(str(short[1]))["token"] > record["token"]
        time.sleep(0.2)
        assert take("f", 16 * 1024)[0] == 1  # e's TTL ran out: reclaimed by this acquire
        assert client.hexists(keys[1], "e") == 0
        assert client.hget(gpu_key, "used") == str(24 * 1024)
        for rid in ("c", "f"):
            assert client.evalsha(release, len(keys), *keys, rid) == 1
    finally:
        least.close()
    assert client.exists(*keys) == 0
    client.close()


def test_the_header_says_how_fast_the_machine_ran_redis() -> None:
    """The minimal Lua lease's Redis time against its callgrind instructions: a figure to read every microsecond
    target by (the same scripts ran twice as long on a slow hour of the same VM)."""
    from bench.instructions import Counts
    from bench.targets import Results, machine_speed

    counts = {10: Counts(10, 0, 100, fit=850_000, handoff=1_960_000, minimal=203_000, floor=25_000)}
    fast = machine_speed(Results(cycle_redis_us={"minimal": 14.5}, instructions=counts))
    assert fast is not None and "in 14.5 us, 203 k instructions (callgrind): 14.0 k instructions per us" in fast
    slow = machine_speed(Results(cycle_redis_us={"minimal": 29.0}, instructions=counts))
    assert slow is not None and ": 7.0 k instructions per us" in slow
    assert machine_speed(Results(cycle_redis_us={"minimal": 29.0})) == (
        "Redis ran bench/minimal.py's acquire + release in 29.0 us (instructions not counted in this run: a full run "
        "with valgrind counts them)"
    )
    assert machine_speed(Results()) is None
