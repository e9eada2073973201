"""A fake NVML module: the pynvml functions gpuboss.nvml calls, over GPUs described in Python.

Errors are pynvml's own classes (``pynvml.NVMLError(code)`` builds the subclass for the code, as the real
bindings do), so the wrapper is tested against the exceptions it meets in production. Handles are the fake
GPU and MIG objects themselves. Strings come back as pynvml gives them (``str``), except the PCI bus id, which
is ``bytes`` in the ctypes structure the real ``nvmlDeviceGetPciInfo`` returns.

Ready-made hosts: :func:`mixed_host` (three models, no MIG), :func:`uniform_host` (four of one model) and
:func:`mig_host` (an RTX 4090 and an A100 with MIG enabled and two instances, with processes over budget) and
:func:`h200_host` (one card whose driver reserves memory).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml

MIB = 1024 * 1024

NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
NOT_FOUND = pynvml.NVML_ERROR_NOT_FOUND
GPU_IS_LOST = pynvml.NVML_ERROR_GPU_IS_LOST
LIBRARY_NOT_FOUND = pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
DRIVER_NOT_LOADED = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
NO_PERMISSION = pynvml.NVML_ERROR_NO_PERMISSION
LIB_RM_VERSION_MISMATCH = pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH
UNKNOWN = pynvml.NVML_ERROR_UNKNOWN


def uuid_of(n: int, prefix: str = "GPU") -> str:
    """A well-formed UUID whose first group is distinct per ``n`` (so 8-hex prefixes are unique)."""
    return f"{prefix}-{n:08x}-1111-2222-3333-{n:012x}"


@dataclass
class FakeProcess:
    pid: int
    used_mib: int | None
    gpu_instance_id: int = 0xFFFFFFFF
    compute_instance_id: int = 0xFFFFFFFF


@dataclass
class FakeMig:
    uuid: str
    name: str
    total_mib: int
    used_mib: int = 0
    gpu_instance_id: int = 1
    compute_instance_id: int = 0
    processes: list[FakeProcess] = field(default_factory=list)
    reserved_mib: int = 0
    #: False: the v2 memory call answers NOT_SUPPORTED for this instance (v1 still works).
    memory_v2: bool = True


@dataclass
class FakeGpu:
    uuid: str
    name: str
    total_mib: int
    bus_id: str
    compute_capability: tuple[int, int]
    used_mib: int = 0
    #: Extra bytes beyond used_mib, to check rounding (used rounds up, free down).
    used_extra_bytes: int = 0
    utilization: tuple[int, int] | None = (0, 0)
    temperature: int | None = 40
    processes: list[FakeProcess] = field(default_factory=list)
    mig_enabled: bool = False
    #: MIG slot -> instance; slots without an instance answer NOT_FOUND, as NVML does.
    migs: dict[int, FakeMig] = field(default_factory=dict)
    max_mig: int = 7
    #: The GPU fell off the bus: every query raises GPU_IS_LOST.
    lost: bool = False
    #: Processes on MIG instances are listed only on this parent (the MIG handles answer NOT_SUPPORTED).
    mig_processes_on_parent: bool = False
    #: Reserved by the driver and firmware: in the total, never allocatable. The v1 memory call counts it
    #: as used; the v2 call gives it apart (an H200 with driver 580: 616 MiB).
    reserved_mib: int = 0


def error(code: int) -> Exception:
    return pynvml.NVMLError(code)


class FakeNvml:
    """Stands in for the ``pynvml`` module."""

    NVMLError = pynvml.NVMLError
    NVML_TEMPERATURE_GPU = 0
    NVML_DEVICE_MIG_ENABLE = 1
    nvmlMemory_v2 = pynvml.nvmlMemory_v2

    def __init__(
        self,
        gpus: list[FakeGpu],
        *,
        init_error: int | None = None,
        driver: str = "550.54.15",
        unopenable: frozenset[int] = frozenset(),
        memory_v2: bool = True,
    ) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.driver = driver
        self.unopenable = unopenable
        #: False: a driver without ``nvmlDeviceGetMemoryInfo_v2`` (the call raises FUNCTION_NOT_FOUND).
        self.memory_v2 = memory_v2
        self.inits = 0
        self.shutdowns = 0
        #: The memory calls made, by version: 1 or 2.
        self.memory_calls: list[int] = []

    # -- library

    def _live(self) -> None:
        if self.inits <= self.shutdowns:
            raise error(pynvml.NVML_ERROR_UNINITIALIZED)

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise error(self.init_error)
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self._live()
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._live()
        return self.driver

    def nvmlDeviceGetCount(self) -> int:
        self._live()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        self._live()
        if index in self.unopenable:
            raise error(pynvml.NVML_ERROR_UNKNOWN)
        if not 0 <= index < len(self.gpus):
            raise error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self.gpus[index]

    # -- per device (GPU or MIG handle)

    def _check(self, handle: Any) -> None:
        self._live()
        if isinstance(handle, FakeGpu) and handle.lost:
            raise error(GPU_IS_LOST)

    def nvmlDeviceGetUUID(self, handle: FakeGpu | FakeMig) -> str:
        self._check(handle)
        return handle.uuid

    def nvmlDeviceGetName(self, handle: FakeGpu | FakeMig) -> str:
        self._check(handle)
        return handle.name

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu | FakeMig, version: int | None = None) -> SimpleNamespace:
        self._check(handle)
        total, reserved = handle.total_mib * MIB, handle.reserved_mib * MIB
        used = handle.used_mib * MIB + (handle.used_extra_bytes if isinstance(handle, FakeGpu) else 0)
        if not version:
            self.memory_calls.append(1)
            return SimpleNamespace(total=total, used=reserved + used, free=total - reserved - used)
        if not self.memory_v2:
            raise error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        assert version == pynvml.nvmlMemory_v2
        if isinstance(handle, FakeMig) and not handle.memory_v2:
            raise error(NOT_SUPPORTED)
        self.memory_calls.append(2)
        return SimpleNamespace(version=version, total=total, reserved=reserved, used=used, free=total - reserved - used)

    def nvmlDeviceGetPciInfo(self, handle: FakeGpu) -> SimpleNamespace:
        self._check(handle)
        if not isinstance(handle, FakeGpu):
            raise error(NOT_SUPPORTED)
        return SimpleNamespace(busId=handle.bus_id.encode())

    def nvmlDeviceGetCudaComputeCapability(self, handle: FakeGpu) -> tuple[int, int]:
        self._check(handle)
        return handle.compute_capability if isinstance(handle, FakeGpu) else (0, 0)

    def nvmlDeviceGetUtilizationRates(self, handle: FakeGpu | FakeMig) -> SimpleNamespace:
        self._check(handle)
        if isinstance(handle, FakeMig) or handle.mig_enabled or handle.utilization is None:
            raise error(NOT_SUPPORTED)
        return SimpleNamespace(gpu=handle.utilization[0], memory=handle.utilization[1])

    def nvmlDeviceGetTemperature(self, handle: FakeGpu | FakeMig, sensor: int) -> int:
        self._check(handle)
        assert sensor == self.NVML_TEMPERATURE_GPU
        if isinstance(handle, FakeMig) or handle.temperature is None:
            raise error(NOT_SUPPORTED)
        return handle.temperature

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeGpu | FakeMig) -> list[SimpleNamespace]:
        self._check(handle)
        if isinstance(handle, FakeMig):
            parent = next(g for g in self.gpus if handle in g.migs.values())
            if parent.mig_processes_on_parent:
                raise error(NOT_SUPPORTED)
            procs = handle.processes
        elif handle.mig_enabled and handle.mig_processes_on_parent:
            procs = [p for m in handle.migs.values() for p in m.processes]
        else:
            procs = handle.processes
        return [
            SimpleNamespace(
                pid=p.pid,
                usedGpuMemory=None if p.used_mib is None else p.used_mib * MIB,
                gpuInstanceId=p.gpu_instance_id,
                computeInstanceId=p.compute_instance_id,
            )
            for p in procs
        ]

    # -- MIG

    def nvmlDeviceGetMigMode(self, handle: FakeGpu) -> list[int]:
        self._check(handle)
        if isinstance(handle, FakeMig):
            raise error(NOT_SUPPORTED)
        return [int(handle.mig_enabled), int(handle.mig_enabled)]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: FakeGpu) -> int:
        self._check(handle)
        return handle.max_mig if handle.mig_enabled else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: FakeGpu, index: int) -> FakeMig:
        self._check(handle)
        if index not in handle.migs:
            raise error(NOT_FOUND)
        return handle.migs[index]

    def nvmlDeviceGetGpuInstanceId(self, handle: FakeMig) -> int:
        self._check(handle)
        if not isinstance(handle, FakeMig):
            raise error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return handle.gpu_instance_id

    def nvmlDeviceGetComputeInstanceId(self, handle: FakeMig) -> int:
        self._check(handle)
        if not isinstance(handle, FakeMig):
            raise error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return handle.compute_instance_id


# ---------------------------------------------------------------- hosts

RTX3090 = uuid_of(0x3090)
T4 = uuid_of(0x7004)
RTX4090 = uuid_of(0x4090)
A100 = uuid_of(0xA100)
MIG_A = uuid_of(0xA1, "MIG")
MIG_B = uuid_of(0xB2, "MIG")
GPU_PID = 4242  # leased 8 GiB, uses 9000 MiB
STRAY_PID = 777  # no lease at all
MIG_PID = 5151


def mixed_host() -> FakeNvml:
    """Three models on three PCI slots. PCI order: 3090, T4, 4090; newest-first guess: 4090, 3090, T4."""
    return FakeNvml(
        [
            FakeGpu(RTX3090, "NVIDIA GeForce RTX 3090", 24576, "00000000:01:00.0", (8, 6)),
            FakeGpu(T4, "Tesla T4", 15360, "00000000:02:00.0", (7, 5)),
            FakeGpu(RTX4090, "NVIDIA GeForce RTX 4090", 24564, "00000000:41:00.0", (8, 9)),
        ]
    )


H200 = uuid_of(0x200)
H200_RESERVED_MIB = 616


def h200_host(*, memory_v2: bool = True) -> FakeNvml:
    """One H200 as a real one read with driver 580 (tests/test_real_gpu.py): 143771 MiB in all, of which the
    driver reserves 616. ``memory_v2=False``: a driver that answers only the v1 memory call."""
    card = FakeGpu(H200, "NVIDIA H200", 143771, "00000000:00:06.0", (9, 0), reserved_mib=H200_RESERVED_MIB)
    return FakeNvml([card], driver="580.159.04", memory_v2=memory_v2)


def uniform_host() -> FakeNvml:
    """Four RTX 4090s, listed by NVML out of PCI order (so sorting by bus id matters)."""
    buses = ["00000000:81:00.0", "00000000:01:00.0", "00000000:C1:00.0", "00000000:41:00.0"]
    return FakeNvml(
        [FakeGpu(uuid_of(0x1000 + i), "NVIDIA GeForce RTX 4090", 24564, bus, (8, 9)) for i, bus in enumerate(buses)]
    )


def mig_host(*, mig_processes_on_parent: bool = False) -> FakeNvml:
    """An RTX 4090 (a holder over budget, and a stray process) and an A100 80GB with MIG enabled: a 3g.40gb
    instance in slot 0 and a 2g.20gb instance in slot 2 (slot 1 is empty)."""
    rtx = FakeGpu(
        RTX4090,
        "NVIDIA GeForce RTX 4090",
        24564,
        "00000000:01:00.0",
        (8, 9),
        used_mib=10200,
        used_extra_bytes=1,
        utilization=(87, 45),
        temperature=71,
        processes=[FakeProcess(GPU_PID, 9000), FakeProcess(STRAY_PID, 1200)],
    )
    a100 = FakeGpu(
        A100,
        "NVIDIA A100-SXM4-80GB",
        81920,
        "00000000:41:00.0",
        (8, 0),
        temperature=55,
        mig_enabled=True,
        mig_processes_on_parent=mig_processes_on_parent,
        migs={
            0: FakeMig(
                MIG_A,
                "NVIDIA A100-SXM4-80GB MIG 3g.40gb",
                40192,
                used_mib=30500,
                gpu_instance_id=1,
                compute_instance_id=0,
                processes=[FakeProcess(MIG_PID, 30000, gpu_instance_id=1, compute_instance_id=0)],
            ),
            2: FakeMig(
                MIG_B,
                "NVIDIA A100-SXM4-80GB MIG 2g.20gb",
                19968,
                used_mib=0,
                gpu_instance_id=5,
                compute_instance_id=0,
            ),
        },
    )
    return FakeNvml([rtx, a100])
