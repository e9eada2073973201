"""``gpuboss demo``: three services in separate processes share one simulated 24 GB GPU.

* ``chat`` (priority high): latency-sensitive, small leases, :class:`~gpuboss.AsyncGPUBoss` in asyncio tasks;
* ``api`` (priority normal): mid-sized leases, :class:`~gpuboss.GPUBoss` from a few threads;
* ``batch`` (priority low): big leases held longer, one step of work (a checkpoint) per lease.

Each request first tries ``timeout=0`` (granted at once, or nothing written), then queues with the rest of
its timeout, so the timeline can say who had to wait. Workers send their events over a multiprocessing
queue; this (parent) process prints them as a live timeline, samples ``HGETALL <ns>:used`` every few
milliseconds, and at the end checks what must hold:

* at every sample, VRAM in use <= capacity, and it equals the sum of the lease records;
* replaying every lease interval (Redis time) never puts more on the GPU than its capacity;
* no grant overtook a waiting request of the same or a higher priority (the queue order);
* fencing tokens grow with grant time; every request was granted or timed out; workers exited cleanly;
* at the end nothing is leased or queued; then the namespace's keys are deleted.

And one process crashes: ``embed`` takes a 4 GB lease a third of the way in, and this process kills it with
SIGKILL (by its PID) while it holds the lease, as the OOM killer would. Its VRAM must come back before the
lease's TTL runs out: the next request on this machine that finds no room sees the process gone and revokes
the lease (``revoked``, reason ``holder process gone``); if none did by the end, the parent's own collect
(``gpuboss gc``) must. (Not where a process has no identity that gpuboss can read, off Linux: only the TTL
would free it there, procs.py.)

The run passes (exit 0) only if all of that held.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import queue
import random
import secrets
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import click

from gpuboss.fmt import gb, ms, percentile, table

GPU: dict[str, Any] = {"id": "gpu0", "name": "simulated 24 GB GPU", "vram_gb": 24, "index": 0}
LEASE_TTL_S = 10.0
SAMPLE_EVERY_S = 0.005
STATUS_EVERY_S = 2.0
PRIORITY_ORDER = ("high", "normal", "low")
RANKS = {"low": 0, "normal": 1, "high": 2}


@dataclass(frozen=True)
class Service:
    name: str
    priority: str
    api: str  # "async" or "threads"
    clients: int
    sizes_gb: tuple[float, ...]
    hold_s: tuple[float, float]
    think_s: tuple[float, float]
    timeout_s: float
    about: str


#: The process that is killed while it holds a lease: its name, priority and lease size, and when it asks (the
#: part of the run gone by).
CRASH = Service("embed", "high", "threads", 1, (4,), (0, 0), (0, 0), 0, "killed with SIGKILL while it holds a lease")
CRASH_AT = 1 / 3

SERVICES: tuple[Service, ...] = (
    Service("chat", "high", "async", 3, (2, 3, 4), (0.1, 0.4), (0.2, 0.8), 1.5, "latency-sensitive, AsyncGPUBoss"),
    Service("api", "normal", "threads", 3, (2, 4, 6), (0.2, 0.6), (0.2, 0.8), 3.0, "GPUBoss from threads"),
    Service("batch", "low", "threads", 3, (8, 10, 12), (1.0, 2.0), (0.05, 0.2), 2.0, "big steps, checkpoints"),
)


# ---------------------------------------------------------------- the worker processes


class _Emitter:
    """Sends a service's events to the parent: ``send`` is a shared queue's ``put``, or for the process that is
    killed a pipe's ``send`` of its own (a process killed while it holds the lock of a queue shared with others
    would stop their messages for good)."""

    def __init__(self, send: Callable[[dict[str, Any]], Any], service: Service) -> None:
        self._send = send
        self._service = service

    def __call__(self, kind: str, **fields: Any) -> None:
        self._send(
            {
                "t": time.time(),
                "kind": kind,
                "service": self._service.name,
                "priority": self._service.priority,
                **fields,
            }
        )


def _redis_ms(t: tuple[int, int] | list[int]) -> int:
    """Redis ``TIME`` as the scripts count it: whole milliseconds."""
    return int(t[0]) * 1000 + int(t[1]) // 1000


def _worker(
    service: Service,
    url: str,
    namespace: str,
    events: Any,
    go: Any,
    start: Any,
    duration: float,
    seed: int,
    debug: bool,
) -> None:
    """One service: a process of its own (spawned), ``service.clients`` concurrent clients."""
    if debug:
        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    emit = _Emitter(events.put, service)
    logging.getLogger("gpuboss").addHandler(_Timeline(emit))
    try:
        if service.api == "async":
            asyncio.run(_async_service(service, url, namespace, emit, go, start, duration, seed))
        else:
            _threaded_service(service, url, namespace, emit, go, start, duration, seed)
    except KeyboardInterrupt:
        emit("done", interrupted=True)
        return
    except Exception as err:  # noqa: BLE001 - reported to the parent, which fails the run
        emit("error", message=f"{type(err).__name__}: {err}")
        raise SystemExit(1) from None
    emit("done", interrupted=False)


class _Timeline(logging.Handler):
    """gpuboss's warnings in a service (a dead holder's lease revoked, say), sent to the parent's timeline."""

    def __init__(self, emit: _Emitter) -> None:
        super().__init__(logging.WARNING)
        self._emit = emit

    def emit(self, record: logging.LogRecord) -> None:
        self._emit("log", message=record.getMessage())


