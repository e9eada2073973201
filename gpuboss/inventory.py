"""The host's GPUs as gpuboss declarations, their memory right now, and holders that use more than they leased.

- :func:`discover_gpus` turns NVML discovery into :class:`DiscoveredGpu` declarations: one per GPU without
  MIG, one per MIG instance of a GPU with MIG enabled. The id is the UUID (``GPU-...`` or ``MIG-...``), never
  an index or a host name, so two containers that see one card under different ``cuda:N`` share one budget
  and two hosts never collide. Each carries its host and PCI bus id; :meth:`DiscoveredGpu.to_gpu_config`
  gives the :class:`~gpuboss.config.GPUConfig` the core registers today.
- :func:`vram_status` reads every leasable GPU now: a :class:`VRAMStatus` each (total, used, free,
  utilisation, temperature, processes, and what is available after a safety margin).
- :func:`vram_alerts` compares each process's real usage with what it leased and says who is over budget.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gpuboss.config import GPUConfig, format_validation_error, gb_to_mib
from gpuboss.core import GpuInfo
from gpuboss.errors import ConfigError, InvalidRequest
from gpuboss.nvml import Discovery, GpuProcess, MigInstance, Sampling, discover, sample

#: Default safety margin (MiB) kept out of "available": a CUDA context alone costs a few hundred MiB.
DEFAULT_MARGIN_MIB = 512


class DiscoveredGpu(BaseModel):
    """A GPU (or MIG instance) found on this host, as a declaration."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The UUID: ``GPU-...``, or ``MIG-...`` for a MIG instance.
    id: str = Field(min_length=1, max_length=128, pattern=r"^(GPU|MIG)-[A-Za-z0-9_.:\-]+$")
    name: str
    vram_gb: float = Field(gt=0, allow_inf_nan=False)
    #: NVML index of the card (of its parent for a MIG instance): host order, not a CUDA ordinal.
    index: int = Field(ge=0)
    reserve_gb: float = Field(default=0, ge=0, allow_inf_nan=False)
    host: str = Field(min_length=1)
    pci_bus_id: str = ""
    #: The physical GPU's UUID, for a MIG instance.
    parent_uuid: str | None = None
    compute_capability: tuple[int, int] | None = None
    #: What the driver reserves on the card (NVML v2): left out of ``vram_gb``, which is what CUDA can allocate.
    driver_reserved_mib: int = Field(default=0, ge=0)

    @property
    def uuid(self) -> str:
        return self.id

    @property
    def capacity_mib(self) -> int:
        return gb_to_mib(self.vram_gb)

    @property
    def reserve_mib(self) -> int:
        return gb_to_mib(self.reserve_gb)

    @property
    def is_mig(self) -> bool:
        return self.parent_uuid is not None

    def to_gpu_info(self) -> GpuInfo:
        """The registry entry (the gpus hash): the declaration with its host, UUID, PCI bus id and MIG parent."""
        return GpuInfo(
            id=self.id,
            name=self.name,
            index=self.index,
            capacity_mib=self.capacity_mib,
            reserve_mib=self.reserve_mib,
            host=self.host,
            uuid=self.id,
            pci_bus_id=self.pci_bus_id or None,
            parent_uuid=self.parent_uuid,
        )

    def to_gpu_config(self) -> GPUConfig:
        """The declaration the core registers (id = UUID; capacity exactly the usable MiB NVML reported)."""
        try:
            return GPUConfig(
                id=self.id, name=self.name, vram_gb=self.vram_gb, index=self.index, reserve_gb=self.reserve_gb
            )
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, f"discovered GPU {self.id}")) from None


def declarations(discovery: Discovery, *, host: str | None = None, reserve_gb: float = 0.0) -> list[DiscoveredGpu]:
    """The leasable GPUs of a discovery as declarations (pure: no NVML call)."""
    host = host or socket.gethostname()
    out = []
    for gpu in discovery.gpus:
        units: Sequence[Any] = gpu.mig if gpu.mig_enabled else (gpu,)
        for unit in units:
            mig = isinstance(unit, MigInstance)
            usable = unit.memory_usable_mib
            if gb_to_mib(reserve_gb) >= usable:
                raise ConfigError(
                    f"reserve_gb={reserve_gb} is not less than the {usable} MiB of {unit.uuid} ({unit.name or gpu.name})"
                )
            out.append(
                DiscoveredGpu(
                    id=unit.uuid,
                    name=unit.name or gpu.name,
                    vram_gb=usable / 1024,  # exact in binary: capacity_mib == usable (total - driver reserved)
                    index=gpu.index,
                    reserve_gb=reserve_gb,
                    host=host,
                    pci_bus_id=gpu.pci_bus_id,
                    parent_uuid=gpu.uuid if mig else None,
                    compute_capability=gpu.compute_capability,
                    driver_reserved_mib=unit.memory_reserved_mib,
                )
            )
    return out


def discover_gpus(
    nvml: Any = None,
    *,
    host: str | None = None,
    reserve_gb: float = 0.0,
    required: bool = False,
) -> list[DiscoveredGpu]:
    """This host's leasable GPUs through NVML, as declarations.

    Without NVML (or with no GPU) the list is empty, unless ``required``: then :class:`ConfigError` says
    why and what to do instead (declare ``gpus`` in the configuration)."""
    return declarations_of(discover(nvml), host=host, reserve_gb=reserve_gb, required=required)


