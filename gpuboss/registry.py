"""The GPU inventory wired into the bosses: discovery and registration, device strings, node, models.

Each boss has one :class:`Inventory` (``boss._inventory``). It

- discovers this host's GPUs through NVML at first use when ``gpus: auto`` (or when no list is given and NVML
  works), and adds them to the boss's declarations, by UUID, with host, PCI bus id and MIG parent
  (:meth:`Inventory.prepare_flow`, :meth:`Inventory.register_flow`);
- beats for the host once at first use, then starts the :class:`~gpuboss.sampler.Sampler` thread;
- turns a granted lease's device string into this process's own CUDA ordinal for the GPU's UUID, honouring
  ``CUDA_VISIBLE_DEVICES`` and ``CUDA_DEVICE_ORDER``, and warns with the fix when the ordinal is a guess
  (:meth:`Inventory.localize`);
- reads the effective free VRAM of the GPUs a request may use (``node``) and picks a model's quantization
  (:meth:`Inventory.free_flow`, :meth:`Inventory.model_flow`).

The flows are generators of core operations, run by either front end, like the core's (``core.py``).
:class:`InventoryMethods` and :class:`AsyncInventoryMethods` give the bosses their public methods
(``register_gpus``, ``vram_status``, ``choose_model``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, cast

from gpuboss.core import GpuInfo, LeaseRequest, Op, ReadHash, on_node, validate_node
from gpuboss.devices import ENV_VISIBLE, cuda_index, cuda_ordinal, visible_devices
from gpuboss.errors import ConfigError, InvalidRequest
from gpuboss.inventory import VRAMStatus, declarations_of, vram_status
from gpuboss.lease import Lease
from gpuboss.models import ModelChoice, ModelRegistry, default_models, resolve_model
from gpuboss.nvml import Discovery, PhysicalGpu, discover
from gpuboss.sampler import Sampler, hostbeat_call, observed, warn

if TYPE_CHECKING:
    from gpuboss.core import Core

log = logging.getLogger("gpuboss")

#: ``node=`` value that lets a request use the GPUs of every host.
ANY_NODE = "any"
UUID_PREFIXES = ("GPU-", "MIG-")

Mode = Literal["declared", "auto", "default"]


class DeviceOrdinalWarning(UserWarning):
    """The device string of a lease may not name the right GPU in this process; the message says the fix."""


def is_uuid(gpu_id: str) -> bool:
    return gpu_id.startswith(UUID_PREFIXES)


def effective_free(
    gpus: Mapping[str, GpuInfo],
    capacity: Mapping[str, str],
    used: Mapping[str, str],
    seen: Mapping[str, int],
    offline: Mapping[str, str],
    holds: Mapping[str, str],
) -> dict[str, int]:
    """Free MiB per online GPU as placement counts it (``lua/includes/state.lua`` ``free_for``): leasable
    minus the larger of leased and observed used, minus VRAM held for a request being served by eviction."""
    out = {}
    for gpu in gpus:
        if gpu in offline or gpu not in capacity:
            continue
        busy = max(int(used.get(gpu, 0)), seen.get(gpu, 0))
        free = int(capacity[gpu]) - busy
        hold = holds.get(gpu)
        if hold is not None:
            free -= _held_mib(hold)
        out[gpu] = free
    return out


def _held_mib(raw: str) -> int:
    """The MiB of a reservation (JSON with ``vram_mib``); 0 for a malformed one."""
    try:
        value = json.loads(raw)
        return int(value["vram_mib"]) if isinstance(value, dict) else 0
    except (KeyError, TypeError, ValueError):
        return 0


class Inventory:
    """One boss's view of its host's GPUs (see the module docstring)."""

    def __init__(self, core: Core, url: str, held: Callable[[], list[Lease]]) -> None:
        self.core = core
        self.url = url
        self._held = held
        #: The NVML module (None: the real ``pynvml``). Tests put a fake here before the first request.
        self.nvml: Any = None
        #: The environment whose ``CUDA_VISIBLE_DEVICES``/``CUDA_DEVICE_ORDER`` device strings honour
        #: (None: this process's, read at each grant).
        self.env: Mapping[str, str] | None = None
        #: Start the sampler thread after the first request (tests turn it off and call ``sampler.tick()``).
        self.autostart = True
        #: The model registry ``choose_model`` reads (None: the shipped one).
        self.models: ModelRegistry | None = None
        self.sampler: Sampler | None = None
        self._lock = threading.Lock()
        self._discovery: Discovery | None = None
        self._local: list[str] | None = None
        self._beaten = False
        self._warned: set[str] = set()

    # -- discovery

    @property
    def mode(self) -> Mode:
        """``auto``: ``gpus: auto``; ``declared``: a GPU list (or ``gpu_discovery: off``); ``default``: neither,
        so discovery is tried and an empty result is no error (the GPUs others registered are used)."""
        config = self.core.config
        if config.gpu_discovery == "auto":
            return "auto"
        if config.gpus or config.gpu_discovery == "off":
            return "declared"
        return "default"

    def _discover(self) -> Discovery:
        if self._discovery is None:
            self._discovery = discover(self.nvml)
        return self._discovery

    def discover_once(self) -> list[str]:
        """Discover this host's GPUs (once) and add them to the boss's declarations; their ids (UUIDs).

        Raises :class:`ConfigError` with ``gpus: auto`` when NVML finds nothing (tried again next time)."""
        local = self._local
        if local is not None:  # the hot path: every request after the first
            return local
        with self._lock:
            if self._local is not None:
                return self._local
            mode = self.mode
            if mode == "declared":
                self._local = []
                return self._local
            found = self._discover()
            try:
                gpus = declarations_of(
                    found,
                    host=self.core.host,
                    reserve_gb=self.core.config.auto_reserve_gb,
                    required=mode == "auto",
                )
            except ConfigError:
                self._discovery = None  # NVML may work next time (a driver being loaded)
                raise
            for gpu in gpus:
                info = gpu.to_gpu_info()
                self.core.declared[info.id] = info
                self.core.registry.setdefault(info.id, info)
            if gpus:
                self.core.registry_loaded = False  # read again, and register them, before the next request
            self._local = [g.id for g in gpus]
            if self._local:
                log.info("gpuboss: discovered %s on %s", ", ".join(self._local), self.core.host)
            return self._local

    def physical(self) -> tuple[PhysicalGpu, ...] | None:
        """This host's physical GPUs as NVML reports them (read once), or None without NVML."""
        with self._lock:
            found = self._discover()
        return found.gpus if found.available else None

    # -- flows

    def prepare_flow(self, req: LeaseRequest) -> Generator[Op, Any, LeaseRequest]:
        """Before a request: discover (first time), map a ``cuda:N`` pin to a UUID, let the core register and
        check, then beat for the host once and start the sampler. Returns the request to acquire."""
        local = self.discover_once()
        req = self.map_pin(req)
        yield from self.core.prepare_flow(req)
        if local and not self._beaten:
            yield hostbeat_call(self.core, self.core.host, self._timeout_ms)
            self._beaten = True
            self._start(local)
        return req

    def register_flow(self, update: bool = False) -> Generator[Op, Any, list[GpuInfo]]:
        """Register the configured or discovered GPUs (those already registered identically are left alone),
        beat for the host, start the sampler; the namespace's registry. With ``update``, GPUs registered with
        another capacity or reserve take the declared ones (lua/reregister-21.lua) instead of being a conflict."""
        local = self.discover_once()
        if not self.core.declared:
            reason = self._discover().reason or "NVML found no usable GPU on this host"
            raise ConfigError(
                f"no GPU to register: no gpus are declared and discovery found none ({reason}). Declare them in "
                "the configuration, e.g. gpus: [{id: gpu0, name: RTX 4090, vram_gb: 24, index: 0}], or use "
                "gpus: auto on a host with NVIDIA's driver and nvidia-ml-py"
            )
        flat = yield ReadHash(self.core.keys.gpus)
        if self.core.needs_register(flat):
            if not flat:  # no GPU registered at all: a new namespace, or one that lost its state (and its rules)
                yield from self.core.policy_flow(again=True)
            if update:
                call = self.core.reregister_call()
                assert call is not None
                self.core.check_reregister_reply((yield call))
            else:
                call = self.core.register_call()
                assert call is not None
                self.core.check_register_reply((yield call))
            flat = yield ReadHash(self.core.keys.gpus)
        self.core.update_registry(flat)
        if local:
            yield hostbeat_call(self.core, self.core.host, self._timeout_ms)
            self._beaten = True
            self._start(local)
        return sorted(self.core.registry.values(), key=lambda g: g.id)

    def unregister_flow(self, gpu_ids: Sequence[str]) -> Generator[Op, Any, int]:
        """Take GPUs out of the namespace's registry (lua/unregister-21.lua); how many were removed."""
        removed = self.core.check_unregister_reply((yield self.core.unregister_call(gpu_ids)))
        flat = yield ReadHash(self.core.keys.gpus)
        self.core.registry_loaded = False  # (else an empty hash, every GPU removed, would keep what it knew)
        self.core.update_registry(flat)
        return removed

    @property
    def _timeout_ms(self) -> int:
        return max(1, round(self.core.config.host_timeout_s * 1000))

    def _start(self, local: Sequence[str]) -> None:
        with self._lock:
            if self.sampler is None:
                self.sampler = Sampler(self.core, self.url, local, self._held, self.nvml)
            sampler = self.sampler
        if self.autostart:
            sampler.start()

    def free_flow(self, node: object = None) -> Generator[Op, Any, dict[str, int]]:
        """Effective free MiB of each online GPU a request with ``node`` may use, read now from Redis.

        Freshness of NVML readings is judged by this machine's clock (placement uses Redis time), so with
        clocks far apart a reading may count a little longer or shorter here than there."""
        where = validate_node(node)
        keys = self.core.keys
        flat = yield ReadHash(keys.gpus)
        capacity = yield ReadHash(keys.capacity)
        used = yield ReadHash(keys.used)
        seen = observed((yield ReadHash(keys.observed)), int(time.time() * 1000))
        offline = yield ReadHash(keys.offline)
        holds = yield ReadHash(keys.holds)
        if self.core.needs_register(flat):
            # This boss's GPUs are not (all) registered yet: count them as the register script will (leasable
            # MiB), but write nothing and leave the registry unloaded, so the next request registers them.
            gpus = {**{k: GpuInfo.from_json(v) for k, v in flat.items()}, **self.core.declared}
            pending = {g: str(info.leasable_mib) for g, info in self.core.declared.items() if g not in flat}
            capacity = {**capacity, **pending}
        else:
            self.core.update_registry(flat)
            gpus = self.core.registry
        eligible = {g: info for g, info in gpus.items() if on_node(info, where, self.core.host)}
        if not eligible and gpus:
            hosts = sorted({i.host for i in gpus.values() if i.host})
            raise InvalidRequest(
                "node",
                node,
                f"no registered GPU is on {where or self.core.host!r}; GPUs are on: {', '.join(hosts)} "
                "(pass node='any' or node='<host>')",
            )
        return effective_free(eligible, capacity, used, seen, offline, holds)

    def model_flow(
        self, model: str, quantizations: Sequence[str] | None = None, node: object = None
    ) -> Generator[Op, Any, ModelChoice]:
        """The quantization of ``model`` to lease: the first preference that fits now on a GPU the request may
        use, else the smallest (the one to wait for). Unknown models raise ``UnknownModel`` (InvalidRequest).

        It only reads: ``acquire(model=...)`` runs it before the request's other arguments are checked, so it
        must write nothing (the GPUs of this boss not registered yet count as they will be once registered;
        :meth:`prepare_flow` registers them after the request is checked)."""
        where = validate_node(node)
        registry = self.check_model(model, quantizations)  # before any I/O
        self.discover_once()
        free = yield from self.free_flow(where)
        return resolve_model(model, quantizations, free, registry=registry)

    def check_model(self, model: str, quantizations: Sequence[str] | None = None) -> ModelRegistry:
        """Raise ``UnknownModel`` (InvalidRequest) for a name the model registry lacks, and InvalidRequest for
        ``quantizations`` it cannot resolve; no I/O. The registry read."""
        registry = self.models or default_models()
        resolve_model(model, quantizations, registry=registry)
        return registry

    # -- leases

    def localize(self, lease: Lease) -> None:
        """Set ``lease.uuid``, and ``lease.device`` to this process's CUDA ordinal for it (GPUs known by UUID),
        and the same for each GPU of a lease over several (``lease.uuids``, ``lease.devices``).

        Declared GPUs (no UUID) keep ``cuda:<index>``. A GPU of another host keeps the device of the record
        (that host's NVML index): hand it on with ``lease.child_env()`` instead."""
        where = [
            self._localize_one(lease.id, gpu, device) for gpu, device in zip(lease.gpus, lease.devices, strict=False)
        ]
        lease.uuids = [uuid for uuid, _ in where]
        lease.devices = [device for _, device in where]
        lease.uuid, lease.device = where[0]

    def _localize_one(self, lease_id: str, gpu: str, device: str) -> tuple[str | None, str]:
        """The UUID of one GPU of a lease and this process's device string for it."""
        info = self.core.registry.get(gpu)
        uuid = info.uuid if info is not None and info.uuid else gpu if is_uuid(gpu) else None
        if uuid is None:
            return None, device
        if info is not None and info.host is not None and info.host != self.core.host:
            return uuid, device
        physical = self.physical()
        if physical is None:
            self._warn(
                f"nvml:{uuid}",
                f"gpuboss: lease {lease_id} is on {uuid}, but this process cannot read NVML, so {device} is "
                f"the GPU's NVML index, not necessarily its CUDA ordinal here; give a child process "
                f"lease.child_env() ({ENV_VISIBLE}={uuid}) and use cuda:0 there",
            )
            return uuid, device
        env = self.env
        where = cuda_ordinal(uuid, physical, env)
        if where.device is None:
            self._warn(
                f"hidden:{uuid}:{(env or os.environ).get(ENV_VISIBLE)}",
                f"gpuboss: lease {lease_id} is on {uuid}, which this process cannot use: {where.reason}. "
                f"Run the work in a child process with lease.child_env() ({ENV_VISIBLE}={uuid}), or widen "
                f"{ENV_VISIBLE}",
            )
            return uuid, device
        if not where.certain and where.warning:
            self._warn(f"order:{uuid}", f"gpuboss: lease {lease_id}: {where.warning}")
        return uuid, where.device

    def _warn(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        warn(message, DeviceOrdinalWarning, stacklevel=4)

    def map_pin(self, req: LeaseRequest) -> LeaseRequest:
        """With discovered GPUs, ``device="cuda:N"`` (or N) means this process's cuda:N: pin its UUID."""
        device = req.device
        if not self._local or device is None or (isinstance(device, str) and not device.startswith("cuda:")):
            return req
        ordinal = device if isinstance(device, int) else cuda_index(device)
        if ordinal is None:
            return req  # the core says what is wrong with it
        physical = self.physical()
        if physical is None:
            return req
        seen = visible_devices(physical, self.env)
        if ordinal >= len(seen.uuids):
            raise InvalidRequest(
                "device",
                device,
                f"this process sees {len(seen.uuids)} GPUs (cuda:0 to cuda:{len(seen.uuids) - 1})"
                if seen.uuids
                else f"this process sees no GPU ({'; '.join(seen.notes) or 'check ' + ENV_VISIBLE})",
            )
        return dataclasses.replace(req, device=seen.uuids[ordinal])

    def vram_status(self) -> list[VRAMStatus]:
        """This host's GPUs now, through NVML (empty without NVML)."""
        return vram_status(self.nvml, host=self.core.host)

    def released(self, lease: Lease) -> None:
        """This process is giving ``lease`` back: the sampler reads its GPUs now (out of turn), so that the
        memory its holder freed is seen by the queue at once (sampler.py)."""
        sampler = self.sampler
        if sampler is not None:
            sampler.poke(lease.gpus)

    def after_fork(self) -> None:
        """In a forked child (base.py): a lock and a sampler of its own."""
        self._lock = threading.Lock()
        if self.sampler is not None:
            self.sampler.after_fork()

    def close(self) -> None:
        with self._lock:
            sampler, self.sampler = self.sampler, None
        if sampler is not None:
            sampler.close()


class InventoryMethods:
    """The inventory methods of :class:`~gpuboss.GPUBoss`."""

    _inventory: Inventory
    if TYPE_CHECKING:
        _ready_lock: threading.Lock

        def _run(self, flow: Any) -> Any: ...

    def register_gpus(self, update: bool = False) -> list[GpuInfo]:
        """Register this boss's GPUs (declared, or discovered with ``gpus: auto``) in the namespace now, instead of
        at the first request, and start the host's heartbeat and sampler; the namespace's GPUs.

        With ``update``, a GPU registered with another capacity or reserve takes the sizes this boss declares
        (after a change of ``reserve_gb`` or ``auto_reserve_gb``), and the memory it gains goes to the queue at
        once; a GPU may shrink only while it still holds what is leased on it and every waiting request can
        still be served, else :class:`ConfigError` and nothing changes (docs/configuration.md)."""
        with self._ready_lock:
            return cast(list[GpuInfo], self._run(self._inventory.register_flow(update)))

    def unregister_gpus(self, gpu_ids: Sequence[str]) -> int:
        """Take GPUs that are gone for good out of the namespace (a decommissioned card or host: otherwise they stay,
        offline, and a request pinned to one waits for it); how many were removed. Refused with
        :class:`InvalidRequest`, and nothing changed, while one has leases or memory held for an eviction, or a
        waiting request would have no GPU left that could hold it. A process that declares or discovers such a
        GPU registers it again at its next registration."""
        with self._ready_lock:
            return cast(int, self._run(self._inventory.unregister_flow(gpu_ids)))

    def vram_status(self) -> list[VRAMStatus]:
        """This host's GPUs now, read through NVML: total, used, free, utilisation, temperature, processes."""
        return self._inventory.vram_status()

    def choose_model(
        self, model: str, quantizations: Sequence[str] | None = None, node: str | None = None
    ) -> ModelChoice:
        """The quantization of ``model`` that fits now (best first, or in the order of ``quantizations``)."""
        return cast(ModelChoice, self._run(self._inventory.model_flow(model, quantizations, node)))


class AsyncInventoryMethods:
    """The inventory methods of :class:`~gpuboss.AsyncGPUBoss`."""

    _inventory: Inventory
    if TYPE_CHECKING:
        _ready_lock: asyncio.Lock

        async def _run(self, flow: Any) -> Any: ...

        async def _bind_loop(self) -> None: ...

    async def register_gpus(self, update: bool = False) -> list[GpuInfo]:
        """See :meth:`InventoryMethods.register_gpus`."""
        await self._bind_loop()  # (before the lock: a new event loop gets its own)
        async with self._ready_lock:
            return cast(list[GpuInfo], await self._run(self._inventory.register_flow(update)))

    async def unregister_gpus(self, gpu_ids: Sequence[str]) -> int:
        """See :meth:`InventoryMethods.unregister_gpus`."""
        await self._bind_loop()
        async with self._ready_lock:
            return cast(int, await self._run(self._inventory.unregister_flow(gpu_ids)))

    async def vram_status(self) -> list[VRAMStatus]:
        """See :meth:`InventoryMethods.vram_status` (NVML is read in a worker thread)."""
        return await asyncio.to_thread(self._inventory.vram_status)

    async def choose_model(
        self, model: str, quantizations: Sequence[str] | None = None, node: str | None = None
    ) -> ModelChoice:
        """See :meth:`InventoryMethods.choose_model`."""
        return cast(ModelChoice, await self._run(self._inventory.model_flow(model, quantizations, node)))
