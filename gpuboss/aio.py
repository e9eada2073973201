"""``AsyncGPUBoss``: the asyncio front end, driving the same core as ``GPUBoss``.

Its heartbeat is the same thread as the blocking boss uses (see ``heartbeat.py`` for why not a task);
``on_lost`` callbacks, coroutine functions included, run on the event loop the boss was used from.

A boss serves one event loop at a time, one after another: each ``asyncio.run`` (or each test of pytest-asyncio)
may use the same boss. Its Redis connections belong to the loop that opened them (asyncio cannot close them
from another), so each loop gets its own, closed as that loop shuts down (:func:`_closing_with_loop`); leases,
the heartbeat and the notice listener carry over. Two loops running at once (in two threads) with one boss
get :class:`~gpuboss.errors.EventLoopError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

from redis.exceptions import RedisError

from gpuboss import warm
from gpuboss.base import BossBase
from gpuboss.config import BossConfig
from gpuboss.core import (
    CLEAN_ERRORS,
    DEFAULT,
    REDIS_OPS,
    Call,
    Collected,
    Flow,
    GpuInfo,
    Op,
    ReleaseReason,
    RevokeReply,
    Timeout,
    Watch,
    YieldOutcome,
    YieldReply,
    grow_request_id,
    new_request_id,
)
from gpuboss.errors import EventLoopError, GPUBossError, LeaseCancelled, RedisUnavailable
from gpuboss.fallback import ROUTE, AsyncLink, Route
from gpuboss.lease import Device, Lease, LeaseState, call_on_evict
from gpuboss.redis_io import connect_async, run_flow_async
from gpuboss.registry import AsyncInventoryMethods

log = logging.getLogger("gpuboss")

#: In a forked child: what its bosses took over from the parent's event loop, held for the child's life (see
#: AsyncGPUBoss._after_fork).
_PARENTS: list[object] = []


async def _closing_with_loop(link: AsyncLink) -> AsyncGenerator[None, None]:
    """Started in an event loop and left suspended there: as that loop shuts down (``asyncio.run`` closes every
    async generator of the loop before it closes the loop), it closes the link's connections, which only that
    loop can close. A loop closed without that step leaves them to the garbage collector."""
    try:
        yield
    finally:
        try:
            await link.close_clients()
        except (RedisError, OSError) as err:
            log.warning("gpuboss: could not close the connections of a finished event loop: %s", err)


class AsyncGPUBoss(AsyncInventoryMethods, BossBase):
    """Asyncio VRAM leases.

    >>> boss = AsyncGPUBoss(redis_url="redis://localhost:6379/0", gpus=[{"id": "gpu0", "vram_gb": 24}])
    >>> async with boss.lease(vram_gb=8, priority="high") as device:   # device == "cuda:0"
    ...     ...
    """

    def __init__(self, redis_url: str | None = None, *, config: BossConfig | None = None, **settings: Any) -> None:
        super().__init__(redis_url, config, settings)
        self._redis = connect_async(self.url, self._core.config.connect_timeout)  # (replies: see reply_within)
        self._link = AsyncLink(self._fallback, self._redis, self._heartbeat)  # Redis, or on_redis_down
        self._ready_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None  # the event loop served (see the module's docstring)
        # (_closing_with_loop of that loop, kept here: the loop holds its async generators only weakly, and one that
        # nothing holds is finalized early, not by the loop's shutdown; tests/test_api.py shows its connections
        # then outlive the loop)
        self._loop_guard: AsyncGenerator[None, None] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    def _after_fork(self) -> None:
        """In a forked child (see :meth:`BossBase._after_fork`), also the loop: the one served at the fork is the
        parent's (running there, maybe), and so are its connections and tasks. The child's first call binds a
        loop of its own with new connections. The parent's objects are kept, never closed nor collected here:
        closing a connection of the parent's loop would take its socket out of the parent's epoll set, which
        the child shares."""
        super()._after_fork()
        _PARENTS.append((self._loop, self._loop_guard, self._redis, self._link, self._background))
        self._loop = None
        self._loop_guard = None
        self._background = set()
        self._redis = connect_async(self.url, self._core.config.connect_timeout)
        self._link = self._link.for_loop(self._redis)
        self._ready_lock = asyncio.Lock()

    # -- I/O

    async def _bind_loop(self) -> None:
        """Serve the running event loop: the first one, or one that came after the last one stopped. A new loop
        gets a new Redis client (and local-store link) and lock; the old loop's connections were closed as it
        shut down."""
        loop = asyncio.get_running_loop()
        old = self._loop
        if old is loop:
            return
        if old is not None:
            if old.is_running():
                raise EventLoopError(
                    "this AsyncGPUBoss is in use by an event loop that is still running in another thread: a boss "
                    "serves one event loop at a time; create one AsyncGPUBoss per event loop"
                )
            self._redis = connect_async(self.url, self._core.config.connect_timeout)
            self._link = self._link.for_loop(self._redis)
            self._ready_lock = asyncio.Lock()
            self._background = set()
            for lease in list(self._leases.values()):  # (no task of the stopped loop holds one now)
                lease._handling = asyncio.Lock()
        guard = _closing_with_loop(self._link)
        await anext(guard)  # (runs to its `yield` at once; the loop now tracks it)
        self._loop_guard, self._loop = guard, loop

    async def _eval(self, call: Call) -> Any:
        if asyncio.get_running_loop() is not self._loop:
            await self._bind_loop()
        return await self._link.perform(call)

    async def _perform(self, op: Op) -> Any:
        if isinstance(op, REDIS_OPS):
            return await self._link.perform(op, ROUTE.get())
        if isinstance(op, Watch):
            self._heartbeat.watch(op.request_id, op.ttl_ms)
            return None
        raise TypeError(f"unknown operation {op!r}")

    async def _run(self, flow: Flow | Any, route: Route | None = None) -> Any:
        """Drive ``flow``; with a ``route`` (a request's), its operations go where the route says."""
        if asyncio.get_running_loop() is not self._loop:
            await self._bind_loop()
        if route is None:
            return await run_flow_async(flow, self._perform)
        token = ROUTE.set(route)
        try:
            return await run_flow_async(flow, self._perform)
        finally:
            ROUTE.reset(token)

    # -- public API

    async def acquire(
        self,
        vram_gb: float | None = None,
        priority: str | None = None,
        timeout: Timeout = DEFAULT,
        ttl: float | None = None,
        device: str | int | None = None,
        on_lost: Any = None,
        *,
        preemptible: bool | None = None,
        on_evict: Any = None,
        resume: bool = True,
        node: str | None = None,
        model: str | None = None,
        quantizations: Sequence[str] | None = None,
        gpus: int = 1,
    ) -> Lease:
        """Wait for a lease of ``vram_gb`` GB (or of what ``model`` needs); see the README, docs/eviction.md and
        docs/inventory.md for every argument."""
        self._check_open()
        choice = None
        if self._wants_model(vram_gb, model, quantizations):
            choice = await self.choose_model(str(model), quantizations, node)
            vram_gb = choice.vram_mib / 1024
        req = self._core.make_request(
            vram_gb, priority, timeout, ttl, device, on_lost, preemptible, on_evict, resume, node, gpus
        )
        if asyncio.get_running_loop() is not self._loop:
            await self._bind_loop()
        request_id = new_request_id()
        route = await self._link.route(req, request_id)  # Redis, or the local store (on_redis_down: local)
        async with self._ready_lock:
            req = await self._run(self._inventory.prepare_flow(req), route)  # + discovery, cuda:N pin, host beat
        if self._may_be_evicted(req) and not route.local:
            await asyncio.to_thread(self._notices.start)
        try:
            lease: Lease = await self._run(self._core.acquire_flow(req, request_id), route)
        except CLEAN_ERRORS:
            self._heartbeat.forget(request_id)
            raise
        except RedisUnavailable:  # nothing to withdraw now: the heartbeat does it once Redis is back
            self._heartbeat.forget(request_id)
            self._heartbeat.release_later(request_id, req.ttl_ms)
            raise
        except BaseException:  # cancelled midway: withdraw the request, or release what it was granted
            self._heartbeat.forget(request_id)
            await self._release_id(request_id, req.ttl_ms, "cancel")
            raise
        try:
            lease._handling = asyncio.Lock()
            if choice is not None:
                lease.model, lease.quantization = choice.model, choice.quantization
            return self._granted(lease)
        except BaseException:  # granted, but never handed to the caller: release it
            self._abandon(lease, request_id)
            await self._release_id(request_id, req.ttl_ms, "cancel")
            raise

    # -- eviction

    def _start_eviction(self, lease: Lease) -> None:
        """From the notice thread: run the hand-back as a task on the boss's event loop."""
        loop = self._loop
        if loop is None or loop.is_closed():
            log.warning("gpuboss: lease %s is asked to checkpoint, but its event loop is gone", lease.id)
            return

        def start() -> None:
            task = asyncio.ensure_future(self._evict_now(lease))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

        loop.call_soon_threadsafe(start)

    async def _evict_now(self, lease: Lease) -> None:
        """Checkpoint (``on_evict``), hand the VRAM back and, with ``resume``, wait to be granted again."""
        async with lease._handling:
            if lease.state is not LeaseState.EVICTING:
                return
            try:
                await self._eval(self._core.checkpoint_call(lease.id))
            except RedisUnavailable as err:
                log.warning("gpuboss: could not record the checkpoint start of %s (%s)", lease.id, err)
            if lease.on_evict is not None:
                try:
                    result = call_on_evict(lease.on_evict, lease.notice)
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    log.exception("gpuboss: on_evict of lease %s failed; the lease is not handed back", lease.id)
                    return
            if lease.state is not LeaseState.EVICTING:
                return  # called off, or shrunk enough, while it checkpointed
            self._before_yield(lease)
            try:
                outcome = await self._run(self._core.yield_flow(lease, stop=lambda: self._stop_waiting(lease)))
            except LeaseCancelled:
                return
            except RedisUnavailable:
                log.exception("gpuboss: could not hand back lease %s; its TTL will reclaim it", lease.id)
                outcome = YieldOutcome(YieldReply.GONE, None)
            self._after_yield(lease, outcome)

    async def _yield_if_requested(self, lease: Lease) -> bool:
        lease.raise_if_lost()
        if lease.state is LeaseState.GRANTED:
            return lease._report_rounds()  # (a round the boss's thread finished since the last safe point)
        if lease.state is LeaseState.EVICTING:
            await self._evict_now(lease)
        await warm.unpark_async(self, lease)  # reclaimed while idle: ask again now (docs/warm.md)
        if not lease._settled.is_set():
            await asyncio.to_thread(lease._settled.wait)
        lease.raise_if_lost()
        lease._report_rounds()
        return True

    async def _resize(self, lease: Lease, vram_gb: float, timeout: float | None) -> Lease:
        self._check_open()
        try:
            record = await self._run(self._core.resize_flow(lease, vram_gb, timeout))
        except BaseException as err:
            grow_id = self._grow_withdrawn(lease, err)
            if grow_id is not None:
                await self._release_id(grow_id, int(lease.ttl * 1000), "cancel")
            raise
        finally:
            self._heartbeat.forget(grow_request_id(lease.id))  # (watched while it waited: renewed no more)
        return self._resized(lease, record)

    async def _activity(self, lease: Lease, op: str, idle_timeout_ms: int | None = None) -> Lease:
        return await warm.activity_async(self, lease, op, idle_timeout_ms)

    def keep_warm(self, model: str, vram_gb: float | None = None, **options: Any) -> warm.WarmModel:
        """``async with boss.keep_warm(model="gemma3:12b", vram_gb=9, idle_timeout_s=300, on_unload=...) as warm:``
        keeps a model loaded between requests, under a lease that yields to real work; serve each request in
        ``async with warm.busy() as device:``. See :class:`~gpuboss.WarmModel` and docs/warm.md."""
        self._check_open()
        return warm.WarmModel(self, model, vram_gb, **options)

    async def _release_id(self, item_id: str, ttl_ms: int, reason: ReleaseReason = "release") -> Any:
        """Release, in the caller's task. If the caller is cancelled before the release lands, or it fails, the
        heartbeat thread finishes it: cancelling a caller cannot leave a lease half released (a release sent
        twice finds nothing the second time). A task of its own for each release (shielded) costs two more
        passes of the event loop on every release, for the rare cancelled one.
        """
        try:
            return await self._eval(self._core.release_call(item_id, reason))
        except BaseException:
            self._heartbeat.release_later(item_id, ttl_ms)
            raise

    async def release(self, lease: Lease | str) -> bool:
        """Give a lease back (a :class:`Lease` or its id). True if it was still held; twice is harmless."""
        releasing = self._begin_release(lease)
        if releasing is None:
            return False
        return self._end_release(await self._release_id(releasing.lease_id, releasing.ttl_ms), releasing)

    @contextlib.asynccontextmanager
    async def lease(
        self,
        vram_gb: float | None = None,
        priority: str | None = None,
        timeout: Timeout = DEFAULT,
        ttl: float | None = None,
        device: str | int | None = None,
        on_lost: Any = None,
        *,
        preemptible: bool | None = None,
        on_evict: Any = None,
        resume: bool = True,
        node: str | None = None,
        model: str | None = None,
        quantizations: Sequence[str] | None = None,
        gpus: int = 1,
    ) -> AsyncIterator[Device]:
        """``async with boss.lease(vram_gb=8) as device:`` holds a lease for the block, releases it after.

        If the lease was lost while the block ran and no ``on_lost`` was given, :class:`LeaseLost` is
        raised at the end of the block.
        """
        held = await self.acquire(
            vram_gb,
            priority,
            timeout,
            ttl,
            device,
            on_lost,
            preemptible=preemptible,
            on_evict=on_evict,
            resume=resume,
            node=node,
            model=model,
            quantizations=quantizations,
            gpus=gpus,
        )
        try:
            yield Device(held)
        finally:
            await self.release(held)
        self._check_block_end(held, on_lost)

    async def gpus(self) -> list[GpuInfo]:
        """The GPUs registered in the namespace."""
        result: list[GpuInfo] = await self._run(self._core.registry_flow())
        return result

    async def revoke(self, lease_id: str, reason: str = "") -> bool:
        """Force-release another holder's lease (the admin path, like ``gpuboss release ID``): its VRAM goes to
        the waiters at once, a ``revoked`` event names this boss, and the holder's heartbeat reports it lost.
        True if the lease was there."""
        call = self._core.revoke_call(lease_id, self._core.operator, reason)
        code, _, _ = self._core.revoked(await self._eval(call))
        return code is not RevokeReply.NOT_FOUND

    async def pause(self, priority: str) -> bool:
        """Stop grants of a priority class in every process at once (active leases continue); True if it
        was not paused yet."""
        return bool(int((await self._eval(self._core.pause_call(priority, True, self._core.operator)))[0]))

    async def resume(self, priority: str) -> bool:
        """Restart grants of a paused class; its waiting requests are served at once. True if it was paused."""
        return bool(int((await self._eval(self._core.pause_call(priority, False, self._core.operator)))[0]))

    async def collect(self) -> dict[str, int]:
        """Reclaim expired leases and queue entries now, and what processes gone from this machine held; say how
        many of each (``leases``, ``requests``: expired; ``revoked``, ``withdrawn``: a gone process's) and how
        many waiting requests were granted (``granted``)."""
        collected: Collected = await self._run(self._core.collect_flow())
        return collected.counts()

    async def close(self) -> None:
        """Release every lease this boss holds (each is marked released) and stop its heartbeat; the boss grants
        nothing after (:class:`~gpuboss.errors.BossClosed`). Safe to call twice. Best effort: a release that
        fails (Redis down) is left to the heartbeat's last try as it stops, and to the lease's TTL."""
        if asyncio.get_running_loop() is not self._loop:
            await self._bind_loop()
        try:
            for lease in self._close_leases():
                self._heartbeat.forget(lease.id)
                try:
                    await self._release_id(lease.id, int(lease.ttl * 1000))
                except (GPUBossError, RedisError, OSError) as err:  # (_release_id handed it to the heartbeat)
                    log.warning(
                        "gpuboss: could not release %s on close (%s); retried as the heartbeat stops", lease.id, err
                    )
            if self._background:
                await asyncio.gather(*self._background, return_exceptions=True)
        finally:
            await asyncio.to_thread(self._notices.close)
            await asyncio.to_thread(self._heartbeat.close, True)
            await asyncio.to_thread(self._inventory.close)
            await self._link.close()  # (its Redis client too)

    async def __aenter__(self) -> AsyncGPUBoss:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _dispatch_on_lost(self, lease: Lease) -> None:
        """From the heartbeat thread: the callback runs on the boss's event loop."""
        loop = self._loop
        if loop is None or loop.is_closed():
            log.warning("gpuboss: lease %s lost, but its event loop is gone: on_lost not called", lease.id)
            return

        def run() -> None:
            try:
                result = lease.on_lost(lease) if lease.on_lost is not None else None
                if inspect.isawaitable(result):
                    task = asyncio.ensure_future(result)
                    self._background.add(task)
                    task.add_done_callback(self._background.discard)
            except Exception:
                log.exception("gpuboss: on_lost callback of lease %s failed", lease.id)

        loop.call_soon_threadsafe(run)
