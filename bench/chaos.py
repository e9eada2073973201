"""``python -m bench.chaos [--duration S] [--workers N] [--json]``: the chaos soak (``make chaos``).

A bounded multi-process soak on a private redis-server (a free loopback port, no persistence, stopped by its
PID; never the Redis on 6379). ``--workers`` processes (``bench/chaos_worker.py``; most of them ``GPUBoss``,
some ``AsyncGPUBoss`` with two tasks each) take leases of random sizes, priorities, TTLs (1 to 3 s) and
timeouts on two GPUs, through a TCP proxy (``bench/proxy.py``), while this driver injects faults at random:

``kill_holder``    SIGKILL a process that holds a lease (a new worker takes its place)
``kill_waiter``    SIGKILL a process that waits in the queue (a new worker takes its place)
``stop_holder``    SIGSTOP a holder for longer than its lease's TTL, then SIGCONT: it must be told that the
                   lease is lost, and a newer lease on that GPU must carry a higher fencing token
``proxy_drop``     cut every live proxied connection at once
``script_flush``   ``SCRIPT FLUSH`` and ``FUNCTION FLUSH``: the clients must load the scripts (NOSCRIPT) or the
                   function library ("Function not found") again by themselves
``redis_restart``  SIGKILL redis-server and start an empty one on the same port (no persistence)
``redis_full``     ``CONFIG SET maxmemory 1`` (``noeviction``) for ``FULL_S``, longer than the shortest TTL: Redis
                   refuses every call that may grow memory, as a shared Redis that another application filled
                   does; new requests get ``RedisOutOfMemory``, while renewals and releases still run (their
                   functions carry ``allow-oom``), so no lease held then may be lost to it (no other fault is
                   injected meanwhile, nor for ``FULL_AFTER_S`` after)

An observer process (``--observe``, started by the driver) reads the namespace read-only, in one MULTI/EXEC
per look (a consistent snapshot, about 20 per second), and checks continuously:

* over-commit: on every GPU, ``used`` and the sum of the leases are at most capacity minus reserve;
* ``used`` equals the sum of the live lease records' ``vram_mib`` on each GPU; every lease has its expiry
  entry; every queued request has its record and its expiry entry, and no record is without its entry;
* fencing tokens only grow: the counter never goes down (across Redis restarts too, where it is re-seeded from
  Redis time), and a lease first seen carries a token above every counter value seen before it;
* no stranded waiter: the request that the scripts would grant now under the rules in force is not left
  waiting for more than ``STRANDED_S`` in a row (expired entries and expired leases left out): without rules
  the head of the queue when it fits on a GPU; with ``--overtake`` also a later one that fits while those
  ahead of it may still be passed; with ``--queueing backfill`` also one that fits on a GPU that no blocked
  request ahead of it waits for (``Observer.due_request``);
* with scheduling rules (``--queueing``, ``--overtake``: every worker's configuration carries them), the rules
  are in force: while GPUs are registered, the policy hash holds exactly those rules (a restart wipes them
  with the registry; the bosses store them again before they register the GPUs), never missing for more than
  ``STRANDED_S`` in a row.

From the workers' logs the driver checks afterwards that every stopped holder was told that its lease was
lost (``on_lost``, or ``release()`` answering False) and never saw it renewed, that a later lease on the same
GPU carries a higher token than the stale one, that every holder of a lease wiped by a restart was told, and
that the leases as their holders saw them (acquire returned -> release called, for leases whose release
answered True) never add up to more than a GPU leases out.

At the end the faults stop, the workers finish (SIGTERM) and close their bosses, the TTLs run out, one
``collect`` runs, and every key of the namespace but the fixed ones (``Keys.fixed()``) counts as leaked.

The report (a table, or JSON with ``--json``) gives operations, faults injected by kind, grants, the figures
that must be 0, and recovery times per fault kind (p50/max): for every kind the time from the fault to the
first grant returned to an ``acquire()`` called after it, and the kind's own measure (see ``RECOVERY``). The
exit status is 1 when a must-be-0 figure is not 0 (or a fault kind was never injected), else 0.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gpuboss
import redis
from gpuboss import GPUBoss, Keys
from gpuboss.config import config_from_arguments, gb_to_mib
from gpuboss.policy import policy_fields
from gpuboss.scripts import lua_dir
from gpuboss.server import RedisProcess, start_redis
from redis.exceptions import RedisError, ResponseError

from bench.env import free_port
from bench.handoff import ROOT, worker_env
from bench.proxy import Proxy
from bench.stats import percentile

GPUS: list[dict[str, Any]] = [
    {"id": "gpu0", "name": "chaos-24g", "vram_gb": 24, "index": 0},
    {"id": "gpu1", "name": "chaos-16g", "vram_gb": 16, "index": 1, "reserve_gb": 1},
]
TTL_RANGE_S = (1.0, 3.0)
#: How long a worker holds each lease, ms (``--hold-ms``): drawn uniformly between the two.
HOLD_MS = (20.0, 500.0)
KINDS = ("kill_holder", "kill_waiter", "stop_holder", "proxy_drop", "script_flush", "redis_restart", "redis_full")
WEIGHTS = {
    "kill_holder": 3,
    "kill_waiter": 2,
    "stop_holder": 2,
    "proxy_drop": 2,
    "script_flush": 2,
    "redis_restart": 1,
    "redis_full": 1,
}
#: What the second recovery figure of each kind measures.
RECOVERY = {
    "kill_holder": "kill -> the dead holder's leases reclaimed",
    "kill_waiter": "kill -> the dead waiter's entries reclaimed",
    "stop_holder": "SIGCONT -> the holder told its lease is lost",
    "proxy_drop": "cut -> each worker's next script call answered",
    "script_flush": "flush -> next script call answered",
    "redis_restart": "kill -> each holder told its lease is lost",
    "redis_full": "memory back -> next grant",
}
#: How long a ``redis_full`` fault keeps Redis out of memory: longer than the shortest TTL (TTL_RANGE_S), so a lease
#: not renewed meanwhile may expire (holds longer than this, ``--hold-ms``, show it: its holder still holds it then).
FULL_S = 2.0
#: After a ``redis_full`` fault, a lease held through it that its holder finds lost within this long counts as
#: lost to it (a holder whose renewal is overdue is told at once, once memory is back); no other fault is
#: injected until then, so a loss then is the full Redis's.
FULL_AFTER_S = 3.0
#: The request that the scripts would grant now (the head of the queue, without rules) left waiting this long in a
#: row counts as a stranded waiter.
STRANDED_S = 3.0
#: Blocked requests a backfill pass looks past before it stops (includes/grant.lua).
BACKFILL_LIMIT = 64
#: The observer's own figures in the report.
OBSERVER_FIGURES = ("snapshots", "failed_reads", "longest_blind_s", "due_snapshots", "due_behind_head", "longest_due_s")
OBSERVE_EVERY_S = 0.05
#: A stopped holder stays stopped this long past its lease's TTL.
STOP_MARGIN_S = 1.0
#: A worker just continued after SIGSTOP is not picked for another fault for this long.
PROTECT_S = 8.0
MIN_FAULT_GAP_S = 0.5
START_TIMEOUT_S = 90.0
EXIT_TIMEOUT_S = 30.0
#: Violations kept with their details, per kind.
DETAILS = 5


def log(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def connect(url: str, timeout: float = 5.0) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=timeout, socket_timeout=timeout)


def stored_rules(rules: dict[str, Any]) -> dict[str, str]:
    """The policy hash that bosses configured with ``rules`` store (gpuboss/policy.py; empty fields are none)."""
    config = config_from_arguments(namespace="chaos", gpus=GPUS, **rules)
    return {name: value for name, value in policy_fields(config) if value}


def pid_of(raw: str) -> tuple[int, dict[str, Any]] | None:
    try:
        rec = json.loads(raw)
        return int(rec["pid"]), rec
    except (ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------- the observer


@dataclass
class Snapshot:
    now_ms: int
    cap: dict[str, int]
    used: dict[str, int]
    leases: dict[str, str]
    lease_exp: dict[str, float]
    queue: list[tuple[str, float]]
    tickets: dict[str, str]
    queue_exp: dict[str, float]
    token: int | None
    offline: set[str]
    holds: int
    #: the policy hash (the scheduling rules in force)
    rules: dict[str, str] = field(default_factory=dict)


def read_snapshot(client: redis.Redis, keys: Keys) -> Snapshot:
    """Everything the checks need, in one MULTI/EXEC: a consistent view between two scripts."""
    pipe = client.pipeline(transaction=True)
    pipe.hgetall(keys.capacity)
    pipe.hgetall(keys.used)
    pipe.hgetall(keys.leases)
    pipe.zrange(keys.lease_exp, 0, -1, withscores=True)
    pipe.zrange(keys.queue, 0, -1, withscores=True)
    pipe.hgetall(keys.tickets)
    pipe.zrange(keys.queue_exp, 0, -1, withscores=True)
    pipe.get(keys.token)
    pipe.time()
    pipe.hgetall(keys.policy)
    extra = [name for name in ("offline", "holds") if isinstance(getattr(keys, name, None), str)]
    for name in extra:
        if name == "holds":
            pipe.hlen(getattr(keys, name))
        else:
            pipe.hkeys(getattr(keys, name))
    res = pipe.execute()
    more = dict(zip(extra, res[10:], strict=True))
    secs, micros = res[8]
    return Snapshot(
        now_ms=int(secs) * 1000 + int(micros) // 1000,
        cap={k: int(v) for k, v in res[0].items()},
        used={k: int(v) for k, v in res[1].items()},
        leases=dict(res[2]),
        lease_exp=dict(res[3]),
        queue=list(res[4]),
        tickets=dict(res[5]),
        queue_exp=dict(res[6]),
        token=None if res[7] is None else int(res[7]),
        offline=set(more.get("offline", [])),
        holds=int(more.get("holds", 0)),
        rules=dict(res[9]),
    )


def live_queue(s: Snapshot) -> list[str]:
    """The queue's request ids in serving order, without entries whose TTL ran out or that have no record."""
    return [req_id for req_id, _ in s.queue if s.queue_exp.get(req_id, 0) > s.now_ms and req_id in s.tickets]


