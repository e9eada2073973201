"""``python -m bench [--smoke] [--iterations N] [--out PATH] [--procs 2,8]``.

One run measures, against a private redis-server on a unix socket:

1. floor A: one round trip of a trivial EVALSHA (``return 1``);
2. floor B: an exclusive token handed between N processes by BLPOP/RPUSH (the push-based floor);
3. uncontended acquire and release with ``GPUBoss``, ``AsyncGPUBoss`` and the bare scripts (sent as gpuboss
   sends them: FCALL of its function library on Redis 7 or later, else EVALSHA; the header's "scripts" line
   says which), and for reference a minimal Lua lease (``minimal.py``: not gpuboss, the least a correct lease
   script does, sent as floor A is);
4. handoff of an exclusive lease between N processes (2, 8, 32), with fairness (consecutive grants to one
   process, and grants retaken by the releaser ahead of a waiter), against the exclusive-lock peers on the
   same Redis: redis-py's ``Lock`` (its default sleep, 0.1 s, and 0.001 s), python-redis-lock, pottery's
   ``Redlock`` with one master;
5. weighted throughput (``weighted.py``): 16 processes, one 24 GB GPU, random sizes 1 to 8 GB, several hold
   times: gpuboss against a trivial EVALSHA counter with busy retry, the npm ``redis-semaphore``
   ``MultiSemaphore`` (Node) and reslock;
6. scaling and Redis cost (``scaling.py``): grant latency and Redis time per script with 10 to 10,000
   waiting requests and 1 to 256 GPUs in a namespace, Redis memory per lease and per waiting request, and
   the keys left at the end;
7. cooperative eviction (``eviction.py``): a high request for a GPU that a low lease of another process
   holds, request -> the victim's callback and request -> grant, over pub/sub and through the heartbeat
   fallback only;
8. the targets of issue 9, each with the measured value and met or missed by how much (``targets.py``).

It prints a table; a full run also writes it to ``docs/performance.md`` (``--smoke`` only prints, unless
``--out`` is given). The exit status is 0 when every measurement worked, 1 when one failed (a peer that is
not installed is skipped with a message, not a failure).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from bench import eviction, floor, instructions, minimal, peers, pyside, scaling, scriptcalls, uncontended, weighted
from bench.env import Server, code_version, connect, describe_machine, load_average, private_server
from bench.handoff import EXCLUSIVE_GB, GPUS, ROOT, Contention, run_contention
from bench.report import Report, Row, Section, Table, ms, render_markdown, render_text, times
from bench.stats import Summary, summarize
from bench.targets import Results, build_targets, machine_speed

DEFAULT_OUT = ROOT / "docs" / "performance.md"
T = TypeVar("T")


@dataclass(frozen=True)
class Plan:
    iterations: int
    rounds: int
    procs: tuple[int, ...]
    max_s: float
    lock_sleeps: tuple[float, ...] = (0.1, 0.001)
    #: also run GPUBoss with its heartbeat never woken (a diagnostic)
    diagnostic: bool = True
    #: weighted throughput: processes, hold times (ms, one phase each) and seconds per phase
    weighted_procs: int = 16
    weighted_holds: tuple[float, ...] = (0.0, 1.0, 10.0)
    weighted_s: float = 3.0
    #: scaling: waiting requests and GPUs per level, samples per measurement and level, in rounds
    waiting: tuple[int, ...] = (10, 1_000, 10_000)
    gpu_counts: tuple[int, ...] = (1, 16, 256)
    scale_samples: int = 1000
    scale_rounds: int = 20
    memory_count: int = 1000
    #: eviction: measured rounds per mode (pub/sub, heartbeat only)
    eviction_rounds: int = 50
    #: the Python side under py-spy: seconds of cycles per front end (alone, then sampled)
    pyside_s: float = 3.0


FULL = Plan(iterations=3000, rounds=5, procs=(2, 8, 32), max_s=20.0)
SMOKE = Plan(
    iterations=100,
    rounds=2,
    procs=(2, 8),
    max_s=3.0,
    lock_sleeps=(0.001,),
    diagnostic=False,
    weighted_procs=4,
    weighted_holds=(0.0, 1.0),
    weighted_s=0.4,
    waiting=(10, 1_000),
    gpu_counts=(1, 16),
    scale_samples=60,
    scale_rounds=2,
    memory_count=200,
    eviction_rounds=5,
    pyside_s=0.5,
)
PARTS = ("single", "handoff", "weighted", "scaling", "eviction")
#: The whole run is stopped (workers killed, redis-server stopped, exit status 1) after this long.
FULL_LIMIT_S = 600
SMOKE_LIMIT_S = 120
#: Cycles of each kind counted under callgrind in a full run (bench/instructions.py).
IR_CYCLES = 100


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


def parse_parts(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if not parts or unknown:
        raise argparse.ArgumentTypeError(f"parts must be among {', '.join(PARTS)}")
    return parts


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
        help="competing processes per contention run (default 2,8,32; smoke 2,8)",
    )
    parser.add_argument(
        "--only",
        type=parse_parts,
        metavar="PART,PART",
        help=f"run only these parts: {', '.join(PARTS)} (default all; 'single' also gives the floor A that "
        "every ratio needs)",
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
    """Script calls (FCALL, EVALSHA, ...: by command) and their Redis-side microseconds (INFO commandstats)
    while one sampler ran."""

    by_command: dict[str, tuple[int, int]] = field(default_factory=dict)
    cycles: int = 0

    def add(self, delta: dict[str, tuple[int, int]]) -> None:
        for name, (calls, usec) in delta.items():
            c, u = self.by_command.get(name, (0, 0))
            self.by_command[name] = (c + calls, u + usec)

    @property
    def calls(self) -> int:
        return sum(c for c, _ in self.by_command.values())

    @property
    def usec(self) -> int:
        return sum(u for _, u in self.by_command.values())


@dataclass
class Bench:
    """Runs the measurements and collects the report, carrying on past a failed one."""

    server: Server
    plan: Plan
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    cpu_notes: list[str] = field(default_factory=list)
    floor_a: Summary | None = None
    results: Results = field(default_factory=Results)
    #: peers that cannot run here, and why
    skipped: dict[str, str] = field(default_factory=dict)
    #: gpuboss namespaces the run used
    namespaces: list[str] = field(default_factory=list)

    def find_peers(self) -> None:
        for name in peers.PYTHON_PEERS:
            found = peers.python_peer(name)
            if not found.ok:
                self.skipped[name] = found.why
        node = peers.node_peer()
        if not node.ok:
            self.skipped["semaphore"] = node.why
        for why in sorted(set(self.skipped.values())):
            print(f"  {why}", file=sys.stderr, flush=True)

    @property
    def url(self) -> str:
        return self.server.unix_url

    def step(self, what: str, fn: Callable[[], list[T]]) -> list[T]:
        print(f"  {what} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - one failed measurement must not hide the others
            self.errors.append(f"{what}: {type(err).__name__}: {err}")
            traceback.print_exc()
            return []
        finally:
            print(f"  {what}: {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)

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
                fa_redis_py = samplers["redis-py evalsha"] = floor.SyncFloor(self.url, direct=False)
                fa_tcp = None
                if self.server.tcp_url is not None:
                    fa_tcp = samplers["floor tcp"] = floor.SyncFloor(self.server.tcp_url)
                bare = samplers["bare"] = uncontended.BareScripts(self.url)
                least = samplers["minimal"] = minimal.MinimalLease(self.url)
                sync = samplers["sync"] = uncontended.SyncLeases(self.url)
                aio = samplers["async"] = uncontended.AsyncLeases(self.url, runner)
                spent = {name: ScriptTime() for name in samplers}
                for _ in range(plan.rounds):
                    for name, sampler in samplers.items():
                        before = scriptcalls.script_stats(control)
                        sampler.sample(chunk)
                        spent[name].add(scriptcalls.stats_delta(before, scriptcalls.script_stats(control)))
                        spent[name].cycles += chunk
            finally:
                for sampler in samplers.values():
                    sampler.close()
                control.close()
        self.floor_a = summarize(fa.samples)
        fas = summarize(fa_async.samples)
        floors = [
            Row("A: EVALSHA `return 1`, sync client", self.floor_a),
            Row("A: EVALSHA `return 1`, asyncio client", fas),
        ]
        if fa_tcp is not None:
            floors.append(Row("A: EVALSHA `return 1`, sync, TCP loopback", summarize(fa_tcp.samples)))
        floors.append(
            Row("EVALSHA `return 1`, sync, by redis-py's evalsha (not a floor)", summarize(fa_redis_py.samples))
        )
        sync_total, async_total = summarize(sync.cycles.total), summarize(aio.cycles.total)
        least_total = summarize(least.cycles.total)
        rows = [
            Row(f"bare scripts: acquire {bare.command}", summarize(bare.cycles.acquire)),
            Row(f"bare scripts: release {bare.command}", summarize(bare.cycles.release)),
            Row("bare scripts: acquire + release", summarize(bare.cycles.total), "2A", doubled(self.floor_a)),
            Row(minimal.ROW, least_total, "2A", doubled(self.floor_a)),
            Row("GPUBoss acquire()", summarize(sync.cycles.acquire)),
            Row("GPUBoss release()", summarize(sync.cycles.release)),
            Row("GPUBoss acquire() + release()", sync_total, "2A", doubled(self.floor_a)),
            Row("AsyncGPUBoss acquire()", summarize(aio.cycles.acquire), "A async", fas),
            Row("AsyncGPUBoss release()", summarize(aio.cycles.release), "A async", fas),
            Row("AsyncGPUBoss acquire() + release()", async_total, "2A async", doubled(fas)),
        ]
        self.results.floor_a, self.results.floor_a_async = self.floor_a, fas
        self.results.sync_cycle, self.results.async_cycle = sync_total, async_total
        self.results.minimal_cycle = least_total
        self.notes.append(script_note(spent))
        for name in ("sync", "async", "minimal"):
            if spent[name].cycles and spent[name].calls:
                self.results.cycle_redis_us[name] = spent[name].usec / spent[name].cycles
        return floors, rows

    def single_sections(self) -> list[Section]:
        floors, rows = self.single_process()
        return [
            Section("Floor A: one script round trip, one process", floors),
            Section("Uncontended acquire and release, one process", rows),
        ]

    def python_side(self) -> list[Section]:
        """The uncontended cycle's Python side under py-spy (bench/pyside.py); a note instead where py-spy is
        missing or may not sample another process."""
        try:
            results = pyside.profile(self.url, self.plan.pyside_s, self.server.workdir)
        except RuntimeError as err:
            self.skipped["py-spy"] = f"The Python side was not profiled: {err}."
            return []
        title = "Where one uncontended acquire() + release() spends its time, Python side (py-spy)"
        return [Section(title, table=pyside.table(results))]

    # -- N processes: floor B, gpuboss, peers

    def contention(self, kind: str, label: str, procs: int, required: bool = True, **extra: object) -> Contention:
        plan = self.plan
        started = time.monotonic()
        result = run_contention(kind, label, self.url, self.server.workdir, procs, plan.iterations, plan.max_s, **extra)
        print(f"    {label}: {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
        self.errors += result.errors if required else [e for e in result.errors if "no handoff" not in e]
        if result.capped:
            self.notes.append(f"{label}: stopped by the {plan.max_s:g} s cap after {result.grants} grants.")
        if result.cpu is not None and kind != "redis-lock":
            self.cpu_notes.append(f"{label}: {result.cpu.line(result.grants)}.")
        return result

    def handoffs(self, n: int) -> list[Row]:
        b = self.contention("token", f"floor B, N={n}", n)
        g = self.contention("gpuboss", f"GPUBoss, N={n}", n)
        q = None
        if self.plan.diagnostic:
            q = self.contention("gpuboss", f"GPUBoss heartbeat not woken, N={n}", n, quiet_heartbeat=True)
        self.results.floor_b[n], self.results.gpuboss[n] = b, g
        if g.late is not None:
            self.notes.append(
                f"GPUBoss, N={n}: of the handoffs whose waiter was woken by the pushed grant, {g.late:.0%} had the "
                "waiter send its BLPOP only after release() had returned (the grant was already in its wake list: "
                "the acquire script's QUEUED reply and the BLPOP are two round trips, and the release fell between)."
            )
        self.namespaces += [c.namespace for c in (g, q) if c is not None]
        rows = [
            Row(
                "B: token BLPOP/RPUSH, from RPUSH returned", b.handoff, "B", b.handoff, b.same_holder, b.wait, b.retakes
            ),
            Row("B: token BLPOP/RPUSH, from RPUSH called", b.from_call, "B call", b.from_call),
            Row("GPUBoss, from release() returned", g.handoff, "B", b.handoff, g.same_holder, g.wait, g.retakes),
            Row("GPUBoss, from release() called", g.from_call, "B call", b.from_call),
            Row("  waiter woken by the pushed grant", g.woken, "B", b.handoff),
            Row("    release() returned → its BLPOP returned", g.wake, "B", b.handoff),
            Row("    its BLPOP returned → acquire() returned", g.client),
            Row("  waiter already in BLPOP when release() was called", g.blocked, "B", b.handoff),
        ]
        if q is not None:
            rows += [
                Row(
                    "  diagnostic, heartbeat never woken: from release() called",
                    q.from_call,
                    "B call",
                    b.from_call,
                    q.same_holder,
                    q.wait,
                    q.retakes,
                ),
                Row("    its BLPOP returned → acquire() returned", q.client),
            ]
        peer_runs: list[tuple[str, str, dict[str, object]]] = [
            ("redis-lock", f"redis-py Lock sleep={sleep:g}", {"sleep": sleep}) for sleep in self.plan.lock_sleeps
        ]
        peer_runs += [
            ("python-redis-lock", "python-redis-lock Lock", {}),
            ("pottery", "pottery Redlock, one master", {}),
        ]
        self.results.peers[n] = []
        for kind, name, extra in peer_runs:
            if kind in self.skipped:
                rows.append(Row(f"{name}: {self.skipped[kind]}", None))
                continue
            lock = self.contention(kind, f"{name}, N={n}", n, required=False, **extra)
            self.results.peers[n].append(lock)
            rows.append(
                Row(
                    f"{name}, from release() returned",
                    lock.handoff,
                    "B",
                    b.handoff,
                    lock.same_holder,
                    lock.wait,
                    lock.retakes,
                )
            )
        return rows

    # -- weighted throughput

    def weighted(self) -> list[Section]:
        plan = self.plan
        kinds: list[tuple[str, str, dict[str, Any]]] = [
            ("gpuboss", "GPUBoss", {}),
            ("gpuboss", f"GPUBoss, overtake: {weighted.OVERTAKE}", {"overtake": weighted.OVERTAKE}),
            ("counter", "EVALSHA counter, busy retry", {}),
            ("semaphore", "npm redis-semaphore MultiSemaphore", {}),
            ("reslock", "reslock (state file)", {}),
        ]
        socket = self.url.removeprefix("unix://")
        table = Table(
            [
                "library",
                "hold ms",
                "grants",
                "grants/s",
                "wait p50 ms (x A)",
                "wait p99 ms (x A)",
                "7-8 GB wait p99 ms (x A)",
                "7-8 GB longest ms",
                "utilisation",
                "mean GB",
                "mean held ms",
                "Redis CPU us/grant",
                "scripts/grant",
            ],
            numeric=set(range(1, 13)),
        )
        for kind, label, settings in kinds:
            if kind in self.skipped:
                table.rows.append([label, self.skipped[kind], *["-"] * 11])
                continue
            started = time.monotonic()
            result = weighted.run_weighted(
                kind,
                label,
                self.url,
                socket,
                self.server.workdir,
                plan.weighted_procs,
                plan.weighted_holds,
                plan.weighted_s,
                settings=settings,
                variant="+overtake" if settings else "",
            )
            print(f"    weighted, {label}: {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
            self.errors += result.errors
            self.results.weighted.append(result)
            if result.namespace:
                self.namespaces.append(result.namespace)
            for ph in result.phases:
                w, large, a = ph.wait, ph.wait_large, self.floor_a
                table.rows.append(
                    [
                        label,
                        f"{ph.hold_ms:g}",
                        str(ph.grants),
                        "-" if ph.rate is None else f"{ph.rate:.0f}",
                        with_a(w.p50 if w else None, a.p50 if a else None),
                        with_a(w.p99 if w else None, a.p99 if a else None),
                        with_a(large.p99 if large else None, a.p99 if a else None),
                        "-" if large is None else ms(large.max),
                        "-" if ph.utilisation is None else f"{ph.utilisation:.1%}",
                        "-" if ph.size_mean_gb is None else f"{ph.size_mean_gb:.2f}",
                        "-" if ph.held_mean_ms is None else f"{ph.held_mean_ms:.3f}",
                        "-" if ph.redis_us_per_grant is None else f"{ph.redis_us_per_grant:.0f}",
                        "-" if ph.calls_per_grant is None else f"{ph.calls_per_grant:.2f}",
                    ]
                )
                if ph.failures:
                    self.notes.append(
                        f"Weighted, {label}, hold {ph.hold_ms:g} ms: {ph.failures} acquire calls raised and were "
                        f"retried (the first: {ph.failure})."
                    )
                if ph.grants == 0:
                    self.errors.append(f"weighted: {label}, hold {ph.hold_ms:g} ms: no grants")
        return [
            Section(
                f"Weighted throughput: {plan.weighted_procs} processes, one {weighted.CAPACITY_GB} GB GPU, "
                f"random sizes {weighted.MIN_GB} to {weighted.MAX_GB} GB, {plan.weighted_s:g} s per hold time",
                table=table,
            )
        ]

    # -- scaling, Redis cost, memory, keys

    def scaling(self) -> list[Section]:
        plan = self.plan
        levels, floor_samples = scaling.run_scaling(
            self.url,
            scaling.ScalePlan(plan.waiting, plan.gpu_counts, plan.scale_samples, plan.scale_rounds),
            lambda what: print(f"    scaling: {what} ...", file=sys.stderr, flush=True),
        )
        self.results.levels = levels
        self.namespaces += [lv.namespace for lv in levels]
        local_a = summarize(floor_samples)
        sections = [
            Section(
                "Floor A again, sampled in the scaling rounds",
                [Row("A: EVALSHA `return 1`, sync client", local_a, floor_a=local_a)],
            )
        ]
        for kind in ("waiting", "gpus"):
            group = [lv for lv in levels if (lv.waiting > 0) == (kind == "waiting")]
            if not group:
                continue
            base = group[0]
            command = base.s.command  # FCALL, or EVALSHA where the server has no functions
            rows = []
            for what, attr in (
                (f"acquire {command}, fits at once", "fit_acquire"),
                (f"release {command}", "fit_release"),
                ("GPUBoss.acquire(), fits at once", "boss_acquire"),
                ("GPUBoss acquire() + release()", "boss_cycle"),
                (f"handoff to the head: release {command} → head's BLPOP", "handoff"),
            ):
                reference = summarize(getattr(base, attr))
                for lv in group:
                    rows.append(
                        Row(f"{what}, {lv.name}", summarize(getattr(lv, attr)), base.name, reference, floor_a=local_a)
                    )
            title = (
                "Scaling with waiting requests in the namespace (2 GPUs; the waiting requests are parked on the second)"
                if kind == "waiting"
                else "Scaling with GPUs registered in the namespace (nothing waiting)"
            )
            sections.append(Section(title, rows))
        cost = Table(
            [
                "level",
                "script call",
                "n",
                "p50 us",
                "p99 us",
                "mean us",
                "its own commands",
                "their us",
                f"GPUBoss's {'/'.join(sorted({lv.s.command for lv in levels}))} usec_per_call (commandstats)",
            ],
            numeric={2, 3, 4, 5, 6, 7, 8},
        )
        for lv in levels:
            per_call = f"{lv.script_usec / lv.script_calls:.1f}" if lv.script_calls else "-"
            for i, label in enumerate(scaling.LABELS):
                us = scaling.us_summary(lv.redis_us.get(label, []))
                inner = lv.inner.get(label, [])
                cost.rows.append(
                    [
                        lv.name if i == 0 else "",
                        label,
                        "0" if us is None else str(us.n),
                        "-" if us is None else f"{us.p50:.0f}",
                        "-" if us is None else f"{us.p99:.0f}",
                        "-" if us is None else f"{us.mean:.1f}",
                        f"{sum(n for n, _ in inner) / len(inner):.1f}" if inner else "-",
                        f"{sum(u for _, u in inner) / len(inner):.1f}" if inner else "-",
                        per_call if i == 0 else "",
                    ]
                )
        sections.append(Section("Redis time per script call (SLOWLOG)", table=cost))
        return sections

    # -- cooperative eviction

    def eviction(self) -> list[Section]:
        table = Table(["measurement", "n", "p50 ms", "p99 ms", "max ms", "mean ms"], numeric={1, 2, 3, 4, 5})
        for notices, mode in ((True, "pub/sub notice"), (False, "heartbeat fallback only")):
            started = time.monotonic()
            run = eviction.run_eviction(self.url, self.server.workdir, self.plan.eviction_rounds, notices, mode)
            print(f"    eviction, {mode}: {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
            self.errors += run.errors
            self.namespaces.append(run.namespace)
            for what, s in (
                ("request → victim's on_evict starts", run.to_callback),
                ("request → high acquire() returns", run.to_grant),
                ("high release() → victim resumed", run.to_resume),
            ):
                name = f"{mode}: {what}"
                if s is None:
                    table.rows.append([name, "0", "-", "-", "-", "-"])
                    self.errors.append(f"eviction: {name}: no samples")
                else:
                    table.rows.append([name, str(s.n), ms(s.p50), ms(s.p99), ms(s.max), ms(s.mean)])
        return [
            Section(
                f"Cooperative eviction: a high request for the whole {eviction.WHOLE_GB:g} GB GPU held by a low "
                f"lease of another process (victim TTL {eviction.VICTIM_TTL_S:g} s)",
                table=table,
            )
        ]

    def instructions(self) -> list[Section]:
        """redis-server's instructions per cycle (bench/instructions.py) with the fewest and the most requests
        waiting of the scaling part: the scripts' cost without the machine's noise."""
        if not instructions.have_callgrind():
            self.notes.append("Redis instructions: valgrind (with callgrind_control) is not on PATH: not counted.")
            return []
        found = self.results.instructions
        for waiting in (min(self.plan.waiting), max(self.plan.waiting)):
            print(f"    callgrind: {waiting:,} waiting ...", file=sys.stderr, flush=True)
            found[waiting] = instructions.count(waiting=waiting, cycles=IR_CYCLES)
        levels = sorted(found)
        table = Table(
            ["cycle", *(f"{w:,} waiting, k" for w in levels), f"{levels[-1]:,} vs {levels[0]:,}", "x minimal"],
            numeric=set(range(1, len(levels) + 3)),
        )
        first, last = found[levels[0]], found[levels[-1]]
        for name, what in instructions.KINDS:
            values = [getattr(found[w], name) for w in levels]
            table.rows.append(
                [
                    f"{name}: {what}",
                    *(f"{v / 1000:.1f}" for v in values),
                    f"{getattr(last, name) / getattr(first, name):.2f}x",
                    f"{first.fit / first.minimal:.2f}x" if name == "fit" else "-",  # (the same two calls)
                ]
            )
        title = f"Redis instructions per cycle (callgrind, {IR_CYCLES} cycles of each)"
        return [Section(title, table=table)]

    def memory_and_keys(self) -> list[Section]:
        table = Table(["measurement", "value"], numeric={1})
        mem = scaling.measure_memory(self.url, self.plan.memory_count)
        table.rows += [
            [f"used_memory per live lease (over {mem.count:,})", f"{mem.per_lease:.0f} B"],
            ["  of which the namespace's fixed keys (event log)", f"{mem.lease_in_fixed:.0f} B"],
            [f"used_memory per waiting request (over {mem.count:,})", f"{mem.per_request:.0f} B"],
            ["  of which the namespace's fixed keys (event log)", f"{mem.request_in_fixed:.0f} B"],
        ]
        left = scaling.keys_left(self.url)
        self.results.keys = left
        other = ", ".join(f"{k} x{v}" for k, v in sorted(left.other.items())) or "none"
        foreign = ", ".join(f"{k} x{v}" for k, v in sorted(left.foreign.items())) or "none"
        table.rows += [
            ["gpuboss namespaces left in Redis at the end", str(left.namespaces)],
            ["  their fixed keys found", ", ".join(sorted(left.fixed)) or "none"],
            ["  any other key of theirs", other],
            ["keys of no gpuboss namespace (peers, barriers)", foreign],
        ]
        if left.other:
            self.errors.append(f"keys left beyond the fixed ones: {other}")
        return [Section("Redis memory and keys left after the run", table=table)]


def with_a(value: float | None, floor_a: float | None) -> str:
    """A latency in ms with its multiple of floor A: ``5.139 (52x)``."""
    if value is None:
        return "-"
    return ms(value) if floor_a is None else f"{ms(value)} ({times(value, floor_a)})"


def doubled(s: Summary | None) -> Summary | None:
    """Two round trips of a floor: its p50 and p99 doubled (the cost of two script calls in a row)."""
    if s is None:
        return None
    return Summary(n=s.n, p50=2 * s.p50, p99=2 * s.p99, mean=2 * s.mean, max=2 * s.max)


def describe_scripts(url: str) -> str:
    """How gpuboss calls its scripts on this server: the header's "scripts" line."""
    client = connect(url)
    try:
        return scriptcalls.describe(client)
    finally:
        client.close()


