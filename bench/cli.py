"""``python -m bench [--smoke] [--iterations N] [--out PATH] [--procs 2,8]``.

One run measures, against a private redis-server on a unix socket:

1. floor A: one round trip of a trivial EVALSHA (``return 1``);
2. floor B: an exclusive token handed between N processes by BLPOP/RPUSH (the push-based floor);
3. uncontended acquire and release with ``GPUBoss``, ``AsyncGPUBoss`` and the bare scripts;
4. handoff of an exclusive lease between N processes, with fairness (consecutive grants to one process);
5. peers on the same Redis: redis-py's ``Lock`` with its default sleep (0.1 s) and with 0.001 s.

It prints a table; a full run also writes it to ``docs/performance.md`` (``--smoke`` only prints, unless
``--out`` is given). The exit status is 0 when every measurement worked, 1 when one failed.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import redis

from bench import floor, uncontended
from bench.env import Server, code_version, connect, describe_machine, load_average, private_server
from bench.handoff import EXCLUSIVE_GB, GPUS, ROOT, Contention, run_contention
from bench.report import Report, Row, Section, render_markdown, render_text
from bench.stats import Summary, summarize

DEFAULT_OUT = ROOT / "docs" / "performance.md"


@dataclass(frozen=True)
class Plan:
    iterations: int
    rounds: int
    procs: tuple[int, ...]
    max_s: float
    lock_sleeps: tuple[float, ...] = (0.1, 0.001)


FULL = Plan(iterations=3000, rounds=5, procs=(2, 8), max_s=20.0)
SMOKE = Plan(iterations=100, rounds=2, procs=(2,), max_s=3.0)
#: The whole run is stopped (workers killed, redis-server stopped, exit status 1) after this long.
FULL_LIMIT_S = 600
SMOKE_LIMIT_S = 120


class OutOfTime(BaseException):  # not caught by the per-measurement handler
    """The run took longer than its limit."""


def out_of_time(signum: int, frame: object) -> None:
    raise OutOfTime("the benchmark ran past its time limit")


def parse_procs(text: str) -> tuple[int, ...]:
    try:
        procs = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of process counts: {text!r}") from None
    if not procs or any(p < 2 or p > 64 for p in procs):
        raise argparse.ArgumentTypeError("process counts must be 2..64")
    return procs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Latency of gpuboss leases and handoffs against the floors Redis allows.",
    )
    parser.add_argument("--smoke", action="store_true", help="a short run (N=2, few iterations) that only prints")
    parser.add_argument(
        "--iterations",
        type=int,
        metavar="N",
        help=f"samples per measurement, and grants per contention run (default {FULL.iterations}, "
        f"smoke {SMOKE.iterations})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="PATH",
        help=f"where to write the Markdown table (default {DEFAULT_OUT.relative_to(ROOT)}; smoke: nowhere)",
    )
    parser.add_argument(
        "--procs",
        type=parse_procs,
        metavar="N,M",
        help="competing processes per contention run (default 2,8; smoke 2)",
    )
    args = parser.parse_args(argv)
    if args.iterations is not None and not 1 <= args.iterations <= 1_000_000:
        parser.error("--iterations must be 1..1000000")
    return args


class Sampler(Protocol):
    def sample(self, n: int) -> None: ...
    def close(self) -> None: ...


@dataclass
class ScriptTime:
    """EVALSHA calls and Redis-side microseconds (INFO commandstats) while one sampler ran."""

    calls: int = 0
    usec: int = 0
    cycles: int = 0


@dataclass
class Bench:
    """Runs the measurements and collects the report, carrying on past a failed one."""

    server: Server
    plan: Plan
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    cpu_notes: list[str] = field(default_factory=list)
    floor_a: Summary | None = None

    @property
    def url(self) -> str:
        return self.server.unix_url

    def step(self, what: str, fn: Callable[[], list[Row]]) -> list[Row]:
        print(f"  {what} ...", file=sys.stderr, flush=True)
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - one failed measurement must not hide the others
            self.errors.append(f"{what}: {type(err).__name__}: {err}")
            traceback.print_exc()
            return []

    # -- one process: floor A and uncontended leases, interleaved in rounds

    def single_process(self) -> tuple[list[Row], list[Row]]:
        """Sample every single-process measurement in turn, round after round, so that background load on
        the machine falls on all of them alike."""
        plan = self.plan
        chunk = max(1, math.ceil(plan.iterations / plan.rounds))
        control = connect(self.url)
        samplers: dict[str, Sampler] = {}  # closed at the end, however far their creation got
        with asyncio.Runner() as runner:
            try:
                fa = samplers["floor"] = floor.SyncFloor(self.url)
                fa_async = samplers["floor async"] = floor.AsyncFloor(self.url, runner)
                fa_tcp = None
                if self.server.tcp_url is not None:
                    fa_tcp = samplers["floor tcp"] = floor.SyncFloor(self.server.tcp_url)
                bare = samplers["bare"] = uncontended.BareScripts(self.url)
                sync = samplers["sync"] = uncontended.SyncLeases(self.url)
                aio = samplers["async"] = uncontended.AsyncLeases(self.url, runner)
                spent = {name: ScriptTime() for name in samplers}
                for _ in range(plan.rounds):
                    for name, sampler in samplers.items():
                        calls, usec = evalsha_stats(control)
                        sampler.sample(chunk)
                        after_calls, after_usec = evalsha_stats(control)
                        spent[name].calls += after_calls - calls
                        spent[name].usec += after_usec - usec
                        spent[name].cycles += chunk
            finally:
                for sampler in samplers.values():
                    sampler.close()
                control.close()
        self.floor_a = summarize(fa.samples)
        fas = summarize(fa_async.samples)
        floors = [
            Row("A: EVALSHA `return 1`, sync client", self.floor_a, "A", self.floor_a),
            Row("A: EVALSHA `return 1`, asyncio client", fas, "A", self.floor_a),
        ]
        if fa_tcp is not None:
            floors.append(
                Row("A: EVALSHA `return 1`, sync, TCP loopback", summarize(fa_tcp.samples), "A", self.floor_a)
            )
        rows = [
            Row("bare scripts: acquire EVALSHA", summarize(bare.cycles.acquire), "A", self.floor_a),
            Row("bare scripts: release EVALSHA", summarize(bare.cycles.release), "A", self.floor_a),
            Row("GPUBoss acquire()", summarize(sync.cycles.acquire), "A", self.floor_a),
            Row("GPUBoss release()", summarize(sync.cycles.release), "A", self.floor_a),
            Row("GPUBoss acquire() + release()", summarize(sync.cycles.total), "A", self.floor_a),
            Row("AsyncGPUBoss acquire()", summarize(aio.cycles.acquire), "A async", fas),
            Row("AsyncGPUBoss release()", summarize(aio.cycles.release), "A async", fas),
            Row("AsyncGPUBoss acquire() + release()", summarize(aio.cycles.total), "A async", fas),
        ]
        self.notes.append(script_note(spent))
        return floors, rows

    # -- N processes: floor B, gpuboss, peers

    def contention(self, kind: str, label: str, procs: int, required: bool = True, **extra: object) -> Contention:
        print(f"    {label} ...", file=sys.stderr, flush=True)
        plan = self.plan
        result = run_contention(kind, label, self.url, self.server.workdir, procs, plan.iterations, plan.max_s, **extra)
        self.errors += result.errors if required else [e for e in result.errors if "no handoff" not in e]
        if result.capped:
            self.notes.append(f"{label}: stopped by the {plan.max_s:g} s cap after {result.grants} grants.")
        if result.cpu is not None and kind != "redis-lock":
            self.cpu_notes.append(f"{label}: {result.cpu.line(result.grants)}.")
        return result

    def handoffs(self, n: int) -> list[Row]:
        b = self.contention("token", f"floor B, N={n}", n)
        g = self.contention("gpuboss", f"GPUBoss, N={n}", n)
        q = self.contention("gpuboss", f"GPUBoss heartbeat not woken, N={n}", n, quiet_heartbeat=True)
        rows = [
            Row("B: token BLPOP/RPUSH, from RPUSH returned", b.handoff, "B", b.handoff, b.same_holder, b.wait),
            Row("B: token BLPOP/RPUSH, from RPUSH called", b.from_call, "B call", b.from_call),
            Row("GPUBoss, from release() returned", g.handoff, "B", b.handoff, g.same_holder, g.wait),
            Row("GPUBoss, from release() called", g.from_call, "B call", b.from_call),
            Row("  waiter woken by the pushed grant", g.woken, "B", b.handoff),
            Row("    release() returned → its BLPOP returned", g.wake, "B", b.handoff),
            Row("    its BLPOP returned → acquire() returned", g.client, "A", self.floor_a),
            Row(
                "  diagnostic, heartbeat never woken: from release() called",
                q.from_call,
                "B call",
                b.from_call,
                q.same_holder,
                q.wait,
            ),
            Row("    its BLPOP returned → acquire() returned", q.client, "A", self.floor_a),
        ]
        for sleep in self.plan.lock_sleeps:
            label = f"redis-py Lock sleep={sleep:g}, N={n}"
            lock = self.contention("redis-lock", label, n, required=False, sleep=sleep)
            rows.append(
                Row(
                    f"redis-py Lock sleep={sleep:g}, from release() returned",
                    lock.handoff,
                    "B",
                    b.handoff,
                    lock.same_holder,
                    lock.wait,
                )
            )
        return rows


def evalsha_stats(client: redis.Redis) -> tuple[int, int]:
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


def script_note(spent: dict[str, ScriptTime]) -> str:
    def per(name: str, what: str) -> str:
        s = spent.get(name)
        if s is None or not s.cycles or not s.calls:
            return f"{what}: -"
        return (
            f"{what}: {s.calls / s.cycles:.1f} EVALSHA and {s.usec / s.cycles:.1f} us of Redis time per "
            f"{'call' if name.startswith('floor') else 'acquire + release'}"
        )

    return (
        "Inside Redis (INFO commandstats): "
        + "; ".join(
            [
                per("floor", "`return 1`"),
                per("bare", "bare scripts"),
                per("sync", "GPUBoss"),
                per("async", "AsyncGPUBoss"),
            ]
        )
        + "."
    )


def run(args: argparse.Namespace) -> Report:
    base = SMOKE if args.smoke else FULL
    plan = Plan(
        iterations=args.iterations or base.iterations,
        rounds=base.rounds,
        procs=args.procs or base.procs,
        max_s=base.max_s,
    )
    started, load_before = time.monotonic(), load_average()
    with private_server() as server:
        environment = [*describe_machine(server.unix_url), ("gpuboss", code_version(ROOT))]
        bench = Bench(server, plan)
        single = bench.step(
            "one process: floor A, uncontended leases", lambda: [r for part in bench.single_process() for r in part]
        )
        split = next((i for i, r in enumerate(single) if not r.name.startswith("A:")), len(single))
        sections = [
            Section("Floor A: one script round trip, one process", single[:split]),
            Section("Uncontended acquire and release, one process", single[split:]),
        ]
        for n in plan.procs:
            rows = bench.step(f"exclusive handoff, N={n}", lambda n=n: bench.handoffs(n))  # type: ignore[misc]
            sections.append(Section(f"Exclusive handoff between N={n} processes (floor B and peers)", rows))
    elapsed = time.monotonic() - started
    for sec in sections:
        if not sec.rows:
            bench.errors.append(f"{sec.title}: no results")
        for row in sec.rows:
            if row.summary is None and not row.name.startswith("redis-py"):
                bench.errors.append(f"{sec.title}: {row.name.strip()}: no samples")
    parameters = [
        ("run", f"{'smoke' if args.smoke else 'full'}, {elapsed:.0f} s in all"),
        (
            "iterations",
            f"{plan.iterations} samples per one-process measurement (in {plan.rounds} interleaved rounds); "
            f"{plan.iterations} grants per contention run, split evenly between the processes",
        ),
        ("processes", ", ".join(f"N={n}" for n in plan.procs) + f"; each contention run capped at {plan.max_s:g} s"),
        (
            "lease",
            f"{EXCLUSIVE_GB:g} GB on one {GPUS[0]['vram_gb']} GB GPU (exclusive), default TTL (30 s), "
            "released at once, re-requested at once",
        ),
        ("clock", "time.monotonic() (CLOCK_MONOTONIC: one clock for every process)"),
        (
            "load average",
            f"{load_before} before the run, {load_average()} after it (1 min; other work on the machine "
            "shows here and widens every p99)",
        ),
    ]
    return Report(
        title="gpuboss performance",
        environment=environment,
        parameters=parameters,
        sections=sections,
        notes=NOTES + bench.notes + bench.cpu_notes,
        errors=bench.errors,
    )


NOTES = [
    "Floor A is one round trip of the cheapest script call from the same kind of client gpuboss uses "
    "(redis-py with hiredis, decoded replies). Without a waiter, acquire() and release() are one script call "
    "each, so 1x floor A each is the ideal; the 'bare scripts' rows are those same calls sent from a plain "
    "client, which splits the time between the scripts in Redis and the Python library around them. The "
    "AsyncGPUBoss rows are compared with the same floor from an asyncio client ('A async').",
    "Floor B is the push-based exclusive floor: a token taken by BLPOP and given back by RPUSH by N "
    "processes. 'from RPUSH returned' is the handoff as the brief defines it: from the RPUSH returning in the "
    "giver to the BLPOP returning in the next taker. Redis answers the giver and wakes the taker in the same "
    "event-loop turn, so it measures which of two runnable processes the kernel runs first, and is often "
    "near 0 or negative (no ratio is given against a floor below 0.01 ms). 'from RPUSH called' counts from the moment "
    "the giver sent its RPUSH and is always positive: one round trip plus the wake-up.",
    "A lease handoff is measured the same two ways: to acquire() returning in the next holder from release() "
    "returning ('B') or from release() being called ('B call') in the previous one. Only changes of holder "
    "count; n is how many there were. The indented rows take the handoffs whose waiter was woken by the "
    "grant that the release script pushed, and split them at the moment the waiter's BLPOP returned.",
    "The diagnostic rows run the same GPUBoss workers with the heartbeat thread never woken (its watch() and "
    "hold() made no-ops; a 30 s lease needs no renewal within the run); set against the rows above them, "
    "they show what waking that thread on every grant costs: it competes for the GIL and a CPU while "
    "acquire() returns.",
    "'same holder' is the share of consecutive grants that went to the process that had just released: near "
    "0 when waiters are served in order, near 100% when the releaser takes it again. 'longest wait' is "
    "the longest any acquire() took from call to return in that run: what unfairness costs a waiter.",
    "A p99 over fewer than 100 samples is close to the maximum; redis-py's Lock hands over so rarely that "
    "its handoff rows have few samples.",
]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if hasattr(signal, "SIGALRM"):  # unwinds through the finally blocks that stop the workers and Redis
        signal.signal(signal.SIGALRM, out_of_time)
        signal.alarm(SMOKE_LIMIT_S if args.smoke else FULL_LIMIT_S)
    try:
        report = run(args)  # an error before the table exists propagates: a traceback and exit status 1
    finally:
        if hasattr(signal, "SIGALRM"):
            signal.alarm(0)
    print(render_text(report))
    out: Path | None = args.out if args.out is not None else (None if args.smoke else DEFAULT_OUT)
    if out is not None:
        command = "python -m bench" + (" --smoke" if args.smoke else "")
        if args.iterations is not None:
            command += f" --iterations {args.iterations}"
        if args.procs is not None:
            command += " --procs " + ",".join(map(str, args.procs))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render_markdown(report, command), encoding="utf-8")
        print(f"\nwrote {out}")
    if report.errors:
        print(f"bench: {len(report.errors)} failure(s)", file=sys.stderr)
        return 1
    return 0