@dataclass
class Observer:
    """The invariant checks over a stream of snapshots (all times on ``time.monotonic()``)."""

    #: the policy hash every worker's rules make (empty: the default rules, not checked)
    rules: dict[str, str] = field(default_factory=dict)
    snapshots: int = 0
    failed_reads: int = 0
    longest_blind_s: float = 0.0
    #: snapshots in which a request was due (due_request), and in which it was not the head of the queue
    due_snapshots: int = 0
    due_behind_head: int = 0
    #: the longest a due request was seen waiting (one streak of the same request, across snapshots)
    longest_due_s: float = 0.0
    violations: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    details: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    #: "<lease id>/<token>" -> [pid, gpu, token, vram_mib, first seen, last seen]
    leases: dict[str, list[Any]] = field(default_factory=dict)
    #: request id -> [pid, first seen, last seen]
    tickets: dict[str, list[Any]] = field(default_factory=dict)
    stranded_ids: list[str] = field(default_factory=list)
    _decoded: dict[str, dict[str, Any]] = field(default_factory=dict)
    _last_token: int | None = None
    _max_token_before: int = 0
    _due: str | None = None
    _due_since: float = 0.0
    _last_ok: float | None = None
    _rules_off_since: float | None = None
    _rules_told: bool = False

    def violation(self, kind: str, t: float, what: str) -> None:
        self.violations[kind] += 1
        if len(self.details[kind]) < DETAILS:
            self.details[kind].append(f"t={t:.3f}: {what}")

    def blind(self, t: float) -> None:
        """A look failed (Redis restarting): what was continuous is not any more."""
        self.failed_reads += 1
        self._due = None
        self._rules_off_since, self._rules_told = None, False

    def decode(self, raw: str) -> dict[str, Any]:
        rec = self._decoded.get(raw)
        if rec is None:
            rec = json.loads(raw)
            if len(self._decoded) > 100_000:
                self._decoded.clear()
            self._decoded[raw] = rec
        return rec

    def check(self, s: Snapshot, t: float) -> None:
        self.snapshots += 1
        if self._last_ok is not None:
            self.longest_blind_s = max(self.longest_blind_s, t - self._last_ok)
        self._last_ok = t
        leases = {lease_id: self.decode(raw) for lease_id, raw in s.leases.items()}
        self.check_books(s, leases, t)
        self.check_tokens(s, leases, t)
        self.check_stranded(s, leases, t)
        self.check_rules(s, t)
        for req_id, raw in s.tickets.items():
            seen = self.tickets.get(req_id)
            if seen is None:
                found = pid_of(raw)
                self.tickets[req_id] = [found[0] if found else None, t, t]
            else:
                seen[2] = t

    def check_books(self, s: Snapshot, leases: dict[str, dict[str, Any]], t: float) -> None:
        leased: dict[str, int] = defaultdict(int)
        for rec in leases.values():
            leased[str(rec["gpu"])] += int(rec["vram_mib"])
        for gpu in sorted(set(s.cap) | set(s.used) | set(leased)):
            cap, used, held = s.cap.get(gpu), s.used.get(gpu, 0), leased.get(gpu, 0)
            if cap is None:
                self.violation("counter_mismatches", t, f"{gpu}: used {used}, leases {held}, but no capacity")
                continue
            if used > cap or held > cap:
                self.violation("over_commit_events", t, f"{gpu}: used {used} MiB, leases {held} MiB > {cap} MiB")
            if used != held:
                self.violation("counter_mismatches", t, f"{gpu}: used {used} MiB != leases {held} MiB")
        if set(s.leases) != set(s.lease_exp):
            diff = sorted(set(s.leases) ^ set(s.lease_exp))[:3]
            self.violation("index_mismatches", t, f"leases vs lease_exp differ: {diff}")
        queued = {req_id for req_id, _ in s.queue}
        if not queued == set(s.tickets) == set(s.queue_exp):
            diff = sorted((queued ^ set(s.tickets)) | (queued ^ set(s.queue_exp)))[:3]
            self.violation("index_mismatches", t, f"queue vs tickets vs queue_exp differ: {diff}")

    def check_tokens(self, s: Snapshot, leases: dict[str, dict[str, Any]], t: float) -> None:
        if s.token is not None and self._last_token is not None and s.token < self._last_token:
            self.violation("token_regressions", t, f"token counter went from {self._last_token} to {s.token}")
        for lease_id, rec in leases.items():
            token = int(rec["token"])
            key = f"{lease_id}/{token}"
            seen = self.leases.get(key)
            if seen is None:
                if token <= self._max_token_before:
                    self.violation(
                        "token_regressions", t, f"new lease {lease_id} has token {token} <= {self._max_token_before}"
                    )
                if s.token is not None and token > s.token:
                    self.violation("token_regressions", t, f"lease {lease_id} token {token} > counter {s.token}")
                self.leases[key] = [rec.get("pid"), str(rec["gpu"]), token, int(rec["vram_mib"]), t, t]
            else:
                seen[5] = t
        if s.token is not None:
            self._last_token = s.token
            self._max_token_before = max(self._max_token_before, s.token)

    def check_stranded(self, s: Snapshot, leases: dict[str, dict[str, Any]], t: float) -> None:
        """The request the scripts would grant now (``due_request``) must not stay ungranted for STRANDED_S in
        a row."""
        if s.holds:
            self._due = None  # capacity set aside for one request (eviction): no judgement
            return
        due = self.due_request(s, leases)
        if due is None:
            self._due = None
            return
        self.due_snapshots += 1
        if due != live_queue(s)[0]:
            self.due_behind_head += 1
        if due != self._due:
            self._due, self._due_since = due, t
        self.longest_due_s = max(self.longest_due_s, t - self._due_since)
        if t - self._due_since > STRANDED_S and due not in self.stranded_ids:
            self.stranded_ids.append(due)
            ahead = [req_id for req_id, _ in s.queue].index(due)
            self.violation(
                "stranded_waiters",
                t,
                f"{due} ({ahead} ahead of it) fits ({s.tickets[due][:200]}) for {t - self._due_since:.1f} s",
            )

    def due_request(self, s: Snapshot, leases: dict[str, dict[str, Any]]) -> str | None:
        """The first queued request (expired entries left out) that the scripts would grant now under the rules
        in force (the snapshot's policy hash), with expired leases counted as free: None when there is none, or
        when the rules are other than ``queueing`` and ``overtake``, or a request is of a kind the chaos
        workers never make, and this check does not judge.

        Each request in line that does not fit where it may go is blocked (includes/grant.lua): with
        ``overtake: N`` one passed fewer than N times (its record's ``passed``) lets the later ones pass;
        otherwise strict queueing stops there (so without rules only the head is judged), and ``backfill``
        keeps from the later ones the GPU it waits for (``target()`` in includes/place.lua: its pin, or the
        eligible GPU with the most free MiB, the first by name on a tie). The scripts look past at most
        ``BACKFILL_LIMIT`` blocked requests."""
        if set(s.rules) - {"queueing", "overtake"}:
            return None
        backfill = s.rules.get("queueing") == "backfill"
        overtake = int(s.rules.get("overtake") or 0)
        free = {gpu: cap for gpu, cap in s.cap.items() if gpu not in s.offline}
        for lease_id, rec in leases.items():
            if s.lease_exp.get(lease_id, 0) > s.now_ms and rec["gpu"] in free:
                free[rec["gpu"]] -= int(rec["vram_mib"])
        kept: set[str] = set()
        for blocked, req_id in enumerate(live_queue(s), start=1):  # (each one not returned is blocked)
            req = self.decode(s.tickets[req_id])
            if req.get("grow_of") or int(req.get("count") or 1) > 1 or req.get("node") not in (None, "any"):
                return None
            need, pin = int(req["vram_mib"]), str(req.get("pin") or "")
            if any(left >= need for gpu, left in free.items() if gpu not in kept and (not pin or gpu == pin)):
                return req_id
            if overtake <= int(req.get("passed") or 0):
                if not backfill:
                    return None
                eligible = [gpu for gpu in free if s.cap[gpu] >= need] if not pin else [pin]
                if eligible:
                    kept.add(eligible[0] if pin else min(eligible, key=lambda gpu: (-free[gpu], gpu)))
            if blocked >= BACKFILL_LIMIT:
                return None
        return None

    def check_rules(self, s: Snapshot, t: float) -> None:
        """While GPUs are registered, the policy hash must hold the rules, missing or different for at most
        STRANDED_S in a row (counted once per episode)."""
        if not self.rules or not s.cap or s.rules == self.rules:
            self._rules_off_since, self._rules_told = None, False
            return
        if self._rules_off_since is None:
            self._rules_off_since = t
        elif t - self._rules_off_since > STRANDED_S and not self._rules_told:
            self._rules_told = True
            self.violation(
                "rules_lost", t, f"policy {s.rules} instead of {self.rules} for {t - self._rules_off_since:.1f} s"
            )

    def result(self) -> dict[str, Any]:
        return {
            "snapshots": self.snapshots,
            "failed_reads": self.failed_reads,
            "longest_blind_s": self.longest_blind_s,
            "due_snapshots": self.due_snapshots,
            "due_behind_head": self.due_behind_head,
            "longest_due_s": self.longest_due_s,
            "violations": dict(self.violations),
            "details": dict(self.details),
            "leases": self.leases,
            "tickets": self.tickets,
        }