def _crash_worker(url: str, namespace: str, conn: Any, go: Any, start: Any, duration: float, debug: bool) -> None:
    """``embed``: takes one lease a third of the way into the run, says so, and holds it until it is killed."""
    from gpuboss import GPUBoss

    if debug:
        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    emit = _Emitter(conn.send, CRASH)
    boss = GPUBoss(url, namespace=namespace, service=CRASH.name, gpus=[GPU], default_ttl=LEASE_TTL_S)
    try:
        emit("ready")
        t_end = _wait_for_go(go, start, duration)
        time.sleep(max(0.0, float(start.value) + duration * CRASH_AT - time.time()))
        asked = time.monotonic()
        # (however busy the GPU, it is granted once the others stop asking, at the end of the run)
        lease = boss.acquire(CRASH.sizes_gb[0], CRASH.priority, timeout=t_end - time.time() + 30)
        emit(
            "doomed",
            req=f"{CRASH.name}-0.1",
            gb=CRASH.sizes_gb[0],
            queued=False,
            wait_ms=(time.monotonic() - asked) * 1000,
            pid=os.getpid(),
            **_lease_fields(lease),
        )
        time.sleep(3600)  # holding the lease, until the parent kills this process
    except Exception as err:  # noqa: BLE001 - reported to the parent, which fails the run
        emit("error", message=f"{type(err).__name__}: {err}")
        raise SystemExit(1) from None
    finally:
        boss.close()


def _wait_for_go(go: Any, start: Any, duration: float) -> float:
    if not go.wait(timeout=120):
        raise RuntimeError("the demo did not start within 120 s")
    return float(start.value) + duration


def _rng(seed: int, service: Service, client: int) -> random.Random:
    return random.Random(f"{seed}-{service.name}-{client}")


def _threaded_service(
    service: Service,
    url: str,
    namespace: str,
    emit: _Emitter,
    go: Any,
    start: Any,
    duration: float,
    seed: int,
) -> None:
    from gpuboss import GPUBoss, LeaseTimeout
    from gpuboss.redis_io import connect_sync

    boss = GPUBoss(url, namespace=namespace, service=service.name, gpus=[GPU], default_ttl=LEASE_TTL_S)
    clock = connect_sync(url, 5.0)
    errors: list[Exception] = []
    stop = threading.Event()  # set on Ctrl-C: clients finish what they hold and ask for nothing more
    try:
        emit("ready")
        t_end = _wait_for_go(go, start, duration)

        def client(k: int) -> None:
            rng = _rng(seed, service, k)
            n = 0
            stop.wait(rng.uniform(0, 0.3))
            while time.time() < t_end and not errors and not stop.is_set():
                n += 1
                req = f"{service.name}-{k}.{n}"
                size = rng.choice(service.sizes_gb)
                asked = time.monotonic()
                try:
                    try:
                        lease = boss.acquire(size, service.priority, timeout=0)
                        queued = False
                    except LeaseTimeout:
                        emit("waiting", req=req, gb=size)
                        queued = True
                        left = service.timeout_s - (time.monotonic() - asked)
                        lease = boss.acquire(size, service.priority, timeout=max(left, 0.001))
                except LeaseTimeout:
                    emit("timeout", req=req, gb=size, wait_ms=(time.monotonic() - asked) * 1000)
                    stop.wait(rng.uniform(*service.think_s))
                    continue
                granted = time.monotonic()
                emit(
                    "granted", req=req, gb=size, queued=queued, wait_ms=(granted - asked) * 1000, **_lease_fields(lease)
                )
                stop.wait(rng.uniform(*service.hold_s))  # "inference" on the leased device
                end_ms = _redis_ms(clock.time())  # before the release: the interval can only be shorter
                boss.release(lease)
                emit(
                    "released",
                    req=req,
                    gb=size,
                    held_s=time.monotonic() - granted,
                    released_ms=end_ms,
                    **_lease_fields(lease),
                )
                stop.wait(rng.uniform(*service.think_s))

        def run(k: int) -> None:
            try:
                client(k)
            except Exception as err:  # noqa: BLE001 - re-raised in the main thread below
                errors.append(err)

        threads = [
            threading.Thread(target=run, args=(k,), name=f"{service.name}-{k}", daemon=True)
            for k in range(service.clients)
        ]
        for th in threads:
            th.start()
        try:
            for th in threads:
                th.join()
        except KeyboardInterrupt:
            stop.set()
            for th in threads:
                th.join(timeout=service.timeout_s + 1)
            raise
        if errors:
            raise errors[0]
    finally:
        boss.close()
        clock.close()


