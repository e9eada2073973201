"""The targets of issue 9, checked against what one run measured: each with its measured value, what it
requires, and whether it was met or missed by how much."""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.handoff import Contention
from bench.instructions import Counts
from bench.report import MIN_FLOOR_MS, Table, ms
from bench.scaling import FIT_ACQUIRE, HANDOFF_RELEASE, KeysLeft, Level, us_summary
from bench.stats import Summary, summarize
from bench.weighted import Phase, Weighted

HANDOFF_LIMIT = 2.0  # x floor B
UNCONTENDED_LIMIT = 2.5  # x two EVALSHA round trips
LARGE_SHARE_LIMIT = 0.5  # x the MultiSemaphore's p99 wait of large requests
SCALING_LIMIT = 2.0
REDIS_US_LIMIT = 50.0
FAIRNESS_LIMIT = 0.01  # share of grants retaken ahead of a waiter that still counts as "near 0"
TARGET_HOLD_MS = 1.0


@dataclass
class Results:
    """What the targets need, filled in by the parts of the run that worked."""

    floor_a: Summary | None = None
    floor_a_async: Summary | None = None
    sync_cycle: Summary | None = None
    async_cycle: Summary | None = None
    #: the minimal Lua lease's acquire + release (bench/minimal.py), sent as floor A is
    minimal_cycle: Summary | None = None
    floor_b: dict[int, Contention] = field(default_factory=dict)
    gpuboss: dict[int, Contention] = field(default_factory=dict)
    peers: dict[int, list[Contention]] = field(default_factory=dict)
    weighted: list[Weighted] = field(default_factory=list)
    levels: list[Level] = field(default_factory=list)
    keys: KeysLeft | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # peer -> why
    #: Redis time (INFO commandstats) per uncontended acquire + release, us: "sync", "async"
    cycle_redis_us: dict[str, float] = field(default_factory=dict)
    #: redis-server instructions per cycle (bench/instructions.py), by requests waiting
    instructions: dict[int, Counts] = field(default_factory=dict)


def release_redis_us(r: Results) -> float | None:
    """The p50 Redis time (SLOWLOG) of a release that grants the queue's head, us, at the scaling level with
    the fewest waiting requests (None when the scaling part did not run)."""
    levels = sorted((lv for lv in r.levels if lv.waiting), key=lambda lv: lv.waiting)
    for level in levels:
        found = us_summary(level.redis_us.get(HANDOFF_RELEASE, []))
        if found is not None:
            return found.p50
    return None


def no_client_beats(floor_ms: float, redis_us: float | None, what: str) -> str:
    """The text of the ratio that a client costing nothing would reach: the floor plus the scripts' Redis time."""
    if redis_us is None or floor_ms < MIN_FLOOR_MS:
        return ""
    bound = (floor_ms + redis_us / 1000) / floor_ms
    return f"; {what} {ms(redis_us / 1000)} ms: a client costing nothing would be at {bound:.1f}x"


def verdict_at_most(value: float, limit: float) -> str:
    return "met" if value <= limit else f"missed by {value / limit - 1:.0%}"


def verdict_at_least(value: float, limit: float) -> str:
    return "met" if value >= limit else f"missed by {1 - value / limit:.0%}"


def ratio(value: float, base: float) -> float | None:
    return value / base if base >= MIN_FLOOR_MS else None