def observe(spec_path: str) -> int:
    """The observer process: look, check, repeat until SIGTERM; then write the result next to the spec."""
    spec = json.loads(Path(spec_path).read_text())
    keys = Keys(spec["namespace"])
    client = connect(spec["url"], timeout=2.0)
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    obs = Observer(rules=spec.get("rules", {}))
    while not stopping:
        t = time.monotonic()
        try:
            snap = read_snapshot(client, keys)
        except (RedisError, OSError):
            obs.blind(t)
            time.sleep(OBSERVE_EVERY_S)
            continue
        obs.check(snap, t)
        time.sleep(OBSERVE_EVERY_S)
    client.close()
    Path(spec["out"]).write_text(json.dumps(obs.result()))
    return 0


# ---------------------------------------------------------------- the driver


@dataclass(frozen=True)
class Plan:
    duration: float
    workers: int
    async_workers: int
    tasks: int
    fault_every: float
    seed: int
    kinds: tuple[str, ...] = KINDS
    #: extra GPUBoss workers that declare no GPU and lease from the namespace's registry
    registry_clients: int = 0
    #: scheduling rules every boss is configured with (``queueing``, ``overtake``); empty: the defaults
    rules: dict[str, Any] = field(default_factory=dict)
    #: how long a worker holds each lease, ms: drawn uniformly between the two
    hold_ms: tuple[float, float] = HOLD_MS


@dataclass
class Worker:
    index: int
    kind: str
    proc: subprocess.Popen[bytes]
    log: Path
    started: float
    killed: float | None = None
    exited: float | None = None
    stopped: bool = False
    protect_until: float = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass
class Fault:
    kind: str
    t: float
    info: dict[str, Any] = field(default_factory=dict)


