"""Discovery as declarations (id = UUID), VRAM status after a margin, and holders over budget."""

from __future__ import annotations

import socket
import uuid
from dataclasses import dataclass

import pytest
from gpuboss import ConfigError, GPUBoss, InvalidRequest
from gpuboss.config import build_config
from gpuboss.inventory import (
    DEFAULT_MARGIN_MIB,
    DiscoveredGpu,
    discover_gpus,
    vram_alerts,
    vram_status,
)

from tests import fake_nvml as fk


def test_declarations_are_named_by_uuid_and_carry_host_and_bus() -> None:
    gpus = discover_gpus(fk.mig_host(), host="node-7")
    assert [g.id for g in gpus] == [fk.RTX4090, fk.MIG_A, fk.MIG_B]  # never the MIG-enabled A100 itself
    rtx, mig_a, mig_b = gpus
    assert rtx == DiscoveredGpu(
        id=fk.RTX4090,
        name="NVIDIA GeForce RTX 4090",
        vram_gb=24564 / 1024,
        index=0,
        host="node-7",
        pci_bus_id="00000000:01:00.0",
        compute_capability=(8, 9),
    )
    assert rtx.uuid == rtx.id and not rtx.is_mig
    assert (mig_a.name, mig_a.capacity_mib, mig_a.parent_uuid, mig_a.index) == (
        "NVIDIA A100-SXM4-80GB MIG 3g.40gb",
        40192,
        fk.A100,
        1,
    )
    assert mig_a.is_mig and mig_a.pci_bus_id == "00000000:41:00.0" and mig_b.capacity_mib == 19968


def test_the_host_defaults_to_this_machine() -> None:
    assert {g.host for g in discover_gpus(fk.mixed_host())} == {socket.gethostname()}


def test_gpu_config_capacity_is_exactly_what_nvml_reported() -> None:
    for g in discover_gpus(fk.mig_host(), reserve_gb=0.5):
        cfg = g.to_gpu_config()
        assert cfg.id == g.id and cfg.capacity_mib == g.capacity_mib and cfg.reserve_mib == 512
    config = build_config(gpus=[g.to_gpu_config() for g in discover_gpus(fk.mixed_host())])
    assert [g.capacity_mib for g in config.gpus] == [24576, 15360, 24564]


def test_a_reserve_as_big_as_a_gpu_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=fk.MIG_B):
        discover_gpus(fk.mig_host(), reserve_gb=19968 / 1024)


def test_without_nvml_the_list_is_empty_or_a_clear_error_when_required() -> None:
    absent = fk.FakeNvml([], init_error=fk.LIBRARY_NOT_FOUND)
    assert discover_gpus(absent) == []
    with pytest.raises(ConfigError) as info:
        discover_gpus(absent, required=True)
    text = str(info.value)
    assert "libnvidia-ml.so.1" in text and "Declare the GPUs in the configuration" in text
    with pytest.raises(ConfigError, match="found no usable GPU"):
        discover_gpus(fk.FakeNvml([]), required=True)


def test_vram_status_after_a_margin() -> None:
    status = {s.id: s for s in vram_status(fk.mig_host(), margin_mib=1024, host="node-7")}
    rtx = status[fk.RTX4090]
    assert (rtx.total_mib, rtx.used_mib, rtx.free_mib) == (24564, 10201, 14363)
    assert rtx.available_mib == 14363 - 1024 and rtx.margin_mib == 1024
    assert (rtx.gpu_util_pct, rtx.temperature_c, rtx.host) == (87, 71, "node-7")
    assert rtx.used_fraction == pytest.approx(10201 / 24564)
    mig = status[fk.MIG_A]
    assert mig.available_mib == 40192 - 30500 - 1024 and mig.parent_uuid == fk.A100
    assert status[fk.MIG_B].available_mib == 19968 - 1024
    tight = {s.id: s for s in vram_status(fk.mig_host(), margin_mib=20000)}
    assert tight[fk.MIG_B].available_mib == 0  # never below zero
    assert {s.margin_mib for s in vram_status(fk.mixed_host())} == {DEFAULT_MARGIN_MIB}
    with pytest.raises(InvalidRequest):
        vram_status(fk.mixed_host(), margin_mib=-1)


def test_vram_status_without_nvml_is_empty() -> None:
    assert vram_status(fk.FakeNvml([], init_error=fk.DRIVER_NOT_LOADED)) == []