async def _async_service(
    service: Service,
    url: str,
    namespace: str,
    emit: _Emitter,
    go: Any,
    start: Any,
    duration: float,
    seed: int,
) -> None:
    from gpuboss import AsyncGPUBoss, LeaseTimeout
    from gpuboss.redis_io import connect_async

    boss = AsyncGPUBoss(url, namespace=namespace, service=service.name, gpus=[GPU], default_ttl=LEASE_TTL_S)
    clock = connect_async(url, 5.0)
    try:
        emit("ready")
        t_end = await asyncio.to_thread(_wait_for_go, go, start, duration)

        async def client(k: int) -> None:
            rng = _rng(seed, service, k)
            n = 0
            await asyncio.sleep(rng.uniform(0, 0.3))
            while time.time() < t_end:
                n += 1
                req = f"{service.name}-{k}.{n}"
                size = rng.choice(service.sizes_gb)
                asked = time.monotonic()
                try:
                    try:
                        lease = await boss.acquire(size, service.priority, timeout=0)
                        queued = False
                    except LeaseTimeout:
                        emit("waiting", req=req, gb=size)
                        queued = True
                        left = service.timeout_s - (time.monotonic() - asked)
                        lease = await boss.acquire(size, service.priority, timeout=max(left, 0.001))
                except LeaseTimeout:
                    emit("timeout", req=req, gb=size, wait_ms=(time.monotonic() - asked) * 1000)
                    await asyncio.sleep(rng.uniform(*service.think_s))
                    continue
                granted = time.monotonic()
                emit(
                    "granted", req=req, gb=size, queued=queued, wait_ms=(granted - asked) * 1000, **_lease_fields(lease)
                )
                await asyncio.sleep(rng.uniform(*service.hold_s))
                end_ms = _redis_ms(await clock.time())
                await boss.release(lease)
                emit(
                    "released",
                    req=req,
                    gb=size,
                    held_s=time.monotonic() - granted,
                    released_ms=end_ms,
                    **_lease_fields(lease),
                )
                await asyncio.sleep(rng.uniform(*service.think_s))

        await asyncio.gather(*(client(k) for k in range(service.clients)))
    finally:
        await boss.close()
        await clock.aclose()


def _lease_fields(lease: Any) -> dict[str, Any]:
    return {
        "lease_id": lease.id,
        "gpu": lease.gpu,
        "device": lease.device,
        "vram_mib": lease.vram_mib,
        "token": lease.token,
        "requested_ms": round(lease.requested_at * 1000),
        "acquired_ms": round(lease.acquired_at * 1000),
    }


# ---------------------------------------------------------------- the parent: sampling


@dataclass
class Sampler:
    """Samples the namespace's usage in a thread and checks the invariants of every sample."""

    url: str
    namespace: str
    declared: dict[str, int] = field(default_factory=dict)  # gpu -> leasable MiB, before it is registered
    samples: int = 0
    peak_used: dict[str, int] = field(default_factory=dict)
    capacity: dict[str, int] = field(default_factory=dict)
    over_capacity: list[str] = field(default_factory=list)
    inconsistent: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    latest: tuple[dict[str, int], dict[int, int]] = field(default_factory=lambda: ({}, {}))
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _conn: Any = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="gpuboss-demo-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.sample_once_safely()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample_once_safely()
            self._stop.wait(SAMPLE_EVERY_S)

    def sample_once_safely(self) -> None:
        try:
            self.sample_once()
        except Exception as err:  # noqa: BLE001 - a failed sample fails the run's first check
            if len(self.errors) < 5:
                self.errors.append(f"{type(err).__name__}: {err}")

    def sample_once(self) -> None:
        from gpuboss.keys import Keys

        client = self._client()
        keys = Keys(self.namespace)
        pipe = client.pipeline(transaction=True)  # one consistent snapshot
        pipe.hgetall(keys.capacity)
        pipe.hgetall(keys.used)
        pipe.hvals(keys.leases)
        pipe.zrange(keys.queue, 0, -1, withscores=True)
        capacity_raw, used_raw, leases_raw, queue_raw = pipe.execute()

        capacity = {**self.declared, **{k: int(v) for k, v in capacity_raw.items()}}
        used = {k: int(v) for k, v in used_raw.items()}
        in_records: dict[str, int] = defaultdict(int)
        for raw in leases_raw:
            rec = json.loads(raw)
            in_records[str(rec["gpu"])] += int(rec["vram_mib"])
        waiting: dict[int, int] = defaultdict(int)
        for _, score in queue_raw:
            waiting[1000 - math.floor(float(score) / 2**40)] += 1
        self.samples += 1
        self.capacity = capacity
        for gpu, mib in used.items():
            self.peak_used[gpu] = max(self.peak_used.get(gpu, 0), mib)
            cap = capacity.get(gpu, 0)
            if mib > cap and len(self.over_capacity) < 10:
                self.over_capacity.append(f"{gpu}: {mib} MiB used > {cap} MiB capacity")
            if mib != in_records.get(gpu, 0) and len(self.inconsistent) < 10:
                self.inconsistent.append(f"{gpu}: used says {mib} MiB, the lease records {in_records.get(gpu, 0)}")
        self.latest = (used, dict(waiting))

    def redis_ms(self) -> int:
        """Redis time now (ms), on a connection of its own (the sampler's belongs to its thread)."""
        from gpuboss.redis_io import connect_sync

        client = connect_sync(self.url, 5.0, socket_timeout=5.0)
        try:
            return _redis_ms(client.time())
        finally:
            client.close()

    def _client(self) -> Any:
        if self._conn is None:
            from gpuboss.redis_io import connect_sync

            self._conn = connect_sync(self.url, 5.0, socket_timeout=5.0)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# ---------------------------------------------------------------- the parent: checks and summary