class Chaos:
    def __init__(self, plan: Plan, workdir: Path) -> None:
        self.plan = plan
        self.workdir = workdir
        self.rng = random.Random(plan.seed)
        self.namespace = f"chaos{uuid.uuid4().hex[:8]}"
        self.keys = Keys(self.namespace)
        self.port = free_port()
        self.socket = workdir / "redis.sock"
        self.server: RedisProcess | None = None
        self.proxy: Proxy | None = None
        self.direct: redis.Redis | None = None
        self.observer: subprocess.Popen[bytes] | None = None
        self.workers: list[Worker] = []
        self.faults: list[Fault] = []
        self.attempts: dict[str, int] = defaultdict(int)
        self.stopped: Fault | None = None
        #: the redis_full fault in progress (no other fault is injected until Redis has its memory back, and
        #: FULL_AFTER_S more: ``quiet_until``)
        self.full: Fault | None = None
        self.quiet_until = 0.0
        self.crashed: list[str] = []
        self.hung: list[int] = []
        self.leaked: list[str] = []
        self.used_left: dict[str, int] = {}
        self.restarts = 0
        self.code: dict[str, float] = {}
        self.began = 0.0
        self.ended = 0.0

    @property
    def direct_url(self) -> str:
        return f"unix://{self.socket}"

    # -- set-up and tear-down

    def code_files(self) -> dict[str, float]:
        """The files a worker runs (gpuboss's modules and scripts): path -> mtime."""
        gpuboss_dir = Path(gpuboss.__file__).resolve().parent
        paths = [*gpuboss_dir.glob("*.py"), *Path(str(lua_dir())).rglob("*.lua")]
        return {str(p): p.stat().st_mtime for p in paths if p.is_file()}

    def changed_code(self) -> list[str]:
        """Files of gpuboss that changed (or appeared, or went) since the run began: its figures are suspect."""
        now = self.code_files()
        changed = {p for p in set(now) | set(self.code) if now.get(p) != self.code.get(p)}
        return sorted(os.path.relpath(p, ROOT) for p in changed)

    def start(self) -> None:
        self.code = self.code_files()
        self.server = start_redis(self.workdir, socket=self.socket, port=self.port)
        self.direct = connect(self.direct_url)
        self.proxy = Proxy("127.0.0.1", self.port).start()
        spec = {
            "url": self.direct_url,
            "namespace": self.namespace,
            "out": str(self.workdir / "observer.json"),
            "rules": stored_rules(self.plan.rules),
        }
        spec_path = self.workdir / "observer.spec.json"
        spec_path.write_text(json.dumps(spec))
        with (self.workdir / "observer.err").open("wb") as err:
            self.observer = subprocess.Popen(
                [sys.executable, "-m", "bench.chaos", "--observe", str(spec_path)],
                cwd=ROOT,
                env=worker_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        for i in range(self.plan.workers):
            self.spawn("async" if i < self.plan.async_workers else "sync")
        for _ in range(self.plan.registry_clients):
            self.spawn("registry")
        self.wait_started(self.workers)

    def spawn(self, kind: str) -> Worker:
        assert self.proxy is not None
        index = len(self.workers)
        path = self.workdir / f"w{index:03d}.jsonl"
        spec = {
            "url": self.proxy.url,
            "namespace": self.namespace,
            "gpus": [] if kind == "registry" else GPUS,
            "kind": kind,
            "tasks": self.plan.tasks,
            "seed": self.rng.randrange(2**32),
            "log": str(path),
            "ttl": TTL_RANGE_S,
            "hold_ms": self.plan.hold_ms,
            "rules": self.plan.rules,
        }
        with (self.workdir / f"w{index:03d}.err").open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "bench.chaos_worker", json.dumps(spec)],
                cwd=ROOT,
                env=worker_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        worker = Worker(index, kind, proc, path, time.monotonic())
        self.workers.append(worker)
        return worker

    def wait_started(self, workers: list[Worker]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        waiting = list(workers)
        while waiting:
            waiting = [w for w in waiting if not (w.log.exists() and w.log.stat().st_size > 0)]
            for w in waiting:
                if w.proc.poll() is not None:
                    raise RuntimeError(f"worker {w.index} exited at start: {self.stderr_of(w)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(waiting)} workers did not start within {START_TIMEOUT_S:g} s")
            time.sleep(0.05)

    def stderr_of(self, w: Worker) -> str:
        path = self.workdir / f"w{w.index:03d}.err"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def close(self) -> None:
        for w in self.workers:
            if w.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGCONT)
                w.proc.kill()
                w.proc.wait()
        if self.observer is not None and self.observer.poll() is None:
            self.observer.kill()
            self.observer.wait()
        if self.proxy is not None:
            self.proxy.stop()
        if self.direct is not None:
            self.direct.close()
        if self.server is not None:
            self.server.stop()

    # -- the run

    def live(self, now: float) -> list[Worker]:
        """Workers that may be picked for a fault now."""
        return [w for w in self.workers if w.proc.poll() is None and not w.stopped and w.protect_until <= now]

    def run(self) -> None:
        self.began = time.monotonic()
        end = self.began + self.plan.duration
        must = list(self.plan.kinds)
        self.rng.shuffle(must)
        next_fault = self.began + 1.0
        log(f"running for {self.plan.duration:g} s; faults about every {self.plan.fault_every:g} s")
        while True:
            now = time.monotonic()
            if now >= end:
                break
            self.tick(now)
            if now >= max(next_fault, self.quiet_until) and self.full is None:
                done = self.inject(must)
                gap = self.rng.expovariate(1 / self.plan.fault_every) if done else 0.3
                if must:  # kinds not injected yet: leave each of them a slot before the end (a long draw would not)
                    gap = min(gap, (end - time.monotonic()) / (len(must) + 1))
                next_fault = time.monotonic() + max(MIN_FAULT_GAP_S if done else 0.3, gap)
            time.sleep(0.02)
        while self.full is not None:  # give Redis its memory back, as planned
            self.tick(time.monotonic())
            time.sleep(0.02)
        if self.stopped is not None:  # finish the stop in progress, as planned
            cont_at = self.stopped.info["cont_at"]
            while time.monotonic() < cont_at:
                self.tick(time.monotonic())
                time.sleep(0.02)
            self.tick(time.monotonic())
        settle = time.monotonic() + 2.0
        while time.monotonic() < settle:
            self.tick(time.monotonic())
            time.sleep(0.02)
        self.ended = time.monotonic()

    def tick(self, now: float) -> None:
        """Continue a stopped holder when due; give Redis its memory back when due; replace a worker that died by
        itself."""
        if self.full is not None and now >= self.full.info["end_at"]:
            assert self.direct is not None
            with contextlib.suppress(RedisError, OSError):
                self.direct.config_set("maxmemory", 0)
            self.full.info["t_end"] = time.monotonic()
            self.quiet_until = self.full.info["t_end"] + FULL_AFTER_S
            self.full = None
        if self.stopped is not None and now >= self.stopped.info["cont_at"]:
            fault, self.stopped = self.stopped, None
            worker = self.by_pid(fault.info["pid"])
            os.kill(fault.info["pid"], signal.SIGCONT)
            fault.info["t_cont"] = time.monotonic()
            if worker is not None:
                worker.stopped = False
                worker.protect_until = fault.info["t_cont"] + PROTECT_S
        for w in self.workers:
            if w.killed is None and w.exited is None and w.proc.poll() is not None:
                w.exited = now
                self.crashed.append(f"worker {w.index} (pid {w.pid}) exited by itself: {w.proc.returncode}")
                log(self.crashed[-1])
                self.spawn(w.kind)

    def by_pid(self, pid: int) -> Worker | None:
        return next((w for w in self.workers if w.pid == pid), None)

    def inject(self, must: list[str]) -> bool:
        if must:
            order = list(must)
        else:
            kinds = list(self.plan.kinds)
            order = self.rng.choices(kinds, weights=[WEIGHTS[k] for k in kinds], k=1)
        for kind in order:
            self.attempts[kind] += 1
            fault = getattr(self, kind)()
            if fault is not None:
                self.faults.append(fault)
                if kind in must:
                    must.remove(kind)
                return True
        return False

    def records(self, which: str) -> dict[str, tuple[int, dict[str, Any]]]:
        """Lease or request records (id -> (pid, record)), read directly; {} when Redis does not answer."""
        assert self.direct is not None
        key = self.keys.leases if which == "leases" else self.keys.tickets
        try:
            flat = self.direct.hgetall(key)
        except (RedisError, OSError):
            return {}
        out = {}
        for item_id, raw in flat.items():
            found = pid_of(str(raw))
            if found is not None:
                out[str(item_id)] = found
        return out

    def pick(self, which: str) -> tuple[Worker, list[str]] | None:
        now = time.monotonic()
        live = {w.pid: w for w in self.live(now)}
        by_pid: dict[int, list[str]] = defaultdict(list)
        for item_id, (pid, _rec) in self.records(which).items():
            if pid in live:
                by_pid[pid].append(item_id)
        if not by_pid:
            return None
        pid = self.rng.choice(sorted(by_pid))
        return live[pid], by_pid[pid]

    def kill(self, which: str, kind: str) -> Fault | None:
        picked = self.pick(which)
        if picked is None:
            return None
        worker, ids = picked
        worker.proc.kill()  # SIGKILL, by PID
        t = time.monotonic()
        worker.proc.wait()
        worker.killed = t
        new = self.spawn(worker.kind)
        return Fault(kind, t, {"pid": worker.pid, "ids": ids, "worker_kind": worker.kind, "replacement": new.index})

    def kill_holder(self) -> Fault | None:
        return self.kill("leases", "kill_holder")

    def kill_waiter(self) -> Fault | None:
        return self.kill("tickets", "kill_waiter")

    def stop_holder(self) -> Fault | None:
        if self.stopped is not None:
            return None
        picked = self.pick("leases")
        if picked is None:
            return None
        worker = picked[0]
        os.kill(worker.pid, signal.SIGSTOP)
        t = time.monotonic()
        worker.stopped = True
        time.sleep(0.1)  # a call it sent before it stopped lands; what it holds now is frozen
        frozen = [
            {"id": i, "tok": int(rec["token"]), "gpu": rec["gpu"], "ttl_ms": int(rec["ttl_ms"])}
            for i, (pid, rec) in self.records("leases").items()
            if pid == worker.pid
        ]
        if not frozen:  # it released just before it stopped: not a holder after all
            os.kill(worker.pid, signal.SIGCONT)
            worker.stopped = False
            return None
        cont_at = t + max(f["ttl_ms"] for f in frozen) / 1000 + STOP_MARGIN_S
        fault = Fault("stop_holder", t, {"pid": worker.pid, "leases": frozen, "cont_at": cont_at})
        self.stopped = fault
        return fault

    def proxy_drop(self) -> Fault | None:
        assert self.proxy is not None
        now = time.monotonic()
        pids = [w.pid for w in self.workers if w.proc.poll() is None and not w.stopped]
        cut = self.proxy.cut()
        return Fault("proxy_drop", time.monotonic(), {"cut": cut, "pids": pids, "t_before": now})

    def script_flush(self) -> Fault | None:
        assert self.direct is not None
        try:
            t = time.monotonic()
            self.direct.script_flush()  # the workers' EVALSHA (a server without functions)
            with contextlib.suppress(ResponseError):  # no FUNCTION command before Redis 7
                self.direct.function_flush()  # their FCALL (Redis and Valkey 7 or later)
        except (RedisError, OSError):
            return None
        return Fault("script_flush", t)

    def redis_full(self) -> Fault | None:
        assert self.direct is not None
        held = [
            {"id": i, "pid": pid, "tok": int(rec["token"])}
            for i, (pid, rec) in self.records("leases").items()
            if (w := self.by_pid(pid)) is not None and not w.stopped and w.killed is None
        ]
        if not held:  # nobody to show that a lease outlives it
            return None
        try:
            self.direct.config_set("maxmemory-policy", "noeviction")
            t = time.monotonic()
            self.direct.config_set("maxmemory", 1)
        except (RedisError, OSError):
            return None
        fault = Fault("redis_full", t, {"leases": held, "end_at": t + FULL_S})
        self.full = fault
        return fault

    def redis_restart(self) -> Fault | None:
        assert self.server is not None
        held = [
            {"id": i, "pid": pid, "tok": int(rec["token"]), "gpu": rec["gpu"]}
            for i, (pid, rec) in self.records("leases").items()
        ]
        t, wall = time.monotonic(), time.time()
        os.kill(self.server.pid, signal.SIGKILL)  # by PID
        if self.server.process is not None:
            self.server.process.wait()
        self.server = start_redis(self.workdir, socket=self.socket, port=self.port)
        self.restarts += 1
        return Fault("redis_restart", t, {"leases": held, "wall": wall, "t_ready": time.monotonic()})

    # -- the end

    def finish(self) -> None:
        """Stop the workers, let the TTLs run out, collect, and look for leaked keys."""
        live = [w for w in self.workers if w.proc.poll() is None]
        for w in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.pid, signal.SIGTERM)
        deadline = time.monotonic() + EXIT_TIMEOUT_S
        for w in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        hung = [w for w in live if w.proc.poll() is None]
        for w in hung:
            self.hung.append(w.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.pid, signal.SIGUSR1)  # its stacks, into its .err file
        if hung:
            time.sleep(0.5)
        for w in hung:
            w.proc.kill()
            w.proc.wait()
            log(f"worker {w.index} (pid {w.pid}) hung at the end; its stacks: {self.stderr_of(w)[-1500:]}")
        for w in live:
            w.exited = time.monotonic()
            if w.proc.returncode not in (0, -signal.SIGKILL) and w not in hung:
                self.crashed.append(f"worker {w.index} (pid {w.pid}) exited with {w.proc.returncode}")
        time.sleep(TTL_RANGE_S[1] + 0.5)  # every TTL has run out
        with GPUBoss(
            self.direct_url, namespace=self.namespace, gpus=GPUS, service="chaos-gc", **self.plan.rules
        ) as boss:
            for _ in range(100):
                got = boss.collect()
                if not any(got.values()):
                    break
        assert self.direct is not None
        left = {str(k) for k in self.direct.scan_iter(match=self.keys.pattern)}
        self.leaked = sorted(left - set(self.keys.fixed()))
        self.used_left = {str(k): int(v) for k, v in self.direct.hgetall(self.keys.used).items() if int(v) != 0}
        time.sleep(0.3)  # the observer looks at the final state too
        assert self.observer is not None
        self.observer.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.observer.wait(timeout=20)


