"""A thin, typed wrapper over NVML (``pynvml``, from the ``nvidia-ml-py`` package).

It reads what the host's GPUs are (:func:`discover`) and what they hold right now (:func:`sample`):

- a physical GPU: its UUID (``GPU-...``), name, total memory and the part of it the driver reserves, PCI bus
  id, NVML index, compute capability, and, when MIG is enabled, its MIG instances, each a GPU of its own
  (``MIG-...`` UUID, its own memory);
- per GPU (or MIG instance): used and free memory, utilisation, temperature, and the compute processes
  with the memory each one uses.

NVML being absent is a result, never an exception: ``pynvml`` not installed, ``libnvidia-ml.so.1`` not found
(no NVIDIA driver in this machine or container), the driver not loaded, a driver/library mismatch. Each gives
a :class:`Discovery` or :class:`Sampling` with ``available`` false, a :class:`NvmlStatus` and a sentence
that says why. A GPU that fails mid-read (fallen off the bus, say) is left out and named in ``problems``;
a reading a GPU does not support (utilisation of a MIG instance, temperature in some VMs) is ``None``.

Every function takes the NVML module as ``nvml`` (default: the real ``pynvml``, imported when first
needed), so tests inject a fake module that emulates the functions used here.

Memory is in MiB, the unit gpuboss accounts in: totals and free memory are rounded down, used and reserved
memory up, so a reading never makes a GPU look emptier than it is. Memory is read with
``nvmlDeviceGetMemoryInfo_v2`` where the driver has it: the memory the driver and firmware reserve (616 MiB
of an H200's 143771 with driver 580) is then ``reserved``, never usable by CUDA, and left out of ``used``, as
``nvidia-smi`` shows it. Older drivers answer the v1 call only, which counts that memory as used and
reports no reservation; the books stay right either way (usable = total - reserved; used excludes it).
"""

from __future__ import annotations

import contextlib
import enum
import math
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from gpuboss.errors import GPUBossError

MIB = 1024 * 1024

# NVML return codes (nvml.h; stable across driver releases). Compared by value, so any module that raises
# errors carrying ``.value`` (pynvml's NVMLError subclasses do) is understood.
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25
NVML_DEVICE_MIG_ENABLE = 1
NVML_TEMPERATURE_GPU = 0
#: A process's gpuInstanceId/computeInstanceId when it does not run on a MIG instance.
NO_INSTANCE = 0xFFFFFFFF

T = TypeVar("T")


class NvmlStatus(enum.Enum):
    """Whether NVML could be used, and if not, why."""

    OK = "ok"
    #: ``import pynvml`` failed: the ``nvidia-ml-py`` package is not installed.
    NOT_INSTALLED = "not_installed"
    #: ``libnvidia-ml.so.1`` (``nvml.dll``) is missing: no NVIDIA driver in this machine or container.
    LIBRARY_NOT_FOUND = "library_not_found"
    #: The library is there but the kernel driver is not loaded.
    DRIVER_NOT_LOADED = "driver_not_loaded"
    #: The driver refuses this user.
    NO_PERMISSION = "no_permission"
    #: The library and the loaded driver differ in version (a driver upgraded without a reboot).
    VERSION_MISMATCH = "version_mismatch"
    #: Any other NVML failure at initialisation.
    ERROR = "error"


_STATUS_OF_CODE = {
    NVML_ERROR_LIBRARY_NOT_FOUND: NvmlStatus.LIBRARY_NOT_FOUND,
    NVML_ERROR_DRIVER_NOT_LOADED: NvmlStatus.DRIVER_NOT_LOADED,
    NVML_ERROR_NO_PERMISSION: NvmlStatus.NO_PERMISSION,
    NVML_ERROR_LIB_RM_VERSION_MISMATCH: NvmlStatus.VERSION_MISMATCH,
}

_STATUS_TEXT = {
    NvmlStatus.NOT_INSTALLED: "the pynvml module (package nvidia-ml-py) cannot be imported",
    NvmlStatus.LIBRARY_NOT_FOUND: (
        "the NVML library (libnvidia-ml.so.1) was not found: there is no NVIDIA driver in this machine or "
        "container (in a container, run it with the NVIDIA container toolkit, e.g. docker run --gpus all)"
    ),
    NvmlStatus.DRIVER_NOT_LOADED: "the NVIDIA kernel driver is not loaded (nvidia-smi fails the same way)",
    NvmlStatus.NO_PERMISSION: "the NVIDIA driver refused this user access to NVML",
    NvmlStatus.VERSION_MISMATCH: (
        "the NVML library and the loaded NVIDIA driver differ in version (a driver was upgraded without a "
        "reboot or module reload)"
    ),
}