class DemoFailed(Exception):
    """The demo could not run (a service failed to start); the message says why."""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def interval_peak(grants: dict[str, dict[str, Any]], releases: dict[str, dict[str, Any]]) -> dict[str, int]:
    """The most VRAM held at once per GPU when every lease is replayed as [acquired, released) in Redis ms."""
    points: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for lease_id, g in grants.items():
        r = releases.get(lease_id)
        if r is None:
            continue
        points[g["gpu"]].append((int(g["acquired_ms"]), int(g["vram_mib"])))
        points[g["gpu"]].append((int(r["released_ms"]), -int(g["vram_mib"])))
    peaks: dict[str, int] = {}
    for gpu, pts in points.items():
        pts.sort(key=lambda p: (p[0], p[1]))  # at the same ms, a release comes before a grant
        level = peak = 0
        for _, delta in pts:
            level += delta
            peak = max(peak, level)
        peaks[gpu] = peak
    return peaks


def order_violations(grants: list[dict[str, Any]]) -> list[str]:
    """Grants that overtook a request waiting with the same (earlier arrival) or a higher priority.

    A lease A was waiting in the queue from ``requested_ms`` to ``acquired_ms`` (Redis time, each taken
    inside one atomic script, so strict inequalities order the scripts). If B was granted in between and
    A ranks above B, or alike and queued earlier, B jumped the queue.
    """
    found = []
    for a in grants:
        if a["requested_ms"] >= a["acquired_ms"]:
            continue  # granted at once: never waited
        for b in grants:
            if a is b or not (a["requested_ms"] < b["acquired_ms"] < a["acquired_ms"]):
                continue
            ra, rb = RANKS[a["priority"]], RANKS[b["priority"]]
            if ra > rb or (ra == rb and a["requested_ms"] < b["requested_ms"]):
                found.append(f"{b['req']} ({b['priority']}) was granted while {a['req']} ({a['priority']}) waited")
    return found


def token_violations(grants: list[dict[str, Any]]) -> list[str]:
    by_time = sorted(grants, key=lambda g: (g["acquired_ms"], g["token"]))
    found = []
    tokens = [g["token"] for g in grants]
    if len(set(tokens)) != len(tokens):
        found.append("a fencing token was handed out twice")
    for earlier, later in itertools.pairwise(by_time):
        if earlier["acquired_ms"] < later["acquired_ms"] and earlier["token"] >= later["token"]:
            found.append(f"token {later['token']} ({later['req']}) is not above {earlier['token']} ({earlier['req']})")
    return found


# ---------------------------------------------------------------- the parent: the run


_STYLE = {
    "granted": "green",
    "waiting": "yellow",
    "timeout": "red",
    "error": "red",
    "released": None,
    "doomed": "magenta",
    "log": "magenta",
}


def _describe(ev: dict[str, Any]) -> str | None:
    kind = ev["kind"]
    size = f"{ev.get('gb', 0):g} GB"
    if kind == "waiting":
        return f"asks {size}: nothing fits now, waits in the queue"
    if kind == "granted":
        where = f"{ev['gpu']} ({ev['device']})"
        if not ev["queued"]:
            return f"asks {size}: granted on {where} at once"
        return f"granted {size} on {where} after {ev['wait_ms']:.0f} ms in the queue"
    if kind == "released":
        what = "checkpointed, " if ev["service"] == "batch" else ""
        return f"{what}released {size} after {ev['held_s']:.2f} s"
    if kind == "timeout":
        return f"timed out after {ev['wait_ms']:.0f} ms waiting for {size}, gives up (a web service would answer 503)"
    if kind == "error":
        return f"ERROR {ev['message']}"
    if kind == "log":
        return str(ev["message"])
    if kind == "doomed":
        return f"holds {size} on {ev['gpu']}: killed now with SIGKILL (pid {ev['pid']}), it never releases it"
    return None


