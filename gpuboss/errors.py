"""The exceptions gpuboss raises; every one is a :class:`GPUBossError`."""

from __future__ import annotations

from collections.abc import Iterable


class GPUBossError(Exception):
    """Base of every gpuboss error."""


class InvalidRequest(GPUBossError, ValueError):
    """An argument is out of its domain. ``field`` names it and ``allowed`` says what it may be."""

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"invalid {field}={_shown(value)}: {allowed}")


def _shown(value: object) -> str:
    """``repr(value)``; an int of 4300+ digits (or a container of one), which ``repr`` refuses, by its type."""
    try:
        return repr(value)
    except ValueError:
        return f"<{type(value).__name__} too large to show>"


class ConfigError(GPUBossError, ValueError):
    """The configuration cannot be used; the message names the file and the field."""


class InsufficientCapacity(GPUBossError):
    """The request can never fit: it is larger than every GPU it may be placed on."""

    def __init__(self, vram_mib: int, largest_mib: int, gpus: Iterable[str] = (), why: str | None = None) -> None:
        self.vram_mib = vram_mib
        self.largest_mib = largest_mib
        where = ", ".join(gpus)
        because = why or (
            f"the largest eligible GPU{f' ({where})' if where else ''} leases out at most {largest_mib} MiB"
        )
        super().__init__(f"a request for {vram_mib} MiB can never be granted: {because}")


class LeaseTimeout(GPUBossError, TimeoutError):
    """No lease was granted within the timeout; the request has left the queue."""


class LeaseCancelled(GPUBossError):
    """A wait was given up because its lease was released meanwhile (the block ended during a resume)."""


class LeaseLost(GPUBossError):
    """The lease is gone (expired, revoked or lost with Redis) while its holder still used it."""


class RedisUnavailable(GPUBossError, ConnectionError):
    """Redis could not be reached; the message names the URL without its password."""


class RedisOutOfMemory(RedisUnavailable):
    """Redis refused a call because it is out of memory (``maxmemory`` reached under ``maxmemory-policy
    noeviction``). Nothing was changed. Raised at once, not retried, whatever ``on_redis_down`` says: Redis is
    reachable, and a full server is an operator's to mend. Renewals and releases still run there (docs/reliability.md)."""


class LeaseEvicted(GPUBossError):
    """The lease was handed back after an eviction request (``resume=False``); raised at the next safe point."""


class EventLoopError(GPUBossError, RuntimeError):
    """An :class:`~gpuboss.AsyncGPUBoss` was used from one event loop while another loop, running in another thread,
    still used it. A boss serves one event loop at a time (one after another is fine): create one per loop."""


class BossClosed(GPUBossError, RuntimeError):
    """The boss was closed: it grants nothing more (its heartbeat is stopped, so a lease would not be renewed).
    Create a new one."""