# ---------------------------------------------------------------- analysis


def read_events(path: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))  # the last line of a killed worker may be cut short
    return out


def quantiles(seconds: list[float]) -> dict[str, Any]:
    if not seconds:
        return {"n": 0, "p50_ms": None, "max_ms": None}
    ordered = sorted(s * 1000 for s in seconds)
    return {"n": len(ordered), "p50_ms": round(percentile(ordered, 0.5), 1), "max_ms": round(ordered[-1], 1)}


@dataclass
class Logs:
    """What the workers wrote, indexed for the checks (times on ``time.monotonic()``)."""

    #: (t, t0, lease id, token, gpu) of every grant, by t
    grants: list[tuple[float, float, str, int, str]] = field(default_factory=list)
    #: pid -> (sent, answered) of every script call, by sent
    calls: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    #: pid -> (lease id, token) -> when on_lost ran
    lost: dict[int, dict[tuple[str, int], float]] = field(default_factory=lambda: defaultdict(dict))
    #: gpu -> (grant returned, release called, MiB) of every lease whose release() answered True
    held: dict[str, list[tuple[float, float, int]]] = field(default_factory=lambda: defaultdict(list))
    #: pid -> lease id -> [(t, release() answer)]
    released: dict[int, dict[str, list[tuple[float, bool]]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list))
    )
    #: pid -> lease id -> when its release() raised RedisUnavailable (given back while Redis was unreachable)
    gave_back: dict[int, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))
    #: pid -> (lease id, token) -> the heartbeat's verdict after the hold was paused (SIGSTOP)
    pauses: dict[int, dict[tuple[str, int], str]] = field(default_factory=lambda: defaultdict(dict))
    #: pid -> the (lease id, token) its acquire() calls returned
    received: dict[int, set[tuple[str, int]]] = field(default_factory=lambda: defaultdict(set))
    #: pid -> when it was killed or ended
    alive_until: dict[int, float] = field(default_factory=dict)
    #: pid -> (SIGSTOP, SIGCONT) times of the stop faults it went through
    stops: dict[int, list[tuple[float, float]]] = field(default_factory=lambda: defaultdict(list))
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    errors: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, chaos: Chaos) -> Logs:
        logs = cls()
        for w in chaos.workers:
            logs.alive_until[w.pid] = w.killed or w.exited or chaos.ended
            mine = []
            granted: dict[str, tuple[float, str, int]] = {}
            for ev in read_events(w.log):
                kind = ev.get("e")
                if kind == "c":
                    mine.append((ev["a"], ev["b"]))
                    continue
                logs.counts[str(kind)] += 1
                if kind == "grant":
                    logs.grants.append((ev["t"], ev["t0"], ev["id"], ev["tok"], ev["gpu"]))
                    logs.received[w.pid].add((ev["id"], ev["tok"]))
                    granted[ev["id"]] = (ev["t"], ev["gpu"], ev["mib"])
                elif kind == "lost":
                    logs.lost[w.pid].setdefault((ev["id"], ev["tok"]), ev["t"])
                elif kind == "rel":
                    logs.released[w.pid][ev["id"]].append((ev["t"], bool(ev["ok"])))
                    got = granted.pop(ev["id"], None)
                    if ev["ok"] and got is not None and "r0" in ev:
                        logs.held[got[1]].append((got[0], ev["r0"], got[2]))
                elif kind == "error":
                    logs.errors.append(f"pid {w.pid}: {ev['what']}")
                elif kind == "unavailable":
                    logs.counts[f"unavailable_{ev.get('op')}"] += 1
                    if ev.get("op") == "release" and "id" in ev:
                        logs.gave_back[w.pid].setdefault(ev["id"], ev["t"])
                elif kind == "pause":
                    logs.pauses[w.pid][(ev["id"], ev["tok"])] = str(ev["verdict"])
            logs.calls[w.pid] = sorted(mine)
        logs.grants.sort()
        for f in chaos.faults:
            if f.kind == "stop_holder":
                logs.stops[f.info["pid"]].append((f.t, f.info.get("t_cont", chaos.ended)))
        return logs

    def awake(self, pid: int, t: float) -> float:
        """``t``, or when ``pid`` was continued if it was stopped at ``t``."""
        return next((cont for stop, cont in self.stops[pid] if stop <= t < cont), t)

    def next_grant(self, t: float) -> float | None:
        """Seconds from ``t`` to the first grant returned to an acquire() called at ``t`` or later."""
        start = bisect.bisect_left(self.grants, (t,))
        return next((g[0] - t for g in self.grants[start:] if g[1] >= t), None)

    def first_grant_on(self, gpu: str, t: float) -> float | None:
        """When the first acquire() called at ``t`` or later returned a lease on ``gpu``."""
        start = bisect.bisect_left(self.grants, (t,))
        return next((g[0] for g in self.grants[start:] if g[1] >= t and g[4] == gpu), None)