def run_demo(
    url: str,
    redis_label: str,
    embedded: bool,
    duration: float = 20.0,
    seed: int | None = None,
    timeline: bool = True,
    as_json: bool = False,
    debug: bool = False,
    echo: Callable[[str], None] | None = None,
) -> bool:
    """Run the scenario; True when every check held."""
    out: Callable[[str], None] = echo or click.echo
    from gpuboss.procs import identity

    crashing = identity() is not None  # (where gpuboss can tell a dead process: Linux)
    namespace = f"demo-{secrets.token_hex(4)}"
    seed = secrets.randbelow(10**6) if seed is None else seed
    capacity_mib = math.ceil(GPU["vram_gb"] * 1024)
    if not as_json:
        out(f"gpuboss demo: {len(SERVICES)} services in separate processes share a {GPU['name']} for {duration:g} s")
        out(f"  Redis      {redis_label}")
        out(f"  namespace  {namespace} (deleted at the end); seed {seed} (--seed {seed} replays the choices)")
        for s in SERVICES:
            sizes = "/".join(f"{x:g}" for x in s.sizes_gb)
            out(
                f"  {s.name:<6} priority {s.priority:<6} {s.clients} clients, leases of {sizes} GB held "
                f"{s.hold_s[0]:g}-{s.hold_s[1]:g} s, timeout {s.timeout_s:g} s ({s.about})"
            )
        if crashing:
            out(
                f"  {CRASH.name:<6} priority {CRASH.priority:<6} one lease of {CRASH.sizes_gb[0]:g} GB at "
                f"{duration * CRASH_AT:.1f} s, then killed with SIGKILL while it holds it (its TTL: {LEASE_TTL_S:g} s)"
            )
        out("")

    ctx = multiprocessing.get_context("spawn")
    events = ctx.Queue()
    go = ctx.Event()
    start = ctx.Value("d", 0.0)
    procs = [
        ctx.Process(
            target=_worker,
            args=(s, url, namespace, events, go, start, duration, seed, debug),
            name=f"gpuboss-demo-{s.name}",
        )
        for s in SERVICES
    ]
    crash_in, crash_out = ctx.Pipe(duplex=False)
    crasher = ctx.Process(
        target=_crash_worker,
        args=(url, namespace, crash_out, go, start, duration, debug),
        name=f"gpuboss-demo-{CRASH.name}",
    )
    crash: dict[str, Any] = {}
    sampler = Sampler(url, namespace, declared={GPU["id"]: capacity_mib})
    grants: dict[str, dict[str, Any]] = {}
    releases: dict[str, dict[str, Any]] = {}
    stats: dict[str, dict[str, Any]] = {
        s.priority: {"service": s.name, "requests": 0, "grants": 0, "timeouts": 0, "queued": 0, "waits": []}
        for s in SERVICES
    }
    worker_errors: list[str] = []
    interrupted = False
    t0 = time.time()
    try:
        running = [*procs, crasher] if crashing else procs
        for p in running:
            p.start()
        _await_ready(procs, events, worker_errors)
        if crashing:
            _await_ready([crasher], _PipeReader(crash_in), worker_errors)
        t0 = time.time()
        start.value = t0
        sampler.start()
        go.set()
        if timeline:
            out(f"{'time':>8}  {'service':<7} {'prio':<7} event")
        next_status = STATUS_EVERY_S
        done: set[str] = set()
        while True:
            ev = _poll(crash_in)
            if ev is None:
                with contextlib.suppress(queue.Empty):  # (nothing in 50 ms: look at the processes)
                    ev = events.get(timeout=0.05)
            if ev is not None and ev["kind"] == "doomed":
                crasher.kill()  # SIGKILL, by its PID: no release, no exit handler
                crash.update(ev, killed_ms=sampler.redis_ms())
                grants[ev["lease_id"]] = ev
            if ev is not None:
                _record(ev, stats, grants, releases, worker_errors, done)
                text = _describe(ev)
                if timeline and text is not None:
                    line = f"{ev['t'] - t0:7.3f}s  {ev['service']:<7} {ev['priority']:<7} {text}"
                    out(click.style(line, fg=_STYLE.get(ev["kind"])) if _STYLE.get(ev["kind"]) else line)
                elif ev["kind"] == "log":  # (a warning is never lost: on stderr without the timeline)
                    click.echo(f"{ev['service']}: {ev['message']}", err=True)
            now = time.time() - t0
            if timeline and now >= next_status:
                out(_status_line(now, sampler, capacity_mib))
                next_status += STATUS_EVERY_S
            if ev is None and not any(p.is_alive() for p in running):
                break
    except KeyboardInterrupt:
        interrupted = True
        out("interrupted: stopping the services")
        deadline = time.monotonic() + 10
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                events.get(timeout=0.1)  # keep draining, or a worker blocks on a full pipe at exit
    finally:
        if crasher.pid is not None and crasher.is_alive():
            crasher.kill()
        for p in (*procs, crasher):
            if p.pid is not None:
                p.join(timeout=15)
                if p.is_alive():
                    p.terminate()
                    p.join(timeout=5)
        sampler.stop()
        if crash and not interrupted:
            crash.update(_crash_outcome(url, namespace, crash))
            if "ended_ms" in crash:
                releases[crash["lease_id"]] = {"released_ms": crash["ended_ms"]}
        final = _final_state(url, namespace)
        removed = _delete_namespace(url, namespace)
        sampler.close()
        events.close()
        events.join_thread()
    elapsed = time.time() - t0
    if interrupted:
        out(f"namespace {namespace} removed ({removed} keys)")
        raise KeyboardInterrupt

    for p in procs:
        if p.exitcode != 0:
            worker_errors.append(f"{p.name} exited with code {p.exitcode}")
    if crash and crasher.exitcode != -signal.SIGKILL:
        worker_errors.append(f"{crasher.name} was not killed (exit code {crasher.exitcode})")
    checks = _checks(sampler, grants, releases, stats, worker_errors, final, removed, capacity_mib)
    if crashing:
        checks.insert(-1, _crash_check(crash))
    ok = all(c.ok for c in checks)
    summary = _summary(namespace, seed, duration, elapsed, stats, sampler, grants, releases, capacity_mib, checks, ok)
    summary["crash"] = {
        k: crash[k] for k in ("pid", "lease_id", "killed_ms", "end", "ended_ms", "by", "reason") if k in crash
    }
    if as_json:
        out(json.dumps(summary, indent=2, sort_keys=True))
    else:
        if timeline:
            out("")
        out(_render_summary(summary))
        if embedded:
            out("")
            out("The embedded Redis keeps running for other gpuboss programs; `gpuboss server stop` stops it.")
    return ok


