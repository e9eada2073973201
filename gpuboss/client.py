"""``GPUBoss``: the blocking front end. Its async twin is ``aio.py``; both drive the same core."""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

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
from gpuboss.errors import LeaseCancelled, RedisUnavailable
from gpuboss.fallback import ROUTE, Route, SyncLink
from gpuboss.lease import Device, Lease, LeaseState, call_on_evict
from gpuboss.redis_io import connect_sync, run_flow_sync
from gpuboss.registry import InventoryMethods

log = logging.getLogger("gpuboss")


class GPUBoss(InventoryMethods, BossBase):
    """Blocking VRAM leases.

    >>> boss = GPUBoss(redis_url="redis://localhost:6379/0", gpus=[{"id": "gpu0", "vram_gb": 24}])
    >>> with boss.lease(vram_gb=8) as device:   # device == "cuda:0"
    ...     ...
    """

    def __init__(self, redis_url: str | None = None, *, config: BossConfig | None = None, **settings: Any) -> None:
        super().__init__(redis_url, config, settings)
        timeout = self._core.config.connect_timeout  # (also for each reply: a hung Redis raises; see pop_sync)
        self._redis = connect_sync(self.url, timeout, socket_timeout=timeout)
        self._link = SyncLink(self._fallback, self._redis, self._heartbeat)  # Redis, or on_redis_down
        self._ready_lock = threading.Lock()

    def _after_fork(self) -> None:
        super()._after_fork()
        self._ready_lock = threading.Lock()  # (a thread of the parent may have held it at the fork)

    # -- I/O

    def _eval(self, call: Call) -> Any:
        return self._link.perform(call)

    def _perform(self, op: Op) -> Any:
        if isinstance(op, REDIS_OPS):
            return self._link.perform(op, ROUTE.get())
        if isinstance(op, Watch):
            self._heartbeat.watch(op.request_id, op.ttl_ms)
            return None
        raise TypeError(f"unknown operation {op!r}")

    def _run(self, flow: Flow | Any, route: Route | None = None) -> Any:
        """Drive ``flow``; with a ``route`` (a request's), its operations go where the route says."""
        if route is None:
            return run_flow_sync(flow, self._perform)
        token = ROUTE.set(route)
        try:
            return run_flow_sync(flow, self._perform)
        finally:
            ROUTE.reset(token)

    # -- public API

    def acquire(
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
            choice = self.choose_model(str(model), quantizations, node)
            vram_gb = choice.vram_mib / 1024
        req = self._core.make_request(
            vram_gb, priority, timeout, ttl, device, on_lost, preemptible, on_evict, resume, node, gpus
        )
        request_id = new_request_id()
        route = self._link.route(req, request_id)  # Redis, or the local store (on_redis_down: local)
        with self._ready_lock:
            req = self._run(self._inventory.prepare_flow(req), route)  # + discovery, cuda:N pin, host beat
        if self._may_be_evicted(req) and not route.local:
            self._notices.start()
        try:
            lease: Lease = self._run(self._core.acquire_flow(req, request_id), route)
        except CLEAN_ERRORS:
            self._heartbeat.forget(request_id)
            raise
        except RedisUnavailable:  # nothing to withdraw now: the heartbeat does it once Redis is back
            self._heartbeat.forget(request_id)
            self._heartbeat.release_later(request_id, req.ttl_ms)
            raise
        except BaseException:  # interrupted midway: withdraw the request, or release what it was granted
            self._heartbeat.forget(request_id)
            self._release_id(request_id, req.ttl_ms, "cancel")
            raise
        try:
            lease._handling = threading.Lock()
            if choice is not None:
                lease.model, lease.quantization = choice.model, choice.quantization
            return self._granted(lease)
        except BaseException:  # (Ctrl-C) granted, but never handed to the caller: release it
            self._abandon(lease, request_id)
            self._release_id(request_id, req.ttl_ms, "cancel")
            raise

    # -- eviction

    def _start_eviction(self, lease: Lease) -> None:
        threading.Thread(
            target=self._evict_now, args=(lease,), name=f"gpuboss-evict-{lease.id[:8]}", daemon=True
        ).start()

    def _evict_now(self, lease: Lease) -> None:
        """Checkpoint (``on_evict``), hand the VRAM back and, with ``resume``, wait to be granted again."""
        with lease._handling:
            if lease.state is not LeaseState.EVICTING:
                return
            try:
                self._eval(self._core.checkpoint_call(lease.id))
            except RedisUnavailable as err:
                log.warning("gpuboss: could not record the checkpoint start of %s (%s)", lease.id, err)
            if lease.on_evict is not None:
                try:
                    result = call_on_evict(lease.on_evict, lease.notice)
                    if inspect.isawaitable(result):
                        asyncio.run(_awaited(result))
                except Exception:
                    log.exception("gpuboss: on_evict of lease %s failed; the lease is not handed back", lease.id)
                    return
            if lease.state is not LeaseState.EVICTING:
                return  # called off, or shrunk enough, while it checkpointed
            self._before_yield(lease)
            try:
                outcome = self._run(self._core.yield_flow(lease, stop=lambda: self._stop_waiting(lease)))
            except LeaseCancelled:
                return
            except RedisUnavailable:
                log.exception("gpuboss: could not hand back lease %s; its TTL will reclaim it", lease.id)
                outcome = YieldOutcome(YieldReply.GONE, None)
            self._after_yield(lease, outcome)

    def _yield_if_requested(self, lease: Lease) -> bool:
        lease.raise_if_lost()
        if lease.state is LeaseState.GRANTED:
            return lease._report_rounds()  # (a round the boss's thread finished since the last safe point)
        if lease.state is LeaseState.EVICTING:
            self._evict_now(lease)
        warm.unpark_sync(self, lease)  # reclaimed while idle: ask again now (docs/warm.md)
        lease._settled.wait()
        lease.raise_if_lost()
        lease._report_rounds()
        return True

    def _resize(self, lease: Lease, vram_gb: float, timeout: float | None) -> Lease:
        self._check_open()
        try:
            record = self._run(self._core.resize_flow(lease, vram_gb, timeout))
        except BaseException as err:
            grow_id = self._grow_withdrawn(lease, err)
            if grow_id is not None:
                self._release_id(grow_id, int(lease.ttl * 1000), "cancel")
            raise
        finally:
            self._heartbeat.forget(grow_request_id(lease.id))  # (watched while it waited: renewed no more)
        return self._resized(lease, record)

    def _activity(self, lease: Lease, op: str, idle_timeout_ms: int | None = None) -> Lease:
        return warm.activity_sync(self, lease, op, idle_timeout_ms)

    def keep_warm(self, model: str, vram_gb: float | None = None, **options: Any) -> warm.WarmModel:
        """``with boss.keep_warm(model="gemma3:12b", vram_gb=9, idle_timeout_s=300, on_unload=..., on_load=...)
        as warm:`` keeps a model loaded between requests, under a lease that yields to real work; serve each
        request in ``with warm.busy() as device:``. See :class:`~gpuboss.WarmModel` and docs/warm.md."""
        self._check_open()
        return warm.WarmModel(self, model, vram_gb, **options)

    def _release_id(self, item_id: str, ttl_ms: int, reason: ReleaseReason = "release") -> Any:
        try:
            return self._eval(self._core.release_call(item_id, reason))
        except BaseException:  # the heartbeat thread finishes it
            self._heartbeat.release_later(item_id, ttl_ms)
            raise

    def release(self, lease: Lease | str) -> bool:
        """Give a lease back (a :class:`Lease` or its id). True if it was still held; twice is harmless."""
        releasing = self._begin_release(lease)
        if releasing is None:
            return False
        return self._end_release(self._release_id(releasing.lease_id, releasing.ttl_ms), releasing)

    @contextmanager
    def lease(
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
    ) -> Iterator[Device]:
        """``with boss.lease(vram_gb=8) as device:`` holds a lease for the block and releases it after.

        If the lease was lost while the block ran and no ``on_lost`` was given, :class:`LeaseLost` is
        raised at the end of the block, so work done without a lease never passes silently.
        """
        held = self.acquire(
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
            self.release(held)
        self._check_block_end(held, on_lost)

    def gpus(self) -> list[GpuInfo]:
        """The GPUs registered in the namespace."""
        result: list[GpuInfo] = self._run(self._core.registry_flow())
        return result

    def revoke(self, lease_id: str, reason: str = "") -> bool:
        """Force-release another holder's lease (the admin path, like ``gpuboss release ID``): its VRAM goes to
        the waiters at once, a ``revoked`` event names this boss, and the holder's heartbeat reports it lost.
        True if the lease was there."""
        call = self._core.revoke_call(lease_id, self._core.operator, reason)
        code, _, _ = self._core.revoked(self._eval(call))
        return code is not RevokeReply.NOT_FOUND

    def pause(self, priority: str) -> bool:
        """Stop grants of a priority class in every process at once (active leases continue); True if it
        was not paused yet."""
        return bool(int((self._eval(self._core.pause_call(priority, True, self._core.operator)))[0]))

    def resume(self, priority: str) -> bool:
        """Restart grants of a paused class; its waiting requests are served at once. True if it was paused."""
        return bool(int((self._eval(self._core.pause_call(priority, False, self._core.operator)))[0]))

    def collect(self) -> dict[str, int]:
        """Reclaim expired leases and queue entries now, and what processes gone from this machine held; say how
        many of each (``leases``, ``requests``: expired; ``revoked``, ``withdrawn``: a gone process's) and how
        many waiting requests were granted (``granted``)."""
        collected: Collected = self._run(self._core.collect_flow())
        return collected.counts()

    def close(self) -> None:
        """Release every lease this boss holds (each is marked released) and stop its heartbeat; the boss grants
        nothing after (:class:`~gpuboss.errors.BossClosed`). Safe to call twice."""
        self._close_leases()  # (the heartbeat releases them: it holds every lease and queued request)
        self._notices.close()
        self._heartbeat.close(release=True)
        self._inventory.close()
        self._link.close()
        self._redis.close()

    def __enter__(self) -> GPUBoss:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _dispatch_on_lost(self, lease: Lease) -> None:
        """From the heartbeat thread: the callback runs right there."""
        try:
            if lease.on_lost is not None:
                lease.on_lost(lease)
        except Exception:
            log.exception("gpuboss: on_lost callback of lease %s failed", lease.id)


async def _awaited(result: Any) -> Any:
    return await result
