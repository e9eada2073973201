"""Scaling and Redis cost: grant latency and Redis CPU with many waiting requests or many GPUs in a namespace,
Redis memory per lease and per waiting request, and the keys left behind.

Levels (one namespace each, all alive at once, sampled in interleaved rounds):

* ``W waiting``: two 24 GB GPUs; ``gpu1`` is held whole by a parked lease, and W requests of 24 GB pinned
  to ``gpu1``, priority low, mode 'wait', TTL 1 h, are queued behind it by the acquire script itself
  (:meth:`gpuboss.core.Core.acquire_call` from a raw client): they stay queued for the whole run.
* ``G GPUs``: G GPUs of 24 GB registered, nothing queued.

In each level, one process with plain clients measures:

* *fits at once*: an acquire script call of 24 GB, normal priority, unpinned (granted at once: the queue
  holds only low requests), then its release call; and the same through ``GPUBoss.acquire()/release()``;
* *handoff to the head*: a holder on ``gpu0``; a waiter asks for ``gpu0`` (queued at the head, ahead of the
  low requests); from the holder's release call being sent to the waiter's BLPOP of its wake list
  returning the grant the release script pushed (sequential, one process: the script cost plus two round
  trips, no scheduling between processes).

The script calls are sent as gpuboss sends them (:class:`bench.scriptcalls.Scripts`): ``FCALL`` of the
library's functions on Redis 7 or later, else ``EVALSHA``. Redis time per script call comes from SLOWLOG
(every command slower than a threshold logged with its own duration, turned on only for these samples and
restored after), filed by operation (FCALL's function name, or EVALSHA's SHA1) and by what the call did;
``INFO commandstats`` gives the usec_per_call of gpuboss's script calls (FCALL and EVALSHA) over the
``GPUBoss`` samples.
"""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
from gpuboss import GPUBoss
from gpuboss.config import config_from_arguments
from gpuboss.core import Core, ReleaseReply, Reply

from bench.env import connect
from bench.scriptcalls import Scripts, totals
from bench.stats import Summary, summarize

GPU_GB = 24
PARK_TTL_S = 3600.0
#: What a script call did, by the label it is filed under.
FIT_ACQUIRE = "acquire, granted at once"
FIT_RELEASE = "release, nobody to grant"
QUEUE_ACQUIRE = "acquire, queued at the head"
HANDOFF_RELEASE = "release, grants the head"
WAITER_RELEASE = "release of the granted waiter"
LABELS = (FIT_ACQUIRE, FIT_RELEASE, QUEUE_ACQUIRE, HANDOFF_RELEASE)
#: SLOWLOG entries one fit sample and one handoff sample leave at most (the scripts' inner commands included).
SLOWLOG_PER_SAMPLE = 250
#: SLOWLOG threshold while timing the scripts: every script call is slower than this, nearly none of their own
#: commands is, so logging those does not slow the scripts down (at 0 it adds ~10 us to each call).
TIMING_THRESHOLD_US = 5
#: Commands the bench itself sends (a SLOWLOG entry of one of these ends the run of a script's own commands).
TOP_LEVEL = ("FCALL", "EVALSHA", "FUNCTION", "SCRIPT", "BLPOP", "CONFIG", "SLOWLOG")


