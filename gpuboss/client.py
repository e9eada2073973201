"""``GPUBoss``: the blocking front end. Its async twin is ``aio.py``; both drive the same core."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
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
from gpuboss.redis_io import MIN_POP_S, TRANSIENT, connect_sync, evalsha_sync, retry_sync, run_flow_sync
from gpuboss.urls import resolve_redis_url

log = logging.getLogger("gpuboss")


class GPUBoss:
    """Blocking VRAM leases.

    >>> boss = GPUBoss(redis_url="redis://localhost:6379/0", gpus=[{"id": "gpu0", "vram_gb": 24}])
    >>> with boss.lease(vram_gb=8) as device:   # device == "cuda:0"
    ...     ...
    """

    def __init__(self, redis_url: str | None = None, *, config: BossConfig | None = None, **settings: Any) -> None:
        self._core = Core(config if config is not None else config_from_arguments(redis_url=redis_url, **settings))
        self.url = resolve_redis_url(self._core.config)
        self._shown_url = redact_url(self.url)
        self._redis = connect_sync(self.url, self._core.config.connect_timeout)
        self._heartbeat = Heartbeat(self._core, self.url, self._call_on_lost)
        self._ready = False
        self._ready_lock = threading.Lock()
        self._leases: dict[str, Lease] = {}
        log.info("gpuboss: namespace %r on Redis %s", self._core.config.namespace, self._shown_url)

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None, **overrides: Any) -> GPUBoss:
        """Build from a YAML file (``GPUBOSS_CONFIG`` wins over ``path``; ``GPUBOSS_REDIS_URL`` over its URL)."""
        return cls(config=load_config(path, **overrides))

    @property
    def config(self) -> BossConfig:
        return self._core.config

    @property
    def namespace(self) -> str:
        return self._core.config.namespace

    # -- I/O

    def _eval(self, call: Call) -> Any:
        return retry_sync(lambda: evalsha_sync(self._redis, call), self._shown_url, self._core.config.connect_timeout)

    def _perform(self, op: Op) -> Any:
        if isinstance(op, Call):
            return self._eval(op)
        if isinstance(op, Pop):
            try:
                popped = self._redis.blpop([op.key], timeout=max(op.timeout, MIN_POP_S))
            except TRANSIENT:
                return None  # the flow looks again through a retried call
            return None if popped is None else popped[1]
        if isinstance(op, Watch):
            self._heartbeat.watch(op.request_id, op.ttl_ms)
            return None
        raise TypeError(f"unknown operation {op!r}")

    def _read_registry(self) -> dict[str, str]:
        flat = retry_sync(
            lambda: self._redis.hgetall(self._core.keys.gpus), self._shown_url, self._core.config.connect_timeout
        )
        return {str(k): str(v) for k, v in flat.items()}

    def _prepare(self, req: LeaseRequest) -> None:
        """Read the GPU registry, check the request against it, then register this boss's GPUs."""
        with self._ready_lock:
            if not self._ready or req.device is not None:
                flat = self._read_registry()
                self._core.update_registry(flat)
                self._core.check_request(req)
                register = self._core.register_call() if self._core.needs_register(flat) else None
                if register is not None:
                    self._core.check_register_reply(self._eval(register))
                self._ready = True
            else:
                self._core.check_request(req)

    # -- public API

    def acquire(
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
        self._prepare(req)
        request_id = new_request_id()
        try:
            lease: Lease = run_flow_sync(self._core.acquire_flow(req, request_id), self._perform)
        except (LeaseTimeout, InsufficientCapacity, InvalidRequest, ConfigError):
            self._heartbeat.forget(request_id)  # the flow left nothing behind in Redis
            raise
        except BaseException:
            self._heartbeat.forget(request_id)
            self._abandon(request_id, req.ttl_ms)
            raise
        self._leases[lease.id] = lease
        self._heartbeat.hold(lease)
        return lease

    def _abandon(self, request_id: str, ttl_ms: int) -> None:
        try:
            self._eval(self._core.release_call(request_id))
        except BaseException:
            self._heartbeat.release_later(request_id, ttl_ms)
            raise

    def release(self, lease: Lease | str) -> bool:
        """Give a lease back (a :class:`Lease` or its id). True if it was still held; twice is harmless."""
        lease_id = lease if isinstance(lease, str) else lease.id
        held = self._leases.pop(lease_id, None)
        obj = held or (lease if isinstance(lease, Lease) else None)
        if obj is not None:
            obj._move("released")
        self._heartbeat.forget(lease_id)
        ttl_ms = int(obj.ttl * 1000) if obj is not None else 60_000
        try:
            reply = self._eval(self._core.release_call(lease_id))
        except BaseException:
            self._heartbeat.release_later(lease_id, ttl_ms)
            raise
        return self._core.released(reply)

    @contextmanager
    def lease(
        self,
        vram_gb: float,
        priority: str | None = None,
        timeout: Timeout = DEFAULT,
        ttl: float | None = None,
        device: str | int | None = None,
        on_lost: Any = None,
    ) -> Iterator[Device]:
        """``with boss.lease(vram_gb=8) as device:`` holds a lease for the block and releases it after.

        If the lease was lost while the block ran and no ``on_lost`` was given, :class:`LeaseLost` is
        raised at the end of the block, so work done without a lease never passes silently.
        """
        held = self.acquire(vram_gb, priority, timeout, ttl, device, on_lost)
        try:
            yield Device(held)
        finally:
            self.release(held)
        if held.lost and on_lost is None:
            raise LeaseLost(f"lease {held.id} on {held.gpu} was lost while its block ran")

    def gpus(self) -> list[GpuInfo]:
        """The GPUs registered in the namespace."""
        self._core.update_registry(self._read_registry())
        return sorted(self._core.registry.values(), key=lambda g: g.id)

    def collect(self) -> dict[str, int]:
        """Reclaim expired leases and queue entries now; say how many of each, and grants made."""
        return self._core.collected(self._eval(self._core.collect_call()))

    def held(self) -> list[Lease]:
        return list(self._leases.values())

    def close(self) -> None:
        """Release every lease this boss holds and stop its heartbeat. Safe to call twice."""
        self._leases.clear()
        self._heartbeat.close(release=True)
        self._redis.close()

    def __enter__(self) -> GPUBoss:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call_on_lost(self, lease: Lease) -> None:
        self._leases.pop(lease.id, None)
        if lease.on_lost is None:
            return
        try:
            lease.on_lost(lease)
        except Exception:
            log.exception("gpuboss: on_lost callback of lease %s failed", lease.id)