def build_targets(r: Results) -> Table:
    t = Table(["target", "measured", "required", "verdict"])
    add = t.rows.append

    # -- handoff against floor B, and against the peers
    for n, g in sorted(r.gpuboss.items()):
        b = r.floor_b.get(n)
        if b is None:
            continue
        for what, mine, floor, bounded in (
            ("from release() called", g.from_call, b.from_call, True),
            ("from release() returned", g.handoff, b.handoff, False),
        ):
            if mine is None or floor is None:
                add([f"Handoff N={n} {what}", "no samples", f"<= {HANDOFF_LIMIT:g}x floor B", "not measured"])
                continue
            for stat in ("p50", "p99"):
                value, base = getattr(mine, stat), getattr(floor, stat)
                x = ratio(value, base)
                measured = f"{ms(value)} ms vs {ms(base)} ms"
                if x is None:
                    add([f"Handoff {stat}, N={n}, {what}", measured, f"<= {HANDOFF_LIMIT:g}x floor B", "n/a: floor ~0"])
                else:
                    if stat == "p50" and bounded:
                        measured += f" = {x:.1f}x" + no_client_beats(
                            base, release_redis_us(r), "the release script's Redis time (p50)"
                        )
                    else:
                        measured += f" = {x:.1f}x"
                    add(
                        [
                            f"Handoff {stat}, N={n}, {what}",
                            measured,
                            f"<= {HANDOFF_LIMIT:g}x floor B",
                            verdict_at_most(x, HANDOFF_LIMIT),
                        ]
                    )
        others = [p for p in r.peers.get(n, []) if p.handoff is not None]
        if g.handoff is not None and others:
            best = min(others, key=lambda p: p.handoff.p99 if p.handoff else 0.0)
            assert best.handoff is not None
            add(
                [
                    f"Handoff p99 ahead of every peer, N={n}",
                    f"{ms(g.handoff.p99)} ms; best peer {best.label.rsplit(',', 1)[0]} {ms(best.handoff.p99)} ms "
                    f"(n={best.handoff.n})",
                    "< every peer's p99",
                    "met"
                    if g.handoff.p99 < best.handoff.p99
                    else f"missed by {g.handoff.p99 / best.handoff.p99 - 1:.0%}",
                ]
            )
        if g.retakes is not None:
            add(
                [
                    f"Fairness, N={n}: grants retaken by the releaser ahead of a waiter",
                    f"{g.retakes:.2%} (same holder: {g.same_holder:.1%})"
                    if g.same_holder is not None
                    else f"{g.retakes:.2%}",
                    f"~0 (<= {FAIRNESS_LIMIT:.0%})",
                    "met" if g.retakes <= FAIRNESS_LIMIT else f"missed ({g.retakes:.2%})",
                ]
            )

    # -- uncontended
    for label, cycle, base, kind in (
        ("GPUBoss", r.sync_cycle, r.floor_a, "sync"),
        ("AsyncGPUBoss (vs the asyncio floor)", r.async_cycle, r.floor_a_async, "async"),
    ):
        if cycle is None or base is None:
            continue
        for stat in ("p50", "p99"):
            value, two = getattr(cycle, stat), 2 * getattr(base, stat)
            bound = ""
            if stat == "p50":
                bound = no_client_beats(two, r.cycle_redis_us.get(kind), "the scripts' Redis time (mean)")
            if kind == "sync" and r.minimal_cycle is not None:
                least = getattr(r.minimal_cycle, stat)
                bound += f"; a minimal Lua lease (bench/minimal.py), sent as floor A: {least / two:.2f}x"
            add(
                [
                    f"Uncontended {label} acquire()+release() {stat}",
                    f"{ms(value)} ms vs 2 x {ms(two / 2)} ms = {value / two:.2f}x{bound}",
                    f"<= {UNCONTENDED_LIMIT:g}x two EVALSHA",
                    verdict_at_most(value / two, UNCONTENDED_LIMIT),
                ]
            )

    # -- weighted
    def phase(kind: str) -> tuple[Weighted, Phase] | None:
        for w in r.weighted:
            if w.kind == kind:
                for ph in w.phases:
                    if ph.hold_ms == TARGET_HOLD_MS:
                        return w, ph
        return None

    mine_w, sem, counter = phase("gpuboss"), phase("semaphore"), phase("counter")
    if mine_w is not None and mine_w[1].wait_large is not None:
        large = mine_w[1].wait_large
        if sem is not None and sem[1].wait_large is not None:
            theirs = sem[1].wait_large.p99
            add(
                [
                    f"Weighted, {TARGET_HOLD_MS:g} ms hold: p99 wait of 7-8 GB requests",
                    f"{ms(large.p99)} ms vs MultiSemaphore {ms(theirs)} ms = {large.p99 / theirs:.2f}x",
                    f"<= {LARGE_SHARE_LIMIT:g}x MultiSemaphore",
                    verdict_at_most(large.p99 / theirs, LARGE_SHARE_LIMIT),
                ]
            )
        else:
            why = r.skipped.get("semaphore", "MultiSemaphore not measured")
            add([f"Weighted, {TARGET_HOLD_MS:g} ms hold: p99 wait of 7-8 GB requests", ms(large.p99) + " ms", "", why])
    if mine_w is not None and counter is not None and mine_w[1].utilisation is not None and counter[1].utilisation:
        u, c = mine_w[1].utilisation, counter[1].utilisation
        measured = f"{u:.1%} vs EVALSHA counter {c:.1%}"
        ua, ca = mine_w[1].asked_utilisation, counter[1].asked_utilisation
        if ua is not None and ca is not None:
            measured += (
                f"; at the hold asked (grants/s x mean GB x {TARGET_HOLD_MS:g} ms / capacity: a late wake-up of a"
                f" holder does not count) {ua:.1%} vs {ca:.1%}"
            )
        add(
            [
                f"Weighted, {TARGET_HOLD_MS:g} ms hold: utilisation",
                measured,
                ">= the counter's",
                verdict_at_least(u, c),
            ]
        )

    # -- scaling: the largest level of each kind against the smallest
    by_queue = sorted((lv for lv in r.levels if lv.waiting), key=lambda lv: lv.waiting)
    by_gpus = sorted((lv for lv in r.levels if not lv.waiting), key=lambda lv: len(lv.gpus))
    for group in (by_queue, by_gpus):
        if len(group) < 2:
            continue
        a, b = group[0], group[-1]
        low, high = a.name, b.name
        for what, attr in (
            (f"acquire {a.s.command}, fits at once", "fit_acquire"),
            ("GPUBoss.acquire(), fits at once", "boss_acquire"),
            ("handoff to the head", "handoff"),
        ):
            sa, sb = summarize(getattr(a, attr)), summarize(getattr(b, attr))
            if sa is None or sb is None:
                continue
            for stat in ("p50", "p99"):
                x = getattr(sb, stat) / getattr(sa, stat)
                add(
                    [
                        f"Scaling {stat}: {what}, {high} vs {low}",
                        f"{ms(getattr(sb, stat))} vs {ms(getattr(sa, stat))} ms = {x:.2f}x",
                        f"<= {SCALING_LIMIT:g}x",
                        verdict_at_most(x, SCALING_LIMIT),
                    ]
                )

        for label in (FIT_ACQUIRE, HANDOFF_RELEASE):
            ua, ub = us_summary(a.redis_us.get(label, [])), us_summary(b.redis_us.get(label, []))
            if ua is None or ub is None:
                continue
            x = ub.mean / ua.mean
            add(
                [
                    f"Scaling, Redis time (SLOWLOG mean): {label}, {high} vs {low}",
                    f"{ub.mean:.1f} vs {ua.mean:.1f} us = {x:.2f}x",
                    f"<= {SCALING_LIMIT:g}x",
                    verdict_at_most(x, SCALING_LIMIT),
                ]
            )

    # -- the same without the noise: redis-server's instructions, counted under callgrind
    if len(r.instructions) >= 2:
        low, high = min(r.instructions), max(r.instructions)
        a, b = r.instructions[low], r.instructions[high]
        for label, attr in (("acquire granted at once + its release", "fit"), ("handoff cycle", "handoff")):
            x = getattr(b, attr) / getattr(a, attr)
            add(
                [
                    f"Scaling, Redis instructions (callgrind): {label}, {high:,} waiting vs {low:,} waiting",
                    f"{getattr(b, attr) / 1000:.1f} k vs {getattr(a, attr) / 1000:.1f} k = {x:.2f}x",
                    f"<= {SCALING_LIMIT:g}x",
                    verdict_at_most(x, SCALING_LIMIT),
                ]
            )

    # -- Redis CPU per grant at the largest queue
    big = max((lv for lv in r.levels if lv.waiting), key=lambda lv: lv.waiting, default=None)
    if big is not None:
        for label in (FIT_ACQUIRE, HANDOFF_RELEASE):
            us = us_summary(big.redis_us.get(label, []))
            if us is None:
                continue
            add(
                [
                    f"Redis time per grant, {big.name}: {label}",
                    f"mean {us.mean:.1f} us (p50 {us.p50:.0f}, p99 {us.p99:.0f})",
                    f"< {REDIS_US_LIMIT:g} us",
                    "met" if us.mean < REDIS_US_LIMIT else f"missed by {us.mean / REDIS_US_LIMIT - 1:.0%}",
                ]
            )

    # -- keys
    if r.keys is not None:
        other = ", ".join(f"{k} x{v}" for k, v in sorted(r.keys.other.items())) or "none"
        add(
            [
                "Keys left beyond the fixed ones",
                f"{other} (in {r.keys.namespaces} namespaces; fixed: {', '.join(sorted(r.keys.fixed))})",
                "none",
                "met" if not r.keys.other else "missed",
            ]
        )
    return t


def machine_speed(r: Results) -> str | None:
    """How fast this machine ran Redis in this run: the minimal Lua lease's Redis time (commandstats) against its
    instructions (callgrind, at the fewest waiting requests). On this kind of VM the same scripts have taken up
    to twice as long from one hour to the next: every target in microseconds moves with it, the instruction
    counts do not. None when the run measured neither."""
    us = r.cycle_redis_us.get("minimal")
    if us is None or us <= 0:
        return None
    said = f"Redis ran bench/minimal.py's acquire + release in {us:.1f} us"
    if not r.instructions:
        return said + " (instructions not counted in this run: a full run with valgrind counts them)"
    ir = r.instructions[min(r.instructions)].minimal
    return (
        f"{said}, {ir / 1000:.0f} k instructions (callgrind): {ir / us / 1000:.1f} k instructions per us; targets "
        "in us move with this figure (a slower or busier machine lowers it), instruction counts do not"
    )
