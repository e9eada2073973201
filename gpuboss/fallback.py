"""What a boss does when Redis cannot be reached: ``on_redis_down`` (docs/scheduling.md, section 7).

``error`` (the default): a call to Redis that fails gets a short reconnect (at most :data:`ERROR_GRACE_S`, or
``connect_timeout`` if shorter: enough for a stale connection or a quick restart), then raises
:class:`RedisUnavailable`. Once an outage is known, a call gets one more try only, so a service can answer
"temporarily unavailable" (503) at once until Redis is back.

``wait``: a request retries with exponential backoff and jitter until its own timeout (``timeout=None``: until
Redis is back, the pauses capped at :data:`WAIT_CAP_S`); then :class:`RedisUnavailable`, chained from the last
connection error. Calls without a timeout of their own (release, pause, ...) retry for ``connect_timeout``.

``local``: a request that cannot reach Redis is served by the same Lua scripts on an in-process fakeredis
server (one per process and Redis URL, so every boss of this process with that URL shares it), seeded with the
GPUs this boss knows. Only this process is coordinated then, which is logged loudly. Each new request, and the
heartbeat, checks whether Redis is back (a PING, at most every :data:`PROBE_EVERY_S`); once it is, new requests
go to Redis again. A lease granted locally (``lease.local``) is not moved to Redis: it stays valid in the local
store, renewed there by the heartbeat, until it is released. A request that was waiting on Redis when Redis
went away moves to the local store (its Redis queue entry is withdrawn when Redis is back, or expires).

The state and the decisions are here, once; :class:`SyncLink` and :class:`AsyncLink` do the I/O for
:class:`~gpuboss.GPUBoss` and :class:`~gpuboss.AsyncGPUBoss`.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import hashlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio
from redis.exceptions import RedisError

from gpuboss.core import Call, Core, LeaseRequest, Op, Pop, Read
from gpuboss.errors import RedisOutOfMemory, RedisUnavailable
from gpuboss.lease import Lease
from gpuboss.redis_io import (
    MIN_POP_S,
    TRANSIENT,
    call_script_async,
    call_script_sync,
    connect_async,
    connect_sync,
    pop_async,
    pop_sync,
    read_async,
    read_sync,
    reply_within,
    retry_async,
    retry_sync,
    send_async,
    send_sync,
)
from gpuboss.topology import redact_url

if TYPE_CHECKING:
    from gpuboss.heartbeat import Heartbeat

log = logging.getLogger("gpuboss")

#: ``error`` and ``local``: how long the first failed call of an outage keeps trying (a stale connection, a
#: restart in progress) before Redis counts as down; ``connect_timeout`` if that is shorter.
ERROR_GRACE_S = 1.0
#: ``error`` and ``local``: the longest pause between two tries of that grace (so it ends close to its end).
GRACE_CAP_S = 0.25
#: ``wait``: the longest pause between two tries.
WAIT_CAP_S = 2.0
#: ``local``: Redis is checked again at most this often (each new request and the heartbeat ask).
PROBE_EVERY_S = 1.0
#: ``local``: the longest a check (connect and PING) may take.
PROBE_TIMEOUT_S = 0.5
LOCAL_SCHEME = "fakeredis://"


@dataclass
class Route:
    """Where the operations of one request go, and until when they may retry (``wait``)."""

    request_id: str
    ttl_ms: int
    #: The request's own timeout and its end (monotonic); None: it waits forever.
    timeout: float | None
    deadline: float | None
    #: True: the local store (``on_redis_down: local``, Redis unreachable).
    local: bool = False


#: The route of the request whose flow runs in this thread or task (set by the fronts' ``_run``).
ROUTE: contextvars.ContextVar[Route | None] = contextvars.ContextVar("gpuboss_route", default=None)


class Fallback:
    """One boss's view of Redis's health and of what it holds in the local store (thread-safe)."""

    def __init__(self, core: Core, url: str, held: Callable[[], list[Lease]] | None = None) -> None:
        self.core = core
        self._held = held
        self.url = url
        self.shown = redact_url(url)
        self.mode = core.config.on_redis_down
        digest = hashlib.sha1(url.encode(), usedforsecurity=False).hexdigest()[:16]
        #: The in-process store of ``local`` mode: shared by every boss of this process with the same URL.
        self.local_url = f"{LOCAL_SCHEME}gpuboss-local-{digest}"
        #: An outage is going on: a call failed and none has worked since.
        self.down = False
        #: ``local`` only: new requests go to the local store.
        self.local_active = False
        #: The outage was logged (once per outage).
        self._announced = False
        self._local_ready = False
        self._ids: set[str] = set()
        #: Redis leases of this boss, and the ids of their stand-ins in the local store (see setup_calls).
        self._shadows: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self._last_probe = 0.0
        self._probe_client: redis.Redis | None = None

    # -- what lives in the local store

    def is_local(self, item_id: str) -> bool:
        """Whether a lease or request id (or a local lease's ``<id>:grow``) belongs to the local store."""
        ids = self._ids
        return item_id in ids or (item_id.endswith(":grow") and item_id[:-5] in ids)

    def has_local(self) -> bool:
        return bool(self._ids)

    def has_shadows(self) -> bool:
        return bool(self._shadows)

    def mark_local(self, item_id: str) -> None:
        self._ids.add(item_id)

    def discard(self, item_id: str) -> None:
        self._ids.discard(item_id)

    def routes_local(self, op: Op) -> bool:
        """Whether an operation outside a request (a release, renew, hand-back, resize, activity...) concerns a
        lease or request of the local store: it names its id (or ``<id>:grow``, or its wake list)."""
        ids = self._ids
        if not ids:
            return False
        names: list[Any]
        if isinstance(op, Call):
            names = op.args
        elif isinstance(op, Pop):
            prefix = self.core.keys.wake_prefix
            names = [op.key[len(prefix) :]] if op.key.startswith(prefix) else []
        else:
            return False
        return any(isinstance(n, str) and self.is_local(n) for n in names)

    def shadows_of(self, batch: dict[str, int]) -> dict[str, int]:
        """The stand-ins of the Redis leases in a heartbeat batch, with their TTLs: renewed with them."""
        shadows = self._shadows
        if not shadows:
            return {}
        return {sid: ttl for rid, ttl in batch.items() for sid in shadows.get(rid, ())}

    def pop_shadows(self, op: Call | None = None) -> list[str]:
        """The stand-ins to free: those of the leases a release names (None: all of them)."""
        if not self._shadows:
            return []
        with self._lock:
            if op is None:
                gone = [sid for ids in self._shadows.values() for sid in ids]
                self._shadows.clear()
                return gone
            return [sid for arg in op.args if isinstance(arg, str) for sid in self._shadows.pop(arg, ())]

    def setup_calls(self) -> list[Call]:
        """What the local store needs before its first request of an outage: this configuration's scheduling
        rules; every GPU this boss knows (its declared and discovered ones, and those last read from Redis);
        and a stand-in for each lease this boss holds from Redis, on the same GPU with the same size and
        priority, so a local grant never lands on VRAM this process already uses. The stand-ins are renewed
        with their leases by the heartbeat, and freed when their lease is released (or expire when it is
        lost)."""
        calls: list[Call] = []
        core = self.core
        if core.policy_fields:
            calls.append(core.policy_call())
        known = {**core.registry, **core.declared}
        register = core.register_call()
        if known and register is not None:
            args: list[str | int] = [g.to_json() for g in known.values()]
            calls.append(dataclasses.replace(register, args=[*args, *register.args[len(core.declared) :]]))
        elif known:
            # No GPU declared here: build the call from an empty declaration list's layout (GPUs, then the cap).
            calls.append(
                Call(
                    "register",
                    [*core.keys.register(), *core.keys.event_keys()],
                    [*(g.to_json() for g in known.values()), core.config.events_maxlen],
                )
            )
        for lease in self._held() if self._held is not None else []:
            if lease.local or lease.id in self._shadows:
                continue
            rank = core.config.priorities.get(lease.priority, 0)
            ids: list[str] = []
            for k, gpu in enumerate(lease.gpus):
                sid = f"{lease.id}-shadow{k}"
                mib = lease.vram_mib // len(lease.gpus)
                stand_in = LeaseRequest(mib, lease.priority, rank, int(lease.ttl * 1000), 0, gpu, None)
                calls.append(core.acquire_call(sid, stand_in, gpu, core.config.service))
                ids.append(sid)
            with self._lock:
                self._shadows[lease.id] = ids
        return calls

    def take_setup(self) -> bool:
        """True once per outage, for the caller that seeds the local store (only while local mode is on)."""
        with self._lock:
            if self._local_ready or not self.local_active:
                return False
            self._local_ready = True
            return True

    # -- routing and budgets

    def new_route(self, req: LeaseRequest, request_id: str) -> Route:
        """A new request's route: the local store while ``local`` mode is active, else Redis."""
        deadline = None if req.timeout is None else time.monotonic() + req.timeout
        route = Route(request_id, req.ttl_ms, req.timeout, deadline)
        if self.local_active:
            route.local = True
            self.mark_local(request_id)
        return route

    def within(self, route: Route | None) -> tuple[float | None, float]:
        """How long a call to Redis may keep trying (None: until it works), and the longest pause."""
        timeout = self.core.config.connect_timeout
        if self.mode == "wait":
            if route is None:
                return timeout, 1.0
            if route.deadline is None:
                return None, WAIT_CAP_S
            left = max(0.0, route.deadline - time.monotonic())
            return left, min(WAIT_CAP_S, max(0.05, left / 8))  # pauses short next to the time left
        # error, local: one more try during a known outage, else a short grace for a blip.
        return (0.0 if self.down else min(timeout, ERROR_GRACE_S)), GRACE_CAP_S

    def timed_out(self, route: Route, err: RedisUnavailable) -> RedisUnavailable:
        """``wait``: the error for a request whose timeout ran out while Redis was down."""
        waited = "" if route.timeout is None else f" for the request's timeout ({route.timeout:g} s)"
        return RedisUnavailable(f"{err}; waited{waited} with on_redis_down: wait")

    # -- outages

    def failed(self, err: BaseException) -> None:
        """A call to Redis failed (its first try): an outage starts, unless one is going on. ``wait`` says so
        at once (its requests now wait); the others when a call gives up (:meth:`unreachable`)."""
        with self._lock:
            self.down = True
            if self.mode != "wait" or self._announced:
                return
            self._announced = True
        log.warning(
            "gpuboss: Redis at %s is unreachable (%s); requests wait for it (on_redis_down: wait)", self.shown, err
        )

    def unreachable(self, err: RedisUnavailable) -> None:
        """A call to Redis gave up. ``local``: new requests go to the local store from now on."""
        with self._lock:
            self.down = True
            if self._announced:
                return
            self._announced = True
            if self.mode == "local":
                self.local_active = True
                self._last_probe = time.monotonic()
        if self.mode == "local":
            log.warning(
                "gpuboss: %s; on_redis_down: local -- leases are now coordinated WITHIN THIS PROCESS ONLY: other "
                "processes are NOT coordinated and may over-commit the GPUs until Redis is back (checked at most "
                "every %g s)",
                err,
                PROBE_EVERY_S,
            )
        else:
            log.warning(
                "gpuboss: %s; requests raise RedisUnavailable until it is back (on_redis_down: %s)", err, self.mode
            )

    def ok(self) -> None:
        """A call to Redis worked: an outage, if any, is over."""
        if not self.down:
            return
        with self._lock:
            if not self.down:
                return
            self.down = False
            announced, self._announced = self._announced, False
            was_local, self.local_active, self._local_ready = self.local_active, False, False
        # The scheduling rules are stored again at the next request (a restarted Redis may have lost them).
        self.core.policy_day = None
        if was_local:
            log.warning(
                "gpuboss: reaches Redis at %s again: new requests go to it. Leases granted in local mode "
                "(lease.local) stay in this process's local store, renewed there, until released; other processes "
                "do not see them",
                self.shown,
            )
        elif announced:
            log.warning("gpuboss: reaches Redis at %s again", self.shown)

    def probe_due(self) -> bool:
        return self.local_active and time.monotonic() - self._last_probe >= PROBE_EVERY_S

    def probe(self) -> bool:
        """``local``: PING Redis (at most every :data:`PROBE_EVERY_S`, briefly); True when it is back."""
        with self._lock:
            now = time.monotonic()
            if not self.local_active or now - self._last_probe < PROBE_EVERY_S:
                return not self.local_active
            self._last_probe = now
            if self._probe_client is None:
                short = min(self.core.config.connect_timeout, PROBE_TIMEOUT_S)
                self._probe_client = connect_sync(self.url, short, socket_timeout=short)
            client = self._probe_client
        try:
            client.ping()
        except TRANSIENT as err:
            log.debug("gpuboss: Redis at %s is still unreachable (%s)", self.shown, err)
            return False
        except RedisError as err:  # answering, but refusing: not usable yet
            log.debug("gpuboss: Redis at %s answers the check with an error (%s)", self.shown, err)
            return False
        self.ok()
        return True

    def after_fork(self) -> None:
        """In a forked child (base.py): the parent's local leases and stand-ins are not this process's; a lock
        and a probe connection of its own."""
        self._lock = threading.Lock()
        self._probe_client = None
        self._ids = set()
        self._shadows = {}

    def close(self) -> None:
        with self._lock:
            client, self._probe_client = self._probe_client, None
        if client is not None:
            client.close()


def move(fallback: Fallback, heartbeat: Heartbeat, route: Route) -> None:
    """``local``: a request that cannot reach Redis goes on in the local store (the operation that failed is
    sent there, and the flow carries on: every script is idempotent). Its copy in Redis, if any, is withdrawn
    by the heartbeat once Redis answers again, or expires with its TTL."""
    route.local = True
    fallback.mark_local(route.request_id)
    heartbeat.withdraw(route.request_id, route.ttl_ms)


def _discard_released(fallback: Fallback, op: Op) -> None:
    """After a release in the local store: its id is no longer the local store's."""
    if isinstance(op, Call) and op.script == "release":
        for arg in op.args:
            if isinstance(arg, str) and fallback.is_local(arg):
                fallback.discard(arg)


class SyncLink:
    """The blocking I/O of :class:`~gpuboss.GPUBoss` under ``on_redis_down``: Redis or the local store."""

    def __init__(self, fallback: Fallback, real: redis.Redis, heartbeat: Heartbeat) -> None:
        self.fallback = fallback
        self.real = real
        self._heartbeat = heartbeat
        self._local: redis.Redis | None = None

    def route(self, req: LeaseRequest, request_id: str) -> Route:
        """Where a new request goes (``local``: checks whether Redis is back, at most every second)."""
        if self.fallback.probe_due():
            self.fallback.probe()
        return self.fallback.new_route(req, request_id)

    def perform(self, op: Call | Pop | Read, route: Route | None = None) -> Any:
        fallback = self.fallback
        if route.local if route is not None else fallback.routes_local(op):
            return self._local_op(op)
        if fallback.has_shadows() and isinstance(op, Call) and op.script == "release":
            for sid in fallback.pop_shadows(op):  # the VRAM is free now, whatever Redis says
                call_script_sync(self._local_connection(), fallback.core.release_call(sid))
        try:
            return self._real_op(op, route)
        except RedisOutOfMemory:
            raise  # (Redis answers: no outage, and no local store for it)
        except RedisUnavailable as err:
            fallback.unreachable(err)
            if fallback.mode != "local" or route is None:
                raise
            move(fallback, self._heartbeat, route)
            return self._local_op(op)

    def _real_op(self, op: Call | Pop | Read, route: Route | None) -> Any:
        client = self.real
        if isinstance(op, Pop):
            try:
                return pop_sync(client, op.key, op.timeout, self.fallback.core.config.connect_timeout)
            except TRANSIENT:
                return None  # the flow looks again through a retried call
        fallback = self.fallback
        within, cap = fallback.within(route)
        wait = fallback.mode == "wait"

        try:
            result = retry_sync(
                functools.partial(send_sync, client, op),
                fallback.shown,
                within,
                cap=cap,
                chain=wait,
                failed=fallback.failed,
            )
        except RedisOutOfMemory:
            raise
        except RedisUnavailable as err:
            if wait and route is not None:
                raise fallback.timed_out(route, err) from err.__cause__
            raise
        fallback.ok()
        return result

    def _local_connection(self) -> redis.Redis:
        if self._local is None:
            self._local = connect_sync(self.fallback.local_url, self.fallback.core.config.connect_timeout)
        return self._local

    def local_client(self) -> redis.Redis:
        """The local store's client; it is seeded (rules, GPUs, stand-ins) at its first use in an outage."""
        client = self._local_connection()
        if self.fallback.take_setup():
            for call in self.fallback.setup_calls():
                call_script_sync(client, call)
        return client

    def _local_op(self, op: Call | Pop | Read) -> Any:
        client = self.local_client()
        if isinstance(op, Call):
            result = call_script_sync(client, op)
            _discard_released(self.fallback, op)
            return result
        if isinstance(op, Pop):
            popped = client.blpop([op.key], timeout=max(op.timeout, MIN_POP_S))
            return None if popped is None else popped[1]
        return read_sync(client, op)

    def close(self) -> None:
        """Free the stand-ins (the heartbeat releases the rest) and close the clients."""
        for sid in self.fallback.pop_shadows():
            call_script_sync(self._local_connection(), self.fallback.core.release_call(sid, "close"))
        if self._local is not None:
            self._local.close()
            self._local = None
        self.fallback.close()


class AsyncLink:
    """The asyncio twin of :class:`SyncLink`."""

    def __init__(self, fallback: Fallback, real: redis.asyncio.Redis, heartbeat: Heartbeat) -> None:
        self.fallback = fallback
        self.real = real
        self._heartbeat = heartbeat
        self._local: redis.asyncio.Redis | None = None

    async def route(self, req: LeaseRequest, request_id: str) -> Route:
        if self.fallback.probe_due():
            await asyncio.to_thread(self.fallback.probe)
        return self.fallback.new_route(req, request_id)

    async def perform(self, op: Call | Pop | Read, route: Route | None = None) -> Any:
        fallback = self.fallback
        if route.local if route is not None else fallback.routes_local(op):
            return await self._local_op(op)
        if fallback.has_shadows() and isinstance(op, Call) and op.script == "release":
            for sid in fallback.pop_shadows(op):
                await call_script_async(self._local_connection(), fallback.core.release_call(sid))
        try:
            return await self._real_op(op, route)
        except RedisOutOfMemory:
            raise  # (Redis answers: no outage, and no local store for it)
        except RedisUnavailable as err:
            fallback.unreachable(err)
            if fallback.mode != "local" or route is None:
                raise
            move(fallback, self._heartbeat, route)
            return await self._local_op(op)

    async def _real_op(self, op: Call | Pop | Read, route: Route | None) -> Any:
        client = self.real
        if isinstance(op, Pop):
            try:
                return await pop_async(client, op.key, op.timeout, self.fallback.core.config.connect_timeout)
            except TRANSIENT:
                return None
        fallback = self.fallback
        within, cap = fallback.within(route)
        wait = fallback.mode == "wait"
        grace = fallback.core.config.connect_timeout  # (the longest wait for one reply: see reply_within)

        def send() -> Awaitable[Any]:
            return reply_within(send_async(client, op), grace)

        try:
            result = await retry_async(send, fallback.shown, within, cap=cap, chain=wait, failed=fallback.failed)
        except RedisOutOfMemory:
            raise
        except RedisUnavailable as err:
            if wait and route is not None:
                raise fallback.timed_out(route, err) from err.__cause__
            raise
        fallback.ok()
        return result

    def _local_connection(self) -> redis.asyncio.Redis:
        if self._local is None:
            self._local = connect_async(self.fallback.local_url, self.fallback.core.config.connect_timeout)
        return self._local

    async def _local_op(self, op: Call | Pop | Read) -> Any:
        client = self._local_connection()
        if self.fallback.take_setup():
            for call in self.fallback.setup_calls():
                await call_script_async(client, call)
        if isinstance(op, Call):
            result = await call_script_async(client, op)
            _discard_released(self.fallback, op)
            return result
        if isinstance(op, Pop):
            popped = await client.blpop([op.key], timeout=max(op.timeout, MIN_POP_S))
            return None if popped is None else popped[1]
        return await read_async(client, op)

    def for_loop(self, real: redis.asyncio.Redis) -> AsyncLink:
        """This link for another event loop: the same fallback and heartbeat, with ``real`` (a client made for that
        loop) and no local-store client yet (the one here belongs to the loop that opened it)."""
        return AsyncLink(self.fallback, real, self._heartbeat)

    async def close_clients(self) -> None:
        """Close this link's clients (Redis and the local store), in the event loop that opened them; the fallback
        stays (it is the boss's)."""
        if self._local is not None:
            await self._local.aclose()
            self._local = None
        await self.real.aclose()

    async def close(self) -> None:
        """Release what the local store still holds for this boss, then close this link's clients (Redis too:
        :meth:`close_clients`) and the fallback's."""
        for sid in self.fallback.pop_shadows():
            await call_script_async(self._local_connection(), self.fallback.core.release_call(sid, "close"))
        await self.close_clients()
        await asyncio.to_thread(self.fallback.close)