@dataclass
class FakeLease:
    id: str
    gpu: str
    pid: int
    host: str
    vram_mib: int


def test_a_holder_over_budget_is_named_with_its_lease_and_the_amounts() -> None:
    status = vram_status(fk.mig_host(), host="node-7")
    leases = [
        FakeLease("lease-over", fk.RTX4090, fk.GPU_PID, "node-7", 8192),
        FakeLease("lease-ok", fk.MIG_A, fk.MIG_PID, "node-7", 32768),
    ]
    alerts = vram_alerts(status, leases)
    assert len(alerts) == 1  # the stray process has no lease: not an alert (effective free covers it)
    a = alerts[0]
    assert (a.gpu, a.pid, a.lease_ids, a.leased_mib, a.used_mib, a.over_mib) == (
        fk.RTX4090,
        fk.GPU_PID,
        ("lease-over",),
        8192,
        9000,
        808,
    )
    assert "lease-over" in a.message and "9000 MiB" in a.message and "8192 MiB" in a.message
    assert "808 MiB over budget" in a.message
    assert a.event() == {
        "type": "vram_alert",
        "gpu": fk.RTX4090,
        "host": "node-7",
        "pid": fk.GPU_PID,
        "leases": ["lease-over"],
        "leased_mib": 8192,
        "used_mib": 9000,
        "over_mib": 808,
    }


def test_leases_of_one_holder_on_one_gpu_add_up_and_tolerance_applies() -> None:
    status = vram_status(fk.mig_host(), host="node-7")
    two = [
        FakeLease("b", fk.RTX4090, fk.GPU_PID, "node-7", 4096),
        FakeLease("a", fk.RTX4090, fk.GPU_PID, "node-7", 4096),
    ]
    assert vram_alerts(status, two)[0].lease_ids == ("a", "b")
    assert vram_alerts(status, two, tolerance_mib=808) == []
    assert vram_alerts(status, two, tolerance_mib=807) != []


def test_other_hosts_and_gpus_do_not_match() -> None:
    status = vram_status(fk.mig_host(), host="node-7")
    assert vram_alerts(status, [FakeLease("x", fk.RTX4090, fk.GPU_PID, "node-8", 1)]) == []
    assert vram_alerts(status, [FakeLease("x", fk.MIG_B, fk.GPU_PID, "node-7", 1)]) == []


def test_unmeasurable_processes_are_skipped() -> None:
    nvml = fk.mig_host()
    nvml.gpus[0].processes = [fk.FakeProcess(fk.GPU_PID, None)]
    status = vram_status(nvml, host="h")
    assert vram_alerts(status, [FakeLease("x", fk.RTX4090, fk.GPU_PID, "h", 1)]) == []


def test_the_core_leases_discovered_gpus_by_uuid() -> None:
    gpus = [g.to_gpu_config() for g in discover_gpus(fk.mig_host())]
    with GPUBoss(f"fakeredis://{uuid.uuid4().hex[:8]}", gpus=gpus, service="inv") as boss:
        lease = boss.acquire(vram_gb=30, timeout=0)
        try:
            assert lease.gpu == fk.MIG_A  # the only one with 30 GiB: the 3g.40gb instance
            assert lease.vram_mib == 30 * 1024
        finally:
            boss.release(lease)


def test_a_discovered_gpu_is_declared_with_what_cuda_can_allocate() -> None:
    (h200,) = discover_gpus(fk.h200_host(), reserve_gb=1)
    assert (h200.capacity_mib, h200.driver_reserved_mib, h200.reserve_mib) == (143771 - 616, 616, 1024)
    assert h200.to_gpu_config().capacity_mib == 143771 - 616
    (old_driver,) = discover_gpus(fk.h200_host(memory_v2=False))
    assert (old_driver.capacity_mib, old_driver.driver_reserved_mib) == (143771, 0)
    with pytest.raises(ConfigError, match="is not less than the 143155 MiB"):
        discover_gpus(fk.h200_host(), reserve_gb=143155 / 1024)


def test_vram_status_gives_the_reservation_apart() -> None:
    nvml = fk.h200_host()
    nvml.gpus[0].used_mib = 1000
    (s,) = vram_status(nvml, margin_mib=512)
    assert (s.total_mib, s.reserved_mib, s.used_mib, s.free_mib) == (143771, 616, 1000, 143771 - 616 - 1000)
    assert s.available_mib == s.free_mib - 512
