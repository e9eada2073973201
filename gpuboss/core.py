"""The I/O-free core shared by :class:`~gpuboss.GPUBoss` and :class:`~gpuboss.AsyncGPUBoss`.

It validates requests, builds every script call (KEYS and ARGV), decodes replies into results or typed
errors, and runs the acquisition protocol as a generator of I/O operations (:class:`Call`, :class:`Pop`,
:class:`Watch`). The sync and async drivers in ``client.py`` and ``aio.py`` only perform those operations,
so the protocol is written once.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Literal

from gpuboss.config import PRIORITIES, BossConfig, GPUConfig, gb_to_mib
from gpuboss.devices import cuda_index
from gpuboss.errors import ConfigError, InsufficientCapacity, InvalidRequest, LeaseCancelled, LeaseLost, LeaseTimeout
from gpuboss.keys import Keys
from gpuboss.lease import Lease, OnEvict, OnLost
from gpuboss.policy import policy_fields
from gpuboss.procs import ProcessIdentity, holder_id, identity, judge

log = logging.getLogger("gpuboss")

#: The longest a waiter blocks before it checks its own request again (liveness, not handoff).
MAX_WAIT_CHUNK_S = 30.0
#: How often a request looks again while the namespace's GPU registry is missing (lost with Redis).
REGISTRY_WAIT_S = 0.5
#: How often a boss with scheduling rules checks, before a request, that the namespace still has them: a boss
#: without rules may have registered the GPUs again in a namespace that lost its state, or a hand deleted them.
RULES_CHECK_S = 30.0
#: A waiter this close to the head of the queue also wakes at the next expiry, to collect it at once.
EXPIRY_WATCH_POSITIONS = 2
#: At most how often a boss whose request waits checks whether the holders of the leases on this machine (and
#: the waiters at the head of the queue) still run (procs.py), and how often a waiter near the head looks again
#: while such a process could still die.
REAP_EVERY_S = 1.0
#: How many requests at the head of the queue a waiter behind them checks for a process that is gone.
REAP_QUEUE_HEAD = 2
MAX_TTL_S = 86400.0
#: No GPU is larger (1 PiB); a request above it is clamped to one MiB more, so it can never fit.
MAX_VRAM_GB = 2**20


class _Default(enum.Enum):
    DEFAULT = "default"


#: Stands for "the configured default" where None already means something (``timeout=None`` waits forever).
DEFAULT = _Default.DEFAULT
Timeout = float | None | _Default


class Reply(enum.IntEnum):
    """Reply codes of the scripts (see the headers in ``lua/``)."""

    BUSY = 0
    GRANTED = 1
    QUEUED = 2
    INSUFFICIENT = -1
    UNKNOWN_GPU = -2
    NO_GPUS = -3


class ReleaseReply(enum.IntEnum):
    NOT_FOUND = 0
    RELEASED = 1
    WITHDRAWN = 2
    NOT_HOLDER = -1


class RevokeReply(enum.IntEnum):
    NOT_FOUND = 0
    REVOKED = 1
    EXPIRED = 2
    WITHDRAWN = 3


#: Why a lease or request is released; carried by the event (``timeout`` makes a request ``timed_out``).
ReleaseReason = Literal["release", "timeout", "cancel", "close"]


class RenewStatus(enum.IntEnum):
    GONE = 0
    LEASE = 1
    QUEUED = 2
    EVICTING = 3


class YieldReply(enum.IntEnum):
    """Replies of ``lua/yield-21.lua``: what handing back an evicted lease did."""

    GONE = 0
    GRANTED = 1
    QUEUED = 2
    CONTINUE = 3
    ENDED = 4


class ResizeReply(enum.IntEnum):
    GONE = 0
    DONE = 1
    QUEUED = 2
    INSUFFICIENT = -1


@dataclass(frozen=True)
class GpuInfo:
    """A GPU as registered in Redis. ``host``, ``uuid``, ``pci_bus_id`` and ``parent_uuid`` are set for GPUs
    discovered through NVML (``gpus: auto``; docs/inventory.md) and None for declared ones."""

    id: str
    name: str
    index: int
    capacity_mib: int
    reserve_mib: int
    host: str | None = None
    uuid: str | None = None
    pci_bus_id: str | None = None
    #: The physical GPU of a MIG instance.
    parent_uuid: str | None = None

    @property
    def device(self) -> str:
        return f"cuda:{self.index}"

    @property
    def leasable_mib(self) -> int:
        return self.capacity_mib - self.reserve_mib

    @classmethod
    def from_config(cls, gpu: GPUConfig) -> GpuInfo:
        return cls(gpu.id, gpu.name, gpu.index, gpu.capacity_mib, gpu.reserve_mib)

    @classmethod
    def from_json(cls, raw: str) -> GpuInfo:
        d = json.loads(raw)

        def opt(key: str) -> str | None:
            value = d.get(key)
            return None if value is None else str(value)

        return cls(
            str(d["id"]),
            str(d.get("name", "")),
            int(d["index"]),
            int(d["capacity_mib"]),
            int(d["reserve_mib"]),
            opt("host"),
            opt("uuid"),
            opt("pci_bus_id"),
            opt("parent_uuid"),
        )

    def to_json(self) -> str:
        """The declaration as registered; the discovery fields only when set (so declared GPUs keep their JSON)."""
        d: dict[str, object] = {
            "id": self.id,
            "name": self.name,
            "index": self.index,
            "capacity_mib": self.capacity_mib,
            "reserve_mib": self.reserve_mib,
        }
        for key in ("host", "uuid", "pci_bus_id", "parent_uuid"):
            value = getattr(self, key)
            if value is not None:
                d[key] = value
        return json.dumps(d, sort_keys=True)


@dataclass(frozen=True)
class LeaseRequest:
    """A validated request."""

    vram_mib: int
    priority: str
    rank: int
    ttl_ms: int
    timeout: float | None
    device: str | int | None
    on_lost: OnLost | None
    preemptible: bool = False
    on_evict: OnEvict | None = None
    resume: bool = True
    #: None: this host's GPUs (and those without a host); "any": every host's; else that host's.
    node: str | None = None
    #: How many GPUs (of one host) the lease spans; ``vram_mib`` is then the MiB on each.
    count: int = 1

    @property
    def ttl(self) -> float:
        return self.ttl_ms / 1000


# ---------------------------------------------------------------- validation


def _number(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(field, value, "must be a number (int or float)")
    try:
        return float(value)
    except OverflowError:
        raise InvalidRequest(field, value, "must be a number within float range") from None


def validate_vram(vram_gb: object) -> int:
    gb = _number("vram_gb", vram_gb)
    if not math.isfinite(gb) or gb <= 0:
        raise InvalidRequest("vram_gb", vram_gb, "must be a finite number of gigabytes greater than 0")
    # Beyond any GPU: one MiB more than the largest GPU can have, so the capacity check answers
    # InsufficientCapacity (and the number stays small enough for Lua and for ceil()).
    return gb_to_mib(gb) if gb <= MAX_VRAM_GB else MAX_VRAM_GB * 1024 + 1


def validate_priority(priority: object, classes: Mapping[str, int] = PRIORITIES) -> tuple[str, int]:
    if not isinstance(priority, str) or priority not in classes:
        allowed = ", ".join(repr(p) for p in classes)
        raise InvalidRequest("priority", priority, f"must be one of {allowed}")
    return priority, classes[priority]


def validate_timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    seconds = _number("timeout", timeout)
    if math.isnan(seconds) or seconds < 0:
        raise InvalidRequest("timeout", timeout, "must be None (wait forever), 0 (try once) or seconds > 0")
    return None if math.isinf(seconds) else seconds


def validate_ttl(ttl: object) -> int:
    seconds = _number("ttl", ttl)
    if not math.isfinite(seconds) or seconds <= 0 or seconds > MAX_TTL_S:
        raise InvalidRequest("ttl", ttl, f"must be seconds greater than 0 and at most {MAX_TTL_S:g}")
    return max(1, math.ceil(seconds * 1000))


def validate_device(device: object) -> str | int | None:
    if device is None or (isinstance(device, int) and not isinstance(device, bool) and device >= 0):
        return device
    if isinstance(device, str) and device:
        return device
    raise InvalidRequest("device", device, "must be a GPU id, 'cuda:N', an index N >= 0, or None")


def validate_on_lost(on_lost: object) -> OnLost | None:
    if on_lost is not None and not callable(on_lost):
        raise InvalidRequest("on_lost", on_lost, "must be a callable taking the Lease, or None")
    return on_lost


def validate_on_evict(on_evict: object) -> OnEvict | None:
    if on_evict is not None and not callable(on_evict):
        raise InvalidRequest(
            "on_evict", on_evict, "must be a callable (sync or async) taking nothing or an EvictNotice, or None"
        )
    return on_evict


def validate_node(node: object) -> str | None:
    """``node=``: None (this host's GPUs), ``"any"`` (every host) or a host name."""
    if node is None or (isinstance(node, str) and 0 < len(node) <= 255 and node.isprintable() and node == node.strip()):
        return node
    raise InvalidRequest("node", node, "must be None (this host's GPUs), 'any' (every host) or a host name")


def on_node(info: GpuInfo, node: str | None, host: str) -> bool:
    """Whether a request with ``node`` from ``host`` may use the GPU (``on_node`` in lua/includes/place.lua).
    GPUs without a host (declared ones) are everybody's; None means this host's GPUs and those; ``"any"`` every
    GPU; a host name that host's."""
    if node == "any" or info.host is None:
        return True
    return info.host == (host if node is None else node)


MAX_GPUS = 64


@dataclass(frozen=True)
class RegistrySummary:
    """What every request asks of the registry, computed once per registry: a request is checked in O(1)
    however many GPUs the namespace has (the checks of a pinned request, or one over several GPUs, and every
    error message still look at the GPUs themselves)."""

    any_host: bool
    #: the most MiB one GPU without a host leases out (None: there is none)
    largest_hostless: int | None
    #: host -> the most MiB one of its GPUs leases out
    largest_by_host: dict[str, int]
    #: (node, host) -> :meth:`largest`'s answer, filled as asked (a boss asks with the same few each time).
    _largest: dict[tuple[str | None, str], int | None] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, registry: Mapping[str, GpuInfo]) -> RegistrySummary:
        hostless = [g.leasable_mib for g in registry.values() if g.host is None]
        by_host: dict[str, int] = {}
        for g in registry.values():
            if g.host is not None:
                by_host[g.host] = max(by_host.get(g.host, 0), g.leasable_mib)
        return cls(bool(by_host), max(hostless, default=None), by_host)

    def largest(self, node: str | None, host: str) -> int | None:
        """The most MiB one GPU a request for ``node`` from ``host`` may use leases out (None: no such GPU)."""
        try:
            return self._largest[node, host]
        except KeyError:
            pass
        sizes = [self.largest_hostless]
        if node == "any":
            sizes += self.largest_by_host.values()
        else:
            sizes.append(self.largest_by_host.get(host if node is None else node))
        found = self._largest[node, host] = max((n for n in sizes if n is not None), default=None)
        return found