def declarations_of(
    found: Discovery, *, host: str | None = None, reserve_gb: float = 0.0, required: bool = False
) -> list[DiscoveredGpu]:
    """:func:`declarations` of a discovery that may have failed: empty then, or :class:`ConfigError` if
    ``required``, saying why and how to declare GPUs instead."""
    gpus = declarations(found, host=host, reserve_gb=reserve_gb) if found.available else []
    if required and not gpus:
        why = found.reason if not found.available else "NVML found no usable GPU on this host"
        extra = f" ({'; '.join(found.problems)})" if found.problems else ""
        raise ConfigError(
            f"gpus: auto cannot discover GPUs: {why}{extra}. Declare the GPUs in the configuration instead, "
            "e.g. gpus: [{id: gpu0, name: RTX 4090, vram_gb: 24, index: 0}]"
        )
    return gpus


@dataclass(frozen=True)
class VRAMStatus:
    """One GPU's memory right now. MiB throughout; ``available_mib`` is free minus the margin (never below 0)."""

    id: str
    name: str
    host: str
    total_mib: int
    used_mib: int
    free_mib: int
    margin_mib: int
    available_mib: int
    gpu_util_pct: int | None
    memory_util_pct: int | None
    temperature_c: int | None
    processes: tuple[GpuProcess, ...]
    #: Unix seconds (this machine's clock) of the reading.
    sampled_at: float
    parent_uuid: str | None = None
    #: Reserved by the driver (never allocatable): total = reserved + used + free.
    reserved_mib: int = 0

    @property
    def used_fraction(self) -> float:
        return self.used_mib / self.total_mib if self.total_mib else 0.0


def statuses(sampling: Sampling, *, margin_mib: int = DEFAULT_MARGIN_MIB, host: str | None = None) -> list[VRAMStatus]:
    """VRAM statuses from a sampling (pure: no NVML call)."""
    if isinstance(margin_mib, bool) or not isinstance(margin_mib, int) or margin_mib < 0:
        raise InvalidRequest("margin_mib", margin_mib, "must be an integer number of MiB >= 0")
    host = host or socket.gethostname()
    return [
        VRAMStatus(
            id=s.uuid,
            name=s.name,
            host=host,
            total_mib=s.total_mib,
            used_mib=s.used_mib,
            free_mib=s.free_mib,
            margin_mib=margin_mib,
            available_mib=max(0, s.free_mib - margin_mib),
            gpu_util_pct=s.gpu_util_pct,
            memory_util_pct=s.memory_util_pct,
            temperature_c=s.temperature_c,
            processes=s.processes,
            sampled_at=sampling.sampled_at,
            parent_uuid=s.parent_uuid,
            reserved_mib=s.reserved_mib,
        )
        for s in sampling.samples
    ]


def vram_status(nvml: Any = None, *, margin_mib: int = DEFAULT_MARGIN_MIB, host: str | None = None) -> list[VRAMStatus]:
    """Every leasable GPU of this host now (empty without NVML: :func:`gpuboss.nvml.sample` says why)."""
    return statuses(sample(nvml), margin_mib=margin_mib, host=host)


# ---------------------------------------------------------------- over budget


class LeaseLike(Protocol):
    """What :func:`vram_alerts` reads of a lease (a :class:`~gpuboss.lease.Lease` has it)."""

    @property
    def id(self) -> str: ...

    @property
    def gpu(self) -> str: ...

    @property
    def pid(self) -> int: ...

    @property
    def host(self) -> str: ...

    @property
    def vram_mib(self) -> int: ...


@dataclass(frozen=True)
class VramAlert:
    """A process using more VRAM on a GPU than its leases there grant."""

    gpu: str
    host: str
    pid: int
    lease_ids: tuple[str, ...]
    leased_mib: int
    used_mib: int

    @property
    def over_mib(self) -> int:
        return self.used_mib - self.leased_mib

    @property
    def message(self) -> str:
        leases = ", ".join(self.lease_ids)
        return (
            f"pid {self.pid} on {self.host} uses {self.used_mib} MiB of {self.gpu} but leased {self.leased_mib} MiB "
            f"(lease {leases}): {self.over_mib} MiB over budget"
        )

    def event(self) -> dict[str, Any]:
        """The ``vram_alert`` event as a JSON-ready mapping."""
        return {
            "type": "vram_alert",
            "gpu": self.gpu,
            "host": self.host,
            "pid": self.pid,
            "leases": list(self.lease_ids),
            "leased_mib": self.leased_mib,
            "used_mib": self.used_mib,
            "over_mib": self.over_mib,
        }


def vram_alerts(
    status: Iterable[VRAMStatus], leases: Iterable[LeaseLike], *, tolerance_mib: int = 0
) -> list[VramAlert]:
    """Holders using more than they leased: for each GPU read, each process with leases on that GPU (same host,
    same pid) whose NVML usage exceeds the sum of those leases by more than ``tolerance_mib``.

    NVML numbers processes as the host's kernel does: a holder inside a container with its own PID namespace
    is matched only if the leases record host PIDs. Processes NVML cannot measure (``used_mib`` None) are
    skipped."""
    by_key: dict[tuple[str, str, int], list[LeaseLike]] = {}
    for lease in leases:
        by_key.setdefault((lease.host, lease.gpu, lease.pid), []).append(lease)
    out = []
    for st in status:
        for proc in st.processes:
            held = by_key.get((st.host, st.id, proc.pid))
            if not held or proc.used_mib is None:
                continue
            leased = sum(lease.vram_mib for lease in held)
            if proc.used_mib > leased + tolerance_mib:
                out.append(
                    VramAlert(
                        gpu=st.id,
                        host=st.host,
                        pid=proc.pid,
                        lease_ids=tuple(sorted(lease.id for lease in held)),
                        leased_mib=leased,
                        used_mib=proc.used_mib,
                    )
                )
    return out