class NvmlUnavailable(GPUBossError):
    """NVML cannot be used here; ``status`` says why. Raised only by :meth:`NvmlSession.open`."""

    def __init__(self, status: NvmlStatus, detail: str = "") -> None:
        self.status = status
        text = _STATUS_TEXT.get(status, "NVML failed to initialise")
        super().__init__(f"NVML unavailable: {text}{f' ({detail})' if detail else ''}")


# ---------------------------------------------------------------- results


class _Usable:
    """What a GPU and a MIG instance share: their usable memory, from their fields of the same names."""

    memory_total_mib: int
    memory_reserved_mib: int

    @property
    def memory_usable_mib(self) -> int:
        """What processes can ever allocate: the total less the driver's reservation (its leasable capacity)."""
        return self.memory_total_mib - self.memory_reserved_mib


@dataclass(frozen=True)
class MigInstance(_Usable):
    """A MIG instance: a GPU of its own, with its own UUID and memory, carved out of a physical GPU."""

    uuid: str
    name: str
    #: Its index under the parent (``nvmlDeviceGetMigDeviceHandleByIndex``).
    mig_index: int
    memory_total_mib: int
    parent_uuid: str
    gpu_instance_id: int | None = None
    compute_instance_id: int | None = None
    #: Memory the driver reserves on it: part of the total that CUDA can never allocate.
    memory_reserved_mib: int = 0


@dataclass(frozen=True)
class PhysicalGpu(_Usable):
    """A physical GPU as NVML reports it."""

    #: NVML index: the order of ``nvidia-smi`` (PCI bus order), which is not always the CUDA order.
    index: int
    uuid: str
    name: str
    memory_total_mib: int
    #: As NVML gives it, e.g. ``"00000000:01:00.0"``.
    pci_bus_id: str
    compute_capability: tuple[int, int] | None = None
    mig_enabled: bool = False
    mig: tuple[MigInstance, ...] = ()
    #: Memory the driver and firmware reserve: part of the total (as ``nvidia-smi`` gives it) that CUDA can
    #: never allocate. 0 where the driver answers only the v1 memory call.
    memory_reserved_mib: int = 0


@dataclass(frozen=True)
class Discovery:
    """The GPUs of this host, or why they could not be read."""

    status: NvmlStatus
    gpus: tuple[PhysicalGpu, ...] = ()
    reason: str = ""
    driver_version: str | None = None
    #: GPUs left out because they failed mid-read, one sentence each.
    problems: tuple[str, ...] = ()

    @property
    def available(self) -> bool:
        return self.status is NvmlStatus.OK

    def units(self) -> list[PhysicalGpu | MigInstance]:
        """What can be leased: GPUs without MIG, and the MIG instances of GPUs with MIG enabled."""
        out: list[PhysicalGpu | MigInstance] = []
        for gpu in self.gpus:
            if gpu.mig_enabled:
                out.extend(gpu.mig)
            else:
                out.append(gpu)
        return out


@dataclass(frozen=True)
class GpuProcess:
    """A compute process on a GPU. ``used_mib`` is None where NVML cannot tell (Windows WDDM, some VMs).

    ``pid`` is as the host kernel numbers it: inside a container with its own PID namespace it differs
    from ``os.getpid()`` there.
    """

    pid: int
    used_mib: int | None
    gpu_instance_id: int | None = None
    compute_instance_id: int | None = None


@dataclass(frozen=True)
class GpuSample:
    """One reading of a GPU (or MIG instance)."""

    uuid: str
    name: str
    total_mib: int
    #: Allocated by processes (CUDA contexts included); the driver's reservation is not in it.
    used_mib: int
    free_mib: int
    #: Percent of time a kernel ran over the last sample period; None where unsupported (MIG instances).
    gpu_util_pct: int | None = None
    #: Percent of time memory was read or written over the last sample period.
    memory_util_pct: int | None = None
    temperature_c: int | None = None
    processes: tuple[GpuProcess, ...] = ()
    #: The physical GPU of a MIG instance; None for a physical GPU.
    parent_uuid: str | None = None
    #: Reserved by the driver: total = reserved + used + free.
    reserved_mib: int = 0


