"""What :class:`~gpuboss.GPUBoss` and :class:`~gpuboss.AsyncGPUBoss` share besides the core: settings,
the Redis URL, the heartbeat, and the book of leases this boss holds."""

from __future__ import annotations

import logging
import os
from typing import Any, Self

from gpuboss.config import BossConfig, config_from_arguments, load_config
from gpuboss.core import Core, redact_url
from gpuboss.errors import InvalidRequest, LeaseLost
from gpuboss.heartbeat import Heartbeat
from gpuboss.lease import Lease
from gpuboss.urls import resolve_redis_url

log = logging.getLogger("gpuboss")

#: How long a release that could not be sent is retried when the lease's own TTL is unknown.
UNKNOWN_TTL_MS = 60_000


class BossBase:
    def __init__(self, redis_url: str | None, config: BossConfig | None, settings: dict[str, Any]) -> None:
        self._core = Core(config if config is not None else config_from_arguments(redis_url=redis_url, **settings))
        self.url = resolve_redis_url(self._core.config)
        self._shown_url = redact_url(self.url)
        self._heartbeat = Heartbeat(self._core, self.url, self._lost)
        self._leases: dict[str, Lease] = {}
        log.info("gpuboss: namespace %r on Redis %s", self._core.config.namespace, self._shown_url)

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None, **overrides: Any) -> Self:
        """Build from a YAML file (``GPUBOSS_CONFIG`` wins over ``path``; ``GPUBOSS_REDIS_URL`` over its URL)."""
        return cls(config=load_config(path, **overrides))  # type: ignore[call-arg]

    @property
    def config(self) -> BossConfig:
        return self._core.config

    @property
    def namespace(self) -> str:
        return self._core.config.namespace

    def held(self) -> list[Lease]:
        """The leases this boss holds now."""
        return list(self._leases.values())

    def _granted(self, lease: Lease) -> Lease:
        self._leases[lease.id] = lease
        self._heartbeat.hold(lease)
        return lease

    def _begin_release(self, lease: Lease | str) -> tuple[str, int]:
        """Mark a lease released and stop renewing it; its id and TTL (ms) for the release call."""
        if not isinstance(lease, str | Lease):
            raise InvalidRequest("lease", lease, "must be a Lease or a lease id (str)")
        lease_id = lease if isinstance(lease, str) else lease.id
        obj = self._leases.pop(lease_id, None) or (lease if isinstance(lease, Lease) else None)
        if obj is not None:
            obj._move("released")
        self._heartbeat.forget(lease_id)
        return lease_id, int(obj.ttl * 1000) if obj is not None else UNKNOWN_TTL_MS

    @staticmethod
    def _check_block_end(lease: Lease, on_lost: object) -> None:
        """At the end of a ``lease()`` block: a lease lost meanwhile, with nobody told, is an error."""
        if lease.lost and on_lost is None:
            raise LeaseLost(f"lease {lease.id} on {lease.gpu} was lost while its block ran")

    def _lost(self, lease: Lease) -> None:
        """From the heartbeat thread: the lease is gone."""
        self._leases.pop(lease.id, None)
        if lease.on_lost is not None:
            self._dispatch_on_lost(lease)

    def _dispatch_on_lost(self, lease: Lease) -> None:
        raise NotImplementedError