def script_note(spent: dict[str, ScriptTime]) -> str:
    def per(name: str, what: str) -> str:
        s = spent.get(name)
        if s is None or not s.cycles or not s.calls:
            return f"{what}: -"
        sent = " + ".join(f"{c / s.cycles:.1f} {cmd.upper()}" for cmd, (c, _) in sorted(s.by_command.items()))
        return (
            f"{what}: {sent} and {s.usec / s.cycles:.1f} us of Redis time per "
            f"{'call' if name.startswith('floor') else 'acquire + release'}"
        )

    return (
        "Inside Redis (INFO commandstats): "
        + "; ".join(
            [
                per("floor", "`return 1`"),
                per("bare", "bare scripts"),
                per("minimal", "minimal Lua lease"),
                per("sync", "GPUBoss"),
                per("async", "AsyncGPUBoss"),
            ]
        )
        + "."
    )


def run(args: argparse.Namespace) -> Report:
    base = SMOKE if args.smoke else FULL
    plan = dataclasses.replace(base, iterations=args.iterations or base.iterations, procs=args.procs or base.procs)
    parts = args.only or PARTS
    started, load_before = time.monotonic(), load_average()
    with private_server() as server:
        environment = [
            *describe_machine(server.unix_url),
            ("gpuboss", code_version(ROOT)),
            ("peers", peers.versions()),
            ("scripts", describe_scripts(server.unix_url)),
        ]
        bench = Bench(server, plan)
        bench.find_peers()
        sections: list[Section] = []
        if "single" in parts:
            sections += bench.step("one process: floor A, uncontended leases", bench.single_sections)
            sections += bench.step("one process: the Python side under py-spy", bench.python_side)
        if "handoff" in parts:
            for n in plan.procs:
                rows = bench.step(f"exclusive handoff, N={n}", lambda n=n: bench.handoffs(n))  # type: ignore[misc]
                sections.append(Section(f"Exclusive handoff between N={n} processes (floor B and peers)", rows))
        if "weighted" in parts:
            sections += bench.step("weighted throughput", bench.weighted)
        if "scaling" in parts:
            sections += bench.step("scaling and Redis cost", bench.scaling)
            if not args.smoke:
                sections += bench.step("Redis instructions under callgrind", bench.instructions)
        if "eviction" in parts:
            sections += bench.step("cooperative eviction", bench.eviction)
        sections += bench.step("Redis memory and keys left", bench.memory_and_keys)
    elapsed = time.monotonic() - started
    for sec in sections:
        if not sec.rows and sec.table is None:
            bench.errors.append(f"{sec.title}: no results")
        for row in sec.rows:
            if row.summary is None and not optional_row(row.name):
                bench.errors.append(f"{sec.title}: {row.name.strip()}: no samples")
    bench.results.skipped = bench.skipped
    parameters = [
        ("run", f"{'smoke' if args.smoke else 'full'}, {elapsed:.0f} s in all; parts: {', '.join(parts)}"),
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
        (
            "weighted",
            f"{plan.weighted_procs} processes, one {weighted.CAPACITY_GB} GB GPU, whole-GB sizes drawn uniformly "
            f"from {weighted.MIN_GB} to {weighted.MAX_GB} (seeded per process), hold times "
            f"{', '.join(f'{h:g}' for h in plan.weighted_holds)} ms, {plan.weighted_s:g} s each",
        ),
        (
            "scaling",
            f"waiting requests {', '.join(f'{w:,}' for w in plan.waiting)}; GPUs "
            f"{', '.join(str(g) for g in plan.gpu_counts)}; {plan.scale_samples} samples per measurement and "
            f"level in {plan.scale_rounds} interleaved rounds; memory over {plan.memory_count:,} leases and "
            f"{plan.memory_count:,} waiting requests",
        ),
        (
            "eviction",
            f"{plan.eviction_rounds} rounds per mode (after {eviction.WARMUP} not counted); one victim process "
            f"holds a low lease of the whole {eviction.WHOLE_GB:g} GB GPU, TTL {eviction.VICTIM_TTL_S:g} s, "
            "on_evict returns at once, resume=True; the bench process asks for the whole GPU at high priority",
        ),
        ("clock", "time.monotonic() (CLOCK_MONOTONIC: one clock for every process, Node's hrtime too)"),
        (
            "load average",
            f"{load_before} before the run, {load_average()} after it (1 min; other work on the machine "
            "shows here and widens every p99)",
        ),
    ]
    speed = machine_speed(bench.results)
    if speed is not None:
        parameters.append(("machine speed", speed))
    return Report(
        title="gpuboss performance",
        environment=environment,
        parameters=parameters,
        sections=sections,
        notes=NOTES + bench.notes + bench.cpu_notes + [why for why in sorted(set(bench.skipped.values()))],
        errors=bench.errors,
        floor_a=bench.floor_a,
        targets=build_targets(bench.results),
    )


