"""Warm models: keep-alive leases that yield to real work (docs/warm.md).

A model server keeps its model loaded between requests; on a shared GPU that idle model must not block
everyone else. A lease can say whether it is in use: ``lease.busy()``, ``lease.idle()``, ``lease.touch()``
(each one call of ``lua/activity-21.lua``). An idle lease is the first candidate whenever another request
cannot be placed, whatever its priority (``lua/includes/evict.lua``); after ``idle_timeout_s`` without
``busy()`` or ``touch()`` the heartbeat's renew script asks it to unload even without contention.

:class:`WarmModel` (``boss.keep_warm(...)``, ``with`` or ``async with``) wraps the pattern: it leases the
model's VRAM and calls ``on_load``; ``warm.busy()`` marks each request; when the lease is asked to leave it
waits for running requests to finish, calls ``on_unload`` and hands the lease back in one script call
(``lua/unload-21.lua``); the next ``busy()`` leases again (queued by its priority), calls ``on_load`` and
reports the time it waited and reloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import json
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any, Literal

from gpuboss.core import (
    DEFAULT,
    Call,
    Core,
    Timeout,
    YieldOutcome,
    YieldReply,
)
from gpuboss.errors import InvalidRequest, LeaseCancelled, LeaseLost, RedisUnavailable
from gpuboss.lease import KEEP, Device, EvictNotice, Lease, LeaseState, call_on_evict

if TYPE_CHECKING:
    from gpuboss.aio import AsyncGPUBoss
    from gpuboss.client import GPUBoss

log = logging.getLogger("gpuboss")

#: How often a waiter looks again at a lease whose eviction may have been called off meanwhile.
POLL_S = 0.05
#: The longest idle timeout (a week); None means no timeout.
MAX_IDLE_TIMEOUT_S = 7 * 86400.0

Op = Literal["busy", "idle", "touch"]
OPS = ("busy", "idle", "touch")
#: Why a warm model was unloaded (``WarmModel.last_unload_reason``, ``model_unloaded`` events).
UnloadReason = Literal["idle_timeout", "reclaimed", "closed", "lost"]


class ActivityReply(enum.IntEnum):
    """Replies of ``lua/activity-21.lua``."""

    GONE = 0
    DONE = 1
    EVICTING = 2


class UnloadReply(enum.IntEnum):
    """Replies of ``lua/unload-21.lua``."""

    GONE = 0
    UNLOADED = 1


# ---------------------------------------------------------------- script calls and replies


def activity_call(
    core: Core,
    lease_id: str,
    op: Op,
    idle_timeout_ms: int | None = None,
    model: str = "",
    load_event: str = "",
    reloads: int = 0,
) -> Call:
    """Mark a lease busy, idle or touched; ``idle_timeout_ms`` 0 removes the timeout, None leaves it."""
    return Call(
        "activity",
        [*core.state_keys(), *core.keys.event_keys()],
        [
            core.keys.wake_prefix,
            lease_id,
            op,
            core.secret,
            "" if idle_timeout_ms is None else idle_timeout_ms,
            model,
            load_event,
            reloads,
            core.config.events_maxlen,
        ],
    )


def unload_call(core: Core, lease: Lease, reason: UnloadReason) -> Call:
    """Hand back the lease of a model that was unloaded (``reason`` counts when it is not being evicted)."""
    known = {
        "model": lease.model,
        "gpu": lease.gpu,
        "vram_mib": lease.vram_mib,
        "service": lease.service,
        "priority": lease.priority,
    }
    return Call(
        "unload",
        [*core.state_keys(), *core.keys.event_keys()],
        [core.keys.wake_prefix, lease.id, core.secret, reason, json.dumps(known), core.config.events_maxlen],
    )


def apply_activity(lease: Lease, op: str, reply: list[Any]) -> dict[str, Any] | None:
    """Apply an activity reply to ``lease``: None when done, the eviction notice when busy was refused.
    Raises :class:`LeaseLost` when the lease is gone."""
    code = ActivityReply(int(reply[0]))
    if code is ActivityReply.GONE:
        raise LeaseLost(f"lease {lease.id} is gone (expired, revoked or released): it cannot be marked {op}")
    if code is ActivityReply.EVICTING:
        return dict(json.loads(str(reply[1])))
    rec = json.loads(str(reply[1]))
    busy = rec.get("busy")
    lease.is_busy = busy if isinstance(busy, bool) else None
    since = rec.get("idle_since")
    lease.idle_since = since / 1000 if isinstance(since, int | float) else None
    called_off = int(reply[2]) if len(reply) > 2 else 0
    if called_off:  # busy() called an idle eviction off: that one only (a notice of a later request stands)
        with lease._lock:  # its notice, should it arrive late, is a settled copy
            lease._settled_notice_at = max(lease._settled_notice_at, called_off / 1000)
        notice = lease.notice
        if (
            lease.state is LeaseState.EVICTING
            and notice is not None
            and round(notice.requested_at * 1000) <= called_off
        ):
            lease._move_if("continue")
    return None


def take_notice(boss: GPUBoss | AsyncGPUBoss, lease: Lease, notice: dict[str, Any]) -> None:
    """Apply a notice that a script just said holds (busy refused: the lease is being handed back). A lease
    that had settled a notice with the same time (a late `continue`) takes it all the same: Redis says so now."""
    boss._on_notice(notice)
    if lease.state is LeaseState.GRANTED:
        at = float(notice.get("at", 0)) / 1000
        with lease._lock:
            lease._settled_notice_at = min(lease._settled_notice_at, at - 0.001)
        boss._on_notice(notice)


def _check_op(op: str) -> Op:
    if op not in OPS:
        raise InvalidRequest("op", op, "must be 'busy', 'idle' or 'touch'")
    return op  # type: ignore[return-value]


def idle_timeout_arg(value: object) -> int | None:
    """``lease.idle(idle_timeout_s=...)`` as the activity script's argument: KEEP (left out) leaves the lease's
    idle timeout as it is (None), None removes it (0), seconds set it (ms, at least 1)."""
    if value is KEEP:
        return None
    seconds = _validate_idle_timeout(value)
    return 0 if seconds is None else max(1, math.ceil(seconds * 1000))


def activity_sync(boss: GPUBoss, lease: Lease, op: str, idle_timeout_ms: int | None = None) -> Lease:
    """``lease.busy()``/``idle()``/``touch()`` for :class:`~gpuboss.GPUBoss`. A busy() on a lease being handed
    back first hands it back at this safe point (``on_evict``, resume) and marks it busy once granted again."""
    checked = _check_op(op)
    while True:
        if checked == "busy" and lease.state is not LeaseState.GRANTED:
            boss._yield_if_requested(lease)  # raises LeaseLost / LeaseEvicted when there is nothing to resume
        call = activity_call(boss._core, lease.id, checked, idle_timeout_ms)
        notice = apply_activity(lease, checked, boss._eval(call))
        if notice is None:
            return lease
        take_notice(boss, lease, notice)
        if not lease.evict_requested.wait(POLL_S):
            continue  # a copy of a notice already settled: look again
        boss._yield_if_requested(lease)


async def activity_async(boss: AsyncGPUBoss, lease: Lease, op: str, idle_timeout_ms: int | None = None) -> Lease:
    """The :class:`~gpuboss.AsyncGPUBoss` twin of :func:`activity_sync`."""
    checked = _check_op(op)
    while True:
        if checked == "busy" and lease.state is not LeaseState.GRANTED:
            await boss._yield_if_requested(lease)
        reply = await boss._eval(activity_call(boss._core, lease.id, checked, idle_timeout_ms))
        notice = apply_activity(lease, checked, reply)
        if notice is None:
            return lease
        take_notice(boss, lease, notice)
        if not lease.evict_requested:
            await asyncio.sleep(POLL_S)
            continue
        await boss._yield_if_requested(lease)


def unpark_sync(boss: GPUBoss, lease: Lease) -> None:
    """A lease reclaimed while idle is suspended without a queue entry (``YieldOutcome.parked``): at its next
    busy() or safe point it asks again, queued by its priority, and is granted again under the same id."""
    if lease.state is not LeaseState.SUSPENDED or lease._handling is None:
        return
    with lease._handling:  # a hand-back in progress finishes first
        if not lease._parked:
            return
        lease._parked = False
        evictions = lease.evictions
        try:
            resumed = boss._run(
                boss._core.acquire_flow(boss._core.request_of(lease), lease.id, stop=lambda: boss._stop_waiting(lease))
            )
        except LeaseCancelled:
            return  # released meanwhile
        except BaseException:
            lease._parked = True
            boss._heartbeat.forget(lease.id)
            boss._release_id(lease.id, int(lease.ttl * 1000), "cancel")
            raise
        _unparked(boss, lease, resumed, evictions)


async def unpark_async(boss: AsyncGPUBoss, lease: Lease) -> None:
    """The :class:`~gpuboss.AsyncGPUBoss` twin of :func:`unpark_sync`."""
    if lease.state is not LeaseState.SUSPENDED or lease._handling is None:
        return
    async with lease._handling:
        if not lease._parked:
            return
        lease._parked = False
        evictions = lease.evictions
        try:
            resumed = await boss._run(
                boss._core.acquire_flow(boss._core.request_of(lease), lease.id, stop=lambda: boss._stop_waiting(lease))
            )
        except LeaseCancelled:
            return
        except BaseException:
            lease._parked = True
            boss._heartbeat.forget(lease.id)
            await boss._release_id(lease.id, int(lease.ttl * 1000), "cancel")
            raise
        _unparked(boss, lease, resumed, evictions)


def _unparked(boss: GPUBoss | AsyncGPUBoss, lease: Lease, resumed: Lease, evictions: int) -> None:
    boss._leases[lease.id] = lease
    boss._after_yield(lease, YieldOutcome(YieldReply.GRANTED, resumed.record))
    lease.evictions = evictions + 1


class BusyBlock:
    """What ``lease.busy()`` returns: the lease is marked busy already (a blocking boss) or when awaited or
    entered (an async boss); as a context manager it marks the lease idle again at the end of the block."""

    def __init__(self, lease: Lease, pending: Any) -> None:
        self._lease = lease
        self._pending = pending if inspect.isawaitable(pending) else None

    def __enter__(self) -> Device:
        if self._pending is not None:
            raise TypeError("lease.busy() of an AsyncGPUBoss lease: use `async with lease.busy():`")
        return Device(self._lease)

    def __exit__(self, *exc: object) -> None:
        if self._lease.active:
            self._lease.idle()

    def __await__(self) -> Generator[Any, None, Lease]:
        return self._run().__await__()

    async def _run(self) -> Lease:
        if self._pending is not None:
            await self._pending
            self._pending = None
        return self._lease

    async def __aenter__(self) -> Device:
        if self._pending is None and self._lease._driver is not None and not _is_async(self._lease._driver):
            raise TypeError("lease.busy() of a GPUBoss lease: use `with lease.busy():`")
        await self._run()
        return Device(self._lease)

    async def __aexit__(self, *exc: object) -> None:
        if self._lease.active:
            await self._lease.idle()


def _is_async(boss: object) -> bool:
    return inspect.iscoroutinefunction(getattr(boss, "acquire", None))


# ---------------------------------------------------------------- callbacks


def _call(fn: Callable[..., Any] | None, arg: object) -> Any:
    """``fn(arg)`` or ``fn()``, whichever it takes (the rule of ``on_evict``); None when there is no callback."""
    return None if fn is None else call_on_evict(fn, arg)


def _call_sync(fn: Callable[..., Any] | None, arg: object) -> None:
    result = _call(fn, arg)
    if inspect.isawaitable(result):
        asyncio.run(_awaited(result))


async def _call_async(fn: Callable[..., Any] | None, arg: object) -> None:
    result = _call(fn, arg)
    if inspect.isawaitable(result):
        await result


async def _awaited(result: Any) -> Any:
    return await result


# ---------------------------------------------------------------- the helper


def _validate_idle_timeout(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest("idle_timeout_s", value, "must be seconds (a number > 0), or None for no timeout")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0 or seconds > MAX_IDLE_TIMEOUT_S:
        raise InvalidRequest(
            "idle_timeout_s", value, f"must be seconds greater than 0 and at most {MAX_IDLE_TIMEOUT_S:g}, or None"
        )
    return seconds


def _validate_callback(field: str, value: object) -> Callable[..., Any] | None:
    if value is not None and not callable(value):
        raise InvalidRequest(field, value, "must be a callable (sync or async), or None")
    return value


Phase = Literal["new", "unloaded", "loading", "ready", "marking", "unloading", "closing", "closed"]


class WarmModel:
    """A model kept loaded between requests, under a lease that yields to real work (docs/warm.md).

    Made by ``boss.keep_warm(...)``; ``with`` it (``async with`` for an :class:`~gpuboss.AsyncGPUBoss`): the
    VRAM is leased and ``on_load`` called on entry, ``on_unload`` called and the lease handed back on exit.
    Serve each request inside ``with warm.busy() as device:`` (``async with``): the lease is busy for the
    block (never unloaded while any block runs) and idle between blocks; after an unload, the next
    ``busy()`` leases again (queued by the priority), calls ``on_load`` and only then enters the block.

    ``on_load(lease)`` or ``on_load()`` and ``on_unload(reason)`` or ``on_unload()`` may be sync or async;
    ``reason`` is ``idle_timeout``, ``reclaimed`` (another request needed the VRAM), ``lost`` (the lease was
    gone: expired or revoked) or ``closed`` (the block ended).
    """

    def __init__(
        self,
        boss: GPUBoss | AsyncGPUBoss,
        model: str,
        vram_gb: float | None = None,
        idle_timeout_s: float | None = 300,
        on_unload: Callable[..., Any] | None = None,
        on_load: Callable[..., Any] | None = None,
        priority: str | None = None,
        *,
        timeout: Timeout = DEFAULT,
        ttl: float | None = None,
        device: str | int | None = None,
        node: str | None = None,
        preemptible: bool | None = None,
    ) -> None:
        if not isinstance(model, str) or not model:
            raise InvalidRequest("model", model, "must be the model's name or a label, e.g. 'gemma3:12b'")
        # Every argument of the leases it will take, checked now (the core's checks, as for acquire()): a bad
        # one raises here, before anything is read or written, not at the first load.
        boss._core.make_request(
            1 if vram_gb is None else vram_gb, priority, timeout, ttl, device, preemptible=preemptible, node=node
        )
        if vram_gb is None:
            boss._inventory.check_model(model)  # the size will come from the model registry
        self._boss = boss
        self._async = _is_async(boss)
        #: The model's name (or label); the ``model`` field of its lease record and events.
        self.model = model
        #: The VRAM leased for it (None until entered, when it comes from the model registry).
        self.vram_gb: float | None = vram_gb
        self.idle_timeout_s = _validate_idle_timeout(idle_timeout_s)
        self.on_unload = _validate_callback("on_unload", on_unload)
        self.on_load = _validate_callback("on_load", on_load)
        self.priority = priority
        self.timeout = timeout
        self.ttl = ttl
        self.device = device
        self.node = node
        self.preemptible = preemptible
        #: The lease while the model is loaded, else None.
        self.lease: Lease | None = None
        #: Loads so far (the first one included), reloads (loads after an unload), unloads.
        self.loads = 0
        self.reloads = 0
        self.unloads = 0
        #: Seconds the last load waited for its lease, and spent in ``on_load``; and their totals.
        self.wait_s: float | None = None
        self.load_s: float | None = None
        self.total_wait_s = 0.0
        self.total_load_s = 0.0
        #: Why the model was last unloaded: ``idle_timeout``, ``reclaimed``, ``lost`` or ``closed``.
        self.last_unload_reason: UnloadReason | None = None
        self._users = 0
        self._phase: Phase = "new"
        self._cv = threading.Condition()
        self._acv: asyncio.Condition | None = None

    def __repr__(self) -> str:
        where = f" on {self.lease.gpu}" if self.lease is not None else ""
        return f"WarmModel({self.model!r}, {self._phase}{where}, users={self._users}, reloads={self.reloads})"

    @property
    def loaded(self) -> bool:
        """True while the model is loaded under a lease that is not being handed back."""
        return self.lease is not None and self._phase in ("ready", "marking") and self.lease.active

    @property
    def users(self) -> int:
        """The ``busy()`` blocks running now."""
        return self._users

    @property
    def idle_timeout_ms(self) -> int:
        return 0 if self.idle_timeout_s is None else max(1, math.ceil(self.idle_timeout_s * 1000))

    # -- the state shared by both front ends (called with the condition held)

    def _next_enter(self) -> Literal["join", "mark", "load", "unload"] | None:
        """What a ``busy()`` does now: join the running blocks, mark the lease busy, load, unload first, or wait
        (None)."""
        if self._phase in ("new", "closing", "closed"):
            raise RuntimeError(f"keep_warm({self.model!r}) is not open: busy() goes inside its with block")
        lease = self.lease
        if self._phase == "ready" and lease is not None:
            if lease.state is LeaseState.GRANTED:
                if self._users > 0:
                    self._users += 1
                    return "join"
                self._phase = "marking"
                return "mark"
            if self._users == 0:
                # Being handed back (or gone) and no block runs: unload here, at this safe point, then load
                # again. This also retries an unload whose on_unload raised in the eviction thread.
                self._phase = "unloading"
                return "unload"
            return None  # being handed back once the running blocks end; no new block joins them
        if self._phase == "unloaded":
            self._phase = "loading"
            return "load"
        return None  # loading, marking or unloading by another caller

    def _claim_unload(self, lease_id: str, evicting: bool) -> Lease | Literal[False] | None:
        """For the eviction (``evicting``) or the loss of lease ``lease_id``: the lease to unload now (the phase
        becomes unloading), None to wait, or False when there is nothing to do (another lease now, or the
        eviction was called off)."""
        lease = self.lease
        if lease is None and self._phase == "loading":
            return None  # granted, but acquire() has not returned it here yet: wait for the load
        if lease is None or lease.id != lease_id or (evicting and lease.state is not LeaseState.EVICTING):
            return False
        if self._phase == "ready" and self._users == 0:
            self._phase = "unloading"
            return lease
        return None

    def _unload_failed(self, reason: UnloadReason) -> bool:
        """on_unload raised (called in its except block, the condition held): whether the lease is handed back
        all the same. It is when the block is closing (the error is raised after) or the lease is gone anyway
        (``lost``: logged). For an eviction the model is taken to be still loaded: the lease stays with it,
        being handed back, and the next ``busy()`` unloads first, calling ``on_unload`` again."""
        if self._phase == "closing":
            return True
        if reason == "lost":
            log.exception("gpuboss: on_unload of %s failed; its lease is gone all the same", self.model)
            return True
        self._phase = "ready"
        return False

    def _after_load(self, lease: Lease, waited: float, loading: float) -> str:
        reload = self.loads > 0
        self.loads += 1
        self.reloads += int(reload)
        self.wait_s, self.load_s = waited, loading
        self.total_wait_s += waited
        self.total_load_s += loading
        if reload:
            log.info(
                "gpuboss: %s reloaded on %s (waited %.3f s, loaded in %.3f s)", self.model, lease.gpu, waited, loading
            )
        return "reloaded" if reload else "loaded"

    def _settle(self, lease: Lease, op: str, reply: list[Any], busy: bool) -> bool | None:
        """After a mark or a load: True when the block may run (busy) or the model is ready (idle), None when
        the lease is being handed back (wait, then try again), False when it is gone (unload it)."""
        try:
            notice = apply_activity(lease, op, reply)
        except LeaseLost:
            self._phase = "unloading"
            return False
        self._phase = "ready"
        if notice is not None:
            take_notice(self._boss, lease, notice)
            return None
        if busy:
            self._users += 1
        return True

    def _unloaded(self, lease: Lease, reason: UnloadReason) -> None:
        lease._move_if("evicted")
        lease._move_if("released")
        self._boss._leases.pop(lease.id, None)
        if self.lease is lease:
            self.lease = None
            self.unloads += 1
            self.last_unload_reason = reason
            self._phase = "closed" if self._phase == "closing" else "unloaded"

    @staticmethod
    def _reason(lease: Lease, default: UnloadReason) -> UnloadReason:
        if lease.state is LeaseState.EVICTING and lease.notice is not None:
            return "idle_timeout" if lease.notice.reason == "idle_timeout" else "reclaimed"
        return default

    def _acquire_args(self) -> dict[str, Any]:
        return {
            "vram_gb": self.vram_gb,
            "priority": self.priority,
            "timeout": self.timeout,
            "ttl": self.ttl,
            "device": self.device,
            "on_lost": self._on_lost_async if self._async else self._on_lost,
            "preemptible": self.preemptible,
            "on_evict": self._on_evict_async if self._async else self._on_evict,
            "resume": False,
            "node": self.node,
        }

    # -- GPUBoss

    def __enter__(self) -> WarmModel:
        if self._async:
            raise TypeError("keep_warm() of an AsyncGPUBoss: use `async with boss.keep_warm(...)`")
        boss: GPUBoss = self._boss  # type: ignore[assignment]
        with self._cv:
            if self._phase != "new":
                raise RuntimeError("a WarmModel is entered once")
            self._phase = "loading"
        try:
            if self.vram_gb is None:
                self.vram_gb = boss.choose_model(self.model, node=self.node).vram_mib / 1024
            lease, reply = self._load_sync(busy=False)
            self._settle_sync(lease, "idle", reply)
        except BaseException:
            with self._cv:
                self._phase = "closed"
                self._cv.notify_all()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cv:
            while self._phase in ("loading", "marking", "unloading") or self._users > 0:
                self._cv.wait(POLL_S)
            if self._phase == "closed":
                return
            lease, self._phase = self.lease, "closing"
        try:
            if lease is not None:
                self._unload_sync(lease, "closed")
        finally:
            with self._cv:
                self._phase = "closed"
                self._cv.notify_all()

    @contextlib.contextmanager
    def _busy_sync(self) -> Iterator[Device]:
        lease = self._enter_sync()
        try:
            yield Device(lease)
        finally:
            self._exit_sync()

    def busy(self) -> Any:
        """``with warm.busy() as device:`` (``async with`` for an async boss): serve one request. Loads the model
        first if it was unloaded (waiting for its lease by the priority); the model is not unloaded while any
        block runs; the lease is idle again when the last block ends."""
        return self._busy_async() if self._async else self._busy_sync()

    def touch(self) -> Any:
        """Still wanted: the idle timeout of the loaded model starts again (nothing happens while it is unloaded,
        busy or being handed back). A coroutine for an async boss."""
        return self._touch_async() if self._async else self._touch_sync()

    def _touchable(self) -> Lease | None:
        lease = self.lease
        if lease is None or self._phase != "ready" or lease.state is not LeaseState.GRANTED:
            return None
        return lease

    def _touch_sync(self) -> None:
        lease = self._touchable()
        if lease is not None:
            with contextlib.suppress(LeaseLost):  # gone meanwhile: on_lost unloads it
                lease.touch()

    async def _touch_async(self) -> None:
        lease = self._touchable()
        if lease is not None:
            with contextlib.suppress(LeaseLost):
                await lease.touch()

    def _load_sync(self, busy: bool) -> tuple[Lease, list[Any]]:
        boss: GPUBoss = self._boss  # type: ignore[assignment]
        asked = time.monotonic()
        lease = boss.acquire(**self._acquire_args())
        lease.model = self.model
        with self._cv:
            self.lease = lease
        granted = time.monotonic()
        try:
            _call_sync(self.on_load, lease)
        except BaseException:
            with self._cv:
                self.lease = None
            boss.release(lease)
            raise
        event = self._after_load(lease, granted - asked, time.monotonic() - granted)
        op: Op = "busy" if busy else "idle"
        reply = boss._eval(
            activity_call(boss._core, lease.id, op, self.idle_timeout_ms, self.model, event, self.reloads)
        )
        return lease, reply

    def _enter_sync(self) -> Lease:
        boss: GPUBoss = self._boss  # type: ignore[assignment]
        while True:
            with self._cv:
                action = self._next_enter()
                while action is None:
                    self._cv.wait(POLL_S)
                    action = self._next_enter()
                lease = self.lease
            if action == "join" and lease is not None:
                return lease
            try:
                if action == "load":
                    lease, reply = self._load_sync(busy=True)
                elif action == "unload":
                    assert lease is not None
                    self._unload_sync(lease, self._reason(lease, "lost"))
                    continue
                else:
                    assert lease is not None
                    reply = boss._eval(activity_call(boss._core, lease.id, "busy"))
            except BaseException:
                with self._cv:
                    self._phase = "unloaded" if self.lease is None else "ready"
                    self._cv.notify_all()
                raise
            if self._settle_sync(lease, "busy", reply, busy=True):
                return lease

    def _exit_sync(self) -> None:
        boss: GPUBoss = self._boss  # type: ignore[assignment]
        with self._cv:
            self._users -= 1
            lease = self.lease
            self._cv.notify_all()
            if self._users > 0 or lease is None or self._phase != "ready" or lease.state is not LeaseState.GRANTED:
                return
            self._phase = "marking"
        reply: list[Any] | None = None
        try:
            reply = boss._eval(activity_call(boss._core, lease.id, "idle"))
        except RedisUnavailable as err:
            log.warning("gpuboss: could not mark %s idle (%s); it stays busy until the next request", lease.id, err)
        finally:
            with self._cv:
                if self._phase == "marking":
                    self._phase = "ready"
                self._cv.notify_all()
        if reply is not None:
            self._settle_sync(lease, "idle", reply)

    def _settle_sync(self, lease: Lease, op: str, reply: list[Any], busy: bool = False) -> bool:
        """Apply a mark or load reply: True when the block may run (or the model is ready); else the lease is
        being handed back (wait a moment: a notice may be a late copy) or it is gone (unloaded here)."""
        with self._cv:
            settled = self._settle(lease, op, reply, busy)
            self._cv.notify_all()
            if settled is None:
                self._cv.wait(POLL_S)
        if settled is False:
            self._unload_sync(lease, "lost")
        return bool(settled)

    def _unload_sync(self, lease: Lease, default: UnloadReason) -> None:
        """Call on_unload and hand the lease back (the phase is unloading or closing; if on_unload raises, see
        :meth:`_unload_failed`)."""
        boss: GPUBoss = self._boss  # type: ignore[assignment]
        reason = self._reason(lease, default)
        failed: BaseException | None = None
        try:
            _call_sync(self.on_unload, reason)
        except BaseException as err:
            with self._cv:
                handed_back = self._unload_failed(reason)
                closing = self._phase == "closing"
                self._cv.notify_all()
            if not handed_back:
                raise
            failed = err if closing else None
        boss._before_yield(lease)  # no more renewals: it is about to be handed back
        try:
            boss._eval(unload_call(boss._core, lease, reason))
        except RedisUnavailable as err:
            log.warning("gpuboss: could not hand back %s (%s); its TTL will reclaim it", lease.id, err)
        finally:
            with self._cv:
                self._unloaded(lease, reason)
                self._cv.notify_all()
        if failed is not None:
            raise failed

    def _on_evict(self, notice: EvictNotice | None) -> None:
        """The boss's eviction thread: wait until no request runs, then unload and hand the lease back."""
        if notice is None:  # called off meanwhile
            return
        with self._cv:
            claim = self._claim_unload(notice.lease_id, evicting=True)
            while claim is None:
                self._cv.wait(POLL_S)
                claim = self._claim_unload(notice.lease_id, evicting=True)
        if claim:
            self._unload_sync(claim, "reclaimed")

    def _on_lost(self, lease: Lease) -> None:
        """From the heartbeat thread: the lease is gone; unload (in a thread: requests may still run)."""
        threading.Thread(target=self._drop_lost, args=(lease,), name="gpuboss-warm-lost", daemon=True).start()

    def _drop_lost(self, lease: Lease) -> None:
        with self._cv:
            claim = self._claim_unload(lease.id, evicting=False)
            while claim is None:
                self._cv.wait(POLL_S)
                claim = self._claim_unload(lease.id, evicting=False)
        if claim:
            self._unload_sync(claim, "lost")

    # -- AsyncGPUBoss

    def _cond(self) -> asyncio.Condition:
        if self._acv is None:
            self._acv = asyncio.Condition()
        return self._acv

    async def _wait(self) -> None:
        """Wait (the condition held) for a change, or POLL_S: lease states also change in other threads."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._cond().wait(), POLL_S)

    async def __aenter__(self) -> WarmModel:
        if not self._async:
            raise TypeError("keep_warm() of a GPUBoss: use `with boss.keep_warm(...)`")
        boss: AsyncGPUBoss = self._boss  # type: ignore[assignment]
        async with self._cond():
            if self._phase != "new":
                raise RuntimeError("a WarmModel is entered once")
            self._phase = "loading"
        try:
            if self.vram_gb is None:
                self.vram_gb = (await boss.choose_model(self.model, node=self.node)).vram_mib / 1024
            lease, reply = await self._load_async(busy=False)
            await self._settle_async(lease, "idle", reply)
        except BaseException:
            async with self._cond():
                self._phase = "closed"
                self._cond().notify_all()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        cv = self._cond()
        async with cv:
            while self._phase in ("loading", "marking", "unloading") or self._users > 0:
                await self._wait()
            if self._phase == "closed":
                return
            lease, self._phase = self.lease, "closing"
        try:
            if lease is not None:
                await self._unload_async(lease, "closed")
        finally:
            async with cv:
                self._phase = "closed"
                cv.notify_all()

    @contextlib.asynccontextmanager
    async def _busy_async(self) -> AsyncIterator[Device]:
        lease = await self._enter_async()
        try:
            yield Device(lease)
        finally:
            await self._exit_async()

    async def _load_async(self, busy: bool) -> tuple[Lease, list[Any]]:
        boss: AsyncGPUBoss = self._boss  # type: ignore[assignment]
        asked = time.monotonic()
        lease = await boss.acquire(**self._acquire_args())
        lease.model = self.model
        self.lease = lease
        granted = time.monotonic()
        try:
            await _call_async(self.on_load, lease)
        except BaseException:
            self.lease = None
            await boss.release(lease)
            raise
        event = self._after_load(lease, granted - asked, time.monotonic() - granted)
        op: Op = "busy" if busy else "idle"
        reply = await boss._eval(
            activity_call(boss._core, lease.id, op, self.idle_timeout_ms, self.model, event, self.reloads)
        )
        return lease, reply

    async def _enter_async(self) -> Lease:
        boss: AsyncGPUBoss = self._boss  # type: ignore[assignment]
        cv = self._cond()
        while True:
            async with cv:
                action = self._next_enter()
                while action is None:
                    await self._wait()
                    action = self._next_enter()
                lease = self.lease
            if action == "join" and lease is not None:
                return lease
            try:
                if action == "load":
                    lease, reply = await self._load_async(busy=True)
                elif action == "unload":
                    assert lease is not None
                    await self._unload_async(lease, self._reason(lease, "lost"))
                    continue
                else:
                    assert lease is not None
                    reply = await boss._eval(activity_call(boss._core, lease.id, "busy"))
            except BaseException:
                async with cv:
                    self._phase = "unloaded" if self.lease is None else "ready"
                    cv.notify_all()
                raise
            if await self._settle_async(lease, "busy", reply, busy=True):
                return lease

    async def _exit_async(self) -> None:
        boss: AsyncGPUBoss = self._boss  # type: ignore[assignment]
        cv = self._cond()
        async with cv:
            self._users -= 1
            lease = self.lease
            cv.notify_all()
            if self._users > 0 or lease is None or self._phase != "ready" or lease.state is not LeaseState.GRANTED:
                return
            self._phase = "marking"
        reply: list[Any] | None = None
        try:
            reply = await boss._eval(activity_call(boss._core, lease.id, "idle"))
        except RedisUnavailable as err:
            log.warning("gpuboss: could not mark %s idle (%s); it stays busy until the next request", lease.id, err)
        finally:
            async with cv:
                if self._phase == "marking":
                    self._phase = "ready"
                cv.notify_all()
        if reply is not None:
            await self._settle_async(lease, "idle", reply)

    async def _settle_async(self, lease: Lease, op: str, reply: list[Any], busy: bool = False) -> bool:
        """See :meth:`_settle_sync`."""
        cv = self._cond()
        async with cv:
            settled = self._settle(lease, op, reply, busy)
            cv.notify_all()
            if settled is None:
                await self._wait()
        if settled is False:
            await self._unload_async(lease, "lost")
        return bool(settled)

    async def _unload_async(self, lease: Lease, default: UnloadReason) -> None:
        """See :meth:`_unload_sync`."""
        boss: AsyncGPUBoss = self._boss  # type: ignore[assignment]
        cv = self._cond()
        reason = self._reason(lease, default)
        failed: BaseException | None = None
        try:
            await _call_async(self.on_unload, reason)
        except BaseException as err:
            async with cv:
                handed_back = self._unload_failed(reason)
                closing = self._phase == "closing"
                cv.notify_all()
            if not handed_back:
                raise
            failed = err if closing else None
        boss._before_yield(lease)
        try:
            await boss._eval(unload_call(boss._core, lease, reason))
        except RedisUnavailable as err:
            log.warning("gpuboss: could not hand back %s (%s); its TTL will reclaim it", lease.id, err)
        finally:
            async with cv:
                self._unloaded(lease, reason)
                cv.notify_all()
        if failed is not None:
            raise failed

    async def _on_evict_async(self, notice: EvictNotice | None) -> None:
        """See :meth:`_on_evict` (a task on the boss's event loop)."""
        if notice is None:
            return
        cv = self._cond()
        async with cv:
            claim = self._claim_unload(notice.lease_id, evicting=True)
            while claim is None:
                await self._wait()
                claim = self._claim_unload(notice.lease_id, evicting=True)
        if claim:
            await self._unload_async(claim, "reclaimed")

    async def _on_lost_async(self, lease: Lease) -> None:
        """See :meth:`_on_lost` (a task on the boss's event loop)."""
        cv = self._cond()
        async with cv:
            claim = self._claim_unload(lease.id, evicting=False)
            while claim is None:
                await self._wait()
                claim = self._claim_unload(lease.id, evicting=False)
        if claim:
            await self._unload_async(claim, "lost")
