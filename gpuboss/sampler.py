"""The per-host sampler: one background thread per boss that registered GPUs discovered through NVML.

Every ``sample_interval_s`` it

1. beats for its host (``lua/hostbeat-22.lua``): the host's GPUs stay online, and the GPUs of hosts silent for
   ``host_timeout_s`` go offline;
2. reads NVML once (used memory and compute processes of every local GPU);
3. stores each local GPU's used memory (``lua/sample-22.lua``) if this process holds the right to sample that
   GPU (one process per GPU at a time, by a short Redis lease the holder renews with each reading; another
   process takes over when it lapses). Placement then counts ``max(leased, observed used)``; a lower reading
   serves the queue at once. The reading's max age is three intervals: after that placement ignores it;
4. compares this process's own NVML usage with the leases it holds (all bosses of the process together): a
   holder over budget (by more than ``alert_margin_gb``) gets a ``vram_alert`` event and a
   :class:`VramOverBudgetWarning` naming the lease and the amounts, once until it is back under budget or
   grows by another GiB.

Between rounds, a release of a lease on a local GPU that leaves requests waiting (and the hand-back of an
eviction) wakes the thread (:meth:`Sampler.poke`): it reads that GPU at once and stores the reading out of
turn, whoever holds the right to sample. Without it, the memory
the holder gave back would count as used until the next round, up to an interval later, and a waiter for it
would wait that long; with it, the waiter is served within an NVML read and a round trip of the release.

Why a thread and not a task: the same reason as the heartbeat (``heartbeat.py``): it must run while the
caller blocks its event loop with GPU work.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from gpuboss.config import gb_to_mib
from gpuboss.core import Call, Core
from gpuboss.inventory import VramAlert, VRAMStatus, statuses, vram_alerts
from gpuboss.lease import Lease
from gpuboss.nvml import NvmlSession, NvmlUnavailable
from gpuboss.redis_io import Rounds, call_script_sync, connect_sync

log = logging.getLogger("gpuboss")

#: A reading is ignored by placement after this many sample intervals.
MAX_AGE_PERIODS = 3
#: An over-budget holder is warned again once its usage grew by this much since the last warning.
REALERT_STEP_MIB = 1024


class VramOverBudgetWarning(UserWarning):
    """A process uses more VRAM on a GPU than its leases there grant (see :class:`~gpuboss.inventory.VramAlert`)."""


class SampleReply:
    """Reply codes of ``lua/sample-22.lua``."""

    UNKNOWN_GPU = -1
    OTHER = 0
    SAMPLING = 1
    OUT_OF_TURN = 2


def warn(message: str, category: type[Warning], stacklevel: int = 2) -> None:
    """Log ``message`` and issue it as a Python warning. Where warnings are errors (``-W error``), the
    error is not raised: it would cut a grant or a sampling round in half; the log has it."""
    log.warning(message)
    try:
        warnings.warn(message, category, stacklevel=stacklevel + 1)
    except category:
        log.debug("gpuboss: warnings are errors here; %s only logged", category.__name__)


def max_age_ms(interval_s: float) -> int:
    return max(1, round(MAX_AGE_PERIODS * interval_s * 1000))


def hostbeat_call(core: Core, host: str, timeout_ms: int) -> Call:
    """Beat for ``host``; mark hosts silent for ``timeout_ms`` offline (``lua/hostbeat-22.lua``)."""
    keys = core.keys
    return Call(
        "hostbeat",
        [*keys.state(), keys.hosts, *keys.event_keys()],
        [keys.wake_prefix, host, timeout_ms, core.config.events_maxlen],
    )


def sample_call(
    core: Core,
    gpu: str,
    sampler_id: str,
    used_mib: int | None,
    max_age: int,
    lease_ms: int,
    alerts: Sequence[VramAlert] = (),
    *,
    out_of_turn: bool = False,
) -> Call:
    """Store a reading of ``gpu`` (if ``sampler_id`` may sample it, or ``out_of_turn``: whoever may) and
    announce ``alerts`` (``lua/sample-22.lua``)."""
    keys = core.keys
    payload = (
        json.dumps(
            [
                {
                    "leases": list(a.lease_ids),
                    "pid": a.pid,
                    "host": a.host,
                    "leased_mib": a.leased_mib,
                    "used_mib": a.used_mib,
                }
                for a in alerts
            ]
        )
        if alerts
        else ""
    )
    return Call(
        "sample",
        [*keys.state(), keys.sampler(gpu), *keys.event_keys()],
        [
            keys.wake_prefix,
            gpu,
            sampler_id,
            "" if used_mib is None else int(used_mib),
            max_age,
            lease_ms,
            payload,
            "1" if out_of_turn else "",
            core.config.events_maxlen,  # (the last: lua/includes/emit.lua)
        ],
    )


@dataclass
class TickResult:
    """What one round did (for tests and ``gpu_check``)."""

    #: Redis time (ms) of the host beat.
    now_ms: int = 0
    #: GPU id -> True when this process samples it (its reading was stored), False when another one does.
    sampling: dict[str, bool] = field(default_factory=dict)
    #: GPU id -> the used MiB NVML read.
    used_mib: dict[str, int] = field(default_factory=dict)
    #: Queued requests granted because of this round (GPUs back online, lower readings).
    granted: int = 0
    #: GPUs of other hosts this round marked offline, and of this host back online.
    offline: int = 0
    online: int = 0
    alerts: list[VramAlert] = field(default_factory=list)
    statuses: list[VRAMStatus] = field(default_factory=list)
    #: Why there was no reading (NVML unavailable), else "".
    problem: str = ""


class Sampler:
    """The sampling and host-beat thread of one boss (see the module docstring)."""

    def __init__(
        self,
        core: Core,
        url: str,
        gpus: Sequence[str],
        held: Callable[[], list[Lease]],
        nvml: Any = None,
    ) -> None:
        self.core = core
        self.url = url
        self.gpus = list(gpus)
        self.nvml = nvml
        self._held = held
        #: Unique per process and boss: the value of the sampler keys this one holds.
        self.id = f"{core.host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        config = core.config
        self.interval_s = config.sample_interval_s
        self.max_age_ms = max_age_ms(self.interval_s)
        self.lease_ms = self.max_age_ms
        self.timeout_ms = max(1, round(config.host_timeout_s * 1000))
        self.margin_mib = gb_to_mib(config.alert_margin_gb)
        self._client: redis.Redis | None = None
        self._session: NvmlSession | None = None
        self._stop = threading.Event()
        #: Set by poke() and close(): the thread looks at _poked (and _stop) before its next round is due.
        self._wake = threading.Event()
        self._poked: set[str] = set()
        self._poke_lock = threading.Lock()  # (not _lock, held through NVML reads: a release never waits on one)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._alerted: dict[tuple[str, ...], int] = {}
        self._rounds = Rounds("sampler")
        self._nvml_problem = ""
        _LIVE.add(self)

    # -- life cycle

    def start(self) -> None:
        with self._lock:
            if self._stop.is_set() or self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="gpuboss-sampler", daemon=True)
            self._thread.start()

    def after_fork(self) -> None:
        """In a forked child (base.py): an id, a thread, locks and connections of its own (the parent's NVML
        session and Redis socket are left to it); a closed sampler stays closed."""
        stopped = self._stop.is_set()
        self.id = f"{self.core.host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._client = None
        self._session = None
        self._stop = threading.Event()
        if stopped:
            self._stop.set()
        self._wake = threading.Event()
        self._poked = set()
        self._poke_lock = threading.Lock()
        self._thread = None
        self._lock = threading.Lock()

    def close(self) -> None:
        """Stop the thread (the right to sample lapses by itself; the host's beat stops with the last process)."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        with self._lock:
            if self._session is not None:
                self._session.close()
                self._session = None
            if self._client is not None:
                self._client.close()
                self._client = None
        _LIVE.discard(self)

    def poke(self, gpus: Sequence[str]) -> None:
        """A lease on ``gpus`` was released in this process: read the local ones among them out of turn, now
        (in the thread; this returns at once)."""
        local = [g for g in gpus if g in self.gpus]
        if not local:
            return
        with self._poke_lock:
            self._poked.update(local)
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._rounds.run(self.tick)
            due = time.monotonic() + self.interval_s
            while not self._stop.is_set() and (left := due - time.monotonic()) > 0:
                if self._wake.wait(left):
                    self._wake.clear()
                    if not self._stop.is_set():
                        self._rounds.run(self.out_of_turn)
        if self._poked:  # a release just before close(): its reading still goes out
            self._rounds.run(self.out_of_turn)

    # -- one round

    def _connection(self) -> redis.Redis:
        if self._client is None:
            timeout = self.core.config.connect_timeout
            self._client = connect_sync(self.url, timeout, socket_timeout=timeout)
        return self._client

    def _read(self, only: Collection[str] | None = None) -> tuple[list[VRAMStatus], str]:
        with self._lock:
            if self._session is None:
                try:
                    self._session = NvmlSession.open(self.nvml)
                except NvmlUnavailable as err:
                    return [], str(err)
            sampling = self._session.sample(only)
        return statuses(sampling, host=self.core.host), "; ".join(sampling.problems)

    def beat(self) -> list[Any]:
        """Beat for this host now; the script's reply ``[now, offline, online, granted]``."""
        reply: list[Any] = call_script_sync(
            self._connection(), hostbeat_call(self.core, self.core.host, self.timeout_ms)
        )
        return reply

    def tick(self) -> TickResult:
        """One round: beat, read NVML, store the readings this process may store, announce alerts."""
        client = self._connection()
        result = TickResult()
        beat = self.beat()
        result.now_ms, result.offline, result.online, result.granted = (int(x) for x in beat[:4])
        found, problem = self._read()
        if problem != self._nvml_problem:
            if problem:
                log.warning("gpuboss: sampler: %s", problem)
            self._nvml_problem = problem
        result.problem = problem
        result.statuses = found
        mine = [s for s in found if s.id in self.gpus]
        alerts = self.alerts(mine)
        result.alerts = [a for batch in alerts.values() for a in batch]
        for status in mine:
            result.used_mib[status.id] = status.used_mib
            call = sample_call(
                self.core,
                status.id,
                self.id,
                status.used_mib,
                self.max_age_ms,
                self.lease_ms,
                alerts.get(status.id, ()),
            )
            reply = call_script_sync(client, call)
            code = int(reply[0])
            if code != SampleReply.UNKNOWN_GPU:
                result.sampling[status.id] = code == SampleReply.SAMPLING
                result.granted += int(reply[1])
        for alert in result.alerts:
            warn(f"gpuboss: {alert.message}", VramOverBudgetWarning)
        return result

    def out_of_turn(self) -> TickResult:
        """Read the GPUs poked since the last call and store their readings out of turn (no beat, no alerts):
        a lower reading serves the queue at once."""
        with self._poke_lock:
            poked, self._poked = self._poked, set()
        result = TickResult()
        if not poked:
            return result
        found, result.problem = self._read(poked)  # (NVML reads only those GPUs)
        client = self._connection()
        for status in found:
            result.used_mib[status.id] = status.used_mib
            call = sample_call(
                self.core, status.id, self.id, status.used_mib, self.max_age_ms, self.lease_ms, out_of_turn=True
            )
            reply = call_script_sync(client, call)
            if int(reply[0]) == SampleReply.OUT_OF_TURN:
                result.granted += int(reply[1])
        return result

    # -- over budget

    def alerts(self, found: Sequence[VRAMStatus]) -> dict[str, list[VramAlert]]:
        """New alerts for leases of this boss, by GPU: this process's NVML usage against every lease the
        process holds (all its bosses), so two bosses sharing a GPU are not each found over budget."""
        own = {lease.id for lease in self._held()}
        everything: dict[str, Lease] = {}
        for sampler in list(_LIVE):
            for lease in sampler._held():
                everything[lease.id] = lease
        pid = os.getpid()
        mine = [lease for lease in everything.values() if lease.pid == pid and lease.host == self.core.host]
        over = vram_alerts(found, mine, tolerance_mib=self.margin_mib)
        current: dict[tuple[str, ...], int] = {}
        out: dict[str, list[VramAlert]] = {}
        for alert in over:
            if alert.lease_ids[0] not in own:
                continue  # another boss of this process holds the first lease: it announces this one
            current[alert.lease_ids] = alert.used_mib
            last = self._alerted.get(alert.lease_ids)
            if last is None or alert.used_mib >= last + REALERT_STEP_MIB:
                out.setdefault(alert.gpu, []).append(alert)
            else:
                current[alert.lease_ids] = last
        self._alerted = current
        return out


_LIVE: weakref.WeakSet[Sampler] = weakref.WeakSet()


def live_samplers() -> list[Sampler]:
    """The samplers running in this process."""
    return list(_LIVE)


def observed(raw: Mapping[str, str], now_ms: int) -> dict[str, int]:
    """The fresh readings of an observed hash (gpu -> "used_mib,sampled_at_ms,max_age_ms") at ``now_ms``, as
    placement reads them (``lua/includes/state.lua``): readings older than their max age are left out."""
    out = {}
    for gpu, value in raw.items():
        parts = str(value).split(",")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            continue
        used, at, age = (int(p) for p in parts)
        if now_ms - at <= age:
            out[gpu] = used
    return out
