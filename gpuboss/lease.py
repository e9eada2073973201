"""The lease state machine, :class:`Lease` and the :class:`Device` string handed to a ``with`` block.

A request and the lease it becomes move through these states; every change goes through
:func:`advance`, so an impossible change (a released lease granted again, say) is a bug caught at once::

    requested --queued--> queued --granted--> granted --released--> released
        |                   |                  |   '-----lost-----> lost     (expired, revoked, Redis lost it)
        '--granted----------+--timed_out--> timed_out
                            '--cancelled--> cancelled
                                    evicting   |   ^  continue (called off, or shrunk enough)
                                               v   |
                                             evicting --suspended--> suspended --granted--> granted
                                                 '------evicted----> evicted    |  (handed back, no resume)
                                                                                '--lost--> lost (its resume failed)

``renewing`` is not a state of its own: a lease is renewed by the heartbeat while it is ``granted`` or
``evicting``. A ``suspended`` lease has handed its VRAM back after a checkpoint and waits in the queue, at
its original arrival position, to be granted again (docs/eviction.md).
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import json
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from gpuboss.errors import LeaseEvicted, LeaseLost


class LeaseState(enum.Enum):
    REQUESTED = "requested"
    QUEUED = "queued"
    GRANTED = "granted"
    RELEASED = "released"
    LOST = "lost"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    EVICTING = "evicting"
    SUSPENDED = "suspended"
    EVICTED = "evicted"


S = LeaseState

#: (state, event) -> next state. Nothing else is allowed.
TRANSITIONS: dict[tuple[LeaseState, str], LeaseState] = {
    (S.REQUESTED, "queued"): S.QUEUED,
    (S.REQUESTED, "granted"): S.GRANTED,
    (S.REQUESTED, "timed_out"): S.TIMED_OUT,
    (S.REQUESTED, "cancelled"): S.CANCELLED,
    (S.QUEUED, "queued"): S.QUEUED,
    (S.QUEUED, "granted"): S.GRANTED,
    (S.QUEUED, "timed_out"): S.TIMED_OUT,
    (S.QUEUED, "cancelled"): S.CANCELLED,
    (S.GRANTED, "released"): S.RELEASED,
    (S.GRANTED, "lost"): S.LOST,
    # Eviction: asked to checkpoint, then called off, handed back for a resume, or handed back for good.
    (S.GRANTED, "evicting"): S.EVICTING,
    (S.EVICTING, "evicting"): S.EVICTING,
    (S.EVICTING, "continue"): S.GRANTED,
    (S.EVICTING, "suspended"): S.SUSPENDED,
    (S.EVICTING, "evicted"): S.EVICTED,
    (S.EVICTING, "released"): S.RELEASED,
    (S.EVICTING, "lost"): S.LOST,
    (S.SUSPENDED, "granted"): S.GRANTED,
    (S.SUSPENDED, "evicted"): S.EVICTED,
    (S.SUSPENDED, "released"): S.RELEASED,
    (S.SUSPENDED, "lost"): S.LOST,  # the resume gave up (Redis could not be reached while it waited)
    # A release after the lease was found lost or handed back, or a second release, changes nothing.
    (S.LOST, "released"): S.LOST,
    (S.EVICTED, "released"): S.EVICTED,
    (S.RELEASED, "released"): S.RELEASED,
    (S.RELEASED, "lost"): S.RELEASED,
    (S.LOST, "lost"): S.LOST,
    (S.EVICTED, "lost"): S.EVICTED,
}


class _Keep(enum.Enum):
    KEEP = "keep"


#: ``lease.idle()`` without ``idle_timeout_s``: the lease keeps the idle timeout it has (none at first).
KEEP = _Keep.KEEP


class IllegalTransition(RuntimeError):
    """A state change the table does not allow: a bug in gpuboss, never a user error."""


def advance(state: LeaseState, event: str) -> LeaseState:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"lease cannot go from {state.value} on {event!r}") from None


OnLost = Callable[["Lease"], Any]
#: ``on_evict()`` or ``on_evict(notice)``, sync or async: checkpoint, then return.
OnEvict = Callable[..., Any]


@dataclass(frozen=True)
class EvictNotice:
    """A request to checkpoint: who asked, how much is needed, and by when. Times are Unix seconds."""

    lease_id: str
    by: str
    need_mib: int
    requested_at: float
    deadline: float
    reason: str

    @property
    def need_gb(self) -> float:
        """The VRAM the requester still needs from this lease: a holder that can shrink by this much may
        ``resize`` instead of handing the whole lease back."""
        return self.need_mib / 1024

    @classmethod
    def from_json(cls, raw: str | dict[str, Any]) -> EvictNotice:
        d = json.loads(raw) if isinstance(raw, str) else raw
        return cls(
            lease_id=str(d["lease"]),
            by=str(d.get("by", "")),
            need_mib=int(d.get("need_mib", 0)),
            requested_at=float(d.get("at", 0)) / 1000,
            deadline=float(d.get("deadline", 0)) / 1000,
            reason=str(d.get("reason") or "priority"),
        )


class Signal:
    """:class:`threading.Event` (``is_set``, ``set``, ``clear``, ``wait``) whose condition is made by the first
    ``wait`` that has to block: every lease has two, made on each grant, and almost none is ever waited on."""

    __slots__ = ("_cond", "_flag", "_lock")

    def __init__(self, flag: bool = False) -> None:
        self._flag = flag
        self._lock = threading.Lock()
        self._cond: threading.Condition | None = None

    def __repr__(self) -> str:
        return f"Signal({self._flag})"

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        with self._lock:
            self._flag = True
            if self._cond is not None:
                self._cond.notify_all()

    def clear(self) -> None:
        with self._lock:
            self._flag = False

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the flag is set, or ``timeout`` seconds passed; the flag then (like ``Event.wait``)."""
        with self._lock:
            if self._flag:
                return True
            if self._cond is None:
                self._cond = threading.Condition(self._lock)
            return self._cond.wait(timeout)