@dataclass(frozen=True)
class Memory:
    """One memory reading of a GPU or MIG instance, in MiB: ``total = reserved + used + free``, give or take
    the rounding (towards a fuller GPU)."""

    total_mib: int
    reserved_mib: int
    used_mib: int
    free_mib: int


@dataclass(frozen=True)
class Sampling:
    """Readings of every leasable GPU (GPUs without MIG, and MIG instances), or why there are none."""

    status: NvmlStatus
    samples: tuple[GpuSample, ...] = ()
    reason: str = ""
    #: Unix seconds, this machine's clock.
    sampled_at: float = 0.0
    problems: tuple[str, ...] = ()

    @property
    def available(self) -> bool:
        return self.status is NvmlStatus.OK

    def by_uuid(self) -> dict[str, GpuSample]:
        return {s.uuid: s for s in self.samples}


# ---------------------------------------------------------------- helpers


def _code(err: BaseException) -> int | None:
    value = getattr(err, "value", None)
    return value if isinstance(value, int) else None


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _floor_mib(n_bytes: int) -> int:
    return int(n_bytes) // MIB


def _ceil_mib(n_bytes: int) -> int:
    return math.ceil(int(n_bytes) / MIB)


def _instance_id(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value != NO_INSTANCE:
        return value
    return None


def import_nvml() -> Any:
    """The real ``pynvml`` module; raises :class:`NvmlUnavailable` (NOT_INSTALLED) when it cannot be imported."""
    try:
        import pynvml
    except ImportError as err:
        raise NvmlUnavailable(NvmlStatus.NOT_INSTALLED, str(err)) from None
    return pynvml


# ---------------------------------------------------------------- session


class NvmlSession:
    """An initialised NVML: open once, read many times (a sampler), close. NVML counts its initialisations,
    so sessions may overlap, in one process or many."""

    def __init__(self, module: Any) -> None:
        self.nvml = module
        self._closed = False
        #: The v2 memory call's version word, until the driver turns the call down (then None: v1 only).
        self._memory_v2: int | None = getattr(module, "nvmlMemory_v2", None)

    @classmethod
    def open(cls, nvml: Any = None) -> NvmlSession:
        """Initialise NVML; raises :class:`NvmlUnavailable` with the reason when it cannot be used."""
        module = import_nvml() if nvml is None else nvml
        error_type: type[BaseException] = getattr(module, "NVMLError", Exception)
        try:
            module.nvmlInit()
        except error_type as err:
            code = _code(err)
            status = _STATUS_OF_CODE.get(code if code is not None else -1, NvmlStatus.ERROR)
            raise NvmlUnavailable(status, "" if status is not NvmlStatus.ERROR else _text(err)) from None
        except OSError as err:  # a broken library file
            raise NvmlUnavailable(NvmlStatus.ERROR, str(err)) from None
        return cls(module)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(self._error_type):
            self.nvml.nvmlShutdown()

    def __enter__(self) -> NvmlSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def _error_type(self) -> type[BaseException]:
        error_type: type[BaseException] = getattr(self.nvml, "NVMLError", Exception)
        return error_type

    def _optional(self, fn: Callable[..., T], *args: Any) -> T | None:
        """A reading that may be unsupported: None instead of an NVML error."""
        try:
            return fn(*args)
        except self._error_type:
            return None

    def memory(self, handle: Any) -> Memory:
        """The memory of a GPU or MIG instance: the v2 call where the driver has it, else v1."""
        mem, version = None, self._memory_v2
        if version is not None:
            try:
                mem = self.nvml.nvmlDeviceGetMemoryInfo(handle, version=version)
            except self._error_type as err:
                code = _code(err)
                if code in (NVML_ERROR_FUNCTION_NOT_FOUND, NVML_ERROR_ARGUMENT_VERSION_MISMATCH):
                    self._memory_v2 = None  # a driver without the v2 call: v1 from now on
                elif code != NVML_ERROR_NOT_SUPPORTED:  # not for this device (some MIG instances): v1 for it
                    raise
        if mem is None:
            mem = self.nvml.nvmlDeviceGetMemoryInfo(handle)  # v1: no reservation given (it counts as used)
        total = _floor_mib(mem.total)
        reserved = min(total, _ceil_mib(getattr(mem, "reserved", 0)))
        used = min(total - reserved, _ceil_mib(mem.used))
        return Memory(total, reserved, used, min(_floor_mib(mem.free), total - reserved - used))

    # -- discovery

    def driver_version(self) -> str | None:
        value = self._optional(self.nvml.nvmlSystemGetDriverVersion)
        return None if value is None else _text(value)

    def _handles(self, problems: list[str]) -> Iterator[tuple[int, Any]]:
        try:
            count = int(self.nvml.nvmlDeviceGetCount())
        except self._error_type as err:
            problems.append(f"cannot count the GPUs: {_text(err)}")
            return
        for index in range(count):
            try:
                yield index, self.nvml.nvmlDeviceGetHandleByIndex(index)
            except self._error_type as err:
                problems.append(f"GPU {index}: left out, NVML cannot open it ({_text(err)})")

    def gpus(self) -> tuple[list[PhysicalGpu], list[str]]:
        """The physical GPUs, in NVML index order, and a sentence for each one left out."""
        problems: list[str] = []
        out: list[PhysicalGpu] = []
        for index, handle in self._handles(problems):
            try:
                out.append(self._physical(index, handle))
            except self._error_type as err:
                problems.append(f"GPU {index}: left out, NVML failed to read it ({_text(err)})")
        return out, problems

    def _physical(self, index: int, handle: Any) -> PhysicalGpu:
        nvml = self.nvml
        uuid = _text(nvml.nvmlDeviceGetUUID(handle))
        name = _text(nvml.nvmlDeviceGetName(handle))
        mem = self.memory(handle)
        pci = self._optional(nvml.nvmlDeviceGetPciInfo, handle)
        bus_id = _text(pci.busId) if pci is not None else ""
        cc = self._optional(nvml.nvmlDeviceGetCudaComputeCapability, handle)
        capability = (int(cc[0]), int(cc[1])) if cc is not None else None
        mig_enabled = self._mig_enabled(handle)
        instances = self._mig_instances(handle, uuid) if mig_enabled else ()
        return PhysicalGpu(
            index=index,
            uuid=uuid,
            name=name,
            memory_total_mib=mem.total_mib,
            pci_bus_id=bus_id,
            compute_capability=capability,
            mig_enabled=mig_enabled,
            mig=instances,
            memory_reserved_mib=mem.reserved_mib,
        )

    def _mig_enabled(self, handle: Any) -> bool:
        fn = getattr(self.nvml, "nvmlDeviceGetMigMode", None)
        if fn is None:
            return False
        mode = self._optional(fn, handle)
        return mode is not None and int(mode[0]) == NVML_DEVICE_MIG_ENABLE

    def _mig_handles(self, handle: Any) -> Iterator[tuple[int, Any]]:
        count = self._optional(self.nvml.nvmlDeviceGetMaxMigDeviceCount, handle) or 0
        for i in range(int(count)):
            # Slots without an instance answer NOT_FOUND: skip them.
            mig = self._optional(self.nvml.nvmlDeviceGetMigDeviceHandleByIndex, handle, i)
            if mig is not None:
                yield i, mig

    def _mig_instances(self, handle: Any, parent_uuid: str) -> tuple[MigInstance, ...]:
        nvml = self.nvml
        out = []
        for i, mig in self._mig_handles(handle):
            gi_fn = getattr(nvml, "nvmlDeviceGetGpuInstanceId", None)
            ci_fn = getattr(nvml, "nvmlDeviceGetComputeInstanceId", None)
            mem = self.memory(mig)
            out.append(
                MigInstance(
                    uuid=_text(nvml.nvmlDeviceGetUUID(mig)),
                    name=_text(self._optional(nvml.nvmlDeviceGetName, mig) or ""),
                    mig_index=i,
                    memory_total_mib=mem.total_mib,
                    parent_uuid=parent_uuid,
                    gpu_instance_id=self._optional(gi_fn, mig) if gi_fn is not None else None,
                    compute_instance_id=self._optional(ci_fn, mig) if ci_fn is not None else None,
                    memory_reserved_mib=mem.reserved_mib,
                )
            )
        return tuple(out)

    def discover(self) -> Discovery:
        gpus, problems = self.gpus()
        return Discovery(
            status=NvmlStatus.OK,
            gpus=tuple(gpus),
            driver_version=self.driver_version(),
            problems=tuple(problems),
        )

    # -- sampling

    def processes(self, handle: Any) -> tuple[GpuProcess, ...] | None:
        """The compute processes on a device handle, or None when NVML cannot list them."""
        raw = self._optional(self.nvml.nvmlDeviceGetComputeRunningProcesses, handle)
        if raw is None:
            return None
        out = []
        for p in raw:
            used = getattr(p, "usedGpuMemory", None)
            out.append(
                GpuProcess(
                    pid=int(p.pid),
                    used_mib=None if used is None else _ceil_mib(used),
                    gpu_instance_id=_instance_id(getattr(p, "gpuInstanceId", None)),
                    compute_instance_id=_instance_id(getattr(p, "computeInstanceId", None)),
                )
            )
        return tuple(out)

    def _temperature(self, handle: Any) -> int | None:
        sensor = getattr(self.nvml, "NVML_TEMPERATURE_GPU", NVML_TEMPERATURE_GPU)
        value = self._optional(self.nvml.nvmlDeviceGetTemperature, handle, sensor)
        return None if value is None else int(value)

    def _reading(
        self,
        handle: Any,
        uuid: str,
        name: str,
        parent: str | None,
        temperature: int | None,
        processes: tuple[GpuProcess, ...],
    ) -> GpuSample:
        mem = self.memory(handle)
        util = self._optional(self.nvml.nvmlDeviceGetUtilizationRates, handle)
        return GpuSample(
            uuid=uuid,
            name=name,
            total_mib=mem.total_mib,
            used_mib=mem.used_mib,
            free_mib=mem.free_mib,
            gpu_util_pct=None if util is None else int(util.gpu),
            memory_util_pct=None if util is None else int(util.memory),
            temperature_c=temperature,
            processes=processes,
            parent_uuid=parent,
            reserved_mib=mem.reserved_mib,
        )

    def sample(self, only: Collection[str] | None = None) -> Sampling:
        """Read every leasable GPU now; with ``only``, just the GPUs (or MIG instances) of those UUIDs."""
        problems: list[str] = []
        samples: list[GpuSample] = []
        for index, handle in self._handles(problems):
            try:
                samples.extend(self._sample_gpu(handle, only))
            except self._error_type as err:
                problems.append(f"GPU {index}: left out, NVML failed to read it ({_text(err)})")
        return Sampling(status=NvmlStatus.OK, samples=tuple(samples), sampled_at=time.time(), problems=tuple(problems))

    def _sample_gpu(self, handle: Any, only: Collection[str] | None = None) -> list[GpuSample]:
        nvml = self.nvml
        uuid = _text(nvml.nvmlDeviceGetUUID(handle))
        mig_enabled = self._mig_enabled(handle)
        if only is not None and not mig_enabled and uuid not in only:
            return []
        name = _text(nvml.nvmlDeviceGetName(handle))
        temperature = self._temperature(handle)
        if not mig_enabled:
            return [self._reading(handle, uuid, name, None, temperature, self.processes(handle) or ())]
        parent_procs: tuple[GpuProcess, ...] | None = None
        gi_fn = getattr(nvml, "nvmlDeviceGetGpuInstanceId", None)
        out = []
        for _, mig in self._mig_handles(handle):
            mig_uuid = _text(nvml.nvmlDeviceGetUUID(mig))
            if only is not None and mig_uuid not in only:
                continue
            procs = self.processes(mig)
            gi = self._optional(gi_fn, mig) if gi_fn is not None else None
            if procs is None:
                # Some drivers list MIG processes only on the parent, tagged with their GPU instance.
                if parent_procs is None:
                    parent_procs = self.processes(handle) or ()
                procs = tuple(p for p in parent_procs if gi is not None and p.gpu_instance_id == gi)
            mig_name = _text(self._optional(nvml.nvmlDeviceGetName, mig) or name)
            out.append(self._reading(mig, mig_uuid, mig_name, uuid, temperature, procs))
        return out


# ---------------------------------------------------------------- one-shot functions


def discover(nvml: Any = None) -> Discovery:
    """The host's GPUs through NVML; never raises for NVML being absent (see :class:`Discovery`)."""
    try:
        session = NvmlSession.open(nvml)
    except NvmlUnavailable as err:
        return Discovery(status=err.status, reason=str(err))
    with session:
        return session.discover()


def sample(nvml: Any = None) -> Sampling:
    """Read used/free memory, utilisation, temperature and processes of every leasable GPU now."""
    try:
        session = NvmlSession.open(nvml)
    except NvmlUnavailable as err:
        return Sampling(status=err.status, reason=str(err), sampled_at=time.time())
    with session:
        return session.sample()