def _crash_outcome(url: str, namespace: str, crash: dict[str, Any]) -> dict[str, Any]:
    """When and by whom the killed process's lease was revoked. A lease still held here (no request found the
    GPU full since the kill) is taken back by a collect of this process, as ``gpuboss gc`` would."""
    from datetime import UTC, datetime

    from gpuboss import GPUBoss
    from gpuboss.events import replay
    from gpuboss.keys import Keys
    from gpuboss.redis_io import connect_sync

    client = connect_sync(url, 5.0)
    try:
        still_held = bool(client.hexists(Keys(namespace).leases, crash["lease_id"]))
    finally:
        client.close()
    if still_held:
        with GPUBoss(url, namespace=namespace, service="demo", gpus=[GPU]) as boss:
            boss.collect()
    since = datetime.fromtimestamp(crash["killed_ms"] / 1000 - 1, tz=UTC)
    for ev in replay(url, namespace, since):
        if ev.type in ("revoked", "expired") and ev.lease == crash["lease_id"]:
            return {"end": ev.type, "ended_ms": ev.time_ms, "by": ev.get("by", "its TTL"), "reason": ev.get("reason")}
    return {}


def _crash_check(crash: dict[str, Any]) -> Check:
    name = "a killed holder's VRAM came back before its TTL ran out"
    if not crash:
        return Check(name, False, f"{CRASH.name} was never granted its lease")
    after = (crash.get("ended_ms", 0) - crash["killed_ms"]) / 1000
    what = f"{CRASH.name} (pid {crash['pid']}) killed with SIGKILL holding {gb(crash['vram_mib'])}"
    if crash.get("end") != "revoked":
        return Check(name, False, f"{what}; its lease was {crash.get('end', 'never taken back')}")
    ok = str(crash["reason"]).startswith("holder process gone") and after < LEASE_TTL_S
    return Check(name, ok, f"{what}; revoked {after:.2f} s later by {crash['by']} (TTL {LEASE_TTL_S:g} s)")


def _poll(conn: Any) -> Any:
    """A message waiting on the pipe, else None (also once the process at its other end is gone)."""
    try:
        return conn.recv() if conn.poll() else None
    except (EOFError, OSError):
        return None