def gpu(i: int, width: int = 1) -> dict[str, Any]:
    return {"id": f"gpu{i:0{width}d}", "name": "bench-scale", "vram_gb": GPU_GB, "index": i}


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Level:
    """One namespace: ``waiting`` parked requests and ``gpus`` GPUs."""

    name: str
    waiting: int
    gpus: list[dict[str, Any]]
    url: str
    pin: str  # the GPU the handoffs use
    namespace: str = field(default_factory=lambda: f"benchs{uuid.uuid4().hex[:10]}")
    fit_acquire: list[float] = field(default_factory=list)
    fit_release: list[float] = field(default_factory=list)
    boss_cycle: list[float] = field(default_factory=list)
    boss_acquire: list[float] = field(default_factory=list)
    handoff: list[float] = field(default_factory=list)
    redis_us: dict[str, list[int]] = field(default_factory=dict)
    #: per label: the script's own commands (count, microseconds) per call, from the SLOWLOG entries between calls
    inner: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    #: gpuboss's script calls (FCALL, EVALSHA) in the GPUBoss samples, and their microseconds (commandstats)
    script_calls: int = 0
    script_usec: int = 0
    parked: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.core = Core(config_from_arguments(namespace=self.namespace, gpus=self.gpus, service="bench-scale"))
        self.client = connect(self.url)
        self.s = Scripts(self.client)
        register = self.core.register_call()
        assert register is not None
        self.core.check_register_reply(self.s.call(register))
        self.fit = self.core.make_request(GPU_GB, priority="normal", timeout=0, ttl=30)
        self.hold = self.core.make_request(GPU_GB, priority="normal", timeout=0, ttl=30, device=self.pin)
        self.wait = self.core.make_request(GPU_GB, priority="normal", timeout=None, ttl=30, device=self.pin)
        self.labels: dict[str, str] = {}  # request id -> what its calls did (for SLOWLOG)
        if self.waiting:
            self.park()
        self.boss = GPUBoss(self.url, namespace=self.namespace, gpus=self.gpus, service="bench-scale-boss")
        for _ in range(20):
            self.boss.release(self.boss.acquire(GPU_GB, timeout=10))

    def park(self) -> None:
        """Fill gpu1 with a lease and queue ``waiting`` low requests pinned to it."""
        park = self.gpus[1]["id"]
        full = self.core.make_request(GPU_GB, priority="low", timeout=0, ttl=PARK_TTL_S, device=park)
        rid = new_id()
        reply = self.s.call(self.core.acquire_call(rid, full, park, "bench-park"))
        if int(reply[0]) != Reply.GRANTED:
            raise RuntimeError(f"{self.name}: could not fill {park}: {reply!r}")
        self.parked.append(rid)
        req = self.core.make_request(GPU_GB, priority="low", timeout=None, ttl=PARK_TTL_S, device=park)
        ids = [new_id() for _ in range(self.waiting)]
        replies = self.s.pipelined([self.core.acquire_call(i, req, park, "bench-park") for i in ids])
        queued = sum(1 for r in replies if int(r[0]) == Reply.QUEUED)
        if queued != self.waiting:
            raise RuntimeError(f"{self.name}: queued {queued} of {self.waiting} requests")
        self.parked += ids

    def sample_fit(self, n: int) -> None:
        core, s, mono = self.core, self.s, time.monotonic
        calls = []
        for _ in range(n):
            rid = new_id()
            self.labels[rid] = "fit"
            calls.append((core.acquire_call(rid, self.fit, "", "bench-scale"), core.release_call(rid)))
        for acquire, release in calls:
            t0 = mono()
            granted = s.call(acquire)
            t1 = mono()
            released = s.call(release)
            t2 = mono()
            if int(granted[0]) != Reply.GRANTED or int(released[0]) != ReleaseReply.RELEASED:
                raise RuntimeError(f"{self.name}: unexpected replies {granted[0]!r}, {released[0]!r}")
            self.fit_acquire.append(t1 - t0)
            self.fit_release.append(t2 - t1)

    def sample_boss(self, n: int) -> None:
        boss, mono = self.boss, time.monotonic
        for _ in range(n):
            t0 = mono()
            lease = boss.acquire(GPU_GB, timeout=10)
            t1 = mono()
            boss.release(lease)
            self.boss_acquire.append(t1 - t0)
            self.boss_cycle.append(mono() - t0)

    def sample_handoff(self, n: int) -> None:
        core, s, client, mono = self.core, self.s, self.client, time.monotonic
        for _ in range(n):
            holder, waiter = new_id(), new_id()
            self.labels[holder], self.labels[waiter] = "holder", "waiter"
            got = s.call(core.acquire_call(holder, self.hold, self.pin, "bench-scale"))
            queued = s.call(core.acquire_call(waiter, self.wait, self.pin, "bench-scale"))
            if int(got[0]) != Reply.GRANTED or int(queued[0]) != Reply.QUEUED or int(queued[1]) != 0:
                raise RuntimeError(f"{self.name}: handoff setup got {got[0]!r}, {queued[:2]!r}")
            release = core.release_call(holder)
            wake = core.keys.wake(waiter)
            t0 = mono()
            s.call(release)
            popped = client.blpop([wake], timeout=5)
            t1 = mono()
            if popped is None:
                raise RuntimeError(f"{self.name}: the head was not granted by the release")
            self.handoff.append(t1 - t0)
            s.call(core.release_call(waiter))

    def reset_samples(self) -> None:
        for samples in (self.fit_acquire, self.fit_release, self.handoff):
            samples.clear()
        self.labels.clear()

    def file_slowlog(self, entries: list[dict[str, Any]], timing: bool) -> None:
        """File the entries of this namespace's script calls (FCALL <function>, or EVALSHA <sha>) by what the
        call did: their durations (``timing``), or the script's own commands, which Redis 7 logs just before
        the script's entry."""
        inner: list[int] = []
        for e in sorted(entries, key=lambda e: int(e["id"])):
            raw = e.get("command", b"")
            words = (raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)).split()
            if not words:
                continue
            name = words[0].upper()
            if name not in TOP_LEVEL:
                inner.append(int(e["duration"]))
                continue
            mine, inner = inner, []
            if len(words) < 3:
                continue
            script = self.s.name_of(name, words[1])
            if script is None or not words[2].isdigit():
                continue
            # The request id is one of ARGV (after the KEYS); found by value, whatever its position.
            rid = next((w for w in words[3 + int(words[2]) :] if w in self.labels), "")
            role = self.labels.get(rid)
            label = {
                ("acquire", "fit"): FIT_ACQUIRE,
                ("release", "fit"): FIT_RELEASE,
                ("acquire", "waiter"): QUEUE_ACQUIRE,
                ("release", "holder"): HANDOFF_RELEASE,
                ("release", "waiter"): WAITER_RELEASE,
            }.get((script, role or ""))
            if label is None:
                continue
            if timing:
                self.redis_us.setdefault(label, []).append(int(e["duration"]))
            else:
                self.inner.setdefault(label, []).append((len(mine), sum(mine)))

    def close(self) -> None:
        """Release every parked lease and request; stop the boss."""
        self.boss.close()
        if self.parked:
            self.s.pipelined([self.core.release_call(i) for i in self.parked])
            self.parked.clear()
        self.client.close()