def optional_row(name: str) -> bool:
    """Rows that may have no samples in a run that worked: peers (skipped, or never handing over) and the
    diagnostic split of woken handoffs."""
    return name.startswith(("redis-py", "python-redis-lock", "pottery")) or "already in BLPOP" in name


NOTES = [
    "Floor A is one round trip of the cheapest script call (an EVALSHA of `return 1`, however gpuboss's own "
    "scripts are called) from the same kind of client gpuboss uses (redis-py with hiredis, decoded replies), sent "
    "the way gpuboss sends its own script calls and its waiters' BLPOPs: packed by hiredis, on a connection the "
    "client keeps out of its pool, without redis-py's per-command layers (gpuboss.redis_io.direct_command). The "
    "row 'by redis-py's evalsha' is the same call through redis-py's own command path, what a plain redis-py "
    "program pays, for reference; the difference between the two is what those layers cost per command. Pages "
    "made up to commit 70a4cef took floors A and B through redis-py's own commands: their ratios are not "
    "comparable with these. Every latency row gives its p50 and p99 as a multiple of floor A "
    "('x A'; the asyncio rows too, against the sync floor A); 'vs' names a second reference where one applies. "
    "Without a waiter, acquire() and release() are one script call each, so acquire() + release() is compared "
    "with two round trips ('2A'); the 'bare scripts' rows are those same calls sent from a plain client, which "
    "splits the time between the scripts in Redis and the Python library around them; the 'minimal Lua lease' "
    "row is a reference for the target, not gpuboss: the least a correct Lua lease does (one GPU, TTL reclaim, "
    "fencing token, refused while anybody waits; no queue, events, policy or placement: bench/minimal.py), sent "
    "as floor A is. Floor A depends on the "
    "state of the machine more than anything measured here: on an idle VM its vCPUs sleep between round trips "
    "and a wake-up costs tens of microseconds (~0.1 ms at p50 then, ~0.02 ms on a busy one), so it is sampled "
    "next to what it is compared with: interleaved with the one-process rows, and again inside the scaling "
    "rounds, which those rows are compared with.",
    "The Python side (py-spy): a worker process runs the uncontended GPUBoss or AsyncGPUBoss cycle of the section "
    "above for a few seconds alone, then again while py-spy samples it without stopping it (bench/pyside.py), and "
    "reports its cycles, wall time and the CPU time of the thread that runs them. The time off the CPU (wall - "
    "CPU, of the run alone) is the wait for Redis: the scripts run and the request and reply travel; no client "
    "can save it (the SLOWLOG section has the scripts' Redis time; Redis works on the other CPU while the worker "
    "is still in the kernel sending or receiving, so the two overlap a little). The CPU time is split by py-spy's "
    "samples of that thread that were not waiting (not in redis-py's socket read, nor in the event loop's "
    "select), each filed by its innermost Python frame: gpuboss's own Python, redis-py and hiredis, json (the "
    "lease record), the asyncio event loop and the rest (the worker's loop, the standard library); a C function, "
    "a system call included, counts for the Python line that called it (the socket write is redis-py's or "
    "asyncio's). 'sampled waiting' is the share of all samples that were waiting, a cross-check of wall - CPU "
    "(py-spy itself takes CPU time on the same two CPUs, which the 'under py-spy' wall time shows; an in-process "
    "profiler would slow these short cycles far more).",
    "'A client costing nothing would be at' (targets): the floor plus the scripts' Redis time, over the floor: "
    "for the uncontended cycle, two floor-A round trips plus the mean Redis time of its two script calls (INFO "
    "commandstats); for a handoff from release() called, floor B from RPUSH called plus the p50 Redis time of a "
    "release that grants the queue's head (SLOWLOG, the scaling level with the fewest waiting requests). It is "
    "the ratio if everything outside Redis cost what the floor's own client costs; the rest of the measured "
    "ratio is the client library and, under contention, the processes' share of the two CPUs.",
    "Floor B is the push-based exclusive floor: a token taken by BLPOP and given back by RPUSH by N "
    "processes (sent the same direct way as floor A). 'from RPUSH returned' is the handoff as issue 9 defines "
    "it: from the RPUSH returning in the giver to the BLPOP returning in the next taker. Redis answers the giver and wakes the taker in the same "
    "event-loop turn, so it measures which of two runnable processes the kernel runs first, and is often "
    "near 0 or negative (no ratio is given against a floor below 0.01 ms, nor for a negative value). 'from RPUSH "
    "called' counts from the moment the giver sent its RPUSH and is always positive: one round trip plus the "
    "wake-up.",
    "A lease handoff is measured the same two ways: to acquire() returning in the next holder from release() "
    "returning ('B') or from release() being called ('B call') in the previous one. Only changes of holder "
    "count; n is how many there were. The indented rows take the handoffs whose waiter was woken by the "
    "grant that the release script pushed, split them at the moment the waiter's BLPOP returned, and pick out "
    "those whose waiter had sent its BLPOP before release() was called (already blocked in Redis).",
    "The diagnostic rows run the same GPUBoss workers with the heartbeat thread never woken (its watch() and "
    "hold() made no-ops; a 30 s lease needs no renewal within the run); set against the rows above them, "
    "they show what waking that thread on every grant costs: it competes for the GIL and a CPU while "
    "acquire() returns.",
    "'same holder' is the share of consecutive grants that went to the process that had just released: near "
    "0 when waiters are served in order, near 100% when the releaser takes it again. 'ahead of a waiter' counts "
    "only the retakes while another process was already waiting (it had called acquire() before the releaser "
    "called release(), and was served later): with zero hold time a same-holder grant is fair when the others "
    "were between their turns. A call's start is taken before the client sends it, so a waiter descheduled "
    "between the two can look waiting when Redis had not seen it yet: a few tenths of a percent are noise. "
    "'p99 wait' and 'longest wait' are taken over every acquire() of the run, from call to return: what "
    "unfairness costs a waiter (a lock that mostly hands itself back has a short p99 wait and a long tail).",
    "A p99 over fewer than 100 samples is close to the maximum; redis-py's Lock and pottery's Redlock hand "
    "over so rarely that their handoff rows have few samples.",
    "Weighted throughput: every process draws whole-GB sizes (1 to 8) from its own seeded sequence and takes, "
    "holds and gives back one lease at a time. grants/s counts the grants inside the window in which every "
    "process was running; wait is acquire called -> returned (its multiple of floor A in brackets); the 7-8 GB "
    "columns take the largest requests apart (starvation shows there). Utilisation is the VRAM the clients "
    "held (from acquire returning to release being called) integrated over the window, over capacity x window: "
    "with zero hold time it is ~0 by construction, and that phase measures throughput. It is grants/s x mean "
    "GB x mean held time / capacity: 'mean GB' is the mean size granted, 'mean held ms' the mean time from "
    "acquire returning to release being called (the hold asked for, plus the holder's wake-up from its sleep, "
    "later when other processes keep the CPUs busy, as a busy-retry loop does: the targets' row also gives "
    "the utilisation at the hold asked, grants/s x mean GB x hold / capacity, which that delay cannot raise). "
    "Redis CPU per grant is "
    "redis-server's user+system CPU over the phase (INFO cpu) divided by the grants: what the library costs "
    "the Redis it shares; scripts/grant counts script calls of every kind (FCALL, EVALSHA, EVAL: busy retry "
    "shows there). 'GPUBoss' runs with the default strict order (the targets use it); 'GPUBoss, overtake: 4' "
    "lets later requests that fit pass a blocked one at most 4 times (docs/scheduling.md, section 3): the "
    "trade of the large requests' wait for utilisation that the rule makes. The npm MultiSemaphore runs with its defaults (a failed try is retried after 10 ms); reslock with its defaults (a JSON state file "
    "under a file lock, polled every 0.25 s; no Redis).",
    "Scaling: each level is its own namespace, sampled in interleaved rounds. The p50 rows are the latency a "
    "client sees; their p99 over ~1,000 samples is sensitive to any other work on the 2 CPUs, so the Redis "
    "time of the scripts (SLOWLOG: each call's own duration in Redis) is the direct evidence of whether a script does work proportional to the queue or the "
    "number of GPUs. The durations are taken with slowlog-log-slower-than 5 us (every script call is slower, "
    "nearly none of its own commands is: logging those at threshold 0 makes each call ~10 us slower). 'its "
    "own commands' and 'their us' come from a separate pass at threshold 0 (Redis 7 logs a script's own "
    "commands too): how many commands a script call ran inside Redis and their summed durations; the rest of "
    "a call's time is Lua itself (JSON encoding and decoding, tables, the redis.call bridge). The script calls "
    "are sent as gpuboss sends them (FCALL of its library's functions where the server has functions, else "
    "EVALSHA: the header's 'scripts' line says which) and filed by operation (FCALL's function name, EVALSHA's "
    "SHA1). The usec_per_call column is INFO commandstats of gpuboss's script calls (FCALL and EVALSHA) over "
    "the GPUBoss acquire() + release() samples of that level, with SLOWLOG off. These timings move by 10-20% "
    "between runs on a shared VM; to compare two versions of the scripts, `make bench-ir` "
    "(bench/instructions.py) counts redis-server's instructions for the same calls under valgrind's callgrind, "
    "which repeats within 0.5%.",
    "Redis instructions: the same calls as the scaling bench's, counted by a private redis-server of the same "
    "binary run under valgrind's callgrind (bench/instructions.py; `make bench-ir` runs it alone): the instructions "
    "the server executes per cycle, reading the commands and writing the replies included. Unlike the timings they "
    "repeat within 0.5% from run to run whatever else the machine does, so they compare two versions of the "
    "scripts and show whether a script's work grows with the queue; they do not give microseconds (those depend "
    "on the CPU, its caches and its clock). 'x minimal' sets gpuboss's acquire + release against "
    "bench/minimal.py's, at the fewest waiting requests.",
    "Cooperative eviction: the victim process holds a preemptible low lease of the whole GPU; each round, after "
    "a random pause (0 to TTL/3) since the previous one, the bench process asks for the whole GPU at high "
    "priority and the acquire script asks the victim to checkpoint. 'request' is the moment just before the "
    "bench calls acquire(); 'on_evict starts' is stamped "
    "in the victim (after the notice arrived and the checkpoint_started script call returned); 'acquire() "
    "returns' includes the victim's hand-back (its on_evict returns at once here) and the grant pushed to "
    "the waiting requester. The high lease is released at once and the next round starts when the victim has "
    "been granted again ('victim resumed': its safe point returned). The pub/sub rows are the normal path; the "
    "heartbeat rows disable the victim's notice listener, so the request reaches it only in its next renew "
    "reply, on average TTL/6 later and at worst TTL/3 (0.2 s here; 10 s at the default 30 s TTL): that is the "
    "fallback for a holder that missed the message, and what eviction would cost without pub/sub.",
    "Memory is INFO memory used_memory before and after 1,000 more live leases, then 1,000 more waiting "
    "requests, in a namespace of their own (after 200 of each, so the small-collection encodings have "
    "already been converted); 'of which the namespace's fixed keys' is what those keys (an event log) grew by "
    "(MEMORY USAGE), and stays after the leases are gone, up to the log's cap. Keys left: every key in the "
    "private Redis at the end of the run, sorted into each gpuboss namespace's fixed keys (gpuboss.keys."
    "FIXED_SUFFIXES) and anything else.",
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