@dataclass
class Tally:
    must: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    notes: list[str] = field(default_factory=list)
    #: fault kind -> how holders were told that their lease was lost: by on_lost, or by release() answering False
    told: dict[str, dict[str, int]] = field(
        default_factory=lambda: {k: {"on_lost": 0, "release": 0} for k in ("stop_holder", "redis_restart")}
    )
    #: restart: per wiped lease whose holder was told, how long its VRAM was granted again before that (s)
    regranted: list[float] = field(default_factory=list)
    wiped: int = 0


def client_over_commits(logs: Logs, tally: Tally) -> int:
    """Leases as their holders saw them: from acquire() returning to release() being called, for every lease
    whose release answered True (it was live in Redis all along). Per GPU they must never add up to more
    than capacity minus reserve. Leases that ended lost (a pause, a restart) are left out: their holders
    overlapping with later grants is what losing a lease means."""
    leasable = {g["id"]: gb_to_mib(g["vram_gb"]) - gb_to_mib(g.get("reserve_gb", 0)) for g in GPUS}
    found = 0
    for gpu, spans in logs.held.items():
        steps = sorted([(a, m) for a, _b, m in spans] + [(b, -m) for _a, b, m in spans], key=lambda s: (s[0], s[1]))
        total = 0
        for t, delta in steps:
            total += delta
            if total > leasable.get(gpu, 0):
                found += 1
                tally.notes.append(f"{gpu}: holders held {total} MiB at t={t:.3f} (> {leasable.get(gpu)} MiB)")
    return found


def analyze(chaos: Chaos) -> dict[str, Any]:
    obs_path = chaos.workdir / "observer.json"
    observer: dict[str, Any] = json.loads(obs_path.read_text()) if obs_path.exists() else {}
    logs = Logs.read(chaos)
    obs_leases: dict[str, list[Any]] = observer.get("leases", {})
    obs_tickets: dict[str, list[Any]] = observer.get("tickets", {})
    by_kind: dict[str, list[Fault]] = defaultdict(list)
    for f in chaos.faults:
        by_kind[f.kind].append(f)
    tally = Tally()
    faults_out: dict[str, Any] = {}
    for kind in KINDS:
        nexts, own = [], []
        for f in by_kind[kind]:
            gap = logs.next_grant(f.t)
            if gap is not None:
                nexts.append(gap)
            if kind in ("kill_holder", "kill_waiter"):
                pid = f.info["pid"]
                rows = [v for v in obs_leases.values() if v[0] == pid and v[5] >= f.t]
                rows += [v for v in obs_tickets.values() if v[0] == pid and v[2] >= f.t]
                last = max((v[-1] for v in rows), default=f.t)
                own.append(last - f.t)
            elif kind == "stop_holder":
                own += check_stop(f, logs, obs_leases, tally)
            elif kind == "proxy_drop":
                for pid in f.info["pids"]:
                    mine = logs.calls.get(pid, [])
                    i = bisect.bisect_left(mine, (f.t, 0.0))
                    if i < len(mine) and mine[i][1] <= logs.alive_until[pid]:
                        own.append(mine[i][1] - f.t)
            elif kind == "script_flush":
                answered = [c[i][1] for c in logs.calls.values() if (i := bisect.bisect_left(c, (f.t, 0.0))) < len(c)]
                if answered:
                    own.append(min(answered) - f.t)
            elif kind == "redis_restart":
                own += check_restart(f, logs, tally)
            elif kind == "redis_full":
                own += check_full(f, logs, tally)
        faults_out[kind] = {
            "injected": len(by_kind[kind]),
            "attempts": chaos.attempts.get(kind, 0),
            "next_grant": quantiles(nexts),
            "recovery": {"what": RECOVERY[kind], **quantiles(own)},
        }
        if not by_kind[kind] and kind in chaos.plan.kinds:
            tally.must["fault_kinds_not_injected"] += 1
    violations = observer.get("violations", {})
    zero = {
        "over_commit_events": violations.get("over_commit_events", 0),
        "client_over_commits": client_over_commits(logs, tally),
        "stranded_waiters": violations.get("stranded_waiters", 0),
        "leaked_keys": len(chaos.leaked) + len(chaos.used_left),
        "counter_mismatches": violations.get("counter_mismatches", 0),
        "index_mismatches": violations.get("index_mismatches", 0),
        "rules_lost": violations.get("rules_lost", 0),
        "token_regressions": violations.get("token_regressions", 0),
        "stale_tokens_not_superseded": tally.must["stale_tokens_not_superseded"],
        "stale_leases_renewed": tally.must["stale_leases_renewed"],
        "lost_leases_not_reported": tally.must["lost_leases_not_reported"],
        "leases_lost_to_a_full_redis": tally.must["leases_lost_to_a_full_redis"],
        "worker_errors": len(logs.errors) + len(chaos.crashed),
        "hung_workers": len(chaos.hung),
        "fault_kinds_not_injected": tally.must["fault_kinds_not_injected"],
        "observer_failures": 0 if observer else 1,
    }
    counts = logs.counts
    acquires = counts["grant"] + counts["timeout"] + counts["unavailable_acquire"]
    report = {
        "duration_s": round(chaos.ended - chaos.began, 1),
        "namespace": chaos.namespace,
        "seed": chaos.plan.seed,
        "workers": {
            "initial": chaos.plan.workers,
            "registry_clients": chaos.plan.registry_clients,
            "async": chaos.plan.async_workers,
            "tasks_per_async": chaos.plan.tasks,
            "started": len(chaos.workers),
        },
        "rules": chaos.plan.rules,
        "hold_ms": list(chaos.plan.hold_ms),
        "operations": acquires + counts["rel"] + counts["unavailable_release"],
        "acquires": acquires,
        "releases": counts["rel"],
        "grants": counts["grant"],
        "timeouts": counts["timeout"],
        "redis_unavailable": counts["unavailable"],
        "leases_lost": counts["lost"],
        "lost_told": tally.told,
        "restart_regranted": {
            "wiped_leases": tally.wiped,
            "regranted_before_told": len(tally.regranted),
            **quantiles(tally.regranted),
        },
        "pauses_seen": counts["pause"],
        "script_calls": sum(len(c) for c in logs.calls.values()),
        "observer": {k: observer.get(k) for k in OBSERVER_FIGURES},
        "faults": faults_out,
        "must_be_zero": zero,
        "details": {
            **observer.get("details", {}),
            "leaked_keys": chaos.leaked[:20] + [f"used {k}={v}" for k, v in chaos.used_left.items()],
            "worker_errors": chaos.crashed[:DETAILS] + summarize_errors(logs.errors),
            "hung_workers": [str(p) for p in chaos.hung],
            "notes": tally.notes[:20],
        },
    }
    report["code_changed_during_run"] = chaos.changed_code()
    report["ok"] = not any(zero.values())
    return report