def us_summary(values: list[int]) -> Summary | None:
    """A summary of microsecond values, in microseconds (summarize() takes seconds and gives ms)."""
    return summarize([v / 1000 for v in values])


@contextlib.contextmanager
def slowlog_everything(control: redis.Redis, max_len: int, threshold_us: int = 0) -> Iterator[None]:
    """Log every command slower than ``threshold_us`` in SLOWLOG (``max_len`` entries); restore the settings
    after. At 0 a script's own commands are logged too, which makes the script itself ~25% slower."""
    old = control.config_get("slowlog-*")
    control.config_set("slowlog-max-len", max_len)
    control.config_set("slowlog-log-slower-than", threshold_us)
    control.slowlog_reset()
    try:
        yield
    finally:
        control.config_set("slowlog-log-slower-than", old.get("slowlog-log-slower-than", "10000"))
        control.config_set("slowlog-max-len", old.get("slowlog-max-len", "128"))
        control.slowlog_reset()


@dataclass(frozen=True)
class ScalePlan:
    waiting: tuple[int, ...]
    gpus: tuple[int, ...]
    samples: int  # per measurement and level
    rounds: int


def run_scaling(url: str, plan: ScalePlan, progress: Callable[[str], None]) -> tuple[list[Level], list[float]]:
    """Build every level, sample them in interleaved rounds, clean up; the levels with their samples, and
    floor A (one EVALSHA ``return 1`` round trip: the floor stays a trivial EVALSHA) sampled in the same rounds, in seconds."""
    from bench.floor import SyncFloor

    control = connect(url)
    levels: list[Level] = []
    floor = SyncFloor(url)
    try:
        for w in plan.waiting:
            progress(f"queueing {w:,} waiting requests")
            levels.append(Level(f"{w:,} waiting", w, [gpu(0), gpu(1)], url, pin="gpu0"))
        for g in plan.gpus:
            width = len(str(g - 1))
            progress(f"registering {g} GPUs")
            gpus = [gpu(i, width) for i in range(g)]
            levels.append(Level(f"{g} GPU{'s' if g > 1 else ''}", 0, gpus, url, pin=gpus[0]["id"]))
        chunk = max(1, math.ceil(plan.samples / plan.rounds))
        # Redis 7 logs a script's own commands too: room for every entry of one level's chunk.
        max_len = SLOWLOG_PER_SAMPLE * chunk + 1000
        for level in levels:  # first, what each script does inside Redis: every command logged
            with slowlog_everything(control, max_len, threshold_us=0):
                level.sample_fit(chunk)
                level.sample_handoff(chunk)
                level.file_slowlog(control.slowlog_get(max_len), timing=False)
            level.reset_samples()
        for _ in range(plan.rounds):
            floor.sample(chunk)
            for level in levels:
                with slowlog_everything(control, max_len, threshold_us=TIMING_THRESHOLD_US):
                    level.sample_fit(chunk)
                    level.sample_handoff(chunk)
                    level.file_slowlog(control.slowlog_get(max_len), timing=True)
                calls, usec = totals(control)
                level.sample_boss(chunk)  # SLOWLOG off: commandstats gives the scripts' plain cost
                after_calls, after_usec = totals(control)
                level.script_calls += after_calls - calls
                level.script_usec += after_usec - usec
    finally:
        for level in levels:
            level.close()
        floor.close()
        control.close()
    return levels, floor.samples