def validate_gpu_count(gpus: object) -> int:
    if isinstance(gpus, bool) or not isinstance(gpus, int) or not 1 <= gpus <= MAX_GPUS:
        raise InvalidRequest("gpus", gpus, f"must be a whole number of GPUs from 1 to {MAX_GPUS}")
    return gpus


def validate_flag(field: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequest(field, value, "must be True or False")
    return value


def resolve_device(device: str | int | None, gpus: Mapping[str, GpuInfo]) -> str:
    """The gpu id a pin names (a GPU id, ``"cuda:N"`` or N), or ``""`` for no pin."""
    if device is None:
        return ""
    if isinstance(device, str) and device in gpus:
        return device
    index = device if isinstance(device, int) else cuda_index(device)
    if index is not None:
        matches = [g.id for g in gpus.values() if g.index == index]
        if len(matches) == 1:
            return matches[0]
    known = ", ".join(f"{g.id} ({g.device})" for g in sorted(gpus.values(), key=lambda g: g.id)) or "none"
    raise InvalidRequest("device", device, f"must name a registered GPU: {known}")


# ---------------------------------------------------------------- I/O operations a flow yields


@dataclass(frozen=True)
class Call:
    """Run a script by EVALSHA (loading it on NOSCRIPT). The result is the raw reply."""

    script: str
    keys: list[str]
    args: list[str | int]


@dataclass(frozen=True)
class Pop:
    """BLPOP one list for at most ``timeout`` seconds. The result is the popped value or None."""

    key: str
    timeout: float


@dataclass(frozen=True)
class ReadHash:
    """HGETALL one hash (read-only). The result is a dict of str to str."""

    key: str


@dataclass(frozen=True)
class ReadQueueHead:
    """The first ``count`` entries of the queue (ZRANGE) and their records (HMGET of the tickets hash), read-only.
    The result is a dict of request id to its JSON record, in queue order (an entry without a record left out)."""

    queue: str
    tickets: str
    count: int


@dataclass(frozen=True)
class Watch:
    """Hand a queued request to the heartbeat so its queue entry stays alive. The result is None."""

    request_id: str
    ttl_ms: int


Op = Call | Pop | ReadHash | ReadQueueHead | Watch
#: The operations a driver sends to Redis (or the local store), for ``isinstance``; :class:`Watch` stays local.
REDIS_OPS = (Call, Pop, ReadHash, ReadQueueHead)
#: The read-only ones among them.
Read = ReadHash | ReadQueueHead
Flow = Generator[Op, Any, Lease]
#: Errors that leave nothing behind in Redis: the flow raised them before writing, or cleaned up itself.
CLEAN_ERRORS = (LeaseTimeout, InsufficientCapacity, InvalidRequest, ConfigError)


@dataclass(frozen=True)
class YieldOutcome:
    code: YieldReply
    record: dict[str, Any] | None
    #: Reclaimed while idle (docs/warm.md): handed back without a queue entry, though it resumes; its next
    #: ``busy()`` (or safe point) asks again, queued by its priority.
    parked: bool = False


@dataclass
class Collected:
    """What :meth:`Core.collect_flow` took back: the records of the leases and queued requests that had expired,
    of the leases it revoked and the queued requests it withdrew because their process is gone from this
    machine, and how many waiting requests were granted the VRAM freed."""

    leases: list[dict[str, Any]]
    requests: list[dict[str, Any]]
    revoked: list[dict[str, Any]]
    withdrawn: list[dict[str, Any]]
    granted: int

    def counts(self) -> dict[str, int]:
        return {
            "leases": len(self.leases),
            "requests": len(self.requests),
            "revoked": len(self.revoked),
            "withdrawn": len(self.withdrawn),
            "granted": self.granted,
        }


# ---------------------------------------------------------------- the core


class Core:
    """Everything about a boss that is not I/O: settings, key names, GPU registry and script calls."""

    def __init__(self, config: BossConfig) -> None:
        self.config = config
        self.keys = Keys(config.namespace)
        #: The KEYS of every lease-state script (the state, then the event channel and log), and the values
        #: every call sends, built once: the namespace and the configuration never change.
        self._lease_keys = (*self.keys.state(), *self.keys.event_keys())
        self._wake_prefix = self.keys.wake_prefix
        self._grace_ms = max(1, math.ceil(config.evict_grace_s * 1000))
        #: The event log's cap, the last ARGV of every script that emits.
        self._cap = config.events_maxlen
        self.declared = {g.id: GpuInfo.from_config(g) for g in config.gpus}
        self.registry = dict(self.declared)
        self.registry_loaded = False
        self.policy_fields = policy_fields(self.config)
        #: The UTC day the policy was last stored (time windows are refreshed daily); None: not yet.
        self.policy_day: date | None = None
        #: When (time.monotonic()) the rules were last stored or found in the namespace.
        self.policy_checked = 0.0
        self.host = socket.gethostname()
        self.holder = self.notify_channel = self.secret = ""
        #: When (by the flow's clock, time.monotonic()) a waiting request may next check for processes gone from
        #: this machine (reap_flow), and whether the last check saw one still running here (a waiter near the head
        #: then looks again sooner).
        self.reap_due = 0.0
        self.reap_watch = False
        self.new_holder()

    def new_holder(self) -> None:
        """Take a holder identity of its own: at creation, and again in a forked child (base.py), which holds
        none of its parent's leases and must not be able to renew or release them."""
        #: This process (procs.py), named in the holder id: on this machine a waiter can tell when it is gone.
        self.me = identity()
        #: This boss's notice channel: eviction notices for its leases arrive there.
        self.holder = holder_id(self.me)
        self.notify_channel = self.keys.holder_channel(self.holder)
        #: Only this boss has it; the scripts keep its SHA1 in each lease, and release, renew, yield and resize
        #: act only for the holder that sends it (docs/security.md). Operators force-release with revoke.
        self.secret = secrets.token_hex(16)

    @property
    def registry(self) -> dict[str, GpuInfo]:
        """The GPUs of the namespace as last read, with this boss's own declarations."""
        return self._registry

    @registry.setter
    def registry(self, gpus: dict[str, GpuInfo]) -> None:
        self._registry = gpus
        self.summary = RegistrySummary.of(gpus)

    @property
    def operator(self) -> str:
        """Who acts, for events: service@host."""
        return f"{self.config.service}@{self.host}"

    @property
    def pid(self) -> int:
        return os.getpid()  # read each time: a forked child is another holder

    # -- requests

    def make_request(
        self,
        vram_gb: object,
        priority: object = None,
        timeout: object = DEFAULT,
        ttl: object = None,
        device: object = None,
        on_lost: object = None,
        preemptible: object = None,
        on_evict: object = None,
        resume: object = True,
        node: object = None,
        gpus: object = 1,
    ) -> LeaseRequest:
        """Validate the arguments of ``lease()``/``acquire()``; None (DEFAULT for timeout) means the default."""
        vram_mib = validate_vram(vram_gb)
        count = validate_gpu_count(gpus)
        if count > 1:
            vram_mib = -(-vram_mib // count)  # the total, split evenly (rounded up) over the GPUs
            if device is not None:
                raise InvalidRequest("device", device, "cannot pin a lease over several GPUs (gpus > 1): leave it None")
        name, rank = validate_priority(
            self.config.default_priority if priority is None else priority, self.config.priorities
        )
        wait = validate_timeout(self.config.default_timeout if timeout is DEFAULT else timeout)
        ttl_ms = validate_ttl(self.config.default_ttl if ttl is None else ttl)
        return LeaseRequest(
            vram_mib=vram_mib,
            priority=name,
            rank=rank,
            ttl_ms=ttl_ms,
            timeout=wait,
            device=validate_device(device),
            on_lost=validate_on_lost(on_lost),
            preemptible=name in self.config.preemptible
            if preemptible is None
            else validate_flag("preemptible", preemptible),
            on_evict=validate_on_evict(on_evict),
            resume=validate_flag("resume", resume),
            node=validate_node(node),
            count=count,
        )

    def on_node(self, gpu: GpuInfo, node: str | None) -> bool:
        return on_node(gpu, node, self.host)

    def node_arg(self, node: str | None, pin: str = "") -> str:
        """The node a script is told: "any" when no registered GPU has a host (nothing to filter), or when a
        GPU is pinned and no node was asked (a pin names the GPU, wherever it is)."""
        if node == "any" or (pin and node is None) or not self.summary.any_host:
            return "any"
        return self.host if node is None else node

    def check_fits(self, req: LeaseRequest, pin: str) -> None:
        """Raise :class:`InsufficientCapacity` early when the known GPUs can never hold the request, and
        :class:`InvalidRequest` when ``node`` leaves no GPU."""
        if not pin and req.count == 1:
            largest = self.summary.largest(req.node, self.host)
            if largest is not None and req.vram_mib <= largest:
                return  # fits some eligible GPU (the full check below finds nothing wrong either)
        everything = [self.registry[pin]] if pin else list(self.registry.values())
        node = "any" if pin and req.node is None else req.node
        eligible = [g for g in everything if self.on_node(g, node)]
        if not everything:
            return
        if not eligible:
            hosts = sorted({g.host for g in self.registry.values() if g.host is not None})
            raise InvalidRequest(
                "node",
                req.node,
                f"no registered GPU is on that host{' (or this one)' if req.node is None else ''}; hosts: "
                f"{', '.join(hosts) or 'none'}; use node='any' for every host",
            )
        largest = max(g.leasable_mib for g in eligible)
        if req.vram_mib > largest:
            why = None
            if req.count > 1:
                why = f"it needs {req.vram_mib} MiB on each of {req.count} GPUs; the largest leases out {largest} MiB"
            raise InsufficientCapacity(req.vram_mib * req.count, largest, [g.id for g in eligible], why)
        if req.count > 1:
            per_host: dict[str | None, int] = {}
            for g in eligible:
                if g.leasable_mib >= req.vram_mib:
                    per_host[g.host] = per_host.get(g.host, 0) + 1
            if max(per_host.values(), default=0) < req.count:
                raise InsufficientCapacity(
                    req.vram_mib * req.count,
                    largest,
                    [g.id for g in eligible],
                    f"no host has {req.count} GPUs that can each hold {req.vram_mib} MiB",
                )

    def check_request(self, req: LeaseRequest) -> str:
        """Resolve the pin against the registry and check the size; the pinned gpu id (or "")."""
        pin = resolve_device(req.device, self.registry)
        self.check_fits(req, pin)
        return pin

    # -- registry

    def needs_register(self, registered: Mapping[str, str]) -> bool:
        """True when a declared GPU is missing from (or differs in) the registry as read."""
        return any(registered.get(g.id) != g.to_json() for g in self.declared.values())

    def check_register_reply(self, reply: list[Any]) -> None:
        if int(reply[0]) < 0:
            gpu, registered = str(reply[1]), GpuInfo.from_json(str(reply[2]))
            mine = self.declared[gpu]
            update = "`gpuboss gpus register --update` (or register_gpus(update=True)) registers the sizes declared now"
            fix = f"fix the declaration, or use another id or namespace; {update}"
            if mine.uuid is not None:  # discovered: the sizes come from the card and auto_reserve_gb
                fix = (
                    "every process must use the same auto_reserve_gb; after a change of it, or in a namespace where an "
                    "older gpuboss registered NVML's whole total (docs/inventory.md), "
                    f"{update}"
                )
            raise ConfigError(
                f"gpus: {gpu!r} is declared with {mine.capacity_mib} MiB (reserve {mine.reserve_mib} MiB) but "
                f"namespace {self.config.namespace!r} already registers it with {registered.capacity_mib} MiB "
                f"(reserve {registered.reserve_mib} MiB); {fix}"
            )

    def update_registry(self, flat: Mapping[str, str]) -> None:
        if not flat and self.registry_loaded:
            return  # the registry was lost (Redis restarted empty): keep what we knew until it is back
        self.registry = {**{k: GpuInfo.from_json(v) for k, v in flat.items()}, **self.declared}
        self.registry_loaded = True

    def registry_flow(self) -> Generator[Op, Any, list[GpuInfo]]:
        """Read the registry: the GPUs registered in the namespace, with this boss's own declarations."""
        self.update_registry((yield ReadHash(self.keys.gpus)))
        return sorted(self.registry.values(), key=lambda g: g.id)

    def policy_flow(self, again: bool = False) -> Generator[Op, Any, None]:
        """Store this configuration's scheduling rules (if it has any) when due: before the first request, once
        a UTC day (time windows), and ``again`` at once when the namespace lost its state (its GPU registry is
        gone: a Redis restarted empty, ``FLUSHALL``, a failover to an empty replica), before the GPUs are
        registered again, so nothing is granted there without the rules. In between, every RULES_CHECK_S, one
        read checks that each rule is still there (by name: a boss configured otherwise may have replaced its
        value, and the last one started wins) and stores them again if one is missing."""
        if not self.policy_fields:
            return
        today = datetime.now(UTC).date()
        if not again and self.policy_day == today:
            if time.monotonic() - self.policy_checked < RULES_CHECK_S:
                return
            self.policy_checked = time.monotonic()
            there = yield ReadHash(self.keys.policy)
            if all(name in there for name, value in policy_fields(self.config, today) if value):
                return
        yield self.policy_call(today)
        self.policy_day, self.policy_checked = today, time.monotonic()

    def prepare_flow(self, req: LeaseRequest) -> Generator[Op, Any, None]:
        """Before a request: read the registry (first time, or to resolve a pin), check the request against
        it, and only then store the scheduling rules (when due) and register this boss's GPUs, so a bad request
        writes nothing."""
        if self.registry_loaded and req.device is None:
            try:
                self.check_request(req)
            except (InsufficientCapacity, InvalidRequest):
                pass  # (by the registry as read before: a GPU may have grown or been added since; read it again)
            else:
                yield from self.policy_flow()
                return
        flat = yield ReadHash(self.keys.gpus)
        self.update_registry(flat)
        self.check_request(req)
        register = self.register_call() if self.needs_register(flat) else None
        # No GPU registered at all (a new namespace, or one that lost its state): the rules go in first, at once.
        yield from self.policy_flow(again=register is not None and not flat)
        if register is not None:
            self.check_register_reply((yield register))

    # -- script calls
    #
    # Every script that changes state announces it (lua/includes/emit.lua): it takes the event channel and
    # the event log as its last two KEYS and the log's cap as its last ARGV.

    def state_keys(self) -> list[str]:
        return self.keys.state()

    def lease_keys(self) -> list[str]:
        """The KEYS of a lease-state script that emits: :meth:`state_keys`, then the event channel and log."""
        return list(self._lease_keys)

    def _event_keys(self) -> list[str]:
        return self.keys.event_keys()

    def _declarations(self) -> list[str | int]:
        """This boss's GPUs as the registering scripts take them (one JSON declaration each)."""
        return [g.to_json() for g in self.declared.values()]

    def register_call(self) -> Call | None:
        if not self.declared:
            return None
        return Call("register", [*self.keys.register(), *self._event_keys()], [*self._declarations(), self._cap])

    def reregister_call(self) -> Call | None:
        """Register this boss's GPUs with the sizes it declares, resizing those registered with others."""
        if not self.declared:
            return None
        return Call("reregister", self.lease_keys(), [self._wake_prefix, *self._declarations(), self._cap])

    def check_reregister_reply(self, reply: list[Any]) -> tuple[int, int, int]:
        """GPUs added, GPUs resized and requests granted; :class:`ConfigError` naming what stands in the way of a
        GPU that would shrink (nothing was written then)."""
        code = int(reply[0])
        if code == -1:
            gpu, leased, leasable = str(reply[1]), int(reply[2]), int(reply[3])
            raise ConfigError(
                f"gpus: {gpu!r} would lease out {leasable} MiB, but {leased} MiB is leased on it now: nothing was "
                "changed; retry once enough of its leases are released (`gpuboss leases --gpu ...`)"
            )
        if code == -2:
            gpu, request, need = str(reply[1]), str(reply[2]), int(reply[3])
            raise ConfigError(
                f"gpus: shrinking {gpu!r} would leave waiting request {request} ({need} MiB on a GPU) with no GPU "
                "that can ever hold it: nothing was changed; retry once it was served or withdrawn (`gpuboss queue`)"
            )
        return int(reply[1]), int(reply[2]), int(reply[3])

    def unregister_call(self, gpu_ids: Sequence[str]) -> Call:
        """Take GPUs out of the namespace's registry (those gone for good)."""
        if not gpu_ids:
            raise InvalidRequest("gpu_ids", list(gpu_ids), "name at least one registered GPU id")
        return Call("unregister", self.lease_keys(), [self._wake_prefix, *gpu_ids, self._cap])

    def check_unregister_reply(self, reply: list[Any]) -> int:
        """GPUs removed; :class:`InvalidRequest` naming the GPU and what keeps it (nothing was written then)."""
        code = int(reply[0])
        if code == 1:
            return int(reply[1])
        gpu = str(reply[1])
        if code == -1:
            known = ", ".join(sorted(str(g) for g in reply[2:])) or "none"
            raise InvalidRequest(
                "gpu", gpu, f"is not registered in namespace {self.config.namespace!r} (registered: {known})"
            )
        if code == -2:
            raise InvalidRequest(
                "gpu",
                gpu,
                f"has {int(reply[2])} MiB leased on it: its leases must end first (`gpuboss leases --gpu {gpu}`)",
            )
        if code == -3:
            raise InvalidRequest(
                "gpu", gpu, f"holds memory for request {reply[2]} (an eviction under way): retry once it was served"
            )
        raise InvalidRequest(
            "gpu",
            gpu,
            f"waiting request {reply[2]} ({int(reply[3])} MiB on a GPU) would have no GPU left that can ever hold it: "
            "retry once it was served or withdrawn (`gpuboss queue`)",
        )

    def acquire_call(self, request_id: str, req: LeaseRequest, pin: str, service: str) -> Call:
        mode = "try" if req.timeout == 0 else "wait"
        args: list[str | int] = [
            self._wake_prefix,
            request_id,
            req.vram_mib,
            req.rank,
            req.priority,
            pin,
            req.ttl_ms,
            mode,
            service,
            self.host,
            self.pid,
            "1" if req.preemptible else "0",
            self.notify_channel,
            self._grace_ms,
            self.config.evict_on_grace,
            self.node_arg(req.node, pin),
            req.count,
            self.secret,
            self._cap,
        ]
        return Call("acquire", self.lease_keys(), args)

    def release_call(self, lease_id: str, reason: ReleaseReason = "release") -> Call:
        """Release a lease or withdraw a request; ``reason`` picks the event (``timeout``: ``timed_out``)."""
        return Call(
            "release",
            self.lease_keys(),
            [self._wake_prefix, lease_id, reason, self.secret, self._cap],
        )

    def revoke_call(self, lease_id: str, by: str, reason: str = "", queued: bool = False) -> Call:
        """Force-release someone else's lease (an operator's ``gpuboss release``); with ``queued``, withdraw the
        id's queued request where it has no lease (a waiter whose process is gone)."""
        if not isinstance(lease_id, str) or not lease_id:
            raise InvalidRequest("lease_id", lease_id, "must be a lease id (a non-empty str)")
        if not isinstance(reason, str):
            raise InvalidRequest("reason", reason, "must be a str")
        return Call(
            "revoke",
            self.lease_keys(),
            [self._wake_prefix, lease_id, by, reason, "1" if queued else "0", self._cap],
        )

    def gone_call(
        self, item_id: str, record: Mapping[str, Any], holder: ProcessIdentity, by: str, queued: bool = False
    ) -> Call:
        """Revoke a lease, or with ``queued`` withdraw a queued request, whose process is gone from this machine
        (procs.py: ``holder``, read from ``record``); the event's reason names the process."""
        why = f"holder process gone (pid {holder.pid} on {record.get('host', self.host)})"
        return self.revoke_call(item_id, by, why, queued)

    def renew_call(self, items: Mapping[str, int]) -> Call:
        args: list[str | int] = [self._wake_prefix, self.secret]
        for lease_id, ttl_ms in items.items():
            args += [lease_id, ttl_ms]
        return Call("renew", self.lease_keys(), [*args, self._cap])

    def yield_call(self, lease_id: str, resume: bool) -> Call:
        """Hand back a lease asked to checkpoint; with ``resume``, queue it again at its arrival position."""
        return Call(
            "yield",
            self.lease_keys(),
            [self._wake_prefix, lease_id, "1" if resume else "0", self.secret, self._cap],
        )

    def resize_call(self, lease_id: str, vram_mib: int) -> Call:
        return Call(
            "resize",
            self.lease_keys(),
            [self._wake_prefix, lease_id, vram_mib, self.secret, self._cap],
        )

    def checkpoint_call(self, lease_id: str) -> Call:
        """Say that the checkpoint of an evicted lease has started (an event for operators)."""
        return Call("checkpoint", [self.keys.leases, *self._event_keys()], [lease_id, self.secret, self._cap])

    def policy_call(self, today: date | None = None) -> Call:
        """Store this configuration's scheduling rules in the namespace (gpuboss/policy.py)."""
        args: list[str | int] = [x for pair in policy_fields(self.config, today) for x in pair]
        return Call("policy", [self.keys.policy, *self._event_keys()], [*args, self._cap])

    def pause_call(self, priority: str, paused: bool, by: str) -> Call:
        """Stop (or restart) grants for a priority class at once, in every process; active leases continue."""
        name, _ = validate_priority(priority, self.config.priorities)
        return Call(
            "pause",
            self.lease_keys(),
            [self._wake_prefix, name, "1" if paused else "0", by, self._cap],
        )

    def collect_call(self) -> Call:
        return Call("collect", self.lease_keys(), [self._wake_prefix, self._cap])

    # -- replies

    @staticmethod
    def released(reply: list[Any], lease_id: str = "") -> bool:
        """True when a release removed something; :class:`InvalidRequest` when the lease is another holder's."""
        code = ReleaseReply(int(reply[0]))
        if code is ReleaseReply.NOT_HOLDER:
            raise InvalidRequest(
                "lease",
                lease_id,
                "is held by another process: only its holder can release it (an operator can force-release it "
                "with `gpuboss release ID`)",
            )
        return code is not ReleaseReply.NOT_FOUND

    @staticmethod
    def still_waiting(reply: list[Any]) -> bool:
        """Whether requests still wait after a release served the queue (its reply's third item)."""
        return len(reply) > 2 and int(reply[2]) == 1

    @staticmethod
    def collected(reply: list[Any]) -> dict[str, int]:
        return {"leases": int(reply[0]), "requests": int(reply[1]), "granted": int(reply[2])}

    @staticmethod
    def collected_records(reply: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The lease and request records a collect removed."""
        leases = [json.loads(str(r)) for r in (reply[4] if len(reply) > 4 else [])]
        requests = [json.loads(str(r)) for r in (reply[5] if len(reply) > 5 else [])]
        return leases, requests

    @staticmethod
    def revoked(reply: list[Any]) -> tuple[RevokeReply, int, dict[str, Any] | None]:
        """What a revoke did, how many waiters it granted, and the lease record it removed."""
        code = RevokeReply(int(reply[0]))
        record = json.loads(str(reply[2])) if len(reply) > 2 else None
        return code, int(reply[1]), record

    # -- the acquisition protocol

    def acquire_flow(
        self,
        req: LeaseRequest,
        request_id: str,
        clock: Callable[[], float] = time.monotonic,
        stop: Callable[[], bool] | None = None,
    ) -> Flow:
        """Acquire a lease: yields operations for a driver, returns the :class:`Lease`.

        Raises :class:`LeaseTimeout` (its request withdrawn, and a grant that raced the timeout released),
        :class:`InsufficientCapacity` or :class:`InvalidRequest`. ``stop`` is asked before each look: when
        it says True the request is withdrawn and :class:`LeaseCancelled` raised (a resume whose block
        ended meanwhile).
        """
        pin = self.check_request(req)
        deadline = None if req.timeout is None else clock() + req.timeout
        call = self.acquire_call(request_id, req, pin, self.config.service)
        watching = False
        restored = False  # the scheduling rules stored again in this call, after the namespace lost its state
        while True:
            if stop is not None and stop():
                yield self.release_call(request_id, "cancel")
                raise LeaseCancelled(f"request {request_id} was withdrawn: its lease was released meanwhile")
            reply = yield call
            code = Reply(int(reply[0]))
            gone = code is Reply.NO_GPUS or (code is Reply.UNKNOWN_GPU and pin in self.registry)
            if code is Reply.NO_GPUS and not restored and (self.declared or self.registry):
                # The namespace lost its state (the registry with the rest): its rules first, then its GPUs.
                yield from self.policy_flow(again=True)
                restored = True
            if code is Reply.NO_GPUS and self.declared:
                register = self.register_call()
                assert register is not None
                self.check_register_reply((yield register))
                continue
            if gone and self.registry:
                # The registry was lost (a Redis restart without persistence, a failover) and this boss declares
                # no GPU to put back: the bosses that do re-register on their next request. Wait for them.
                if deadline is not None and deadline - clock() <= 0:
                    raise LeaseTimeout(f"{self._timeout_message(req)}: the namespace lost its GPU registry")
                left = REGISTRY_WAIT_S if deadline is None else min(REGISTRY_WAIT_S, deadline - clock())
                yield Pop(self.keys.wake(request_id), max(left, 0.001))
                continue
            if code is Reply.NO_GPUS:
                raise ConfigError(
                    f"no GPU is registered in namespace {self.config.namespace!r}: declare gpus in the "
                    "configuration (gpus: [{id: gpu0, vram_gb: 24, index: 0}])"
                )
            if code is Reply.UNKNOWN_GPU:
                raise InvalidRequest("device", req.device, f"GPU {pin!r} is not registered in this namespace")
            if code is Reply.INSUFFICIENT:
                raise InsufficientCapacity(req.vram_mib, int(reply[1]), [pin] if pin else [])
            if code is Reply.GRANTED:
                return self.make_lease(str(reply[1]), req)
            if code is Reply.BUSY:
                if (yield from self.reap_flow(clock, REAP_QUEUE_HEAD)):
                    continue  # a dead holder's lease was revoked: look again
                raise LeaseTimeout(
                    f"no GPU has {req.vram_mib} MiB free for a {req.priority} request right now (timeout=0)"
                )
            # QUEUED
            position, next_ms = int(reply[1]), int(reply[2])
            if not watching:
                yield Watch(request_id, req.ttl_ms)
                watching = True
            # (a grant made by a revoke here is pushed to this request's wake list: the Pop below takes it)
            yield from self.reap_flow(clock, position)
            chunk = min(MAX_WAIT_CHUNK_S, max(req.ttl, 1.0))
            if position < EXPIRY_WATCH_POSITIONS and next_ms >= 0:
                chunk = min(chunk, next_ms / 1000 + 0.002)
            if position < EXPIRY_WATCH_POSITIONS and self.reap_watch:
                chunk = min(chunk, REAP_EVERY_S)
            if deadline is not None:
                left = deadline - clock()
                if left <= 0:
                    yield self.release_call(request_id, "timeout")
                    raise LeaseTimeout(self._timeout_message(req))
                chunk = min(chunk, left)
            popped = yield Pop(self.keys.wake(request_id), max(chunk, 0.001))
            if popped is not None:
                return self.make_lease(str(popped), req)
            if deadline is not None and deadline - clock() <= 0:
                yield self.release_call(request_id, "timeout")
                raise LeaseTimeout(self._timeout_message(req))
            # Not granted yet: look again (this also collects what expired, and re-queues a request whose
            # queue entry was lost while this process was stopped).

    def reap_flow(self, clock: Callable[[], float] = time.monotonic, ahead: int = 0) -> Generator[Op, Any, int]:
        """Revoke the leases, and withdraw the first ``ahead`` queued requests (at most REAP_QUEUE_HEAD), whose
        process is gone from this machine (procs.py), so that a killed holder's VRAM, or the turn of a killed
        waiter, comes back now rather than when its TTL runs out. Runs for a request that waits (or finds no
        room with ``timeout=0``), at most every REAP_EVERY_S per boss; returns how many it removed."""
        if self.me is None or clock() < self.reap_due:
            return 0
        self.reap_due = clock() + REAP_EVERY_S
        leases: Mapping[str, str] = yield ReadHash(self.keys.leases)
        requests: Mapping[str, str] = {}
        if ahead > 0:
            requests = yield ReadQueueHead(self.keys.queue, self.keys.tickets, min(ahead, REAP_QUEUE_HEAD))
        removed, watch = 0, False
        # (the requests first: a lease revoked before would be granted to a gone waiter at the head)
        for queued, records in ((True, requests), (False, leases)):
            outcomes, running = yield from self._reap(records, queued, self.operator)
            removed += sum(1 for code, _, _ in outcomes if code in (RevokeReply.REVOKED, RevokeReply.WITHDRAWN))
            watch = watch or running
        self.reap_watch = watch
        return removed

    def collect_flow(self, by: str | None = None, announce: bool = True) -> Generator[Op, Any, Collected]:
        """Collect what has expired (one script), then revoke every lease and withdraw every queued request whose
        process is gone from this machine (``boss.collect()``, ``gpuboss gc``); ``by`` names who did it, and
        ``announce`` logs a warning for each such revoke (``gpuboss gc`` prints them itself)."""
        reply = yield self.collect_call()
        leases, requests = self.collected_records(reply)
        out = Collected(leases, requests, [], [], self.collected(reply)["granted"])
        if self.me is None:
            return out  # (this process cannot tell whose process is gone)
        # (the queued requests first: a lease revoked before would be granted to a gone waiter)
        for queued, key in ((True, self.keys.tickets), (False, self.keys.leases)):
            records: Mapping[str, str] = yield ReadHash(key)
            outcomes, _ = yield from self._reap(records, queued, by or self.operator, announce)
            for code, granted, record in outcomes:
                out.granted += granted
                if code is RevokeReply.REVOKED:
                    out.revoked.append(record)
                elif code is RevokeReply.WITHDRAWN:
                    out.withdrawn.append(record)
                elif code is RevokeReply.EXPIRED:  # (its TTL ran out since the collect)
                    out.leases.append(record)
        return out

    def _reap(
        self, records: Mapping[str, str], queued: bool, by: str, announce: bool = True
    ) -> Generator[Op, Any, tuple[list[tuple[RevokeReply, int, dict[str, Any]]], bool]]:
        """Revoke (``queued``: withdraw) each of ``records`` (id -> JSON) whose process is gone from this machine:
        what each revoke did, how many waiters it granted and the record it removed; and whether a holder of this
        machine other than this process still runs (it could still die: the head waiters look again soon)."""
        me = self.me
        outcomes: list[tuple[RevokeReply, int, dict[str, Any]]] = []
        running = False
        if me is None:
            return outcomes, running
        for item_id, raw in records.items():
            try:
                rec = json.loads(raw)
            except ValueError:
                continue  # (not a record gpuboss wrote: never a reason to revoke)
            judged = judge(rec, me) if isinstance(rec, dict) else None
            if judged is None:
                continue  # another machine or pid namespace: only its TTL tells
            holder, gone = judged
            if not gone:
                running = running or holder.pid != me.pid
                continue
            code, granted, removed = self.revoked((yield self.gone_call(item_id, rec, holder, by, queued)))
            if announce and code in (RevokeReply.REVOKED, RevokeReply.WITHDRAWN):
                log.warning(
                    "gpuboss: %s %s (%s MiB, service %r): its process, pid %d, is gone",
                    "revoked lease" if code is RevokeReply.REVOKED else "withdrew the queued request",
                    item_id,
                    rec.get("vram_mib"),
                    rec.get("service"),
                    holder.pid,
                )
            outcomes.append((code, granted, removed or rec))
        return outcomes, running

    @staticmethod
    def make_lease(record: str, req: LeaseRequest) -> Lease:
        return Lease.from_record(record, on_lost=req.on_lost, on_evict=req.on_evict, resume=req.resume)

    # -- eviction: handing back, resuming, resizing

    def request_of(self, lease: Lease) -> LeaseRequest:
        """The request that waits to resume ``lease``: same size, priority and TTL, pinned to its GPU."""
        return LeaseRequest(
            vram_mib=lease.vram_mib // len(lease.gpus),
            priority=lease.priority,
            rank=self.config.priorities.get(lease.priority, PRIORITIES.get(lease.priority, 0)),
            ttl_ms=int(lease.ttl * 1000),
            timeout=None,
            device=lease.gpu if len(lease.gpus) == 1 else None,
            on_lost=lease.on_lost,
            preemptible=lease.preemptible,
            on_evict=lease.on_evict,
            resume=lease.resume,
            node=lease.node,
            count=len(lease.gpus),
        )

    def yield_flow(self, lease: Lease, stop: Callable[[], bool] | None = None) -> Generator[Op, Any, YieldOutcome]:
        """Hand back a lease asked to checkpoint; with ``lease.resume``, wait until it is granted again.

        Returns what happened and, for CONTINUE and GRANTED, the lease record to apply to ``lease``.
        """
        idle = lease.notice is not None and lease.notice.reason in ("idle", "idle_timeout")
        reply = yield self.yield_call(lease.id, lease.resume and not idle)
        code = YieldReply(int(reply[0]))
        if code is YieldReply.ENDED and lease.resume and idle:
            return YieldOutcome(code, None, parked=True)
        if code in (YieldReply.CONTINUE, YieldReply.GRANTED):
            return YieldOutcome(code, json.loads(str(reply[1])))
        if code is not YieldReply.QUEUED:
            return YieldOutcome(code, None)
        resumed = yield from self.acquire_flow(self.request_of(lease), lease.id, stop=stop)
        return YieldOutcome(YieldReply.GRANTED, resumed.record)

    def resize_flow(
        self, lease: Lease, vram_gb: object, timeout: object = None, clock: Callable[[], float] = time.monotonic
    ) -> Generator[Op, Any, dict[str, Any]]:
        """Change a lease's size; growing may wait (``timeout`` seconds, None: forever). Returns the record."""
        vram_mib = validate_vram(vram_gb)
        wait = validate_timeout(timeout)
        if len(lease.gpus) > 1:
            raise InvalidRequest(
                "lease", lease.id, "a lease over several GPUs cannot be resized; release it and ask again"
            )
        deadline = None if wait is None else clock() + wait
        grow_id = grow_request_id(lease.id)
        watching = False
        while True:
            reply = yield self.resize_call(lease.id, vram_mib)
            code = ResizeReply(int(reply[0]))
            if code is ResizeReply.GONE:
                raise LeaseLost(f"lease {lease.id} is gone: it cannot be resized")
            if code is ResizeReply.INSUFFICIENT:
                raise InsufficientCapacity(vram_mib, int(reply[1]), [lease.gpu])
            if code is ResizeReply.DONE:
                return dict(json.loads(str(reply[1])))
            if not watching:
                yield Watch(grow_id, int(lease.ttl * 1000))
                watching = True
            chunk = min(MAX_WAIT_CHUNK_S, max(lease.ttl, 1.0))
            if deadline is not None:
                left = deadline - clock()
                if left <= 0:
                    yield self.release_call(grow_id, "timeout")
                    raise LeaseTimeout(f"lease {lease.id} could not grow to {vram_mib} MiB within {wait:g} s")
                chunk = min(chunk, left)
            yield Pop(self.keys.wake(grow_id), max(chunk, 0.001))

    @staticmethod
    def _timeout_message(req: LeaseRequest) -> str:
        return f"no lease of {req.vram_mib} MiB ({req.priority}) was granted within {req.timeout:g} s"


def grow_request_id(lease_id: str) -> str:
    """The id of the request a growing resize queues (and watches) while it waits: ``<lease id>:grow``."""
    return f"{lease_id}:grow"


def new_request_id() -> str:
    """A random UUID4 as 32 hex digits: ``uuid.uuid4().hex``, without building the UUID object (a third of the
    time, on every request)."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    return raw.hex()