def summarize_errors(errors: list[str]) -> list[str]:
    """Worker errors grouped by their last line (the exception), most frequent first, with one full example."""
    groups: dict[str, list[str]] = defaultdict(list)
    for err in errors:
        groups[err.strip().splitlines()[-1][:300]].append(err)
    out = []
    for last, items in sorted(groups.items(), key=lambda kv: -len(kv[1]))[:DETAILS]:
        out.append(f"{len(items)} x {last}")
    if groups:
        example = max(groups.values(), key=len)[0]
        out.append("first of the most frequent, in full:\n" + example[-1500:])
    return out


def check_stop(f: Fault, logs: Logs, obs_leases: dict[str, list[Any]], tally: Tally) -> list[float]:
    """The stopped holder was told of each frozen lease, and a newer lease on that GPU outranks its token."""
    pid, t_cont = f.info["pid"], f.info.get("t_cont")
    out = []
    for frozen in f.info["leases"]:
        lease_id, tok, gpu = frozen["id"], frozen["tok"], frozen["gpu"]
        at = logs.lost[pid].get((lease_id, tok))
        late = [t for t, ok in logs.released[pid].get(lease_id, []) if not ok and t_cont is not None and t >= t_cont]
        if logs.pauses[pid].get((lease_id, tok)) == "renewed":
            tally.must["stale_leases_renewed"] += 1
            tally.notes.append(f"stop_holder: lease {lease_id} of pid {pid} was renewed after a pause past its TTL")
        if t_cont is not None and at is not None:
            out.append(max(0.0, at - t_cont))
            tally.told["stop_holder"]["on_lost"] += 1
        elif t_cont is not None and late:
            out.append(late[0] - t_cont)
            tally.told["stop_holder"]["release"] += 1
        else:
            tally.must["lost_leases_not_reported"] += 1
            tally.notes.append(f"stop_holder: pid {pid} was never told that lease {lease_id} (token {tok}) was lost")
        seen = obs_leases.get(f"{lease_id}/{tok}")
        gone = seen[5] if seen else f.t
        newer = [v[2] for v in obs_leases.values() if v[1] == gpu and v[4] > gone]
        newer += [g[3] for g in logs.grants if g[4] == gpu and g[1] > gone]
        if not newer or min(newer) <= tok:
            tally.must["stale_tokens_not_superseded"] += 1
            tally.notes.append(f"stop_holder: lease {lease_id} token {tok} on {gpu}: later there {sorted(newer)[:3]}")
    return out


def check_full(f: Fault, logs: Logs, tally: Tally) -> list[float]:
    """A redis_full fault: no lease held when it began may be lost to it (its holder alive and not stopped, and
    finding it lost, by on_lost or a release answering False, before FULL_AFTER_S past its end). Returns the
    time from the end to the next grant."""
    end = f.info.get("t_end", f.info["end_at"])
    for held in f.info["leases"]:
        pid = held["pid"]
        if logs.alive_until.get(pid, 0) < end + FULL_AFTER_S or any(a < end and b > f.t for a, b in logs.stops[pid]):
            continue  # killed, or stopped, meanwhile: a loss is another fault's
        when = [logs.lost[pid].get((held["id"], held["tok"]))]
        when += [t for t, ok in logs.released[pid].get(held["id"], []) if not ok]
        lost = [t for t in when if t is not None and f.t <= t <= end + FULL_AFTER_S]
        if lost:
            tally.must["leases_lost_to_a_full_redis"] += 1
            tally.notes.append(f"lease {held['id']} of pid {pid} lost {min(lost) - f.t:.3f} s into a full Redis")
    gap = logs.next_grant(end)
    return [] if gap is None else [gap]


def check_restart(f: Fault, logs: Logs, tally: Tally) -> list[float]:
    """Every holder of a lease wiped by the restart is told (on_lost, or release() answering False); and how
    long the new server had already granted that lease's GPU to someone else by then."""
    out = []
    for held in f.info["leases"]:
        pid, lease_id, tok, gpu = held["pid"], held["id"], held["tok"], held["gpu"]
        if pid not in logs.alive_until or (lease_id, tok) not in logs.received[pid]:
            continue  # not one of ours, or granted but never taken (its waiter asked again on the new server)
        at = logs.lost[pid].get((lease_id, tok))
        rels = [(t, ok) for t, ok in logs.released[pid].get(lease_id, []) if t >= f.t - 1.0]
        if at is not None and at >= f.t:
            tally.told["redis_restart"]["on_lost"] += 1
        elif rels and not rels[0][1]:
            at = max(f.t, rels[0][0])
            tally.told["redis_restart"]["release"] += 1
        elif rels and rels[0][1]:
            continue  # its release landed before the kill
        elif logs.gave_back[pid].get(lease_id, f.t - 2.0) >= f.t - 1.0:
            continue  # it gave the lease back while Redis was down (release() raised RedisUnavailable): it holds
            # nothing to be told about, and the heartbeat sends that release once Redis is back
        elif logs.alive_until[pid] < f.t + 5.0:
            continue  # killed (or ended) before it could be told
        else:
            tally.must["lost_leases_not_reported"] += 1
            tally.notes.append(f"redis_restart: pid {pid} was never told that lease {lease_id} (token {tok}) was lost")
            continue
        awake = logs.awake(pid, f.t)
        out.append(at - awake)  # a holder stopped meanwhile is told once it runs again
        if awake != f.t:
            continue  # stopped past its TTL: it lost the lease to the stop anyway
        tally.wiped += 1
        regranted = logs.first_grant_on(gpu, f.t)
        if regranted is not None and regranted < at:
            tally.regranted.append(at - regranted)
    return out