@dataclass(frozen=True)
class Memory:
    per_lease: float  # bytes of used_memory per live lease
    per_request: float  # bytes per waiting request
    count: int
    lease_in_fixed: float  # of per_lease: what the fixed keys (an event log) grew by, per lease
    request_in_fixed: float


def used_memory(control: redis.Redis) -> int:
    return int(control.info("memory")["used_memory"])


def measure_memory(url: str, count: int, warm: int = 200) -> Memory:
    """INFO memory used_memory before and after ``count`` more live leases, then ``count`` more waiting
    requests (after ``warm`` of each, so the small-collection encodings have already turned into the large
    ones), in a namespace of its own; everything is released at the end."""
    namespace = f"benchm{uuid.uuid4().hex[:10]}"
    room = math.ceil((count + warm) * 1.1)
    gpus = [
        {"id": "big", "name": "bench-memory", "vram_gb": room, "index": 0},
        {"id": "full", "name": "bench-memory", "vram_gb": 1, "index": 1},
    ]
    core = Core(config_from_arguments(namespace=namespace, gpus=gpus, service="bench-memory"))
    client = connect(url)
    s = Scripts(client)
    ids: list[str] = []
    try:
        register = core.register_call()
        assert register is not None
        core.check_register_reply(s.call(register))
        lease = core.make_request(1, priority="normal", timeout=0, ttl=PARK_TTL_S, device="big")
        blocker = core.make_request(1, priority="low", timeout=0, ttl=PARK_TTL_S, device="full")
        waiting = core.make_request(1, priority="low", timeout=None, ttl=PARK_TTL_S, device="full")

        def add(req: Any, pin: str, n: int, expect: int) -> None:
            new = [new_id() for _ in range(n)]
            ids.extend(new)
            replies = s.pipelined([core.acquire_call(i, req, pin, "bench-memory") for i in new])
            if any(int(r[0]) != expect for r in replies):
                raise RuntimeError(f"memory: expected reply {expect} for every call, got {replies[0]!r}")

        def fixed_usage() -> int:
            return sum(int(client.memory_usage(k, samples=0) or 0) for k in core.keys.fixed())

        add(blocker, "full", 1, Reply.GRANTED)
        add(lease, "big", warm, Reply.GRANTED)
        before, fixed_before = used_memory(client), fixed_usage()
        add(lease, "big", count, Reply.GRANTED)
        per_lease = (used_memory(client) - before) / count
        lease_in_fixed = (fixed_usage() - fixed_before) / count
        add(waiting, "full", warm, Reply.QUEUED)
        before, fixed_before = used_memory(client), fixed_usage()
        add(waiting, "full", count, Reply.QUEUED)
        per_request = (used_memory(client) - before) / count
        request_in_fixed = (fixed_usage() - fixed_before) / count
    finally:
        s.pipelined([core.release_call(i) for i in ids])
        client.close()
    return Memory(per_lease, per_request, count, lease_in_fixed, request_in_fixed)


@dataclass
class KeysLeft:
    namespaces: int = 0
    fixed: set[str] = field(default_factory=set)  # suffixes of fixed keys found
    other: dict[str, int] = field(default_factory=dict)  # suffix (ids folded to <id>) -> count, gpuboss keys
    foreign: dict[str, int] = field(default_factory=dict)  # keys of no gpuboss namespace, by pattern


def fold(suffix: str) -> str:
    """A key suffix with request ids folded (``wake:3f2a...`` -> ``wake:<id>``)."""
    head, _, tail = suffix.partition(":")
    return f"{head}:<id>" if tail else head


def keys_left(url: str) -> KeysLeft:
    """Every key left in the private Redis, sorted into gpuboss namespaces' fixed keys and the rest."""
    from gpuboss.keys import FIXED_SUFFIXES

    client = connect(url)
    try:
        keys = list(client.scan_iter(count=1000))
    finally:
        client.close()
    namespaces = {k.rsplit(":", 1)[0] for k in keys if k.endswith(":gpus")}
    found = KeysLeft(namespaces=len(namespaces))
    for key in keys:
        ns = next((n for n in namespaces if key.startswith(n + ":")), None)
        if ns is None:
            pattern = ":".join(p if len(p) < 16 else "<id>" for p in key.split(":"))
            found.foreign[pattern] = found.foreign.get(pattern, 0) + 1
            continue
        suffix = key[len(ns) + 1 :]
        if suffix in FIXED_SUFFIXES:
            found.fixed.add(suffix)
        else:
            name = fold(suffix)
            found.other[name] = found.other.get(name, 0) + 1
    return found
