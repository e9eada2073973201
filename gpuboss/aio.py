"""``AsyncGPUBoss``: the asyncio front end, driving the same core as ``GPUBoss``.

Its heartbeat is the same thread as the blocking boss uses (see ``heartbeat.py`` for why not a task);
``on_lost`` callbacks, coroutine functions included, run on the event loop the boss was used from.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from gpuboss.config import BossConfig, config_from_arguments, load_config
from gpuboss.core import (
    DEFAULT,
    Call,
    Core,
    GpuInfo,
    LeaseRequest,
    Op,
    Pop,
    Timeout,
    Watch,
    new_request_id,
    redact_url,
)
from gpuboss.errors import ConfigError, InsufficientCapacity, InvalidRequest, LeaseLost, LeaseTimeout
from gpuboss.heartbeat import Heartbeat
from gpuboss.lease import Device, Lease
from gpuboss.redis_io import MIN_POP_S, TRANSIENT, connect_async, evalsha_async, retry_async, run_flow_async
from gpuboss.urls import resolve_redis_url

log = logging.getLogger("gpuboss")


class AsyncGPUBoss:
    """Asyncio VRAM leases.

    >>> boss = AsyncGPUBoss(redis_url="redis://localhost:6379/0", gpus=[{"id": "gpu0", "vram_gb": 24}])
    >>> async with boss.lease(vram_gb=8, priority="high") as device:   # device == "cuda:0"
    ...     ...
    """

    def __init__(self, redis_url: str | None = None, *, config: BossConfig | None = None, **settings: Any) -> None:
        self._core = Core(config if config is not None else config_from_arguments(redis_url=redis_url, **settings))
        self.url = resolve_redis_url(self._core.config)
        self._shown_url = redact_url(self.url)
        self._redis = connect_async(self.url, self._core.config.connect_timeout)
        self._heartbeat = Heartbeat(self._core, self.url, self._call_on_lost)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = False
        self._ready_lock = asyncio.Lock()
        self._leases: dict[str, Lease] = {}
        self._background: set[asyncio.Task[Any]] = set()
        log.info("gpuboss: namespace %r on Redis %s", self._core.config.namespace, self._shown_url)

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None, **overrides: Any) -> AsyncGPUBoss:
        """Build from a YAML file (``GPUBOSS_CONFIG`` wins over ``path``; ``GPUBOSS_REDIS_URL`` over its URL)."""
        return cls(config=load_config(path, **overrides))

    @property
    def config(self) -> BossConfig:
        return self._core.config

    @property
    def namespace(self) -> str:
        return self._core.config.namespace

    # -- I/O

    async def _eval(self, call: Call) -> Any:
        return await retry_async(
            lambda: evalsha_async(self._redis, call), self._shown_url, self._core.config.connect_timeout
        )

    async def _perform(self, op: Op) -> Any:
        if isinstance(op, Call):
            return await self._eval(op)
        if isinstance(op, Pop):
            try:
                popped = await self._redis.blpop([op.key], timeout=max(op.timeout, MIN_POP_S))
            except TRANSIENT:
                return None  # the flow looks again through a retried call
            return None if popped is None else popped[1]
        if isinstance(op, Watch):
            self._heartbeat.watch(op.request_id, op.ttl_ms)
            return None
        raise TypeError(f"unknown operation {op!r}")

    async def _registry(self) -> dict[str, str]:
        flat: dict[str, str] = await retry_async(
            lambda: self._redis.hgetall(self._core.keys.gpus),  # type: ignore[arg-type,return-value]
            self._shown_url,
            self._core.config.connect_timeout,
        )
        return flat

    async def _prepare(self, req: LeaseRequest) -> None:
        """Read the GPU registry, check the request against it, then register this boss's GPUs."""
        async with self._ready_lock:
            if not self._ready or req.device is not None:
                flat = await self._registry()
                self._core.update_registry(flat)
                self._core.check_request(req)
                register = self._core.register_call() if self._core.needs_register(flat) else None
                if register is not None:
                    self._core.check_register_reply(await self._eval(register))
                self._ready = True
            else:
                self._core.check_request(req)

    # -- public API

    async def acquire(
        self,
        vram_gb: float,
        priority: str | None = None,
        timeout: Timeout = DEFAULT,
        ttl: float | None = None,
        device: str | int | None = None,
        on_lost: Any = None,
    ) -> Lease:
        """Wait for a lease of ``vram_gb`` GB; see the README for every argument."""
        req = self._core.make_request(vram_gb, priority, timeout, ttl, device, on_lost)
        self._loop = asyncio.get_running_loop()
        await self._prepare(req)
        request_id = new_request_id()
        try:
            lease: Lease = await run_flow_async(self._core.acquire_flow(req, request_id), self._perform)
        except (LeaseTimeout, InsufficientCapacity, InvalidRequest, ConfigError):
            self._heartbeat.forget(request_id)  # the flow left nothing behind in Redis
            raise
        except BaseException:
            self._heartbeat.forget(request_id)
            await self._release_id(request_id, req.ttl_ms)
            raise
        self._leases[lease.id] = lease
        self._heartbeat.hold(lease)
        return lease

    async def _release_id(self, item_id: str, ttl_ms: int) -> Any:
        """Release in a task of its own, so cancelling the caller cannot cut the release in half.

        If the release fails, or the caller is cancelled before it lands, the heartbeat thread
        finishes it.
        """
        task = asyncio.get_running_loop().create_task(self._eval(self._core.release_call(item_id)))
        self._background.add(task)

        def settled(done: asyncio.Task[Any]) -> None:
            self._background.discard(done)
            if done.cancelled() or done.exception() is not None:
                self._heartbeat.release_later(item_id, ttl_ms)

        task.add_done_callback(settled)
        return await asyncio.shield(task)

    async def release(self, lease: Lease | str) -> bool:
        """Give a lease back (a :class:`Lease` or its id). True if it was still held; twice is harmless."""
        lease_id = lease if isinstance(lease, str) else lease.id
        held = self._leases.pop(lease_id, None)
        obj = held or (lease if isinstance(lease, Lease) else None)
        if obj is not None:
            obj._move("released")
        self._heartbeat.forget(lease_id)
        ttl_ms = int(obj.ttl * 1000) if obj is not None else 60_000
        return self._core.released(await self._release_id(lease_id, ttl_ms))

    @contextlib.asynccontextmanager
    async def lease(
        self,
        vram_gb: float,
        priority: str | None = None,
        timeout: Timeout = DEFAULT,
        ttl: float | None = None,
        device: str | int | None = None,
        on_lost: Any = None,
    ) -> AsyncIterator[Device]:
        """``async with boss.lease(vram_gb=8) as device:`` holds a lease for the block, releases it after.

        If the lease was lost while the block ran and no ``on_lost`` was given, :class:`LeaseLost` is
        raised at the end of the block.
        """
        held = await self.acquire(vram_gb, priority, timeout, ttl, device, on_lost)
        try:
            yield Device(held)
        finally:
            await self.release(held)
        if held.lost and on_lost is None:
            raise LeaseLost(f"lease {held.id} on {held.gpu} was lost while its block ran")

    async def gpus(self) -> list[GpuInfo]:
        """The GPUs registered in the namespace."""
        self._core.update_registry(await self._registry())
        return sorted(self._core.registry.values(), key=lambda g: g.id)

    async def collect(self) -> dict[str, int]:
        """Reclaim expired leases and queue entries now; say how many of each, and grants made."""
        return self._core.collected(await self._eval(self._core.collect_call()))

    def held(self) -> list[Lease]:
        return list(self._leases.values())

    async def close(self) -> None:
        """Release every lease this boss holds and stop its heartbeat. Safe to call twice."""
        for lease_id in list(self._leases):
            await self.release(lease_id)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await asyncio.to_thread(self._heartbeat.close, True)
        await self._redis.aclose()

    async def __aenter__(self) -> AsyncGPUBoss:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _call_on_lost(self, lease: Lease) -> None:
        """From the heartbeat thread: run the callback on the boss's event loop."""
        self._leases.pop(lease.id, None)
        loop = self._loop
        if lease.on_lost is None or loop is None or loop.is_closed():
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