# ---------------------------------------------------------------- report


def fmt_ms(q: dict[str, Any]) -> str:
    if not q["n"]:
        return "-"
    return f"{q['p50_ms']:.0f} / {q['max_ms']:.0f}"


def render(report: dict[str, Any]) -> str:
    w = report["workers"]
    told = report["lost_told"]
    lines = [
        f"gpuboss chaos: {report['duration_s']} s, {w['initial']} workers ({w['initial'] - w['async']} GPUBoss, "
        f"{w['async']} AsyncGPUBoss x {w['tasks_per_async']} tasks) + {w['registry_clients']} registry clients, "
        f"{w['started']} started in all; seed {report['seed']}; rules "
        f"{', '.join(f'{k}: {v}' for k, v in report['rules'].items()) or 'the defaults'}; holds "
        f"{report['hold_ms'][0]:g} to {report['hold_ms'][1]:g} ms",
        f"operations {report['operations']} (grants {report['grants']}, releases {report['releases']}, "
        f"timeouts {report['timeouts']}, Redis unavailable {report['redis_unavailable']}), "
        f"script calls {report['script_calls']}",
        f"leases lost {report['leases_lost']}; holders told by on_lost / by release() answering False: stop_holder "
        f"{told['stop_holder']['on_lost']} / {told['stop_holder']['release']}, redis_restart "
        f"{told['redis_restart']['on_lost']} / {told['redis_restart']['release']}",
        f"observer: {report['observer']['snapshots']} snapshots, "
        f"{report['observer']['failed_reads']} failed reads, longest blind {report['observer']['longest_blind_s'] or 0:.2f} s; "
        f"a request due in {report['observer']['due_snapshots']} ({report['observer']['due_behind_head']} behind the "
        f"head), the longest seen waiting {report['observer']['longest_due_s'] or 0:.2f} s",
        f"redis_restart: {report['restart_regranted']['wiped_leases']} leases wiped; the GPU of "
        f"{report['restart_regranted']['regranted_before_told']} was granted again before their holder was told, "
        f"for p50/max {fmt_ms(report['restart_regranted'])} ms (no persistence: see docs/reliability.md)",
        "",
    ]
    head = ("fault", "injected", "next grant p50/max ms", "recovery", "p50/max ms", "n")
    rows = [head]
    for kind, f in report["faults"].items():
        rec = f["recovery"]
        rows.append((kind, str(f["injected"]), fmt_ms(f["next_grant"]), rec["what"], fmt_ms(rec), str(rec["n"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        lines.append(
            "  ".join(c.rjust(widths[i]) if i in (1, 2, 4, 5) else c.ljust(widths[i]) for i, c in enumerate(r))
        )
    lines.append("")
    lines.append("must be 0")
    for name, value in report["must_be_zero"].items():
        lines.append(f"  {name.replace('_', ' '):<30} {value}{'' if value == 0 else '   <-- FAIL'}")
    for name, items in report["details"].items():
        if items and report["must_be_zero"].get(name, 1) != 0:
            lines.append(f"  {name}:")
            lines += [f"    {item}" for item in items]
    if report.get("code_changed_during_run"):
        lines.append("")
        lines.append(
            "WARNING: gpuboss changed while this ran (workers started later ran other code): "
            + ", ".join(report["code_changed_during_run"][:10])
        )
    lines.append("")
    lines.append("RESULT: " + ("PASS" if report["ok"] else "FAIL"))
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of faults (default 180)")
    parser.add_argument("--workers", type=int, default=16, help="worker processes (default 16)")
    parser.add_argument("--async-workers", type=int, default=None, help="how many are AsyncGPUBoss (default 1/4)")
    parser.add_argument("--tasks", type=int, default=2, help="concurrent tasks per async worker (default 2)")
    parser.add_argument(
        "--registry-clients",
        type=int,
        default=0,
        help="extra GPUBoss workers that declare no GPU and use the namespace's registry (default 0)",
    )
    parser.add_argument(
        "--queueing",
        choices=("strict", "backfill"),
        help="every boss's queueing rule (default: none stored, so strict)",
    )
    parser.add_argument(
        "--overtake", type=int, metavar="N", help="every boss's overtake rule, 0 to 1000 (default: none)"
    )
    parser.add_argument(
        "--hold-ms",
        default=f"{HOLD_MS[0]:g},{HOLD_MS[1]:g}",
        metavar="MIN,MAX",
        help=f"how long a worker holds each lease, ms, drawn between the two (default {HOLD_MS[0]:g},{HOLD_MS[1]:g})",
    )
    parser.add_argument("--fault-every", type=float, default=2.5, help="mean seconds between faults (default 2.5)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    parser.add_argument(
        "--only", default=",".join(KINDS), help="the fault kinds to inject, comma-separated (default: all)"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--keep", action="store_true", help="keep the run folder (logs); kept anyway on failure")
    parser.add_argument("--observe", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.observe:
        return observe(args.observe)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    async_workers = args.async_workers if args.async_workers is not None else max(1, args.workers // 4)
    kinds = tuple(k for k in args.only.split(",") if k)
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        parser.error(f"--only: unknown fault kinds {unknown}; choose from {', '.join(KINDS)}")
    if args.overtake is not None and not 0 <= args.overtake <= 1000:
        parser.error(f"--overtake: {args.overtake} is not allowed; choose 0 to 1000")
    try:
        hold_ms = tuple(float(v) for v in args.hold_ms.split(","))
    except ValueError:
        hold_ms = ()
    if len(hold_ms) != 2 or not 0 <= hold_ms[0] <= hold_ms[1]:
        parser.error(f"--hold-ms: {args.hold_ms!r} is not allowed; give MIN,MAX in ms, 0 <= MIN <= MAX")
    workers = max(2, args.workers)
    plan = Plan(
        args.duration,
        workers,
        min(async_workers, workers),
        args.tasks,
        args.fault_every,
        seed,
        kinds,
        max(0, args.registry_clients),
        {k: v for k, v in (("queueing", args.queueing), ("overtake", args.overtake)) if v is not None},
        (hold_ms[0], hold_ms[1]),
    )
    workdir = Path(tempfile.mkdtemp(prefix="gpuboss-chaos-"))
    chaos = Chaos(plan, workdir)
    report: dict[str, Any] | None = None
    try:
        log(f"seed {seed}; folder {workdir}")
        chaos.start()
        log(f"redis-server pid {chaos.server.pid if chaos.server else '?'} on 127.0.0.1:{chaos.port}; "
            f"proxy on {chaos.proxy.port if chaos.proxy else '?'}; {plan.workers} workers started")  # fmt: skip
        chaos.run()
        log(f"faults stopped ({len(chaos.faults)} injected); stopping the workers")
        chaos.finish()
        faults = [{"kind": f.kind, "t": f.t, **f.info} for f in chaos.faults]
        (workdir / "faults.json").write_text(json.dumps(faults, indent=1))
        report = analyze(chaos)
    finally:
        chaos.close()
        if report is not None and report["ok"] and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"run folder kept: {workdir}")
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