def _set_signal() -> Signal:
    return Signal(True)


class EvictFlag:
    """``lease.evict_requested``: true while the lease is asked to checkpoint; also waitable.

    ``if lease.evict_requested:`` polls; ``lease.evict_requested.wait(timeout)`` blocks a thread;
    ``await lease.evict_requested`` waits in a coroutine. It is set from the notice thread, so both kinds of
    waiter are woken from there.
    """

    def __init__(self) -> None:
        self._event = Signal()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return self._event.is_set()

    def __repr__(self) -> str:
        return f"EvictFlag({bool(self)})"

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)

    def __await__(self) -> Generator[Any, None, None]:
        if self._event.is_set():
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._event.is_set():
                return
            self._waiters.append((loop, fut))
        yield from fut.__await__()

    def set(self) -> None:
        with self._lock:
            self._event.set()
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            if not loop.is_closed():
                loop.call_soon_threadsafe(_resolve, fut)

    def clear(self) -> None:
        self._event.clear()


def call_on_evict(on_evict: OnEvict, notice: object) -> Any:
    """Call ``on_evict()`` or ``on_evict(notice)``, whichever it takes; returns what it returns. (Also the rule
    for a warm model's ``on_load(lease)`` and ``on_unload(reason)``.)"""
    try:
        params = inspect.signature(on_evict).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: call it plainly
        return on_evict()
    takes = any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in params)
    return on_evict(notice) if takes else on_evict()


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