class _PipeReader:
    """The receiving end of a pipe, read as :func:`_await_ready` reads a queue."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def get(self, timeout: float) -> Any:
        if not self._conn.poll(timeout):
            raise queue.Empty
        return self._conn.recv()


def _await_ready(procs: list[Any], events: Any, errors: list[str]) -> None:
    ready = 0
    deadline = time.monotonic() + 120
    while ready < len(procs):
        if time.monotonic() > deadline:
            raise DemoFailed("the demo's services did not start within 120 s")
        try:
            ev = events.get(timeout=0.1)
        except queue.Empty:
            dead = [p for p in procs if not p.is_alive()]
            if dead:
                raise DemoFailed(f"{dead[0].name} exited while starting (code {dead[0].exitcode})") from None
            continue
        if ev["kind"] == "ready":
            ready += 1
        elif ev["kind"] == "error":
            errors.append(f"{ev['service']}: {ev['message']}")
            raise DemoFailed(f"{ev['service']} failed to start: {ev['message']}")


def _record(
    ev: dict[str, Any],
    stats: dict[str, dict[str, Any]],
    grants: dict[str, dict[str, Any]],
    releases: dict[str, dict[str, Any]],
    errors: list[str],
    done: set[str],
) -> None:
    kind, row = ev["kind"], stats[ev["priority"]]
    if kind == "granted":
        row["requests"] += 1
        row["grants"] += 1
        row["queued"] += int(ev["queued"])
        row["waits"].append(float(ev["wait_ms"]))
        grants[ev["lease_id"]] = ev
    elif kind == "timeout":
        row["requests"] += 1
        row["timeouts"] += 1
        row["queued"] += 1
        row["waits"].append(float(ev["wait_ms"]))  # a wait that ended in giving up counts too
    elif kind == "released":
        releases[ev["lease_id"]] = ev
    elif kind == "error":
        errors.append(f"{ev['service']}: {ev['message']}")
    elif kind == "done":
        done.add(ev["service"])


def _status_line(now: float, sampler: Sampler, capacity_mib: int) -> str:
    used, waiting = sampler.latest
    in_use = sum(used.values())
    queue_text = ", ".join(f"{name} {waiting.get(RANKS[name], 0)}" for name in PRIORITY_ORDER)
    return click.style(
        f"{now:7.3f}s  -- {GPU['id']}: {gb(in_use)} of {gb(capacity_mib)} in use; waiting: {queue_text}",
        dim=True,
    )


def _final_state(url: str, namespace: str) -> dict[str, Any]:
    from gpuboss.keys import Keys
    from gpuboss.redis_io import connect_sync

    keys = Keys(namespace)
    client = connect_sync(url, 5.0)
    try:
        pipe = client.pipeline(transaction=True)
        pipe.hlen(keys.leases)
        pipe.zcard(keys.queue)
        pipe.hlen(keys.tickets)
        pipe.hgetall(keys.used)
        leases, queued, tickets, used = pipe.execute()
    finally:
        client.close()
    return {"leases": leases, "queued": queued, "tickets": tickets, "used": {k: int(v) for k, v in used.items()}}


def _delete_namespace(url: str, namespace: str) -> int:
    from gpuboss.keys import Keys
    from gpuboss.redis_io import connect_sync

    client = connect_sync(url, 5.0)
    try:
        found = list(client.scan_iter(match=Keys(namespace).pattern, count=1000))
        if found:
            client.delete(*found)
        return len(found)
    finally:
        client.close()


def _checks(
    sampler: Sampler,
    grants: dict[str, dict[str, Any]],
    releases: dict[str, dict[str, Any]],
    stats: dict[str, dict[str, Any]],
    worker_errors: list[str],
    final: dict[str, Any],
    removed: int,
    capacity_mib: int,
) -> list[Check]:
    checks = []
    cap = sampler.capacity.get(GPU["id"], capacity_mib)
    peak = max(sampler.peak_used.values(), default=0)
    checks.append(
        Check(
            "used <= capacity at every sample",
            sampler.samples > 0 and not sampler.over_capacity and not sampler.errors,
            f"{sampler.samples} samples, peak {gb(peak)} of {gb(cap)}"
            + "".join(f"; {x}" for x in sampler.over_capacity + sampler.errors),
        )
    )
    checks.append(
        Check(
            "used == sum of the lease records at every sample",
            not sampler.inconsistent,
            "; ".join(sampler.inconsistent) or "always equal",
        )
    )
    peaks = interval_peak(grants, releases)
    worst = max(peaks.values(), default=0)
    checks.append(
        Check(
            "lease intervals never exceed capacity",
            worst <= cap and len(releases) == len(grants),
            f"{len(grants)} leases replayed, most held at once {gb(worst)} of {gb(cap)}"
            + ("" if len(releases) == len(grants) else f"; {len(grants) - len(releases)} never released"),
        )
    )
    listed = list(grants.values())
    jumps = order_violations(listed)
    checks.append(
        Check(
            "queue order: nobody overtook a waiting request of the same or higher priority",
            not jumps,
            "; ".join(jumps[:3]) or f"{sum(1 for g in listed if g['queued'])} grants from the queue, all in order",
        )
    )
    bad_tokens = token_violations(listed)
    checks.append(Check("fencing tokens increase with grant time", not bad_tokens, "; ".join(bad_tokens[:3]) or "yes"))
    requests = sum(r["requests"] for r in stats.values())
    ended = sum(r["grants"] + r["timeouts"] for r in stats.values())
    checks.append(
        Check(
            "every request was granted or timed out",
            requests == ended and requests > 0,
            f"{requests} requests",
        )
    )
    checks.append(Check("services exited cleanly", not worker_errors, "; ".join(worker_errors[:3]) or "yes"))
    clean = final["leases"] == 0 and final["queued"] == 0 and final["tickets"] == 0 and not any(final["used"].values())
    checks.append(
        Check(
            "nothing leased or queued at the end",
            clean,
            f"{final['leases']} leases, {final['queued']} queued, used {final['used']}; {removed} keys deleted",
        )
    )
    return checks


def _summary(
    namespace: str,
    seed: int,
    duration: float,
    elapsed: float,
    stats: dict[str, dict[str, Any]],
    sampler: Sampler,
    grants: dict[str, dict[str, Any]],
    releases: dict[str, dict[str, Any]],
    capacity_mib: int,
    checks: list[Check],
    ok: bool,
) -> dict[str, Any]:
    priorities = {}
    for name in PRIORITY_ORDER:
        row = stats[name]
        waits = row["waits"]
        priorities[name] = {
            "service": row["service"],
            "requests": row["requests"],
            "grants": row["grants"],
            "timeouts": row["timeouts"],
            "queued": row["queued"],
            "wait_p50_ms": _round(percentile(waits, 50)),
            "wait_p99_ms": _round(percentile(waits, 99)),
            "wait_max_ms": _round(max(waits, default=math.nan)),
        }
    return {
        "namespace": namespace,
        "seed": seed,
        "duration_s": duration,
        "elapsed_s": round(elapsed, 2),
        "capacity_mib": sampler.capacity.get(GPU["id"], capacity_mib),
        "peak_used_mib": max(sampler.peak_used.values(), default=0),
        "peak_interval_mib": max(interval_peak(grants, releases).values(), default=0),
        "samples": sampler.samples,
        "priorities": priorities,
        "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks],
        "ok": ok,
    }


def _round(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 1)


def _render_summary(summary: dict[str, Any]) -> str:
    rows = []
    for name, row in summary["priorities"].items():
        rows.append(
            [
                name,
                row["service"],
                row["requests"],
                row["grants"],
                row["timeouts"],
                row["queued"],
                ms(_nan(row["wait_p50_ms"])),
                ms(_nan(row["wait_p99_ms"])),
                ms(_nan(row["wait_max_ms"])),
            ]
        )
    headers = [
        "PRIORITY",
        "SERVICE",
        "REQUESTS",
        "GRANTS",
        "TIMEOUTS",
        "QUEUED",
        "WAIT P50 ms",
        "WAIT P99 ms",
        "MAX ms",
    ]
    cap = summary["capacity_mib"]
    lines = [
        f"Summary ({summary['elapsed_s']:.1f} s, namespace {summary['namespace']}, seed {summary['seed']})",
        "",
        table(headers, rows, right={2, 3, 4, 5, 6, 7, 8}),
        "",
        f"  peak VRAM in use: {gb(summary['peak_used_mib'])} of {gb(cap)} "
        f"({100 * summary['peak_used_mib'] / cap:.0f}%, {summary['samples']} samples); "
        f"replayed lease intervals: {gb(summary['peak_interval_mib'])} at most",
    ]
    lines.append("  waits run from asking until the grant, or until the request gave up (timeouts count)")
    p50 = [summary["priorities"][name]["wait_p50_ms"] for name in PRIORITY_ORDER]
    if None not in p50:
        shown = ", ".join(f"{name} {ms(v)} ms" for name, v in zip(PRIORITY_ORDER, p50, strict=True))
        if p50[0] <= p50[1] <= p50[2]:
            verdict = "served in priority order, high waited least and low most"
        elif p50[0] <= min(p50[1], p50[2]):
            verdict = "high waited least"
        else:
            verdict = "high did not wait least this run"
        lines.append(f"  priority order: wait p50 {shown}: {verdict}")
    lines.append("")
    lines.append("Checks")
    for c in summary["checks"]:
        mark = "ok  " if c["ok"] else "FAIL"
        lines.append(f"  {mark} {c['name']}: {c['detail']}")
    lines.append("")
    lines.append("All checks held." if summary["ok"] else "SOME CHECKS FAILED.")
    return "\n".join(lines)


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


__all__ = ["SERVICES", "Sampler", "Service", "interval_peak", "order_violations", "run_demo", "token_violations"]