@dataclass(eq=False)
class Lease:
    """A granted VRAM lease. Times are Unix seconds from the Redis clock."""

    id: str
    gpu: str
    device: str
    vram_mib: int
    priority: str
    token: int
    service: str
    host: str
    pid: int
    acquired_at: float
    expires_at: float
    requested_at: float
    ttl: float
    on_lost: OnLost | None = None
    state: LeaseState = LeaseState.GRANTED
    preemptible: bool = False
    #: How many times the lease was evicted and resumed.
    evictions: int = 0
    on_evict: OnEvict | None = None
    resume: bool = True
    #: The eviction request being served, if any.
    notice: EvictNotice | None = None
    #: The ``node=`` it was asked with (None: its own host); a resume asks the same.
    node: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _evict_flag: EvictFlag = field(default_factory=EvictFlag, repr=False)
    #: Set whenever the lease is not suspended (a resume waits on it).
    _settled: Signal = field(default_factory=_set_signal, repr=False)
    #: The boss that holds it (for resize and yield_if_requested); set when granted.
    _driver: Any = field(default=None, repr=False)
    #: A lock (threading or asyncio, per front end) so the eviction handling runs once at a time.
    _handling: Any = field(default=None, repr=False)
    #: True once LeaseEvicted was raised to the holder at a safe point.
    _evicted_seen: bool = field(default=False, repr=False)
    #: When (Redis seconds) the last eviction request this lease dealt with was made: a late copy of that
    #: notice (a heartbeat reply sent before it was settled) must not start it again.
    _settled_notice_at: float = field(default=0.0, repr=False)
    #: The GPU's UUID when known (GPUs discovered through NVML), else None (docs/inventory.md).
    uuid: str | None = None
    #: Every GPU of the lease (one, or several for ``lease(gpus=N)``), with this process's device and UUID
    #: of each; ``gpu``, ``device`` and ``uuid`` are the first's.
    gpus: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    uuids: list[str | None] = field(default_factory=list)
    #: With ``lease(model=...)``: the model and the quantization chosen for it.
    model: str | None = None
    quantization: str | None = None
    #: True after ``busy()``, False after ``idle()`` (the first candidate for reclaim), None: never said.
    is_busy: bool | None = None
    #: When (Redis seconds) the lease went idle or was last touched; None while busy or never idle.
    idle_since: float | None = None
    #: Suspended after it was reclaimed while idle: no queue entry until its next busy() or safe point.
    _parked: bool = field(default=False, repr=False)
    #: The idle timeout given to ``idle()`` (ms; 0: none), sent with each ``idle()``; None: never given.
    _idle_timeout_ms: int | None = field(default=None, repr=False)
    #: Granted by this process's local store while Redis was unreachable (``on_redis_down: local``): only this
    #: process's leases were coordinated with it. It stays there, renewed, until released (docs/scheduling.md).
    local: bool = False
    #: ``evictions`` as of the holder's last safe point (yield_if_requested): a round finished since then on
    #: the boss's own thread (with ``on_evict``) is reported at the next one.
    _evictions_reported: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if not self.gpus:
            self.gpus = [self.gpu]
        if not self.devices:
            self.devices = [self.device]
        self._evictions_reported = self.evictions

    def _report_rounds(self) -> bool:
        """True when an eviction round (hand-back and resume) ended since the last safe point; the next call
        then answers False until another one ends."""
        ended = self.evictions != self._evictions_reported
        self._evictions_reported = self.evictions
        return ended

    @classmethod
    def from_record(
        cls,
        raw: str | dict[str, Any],
        on_lost: OnLost | None = None,
        on_evict: OnEvict | None = None,
        resume: bool = True,
    ) -> Lease:
        rec = json.loads(raw) if isinstance(raw, str) else raw
        return cls(
            id=str(rec["id"]),
            gpu=str(rec["gpu"]),
            device=str(rec["device"]),
            vram_mib=int(rec["vram_mib"]),
            priority=str(rec["priority"]),
            token=int(rec["token"]),
            service=str(rec["service"]),
            host=str(rec["host"]),
            pid=int(rec["pid"]),
            acquired_at=rec["acquired_at"] / 1000,
            expires_at=rec["expires_at"] / 1000,
            requested_at=rec["requested_at"] / 1000,
            ttl=rec["ttl_ms"] / 1000,
            on_lost=on_lost,
            preemptible=bool(rec.get("preemptible", False)),
            evictions=int(rec.get("evictions", 0)),
            on_evict=on_evict,
            resume=resume,
            gpus=[str(g) for g in rec.get("gpus") or [rec["gpu"]]],
            devices=[str(d) for d in rec.get("devices") or [rec["device"]]],
        )

    @property
    def record(self) -> dict[str, Any]:
        """The lease as a record (the fields the scripts keep), for a flow that needs them."""
        return {
            "id": self.id,
            "gpu": self.gpu,
            "device": self.device,
            "vram_mib": self.vram_mib,
            "priority": self.priority,
            "token": self.token,
            "service": self.service,
            "host": self.host,
            "pid": self.pid,
            "acquired_at": round(self.acquired_at * 1000),
            "expires_at": round(self.expires_at * 1000),
            "requested_at": round(self.requested_at * 1000),
            "ttl_ms": round(self.ttl * 1000),
            "preemptible": self.preemptible,
            "evictions": self.evictions,
            "gpus": list(self.gpus),
            "devices": list(self.devices),
        }

    def apply_record(self, rec: dict[str, Any]) -> None:
        """Take the numbers of a newer record of this lease (after a resume or a resize)."""
        self.gpu = str(rec["gpu"])
        self.device = str(rec.get("device", self.device))
        self.gpus = [str(g) for g in rec.get("gpus") or [self.gpu]]
        self.devices = [str(d) for d in rec.get("devices") or [self.device]]
        self.vram_mib = int(rec["vram_mib"])
        self.token = int(rec["token"])
        self.acquired_at = rec["acquired_at"] / 1000
        self.expires_at = rec["expires_at"] / 1000
        self.evictions = int(rec.get("evictions", self.evictions))

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled (handed to another process: a ``multiprocessing`` or executor worker, say): a detached copy,
        the lease's fields and state as they are now, without its boss, callbacks and locks. The lease stays
        its holder's: the other process can read the copy, not renew, resize or release the lease."""
        extra = {"uuid": self.uuid, "uuids": self.uuids, "model": self.model, "quantization": self.quantization}
        return (_detached, (self.record, self.state.value, self.local, extra))

    def __copy__(self) -> Lease:
        return self  # one lease in Redis, one object for it: a copy would be a second handle on the same lease

    def __deepcopy__(self, memo: dict[int, Any]) -> Lease:
        return self

    @property
    def vram_gb(self) -> float:
        return self.vram_mib / 1024

    @property
    def lost(self) -> bool:
        """True once the lease is known to be gone while it was held."""
        return self.state is LeaseState.LOST

    @property
    def evicted(self) -> bool:
        """True once the lease was handed back after an eviction request for good (``resume=False``)."""
        return self.state is LeaseState.EVICTED

    @property
    def active(self) -> bool:
        """True while the holder may use the VRAM: granted, or asked to checkpoint but not yet handed back."""
        return self.state in (LeaseState.GRANTED, LeaseState.EVICTING)

    @property
    def suspended(self) -> bool:
        return self.state is LeaseState.SUSPENDED

    @property
    def evict_requested(self) -> EvictFlag:
        """Truthy while the lease is asked to checkpoint; ``await`` it, or ``.wait()``, to wait for that."""
        return self._evict_flag

    @property
    def waited(self) -> float:
        """Seconds between the request and the grant, by the Redis clock."""
        return max(0.0, self.acquired_at - self.requested_at)

    def raise_if_lost(self) -> None:
        """Raise :class:`LeaseLost` if the lease is gone, :class:`LeaseEvicted` if it was handed back for good:
        call it at safe points of long work."""
        if self.lost:
            raise LeaseLost(f"lease {self.id} on {self.gpu} ({self.device}) was lost (expired or revoked)")
        if self.evicted:
            self._evicted_seen = True
            raise LeaseEvicted(f"lease {self.id} on {self.gpu} was handed back after an eviction request")

    def yield_if_requested(self) -> Any:
        """At a safe point: if the lease is asked to checkpoint, run ``on_evict``, hand the VRAM back and (with
        ``resume``) wait until it is granted again. True when it yielded, here or since the last safe point:
        with ``on_evict``, the boss's own thread may run a whole round (checkpoint, hand-back, resume) before
        the holder gets here: state kept on the GPU may be gone, so reload from the checkpoint when this
        answers True. False when nothing was asked since the last safe point.

        With an async boss this is a coroutine: ``await lease.yield_if_requested()``. Raises
        :class:`LeaseEvicted` when the lease was handed back for good, :class:`LeaseLost` when it is gone.
        """
        if self._driver is None:
            raise RuntimeError(f"lease {self.id} is not held by a boss")
        return self._driver._yield_if_requested(self)

    def resize(self, vram_gb: float, timeout: float | None = None) -> Any:
        """Change the lease's VRAM: shrinking hands the difference to waiters at once; growing waits like a new
        request of the lease's priority (``timeout`` seconds; None waits forever) while the current part stays
        held. With an async boss this is a coroutine."""
        if self._driver is None:
            raise RuntimeError(f"lease {self.id} is not held by a boss")
        return self._driver._resize(self, vram_gb, timeout)

    def busy(self) -> Any:
        """Mark the lease busy: in use, so not taken back as idle (docs/warm.md). Also a context manager that
        marks it idle after the block: ``with lease.busy():``, ``async with lease.busy():`` (or ``await
        lease.busy()``) for an async boss. A lease being handed back is handed back first, here."""
        from gpuboss.warm import BusyBlock

        return BusyBlock(self, self._activity("busy"))

    def idle(self, idle_timeout_s: float | _Keep | None = KEEP) -> Any:
        """Mark the lease idle: the first candidate when another request does not fit, whatever its priority.
        With an async boss this is a coroutine.

        ``idle_timeout_s`` (seconds) also sets an idle timeout: a lease idle that long, by the Redis clock, is
        asked to hand back (reason ``idle_timeout``) at its next heartbeat, with or without contention; busy()
        and touch() start it again. None removes it; left out, the lease keeps the one it has (docs/warm.md).
        """
        from gpuboss.warm import idle_timeout_arg

        ms = idle_timeout_arg(idle_timeout_s)
        if ms is not None:  # kept here too: a lease granted again (resumed) has a fresh record
            self._idle_timeout_ms = ms
        return self._activity("idle", self._idle_timeout_ms)

    def touch(self) -> Any:
        """Still wanted while idle: its idle time (and idle timeout) starts again. A coroutine for an async boss."""
        return self._activity("touch")

    def _activity(self, op: str, idle_timeout_ms: int | None = None) -> Any:
        if self._driver is None:
            raise RuntimeError(f"lease {self.id} is not held by a boss")
        return self._driver._activity(self, op, idle_timeout_ms)

    def _move(self, event: str) -> bool:
        """Apply an event; True when the state changed."""
        with self._lock:
            before = self.state
            self.state = advance(before, event)
            changed = self.state is not before
            self._after_move()
            return changed

    def _take_notice(self, notice: EvictNotice) -> bool:
        """An eviction notice arrived: True when it starts an eviction (the lease moved to EVICTING). A copy
        of a notice already settled (called off, shrunk, handed back) is ignored."""
        with self._lock:
            if notice.requested_at <= self._settled_notice_at:
                return False
            if self.state is LeaseState.EVICTING:
                self.notice = notice
                return False
            if (self.state, "evicting") not in TRANSITIONS:
                return False
            self.notice = notice
            self.state = LeaseState.EVICTING
            self._after_move()
            return True

    def _move_if(self, event: str) -> bool:
        """Apply an event if the table allows it from the current state; False (and no change) if not."""
        with self._lock:
            after = TRANSITIONS.get((self.state, event))
            if after is None or after is self.state:
                return False
            self.state = after
            self._after_move()
            return True

    def _after_move(self) -> None:
        # The flag and the event change only here, under the lease's lock: one already as wanted is left alone
        # (setting a set Event, or clearing a clear one, would only take its lock).
        if self.state is LeaseState.EVICTING:
            self._evict_flag.set()
        else:
            if self._evict_flag:
                self._evict_flag.clear()
            if self.notice is not None:
                self._settled_notice_at = max(self._settled_notice_at, self.notice.requested_at)
        if self.state is LeaseState.GRANTED:
            self.notice = None
        if self.state is LeaseState.SUSPENDED:
            self._settled.clear()
        elif not self._settled.is_set():
            self._settled.set()

    def child_env(self) -> dict[str, str]:
        """The environment that gives a child process this lease's GPU as its ``cuda:0``:
        ``{"CUDA_VISIBLE_DEVICES": uuid}`` (by UUID, whatever the order); for a declared GPU without UUID, the
        entry of this process's ``CUDA_VISIBLE_DEVICES`` for its device. Use
        ``subprocess.run(cmd, env={**os.environ, **lease.child_env()})``."""
        from gpuboss.devices import ENV_VISIBLE, child_env, child_env_for_device

        uuids = self.uuids if len(self.uuids) == len(self.gpus) else [self.uuid]
        if all(uuids):
            return child_env([u for u in uuids if u])
        entries = [child_env_for_device(d)[ENV_VISIBLE] for d in self.devices]
        return {ENV_VISIBLE: ",".join(entries)}


class Device(str):
    """The device string of a lease (``"cuda:0"``), usable anywhere a device string goes.

    ``device.lease`` is the :class:`Lease` it came from. Copied, it is itself; pickled (to a worker process),
    it is a Device with a detached copy of the lease (see :meth:`Lease.__reduce__`).
    """

    lease: Lease

    def __new__(cls, lease: Lease) -> Device:
        obj = super().__new__(cls, lease.device)
        obj.lease = lease
        return obj

    def __reduce__(self) -> tuple[Any, ...]:
        return (Device, (self.lease,))

    def __copy__(self) -> Device:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Device:
        return self


def _detached(record: dict[str, Any], state: str, local: bool, extra: dict[str, Any]) -> Lease:
    """A lease unpickled in another process (:meth:`Lease.__reduce__`): held by no boss there."""
    lease = Lease.from_record(record)
    with lease._lock:
        lease.state = LeaseState(state)
        lease._after_move()  # (its eviction flag and its settled signal, as the state says)
    lease.local = local
    lease.uuid, lease.model, lease.quantization = extra["uuid"], extra["model"], extra["quantization"]
    lease.uuids = list(extra["uuids"])
    return lease
