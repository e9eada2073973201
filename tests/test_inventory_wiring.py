"""The GPU inventory wired into the bosses (issue 5): ``gpus: auto``, registration by UUID with host and bus id,
host heartbeat and offline GPUs, the sampler and effective free VRAM, vram alerts, device strings, models.

Every test runs against a real redis-server and fakeredis (``backend_url``), with the fake NVML of
``tests/fake_nvml.py``. Bosses get their NVML and host name before their first request; the sampler thread is
not started (``autostart = False``): tests run its rounds themselves with ``sampler.tick()``.
"""

from __future__ import annotations

import json
import os
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gpuboss import ConfigError, GPUBoss, InsufficientCapacity, InvalidRequest, Keys, LeaseTimeout, events
from gpuboss.aio import AsyncGPUBoss
from gpuboss.config import build_config, load_config
from gpuboss.core import GpuInfo
from gpuboss.lease import LeaseState
from gpuboss.registry import DeviceOrdinalWarning, effective_free, on_node, validate_node
from gpuboss.sampler import Sampler, VramOverBudgetWarning, observed

from tests import fake_nvml as fk
from tests.conftest import GPUS, raw_client, snapshot

GB = 1024


def make_boss(url: str, namespace: str, nvml: Any, host: str = "hostA", **settings: Any) -> GPUBoss:
    settings.setdefault("gpus", "auto")
    # Readings stay fresh for 3 minutes and hosts for 10, whatever the pace of the test machine.
    settings.setdefault("sample_interval_s", 60)
    settings.setdefault("host_timeout_s", 600)
    boss = GPUBoss(url, namespace=namespace, service=f"svc-{host}", **settings)
    boss._core.host = host
    boss._inventory.nvml = nvml
    boss._inventory.autostart = False
    return boss


@pytest.fixture
def bosses(backend_url: str, namespace: str) -> Iterator[list[GPUBoss]]:
    made: list[GPUBoss] = []
    yield made
    for b in made:
        b.close()


def sampler_of(boss: GPUBoss) -> Sampler:
    sampler = boss._inventory.sampler
    assert sampler is not None, "the sampler exists once the boss registered discovered GPUs"
    return sampler


def types(url: str, namespace: str, *wanted: str) -> list[events.Event]:
    return [e for e in events.replay(url, namespace) if e.type in wanted]


def no_warning(caught: list[warnings.WarningMessage], category: type[Warning]) -> bool:
    return not [w for w in caught if issubclass(w.category, category)]


def wait_until(predicate: Any, what: str, limit: float = 30.0) -> None:
    """Poll a condition (a liveness bound, not a timing assertion)."""
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.005)


# ---------------------------------------------------------------- configuration


def test_gpus_auto_is_a_setting_and_bad_values_name_the_field(tmp_path: Path) -> None:
    config = build_config(gpus="auto")
    assert config.gpu_discovery == "auto" and config.gpus == []
    assert build_config().gpu_discovery is None and build_config().sample_interval_s == 2.0
    file = tmp_path / "c.yaml"
    file.write_text("gpus: auto\nsample_interval_s: 0.5\nhost_timeout_s: 10\n")
    loaded = load_config(file)
    assert (loaded.gpu_discovery, loaded.sample_interval_s, loaded.host_timeout_s) == ("auto", 0.5, 10)
    with pytest.raises(ConfigError, match="gpus must be a list of GPUs or 'auto'"):
        build_config(gpus="all")
    with pytest.raises(ConfigError, match="not both"):
        build_config(gpus=GPUS, gpu_discovery="auto")
    with pytest.raises(ConfigError, match="contradicts"):
        build_config(gpus="auto", gpu_discovery="off")
    with pytest.raises(ConfigError, match="host_timeout_s"):
        build_config(sample_interval_s=5, host_timeout_s=10)
    with pytest.raises(ConfigError, match="sample_interval_s"):
        build_config(sample_interval_s=0)


def test_gpu_info_reads_old_records_and_keeps_declared_json() -> None:
    old = '{"capacity_mib": 24576, "id": "gpu0", "index": 0, "name": "RTX 4090", "reserve_mib": 0}'
    info = GpuInfo.from_json(old)
    assert (info.host, info.uuid, info.pci_bus_id, info.parent_uuid) == (None, None, None, None)
    assert info.to_json() == old  # a declared GPU registers exactly as before
    full = GpuInfo("MIG-1", "A100 MIG", 1, 40192, 0, "node-7", "MIG-1", "00000000:41:00.0", "GPU-9")
    assert GpuInfo.from_json(full.to_json()) == full


# ---------------------------------------------------------------- discovery and registration


def test_auto_without_nvml_is_a_clear_error_at_first_use_and_writes_nothing(
    backend_url: str, namespace: str, bosses: list[GPUBoss]
) -> None:
    boss = make_boss(backend_url, namespace, fk.FakeNvml([], init_error=fk.LIBRARY_NOT_FOUND))
    bosses.append(boss)  # building the boss is fine: discovery happens at first use
    for use in (lambda: boss.acquire(vram_gb=1, timeout=0), boss.register_gpus):
        with pytest.raises(ConfigError, match=r"gpus: auto cannot discover GPUs: NVML unavailable.*gpus: \[\{id: gpu0"):
            use()
    assert snapshot(raw_client(backend_url), namespace) == {}


def test_no_list_and_no_nvml_uses_the_gpus_others_registered(
    backend_url: str, namespace: str, bosses: list[GPUBoss]
) -> None:
    owner = GPUBoss(backend_url, namespace=namespace, gpus=GPUS, service="owner")
    bosses.append(owner)
    owner.register_gpus()
    user = make_boss(backend_url, namespace, fk.FakeNvml([], init_error=fk.DRIVER_NOT_LOADED), gpus=None)
    bosses.append(user)
    lease = user.acquire(vram_gb=20, timeout=0)
    assert (lease.gpu, lease.device, lease.uuid) == ("gpu0", "cuda:0", None)
    assert user._inventory.sampler is None  # nothing discovered: no sampler, no host beat
    assert raw_client(backend_url).hgetall(Keys(namespace).hosts) == {}
    with pytest.raises(ConfigError, match="no GPU to register"):
        user.register_gpus()


def test_auto_registers_by_uuid_with_host_bus_and_mig_parent(
    backend_url: str, namespace: str, bosses: list[GPUBoss]
) -> None:
    boss = make_boss(backend_url, namespace, fk.mig_host(), host="node-7")
    bosses.append(boss)
    registry = boss.register_gpus()
    assert [g.id for g in registry] == sorted([fk.RTX4090, fk.MIG_A, fk.MIG_B])
    stored = {k: json.loads(v) for k, v in raw_client(backend_url).hgetall(Keys(namespace).gpus).items()}
    assert stored[fk.RTX4090] == {
        "id": fk.RTX4090,
        "name": "NVIDIA GeForce RTX 4090",
        "index": 0,
        "capacity_mib": 24564,
        "reserve_mib": 0,
        "host": "node-7",
        "uuid": fk.RTX4090,
        "pci_bus_id": "00000000:01:00.0",
    }
    assert stored[fk.MIG_A]["parent_uuid"] == fk.A100 and stored[fk.MIG_A]["capacity_mib"] == 40192
    assert fk.A100 not in stored, "a GPU with MIG enabled is leased through its instances only"
    registered = types(backend_url, namespace, "gpu_registered")
    assert {e.gpu for e in registered} == set(stored) and {e["host"] for e in registered} == {"node-7"}
    # Registered identically again (another process of the host): left alone, no event.
    again = make_boss(backend_url, namespace, fk.mig_host(), host="node-7")
    bosses.append(again)
    assert again.register_gpus() == registry
    assert len(types(backend_url, namespace, "gpu_registered")) == len(registered)
    assert raw_client(backend_url).hget(Keys(namespace).hosts, "node-7") is not None


def test_discovered_gpus_are_registered_even_after_the_registry_was_read(
    backend_url: str, namespace: str, bosses: list[GPUBoss]
) -> None:
    other = GPUBoss(backend_url, namespace=namespace, gpus=GPUS, service="other")
    bosses.append(other)
    other.register_gpus()
    boss = make_boss(backend_url, namespace, fk.uniform_host())
    bosses.append(boss)
    assert [g.id for g in boss.gpus()] == ["gpu0", "gpu1"]  # read before any request: nothing discovered yet
    lease = boss.acquire(vram_gb=20, timeout=0)
    assert lease.gpu == fk.uuid_of(0x1000), "best fit: 24564 - 20480 MiB left there, 4096 on gpu0"
    assert len(boss.gpus()) == 6


def test_two_hosts_register_separate_gpus_and_pin_their_own(
    backend_url: str, namespace: str, bosses: list[GPUBoss]
) -> None:
    a = make_boss(backend_url, namespace, fk.mixed_host(), host="hostA")
    b = make_boss(backend_url, namespace, fk.uniform_host(), host="hostB")
    bosses += [a, b]
    a.register_gpus()
    registry = b.register_gpus()
    hosts = {g.id: g.host for g in registry}
    assert len(registry) == 7 and list(hosts.values()).count("hostA") == 3 and list(hosts.values()).count("hostB") == 4
    # cuda:0 means each process's own first GPU: hostB's in PCI order is the one on bus 01.
    lease = b.acquire(vram_gb=1, device="cuda:0", timeout=0)
    assert lease.gpu == fk.uuid_of(0x1001) and hosts[lease.gpu] == "hostB" and lease.device == "cuda:0"
    free_b = b.choose_model("gemma3:4b")  # sees hostB's GPUs only (plus host-less declared ones)
    assert free_b.gpu is not None and hosts[free_b.gpu] == "hostB"
    on_a = b.choose_model("gemma3:4b", node="hostA")
    assert on_a.gpu is not None and hosts[on_a.gpu] == "hostA"
    anywhere = b.choose_model("gemma3:12b", node="any")
    assert (anywhere.quantization, anywhere.gpu) == ("q8_0", fk.T4), "best fit: 15360 MiB fill hostA's T4 exactly"
    assert b.choose_model("gemma3:12b").gpu != fk.T4
    with pytest.raises(InvalidRequest, match="device"):
        b.acquire(vram_gb=1, device="cuda:4", timeout=0)


def test_leases_stay_on_their_host_unless_node_says_otherwise(
    backend_url: str, namespace: str, bosses: list[GPUBoss]
) -> None:
    a = make_boss(backend_url, namespace, fk.mixed_host(), host="hostA")
    b = make_boss(backend_url, namespace, fk.uniform_host(), host="hostB")
    bosses += [a, b]
    a.register_gpus()
    hosts = {g.id: g.host for g in b.register_gpus()}
    mine = [b.acquire(vram_gb=20, timeout=0) for _ in range(4)]  # hostB's four 24 GB cards
    assert {hosts[lease.gpu] for lease in mine} == {"hostB"}
    with pytest.raises(LeaseTimeout):  # hostA has room, but a request stays on its own host by default
        b.acquire(vram_gb=4, timeout=0)
    there = b.acquire(vram_gb=4, node="hostA", timeout=0)
    anywhere = b.acquire(vram_gb=4, node="any", timeout=0)
    assert hosts[there.gpu] == "hostA" and hosts[anywhere.gpu] == "hostA"
    with pytest.raises(InvalidRequest, match="node"):
        b.acquire(vram_gb=1, node="hostC", timeout=0)
    for lease in [*mine, there, anywhere]:
        b.release(lease)


def test_lease_by_model_name(backend_url: str, namespace: str, bosses: list[GPUBoss]) -> None:
    boss = make_boss(backend_url, namespace, fk.uniform_host())
    bosses.append(boss)
    with boss.lease(model="gemma3:12b", timeout=0) as device:
        lease = device.lease
        assert (lease.model, lease.quantization, lease.vram_mib) == ("gemma3:12b", "q8_0", 15360)
    lease = boss.acquire(model="gemma3:12b", quantizations=["q4_K_M"], timeout=0)
    assert lease.quantization == "q4_K_M" and lease.vram_mib < 15360
    boss.release(lease)
    for bad in ({"vram_gb": 1, "model": "gemma3:12b"}, {}, {"vram_gb": 1, "quantizations": ["q8_0"]}):
        with pytest.raises(InvalidRequest):
            boss.acquire(timeout=0, **bad)
    with pytest.raises(InvalidRequest, match="gemma3:13b"):
        boss.acquire(model="gemma3:13b", timeout=0)


def test_two_processes_with_different_visible_devices_share_one_budget(
    backend_url: str, namespace: str, bosses: list[GPUBoss]
) -> None:
    one = make_boss(backend_url, namespace, fk.uniform_host())
    two = make_boss(backend_url, namespace, fk.uniform_host())
    bosses += [one, two]
    first_by_pci = fk.uuid_of(0x1001)  # bus 01: CUDA's 0, and index 1 of NVML
    one._inventory.env = {"CUDA_VISIBLE_DEVICES": "0,1"}
    two._inventory.env = {"CUDA_VISIBLE_DEVICES": f"{fk.uuid_of(0x1003)},{first_by_pci}"}
    a = one.acquire(vram_gb=16, device="cuda:0", timeout=0)
    b = two.acquire(vram_gb=7, device="cuda:1", timeout=0)
    assert a.gpu == b.gpu == first_by_pci, "one card, one budget, whatever each process calls it"
    assert (a.device, b.device) == ("cuda:0", "cuda:1")
    assert raw_client(backend_url).hget(Keys(namespace).used, first_by_pci) == str(23 * GB)
    with pytest.raises(LeaseTimeout):
        two.acquire(vram_gb=1, device="cuda:1", timeout=0)  # 24564 - 23552 = 1012 MiB left
    assert a.child_env() == b.child_env() == {"CUDA_VISIBLE_DEVICES": first_by_pci}


# ---------------------------------------------------------------- device strings


@pytest.mark.parametrize(
    ("env", "device"),
    [
        ({}, "cuda:2"),  # PCI order 01, 41, 81, C1: bus 81 is third
        ({"CUDA_VISIBLE_DEVICES": "2"}, "cuda:0"),
        ({"CUDA_VISIBLE_DEVICES": "3,2"}, "cuda:1"),
        ({"CUDA_VISIBLE_DEVICES": fk.uuid_of(0x1000)}, "cuda:0"),
        ({"CUDA_VISIBLE_DEVICES": f"{fk.uuid_of(0x1002)},GPU-00001000"}, "cuda:1"),  # a UUID prefix
        ({"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, "cuda:2"),
    ],
)
def test_device_string_is_this_process_ordinal(
    backend_url: str, namespace: str, bosses: list[GPUBoss], env: dict[str, str], device: str
) -> None:
    boss = make_boss(backend_url, namespace, fk.uniform_host())
    bosses.append(boss)
    boss._inventory.env = env
    target = fk.uuid_of(0x1000)  # NVML index 0, bus 81
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lease = boss.acquire(vram_gb=1, device=target, timeout=0)
    assert no_warning(caught, DeviceOrdinalWarning), "one model of card: the ordinal is certain"
    assert (lease.device, lease.uuid) == (device, target)
    assert lease.child_env() == {"CUDA_VISIBLE_DEVICES": target}
    with boss.lease(vram_gb=1, device=target, timeout=0) as dev:
        assert dev == device and dev.lease.uuid == target


@pytest.mark.parametrize("device", ["cuda:" + "1" * 5000, 10**5000], ids=["5000-digits", "int-of-5000-digits"])
def test_a_huge_cuda_index_is_invalid_request(
    backend_url: str, namespace: str, bosses: list[GPUBoss], device: object
) -> None:
    """Mapping a pin to this process's GPU called int() and str() on it: ValueError past 4300 digits."""
    boss = make_boss(backend_url, namespace, fk.uniform_host())
    bosses.append(boss)
    before = snapshot(raw_client(backend_url), namespace)
    with pytest.raises(InvalidRequest):
        boss.acquire(vram_gb=1, device=device, timeout=0)
    assert snapshot(raw_client(backend_url), namespace) == before
    assert boss.acquire(vram_gb=1, device="cuda:" + "0" * 30 + "1", timeout=0).device == "cuda:1"


def test_mixed_models_warn_with_the_fix_and_hidden_gpus_warn(
    backend_url: str, namespace: str, bosses: list[GPUBoss]
) -> None:
    boss = make_boss(backend_url, namespace, fk.mixed_host())
    bosses.append(boss)
    with pytest.warns(DeviceOrdinalWarning, match="CUDA_DEVICE_ORDER=PCI_BUS_ID"):
        lease = boss.acquire(vram_gb=1, device=fk.T4, timeout=0)
    assert lease.device == "cuda:2", "best guess: newest compute capability first (4090, 3090, T4)"
    boss._inventory.env = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert boss.acquire(vram_gb=1, device=fk.T4, timeout=0).device == "cuda:1"
    assert no_warning(caught, DeviceOrdinalWarning)
    boss._inventory.env = {"CUDA_VISIBLE_DEVICES": fk.RTX3090}
    with pytest.warns(DeviceOrdinalWarning, match="cannot use.*child_env"):
        hidden = boss.acquire(vram_gb=1, device=fk.T4, timeout=0)
    assert hidden.uuid == fk.T4 and hidden.child_env() == {"CUDA_VISIBLE_DEVICES": fk.T4}


def test_declared_gpus_keep_their_index_and_child_env_follows_visible_devices(
    backend_url: str, namespace: str, bosses: list[GPUBoss], monkeypatch: pytest.MonkeyPatch
) -> None:
    boss = GPUBoss(backend_url, namespace=namespace, gpus=GPUS, service="declared")
    bosses.append(boss)
    lease = boss.acquire(vram_gb=1, device="gpu1", timeout=0)
    assert (lease.device, lease.uuid) == ("cuda:1", None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert lease.child_env() == {"CUDA_VISIBLE_DEVICES": "1"}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert lease.child_env() == {"CUDA_VISIBLE_DEVICES": "5"}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(InvalidRequest, match="not visible"):
        lease.child_env()


# ---------------------------------------------------------------- hosts: heartbeat and offline


def test_silent_host_goes_offline_gets_no_grants_and_comes_back(
    backend_url: str, namespace: str, bosses: list[GPUBoss]
) -> None:
    a = make_boss(backend_url, namespace, fk.mixed_host(), host="hostA")
    b = make_boss(backend_url, namespace, fk.uniform_host(), host="hostB")
    bosses += [a, b]
    a.register_gpus()
    b.register_gpus()
    client = raw_client(backend_url)
    keys = Keys(namespace)
    assert set(client.hgetall(keys.hosts)) == {"hostA", "hostB"}
    assert sampler_of(b).beat()[1] == 0, "hostA beat just now: nothing goes offline"
    # hostA falls silent: its last beat is made older than the timeout (600 s here).
    client.hset(keys.hosts, "hostA", int(client.hget(keys.hosts, "hostA") or 0) - 601_000)
    assert sampler_of(b).beat()[1:3] == [3, 0]
    offline = {k: json.loads(v) for k, v in client.hgetall(keys.offline).items()}
    assert set(offline) == {fk.RTX3090, fk.T4, fk.RTX4090}
    assert {o["host"] for o in offline.values()} == {"hostA"} and {o["reason"] for o in offline.values()} == {
        "host_timeout"
    }
    assert "hostA" not in client.hgetall(keys.hosts), "a dead host is handled once"
    assert sampler_of(b).beat()[1] == 0
    went = types(backend_url, namespace, "gpu_offline")
    assert {e.gpu for e in went} == set(offline) and all(e["silent_ms"] >= 601_000 for e in went)
    # No grant on an offline GPU: placement skips it; a request pinned there waits.
    with pytest.raises(LeaseTimeout):
        b.acquire(vram_gb=1, device=fk.T4, timeout=0)
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(b.acquire(vram_gb=1, device=fk.T4, timeout=60)), daemon=True)
    waiter.start()
    wait_until(lambda: client.zcard(keys.queue) == 1, "the request queued")
    # hostA beats again: its GPUs come back and the waiter is served by that same script.
    assert sampler_of(a).beat()[2:4] == [3, 1]
    waiter.join(timeout=60)
    assert got and got[0].gpu == fk.T4
    assert client.hgetall(keys.offline) == {}
    assert {e.gpu for e in types(backend_url, namespace, "gpu_online")} == set(offline)


# ---------------------------------------------------------------- sampler and effective free


def test_the_sampler_thread_beats_and_samples_by_itself_until_closed(backend_url: str, namespace: str) -> None:
    nvml = fk.uniform_host()
    nvml.gpus[0].used_mib = 1234
    boss = make_boss(backend_url, namespace, nvml, sample_interval_s=0.1, host_timeout_s=1)
    boss._inventory.autostart = True
    client, keys = raw_client(backend_url), Keys(namespace)
    try:
        boss.acquire(vram_gb=1, timeout=0)
        wait_until(lambda: str(client.hget(keys.observed, fk.uuid_of(0x1000))).startswith("1234,"), "a reading")
        nvml.gpus[0].used_mib = 4321
        wait_until(lambda: str(client.hget(keys.observed, fk.uuid_of(0x1000))).startswith("4321,"), "a new reading")
    finally:
        boss.close()
    assert boss._inventory.sampler is None and not [t for t in threading.enumerate() if t.name == "gpuboss-sampler"]


def test_one_sampler_per_gpu_and_another_takes_over_when_it_lapses(
    backend_url: str, namespace: str, bosses: list[GPUBoss]
) -> None:
    nvml = fk.uniform_host()
    one = make_boss(backend_url, namespace, nvml)
    two = make_boss(backend_url, namespace, nvml)
    bosses += [one, two]
    one.register_gpus()
    two.register_gpus()
    first, second = sampler_of(one).tick(), sampler_of(two).tick()
    gpus = {g.uuid for g in nvml.gpus}
    assert first.sampling == dict.fromkeys(gpus, True) and second.sampling == dict.fromkeys(gpus, False)
    client, keys = raw_client(backend_url), Keys(namespace)
    gpu = fk.uuid_of(0x1000)
    assert client.get(keys.sampler(gpu)) == sampler_of(one).id
    assert 0 < client.pttl(keys.sampler(gpu)) <= sampler_of(one).lease_ms
    nvml.gpus[0].used_mib = 3000
    assert sampler_of(one).tick().sampling[gpu] and client.hget(keys.observed, gpu).startswith("3000,")
    nvml.gpus[0].used_mib = 5000
    assert not sampler_of(two).tick().sampling[gpu]
    assert client.hget(keys.observed, gpu).startswith("3000,"), "the reading of a non-holder is dropped"
    client.delete(keys.sampler(gpu))  # the holder's turn lapses (it stopped sampling)
    assert sampler_of(two).tick().sampling[gpu] and client.hget(keys.observed, gpu).startswith("5000,")
    assert not sampler_of(one).tick().sampling[gpu]
    used, at, age = (int(x) for x in client.hget(keys.observed, gpu).split(","))
    assert used == 5000 and age == 3 * 60_000 and at > 0


def test_observed_usage_blocks_grants_and_a_lower_reading_wakes_the_waiter(
    backend_url: str, namespace: str, bosses: list[GPUBoss]
) -> None:
    nvml = fk.uniform_host()
    boss = make_boss(backend_url, namespace, nvml)
    bosses.append(boss)
    boss.register_gpus()
    gpu = fk.uuid_of(0x1000)
    nvml.gpus[0].used_mib = 20_000  # a process outside gpuboss holds 20000 of 24564 MiB
    sampler_of(boss).tick()
    with pytest.raises(LeaseTimeout):
        boss.acquire(vram_gb=8, device=gpu, timeout=0)
    assert boss.acquire(vram_gb=4, device=gpu, timeout=0).gpu == gpu  # 4096 <= 4564 still fits
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(boss.acquire(vram_gb=8, device=gpu, timeout=60)), daemon=True)
    waiter.start()
    client, keys = raw_client(backend_url), Keys(namespace)
    wait_until(lambda: client.zcard(keys.queue) == 1, "the request queued")
    nvml.gpus[0].used_mib = 4_500  # the stray process exits; the lease's 4096 remain
    assert sampler_of(boss).tick().granted == 1
    waiter.join(timeout=60)
    assert got and got[0].gpu == gpu and got[0].vram_mib == 8 * GB


def test_the_memory_a_driver_reserves_is_never_leased(backend_url: str, namespace: str, bosses: list[GPUBoss]) -> None:
    """An H200 whose driver reserves 616 of its 143771 MiB. Read with the v2 memory call, the books hold the
    143155 MiB CUDA can allocate: a request for the whole total fails at once, and leases never add up to
    more. (Before, the total was registered: leases could add up to 616 MiB more than the card gives, and a
    request for the total waited for ever.) A driver with only the v1 call does not tell the reservation
    apart: the total is registered and an idle card reads 616 MiB used, which still holds the first
    grants to what the card gives."""
    usable = 143771 - fk.H200_RESERVED_MIB
    for memory_v2 in (True, False):
        nvml = fk.h200_host(memory_v2=memory_v2)
        boss = make_boss(backend_url, f"{namespace}-{memory_v2}", nvml)
        bosses.append(boss)
        (info,) = boss.register_gpus()
        assert info.capacity_mib == (usable if memory_v2 else 143771)
        sampler_of(boss).tick()  # an idle card: v2 reads 0 MiB used, v1 616
        with pytest.raises(InsufficientCapacity if memory_v2 else LeaseTimeout):
            boss.acquire(vram_gb=143771 / 1024, device=fk.H200, timeout=0)
        first = boss.acquire(vram_gb=(usable - 1024) / 1024, device=fk.H200, timeout=0)
        with pytest.raises(LeaseTimeout):
            boss.acquire(vram_gb=2, device=fk.H200, timeout=0)  # 1024 MiB is all that is left
        last = boss.acquire(vram_gb=1, device=fk.H200, timeout=0)
        assert first.vram_mib + last.vram_mib == usable


def test_a_card_registered_with_its_whole_total_is_a_conflict_that_says_what_to_do(
    backend_url: str, namespace: str, bosses: list[GPUBoss]
) -> None:
    old = make_boss(backend_url, namespace, fk.h200_host(memory_v2=False))  # as an earlier gpuboss registered it
    new = make_boss(backend_url, namespace, fk.h200_host())
    bosses += [old, new]
    old.register_gpus()
    with pytest.raises(
        ConfigError,
        match=r"declared with 143155 MiB .* registers it with 143771 MiB .* whole total .*gpus register --update",
    ):
        new.acquire(vram_gb=1, timeout=0)
    assert [g.capacity_mib for g in old.gpus()] == [143771], "nothing written"
    held = old.acquire(vram_gb=100, timeout=0)  # (held across the update: it stays)
    assert [g.capacity_mib for g in new.register_gpus(update=True)] == [143155], "what the message says works"
    with pytest.raises(InsufficientCapacity):
        new.acquire(vram_gb=143771 / 1024, timeout=0)
    assert new.acquire(vram_gb=(143155 - 100 * 1024) / 1024, timeout=0).vram_mib == 143155 - 100 * 1024
    assert old.release(held)


def test_a_release_is_read_at_once_so_the_memory_it_gave_back_serves_the_queue(
    backend_url: str, namespace: str, bosses: list[GPUBoss]
) -> None:
    """Readings every 60 s, yet the waiter for the memory a holder freed and released is served at once: the
    release wakes the sampler thread, which reads the GPU and stores the reading out of turn. (Before, the
    GPU looked full until the next round, up to a sample interval after the release.)"""
    nvml = fk.uniform_host()
    gpu = fk.uuid_of(0x1000)
    holder = make_boss(backend_url, namespace, nvml)
    holder._inventory.autostart = True  # its thread: a round at start, the next one 60 s later
    bosses.append(holder)
    held = holder.acquire(vram_gb=16, device=gpu, timeout=0)
    nvml.gpus[0].used_mib = 16_500  # what the holder uses, as the first round read it
    client, keys = raw_client(backend_url), Keys(namespace)
    sampler = sampler_of(holder)
    sampler.tick()
    waiter = make_boss(backend_url, namespace, nvml, host="hostA")
    bosses.append(waiter)
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(waiter.acquire(vram_gb=16, device=gpu, timeout=60)))
    thread.start()
    wait_until(lambda: client.zcard(keys.queue) == 1, "the request queued")
    nvml.gpus[0].used_mib = 300  # the holder frees its memory, then releases
    assert holder.release(held)
    thread.join(timeout=30)
    assert got and got[0].gpu == gpu, "served by the reading taken out of turn, not 60 s later"
    assert str(client.hget(keys.observed, gpu)).startswith("300,")


def test_an_eviction_is_read_at_once_so_the_memory_the_checkpoint_freed_serves_the_requester(
    backend_url: str, namespace: str, bosses: list[GPUBoss]
) -> None:
    nvml = fk.uniform_host()
    gpu = fk.uuid_of(0x1000)
    victim = make_boss(backend_url, namespace, nvml)
    victim._inventory.autostart = True  # readings every 60 s
    bosses.append(victim)

    def checkpoint(notice: Any) -> None:
        nvml.gpus[0].used_mib = 300  # the checkpoint frees the victim's memory before it hands the lease back

    low = victim.acquire(vram_gb=16, device=gpu, priority="low", on_evict=checkpoint, resume=False)
    nvml.gpus[0].used_mib = 16_500
    sampler_of(victim).tick()
    requester = make_boss(backend_url, namespace, nvml)
    bosses.append(requester)
    high = requester.acquire(vram_gb=16, device=gpu, priority="high", timeout=30)
    assert high.gpu == gpu, "granted by the reading taken at the hand-back, not 60 s later"
    wait_until(lambda: low.state is LeaseState.EVICTED, "the victim's lease ended (it does not resume)")


def test_a_reading_out_of_turn_is_stored_whoever_samples_and_leaves_the_right_alone(
    backend_url: str, namespace: str, bosses: list[GPUBoss]
) -> None:
    from gpuboss.core import Core
    from gpuboss.redis_io import call_script_sync
    from gpuboss.sampler import SampleReply, sample_call

    boss = make_boss(backend_url, namespace, fk.uniform_host())
    bosses.append(boss)
    boss.register_gpus()
    gpu = fk.uuid_of(0x1000)
    core: Core = boss._core
    client, keys = raw_client(backend_url), Keys(namespace)
    assert call_script_sync(client, sample_call(core, gpu, "one", 9000, 60_000, 60_000))[0] == SampleReply.SAMPLING
    dropped = call_script_sync(client, sample_call(core, gpu, "two", 100, 60_000, 60_000))
    assert (dropped[0], dropped[2]) == (SampleReply.OTHER, "one")
    assert str(client.hget(keys.observed, gpu)).startswith("9000,")
    stored = call_script_sync(client, sample_call(core, gpu, "two", 100, 60_000, 60_000, out_of_turn=True))
    assert (stored[0], stored[2]) == (SampleReply.OUT_OF_TURN, "one")
    assert str(client.hget(keys.observed, gpu)).startswith("100,") and client.get(keys.sampler(gpu)) == "one"


def test_a_stale_reading_is_ignored(backend_url: str, namespace: str, bosses: list[GPUBoss]) -> None:
    boss = make_boss(backend_url, namespace, fk.uniform_host())
    bosses.append(boss)
    boss.register_gpus()
    gpu = fk.uuid_of(0x1000)
    client, keys = raw_client(backend_url), Keys(namespace)
    client.hset(keys.observed, gpu, "24000,1000,6000")  # sampled long ago (Unix ms 1000)
    assert boss.acquire(vram_gb=20, device=gpu, timeout=0).gpu == gpu
    assert observed({gpu: "24000,1000,6000", "x": "1,999000,2000", "bad": "nope"}, 1_000_000) == {"x": 1}


def test_a_holder_over_budget_gets_one_alert_event_and_a_warning(
    backend_url: str, namespace: str, bosses: list[GPUBoss]
) -> None:
    nvml = fk.uniform_host()
    boss = make_boss(backend_url, namespace, nvml)
    bosses.append(boss)
    boss.register_gpus()
    gpu = fk.uuid_of(0x1000)
    lease = boss.acquire(vram_gb=8, device=gpu, timeout=0)
    me = fk.FakeProcess(os.getpid(), 8 * GB + 300)
    nvml.gpus[0].processes = [me, fk.FakeProcess(fk.STRAY_PID, 5000)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert sampler_of(boss).tick().alerts == []
    assert no_warning(caught, VramOverBudgetWarning), "300 MiB over is within the 1 GB margin (a CUDA context)"
    me.used_mib = 8 * GB + 900  # a torch process on an H200 holds 684 MiB beyond its tensors: no false alert
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert sampler_of(boss).tick().alerts == []
    assert no_warning(caught, VramOverBudgetWarning)
    me.used_mib = 9000 + 512
    with pytest.warns(VramOverBudgetWarning, match=rf"uses 9512 MiB of {gpu} but leased 8192 MiB \(lease {lease.id}\)"):
        tick = sampler_of(boss).tick()
    assert [(a.lease_ids, a.over_mib) for a in tick.alerts] == [((lease.id,), 9512 - 8192)]
    assert sampler_of(boss).tick().alerts == [], "told once"
    (alert,) = types(backend_url, namespace, "vram_alert")
    assert (alert.lease, alert.gpu, alert.service, alert.vram_mib) == (lease.id, gpu, "svc-hostA", 8192)
    assert (alert["leases"], alert["pid"], alert["host"]) == ([lease.id], os.getpid(), "hostA")
    assert (alert["leased_mib"], alert["used_mib"], alert["over_mib"]) == (8192, 9512, 1320)
    me.used_mib = 9512 + 1024  # grew by another GiB: told again
    with pytest.warns(VramOverBudgetWarning):
        assert len(sampler_of(boss).tick().alerts) == 1
    assert len(types(backend_url, namespace, "vram_alert")) == 2


def test_sample_script_ignores_unknown_gpus_and_bad_alerts(backend_url: str, namespace: str) -> None:
    from gpuboss.core import Core
    from gpuboss.redis_io import call_script_sync
    from gpuboss.sampler import sample_call

    core = Core(build_config(namespace=namespace, gpus=GPUS))
    client = raw_client(backend_url)
    before = snapshot(client, namespace)
    reply = call_script_sync(client, sample_call(core, "nope", "me", 5, 6000, 6000))
    assert reply[:3] == [-1, 0, ""] and snapshot(client, namespace) == before
    register = core.register_call()
    assert register is not None
    call_script_sync(client, register)
    call = sample_call(core, "gpu0", "me", 5, 6000, 6000)
    bad = type(call)(call.script, call.keys, [*call.args[:6], '[{"leases": ["gone"], "used_mib": 9}, 7]', 0])
    assert call_script_sync(client, bad)[0] == 1
    assert types(backend_url, namespace, "vram_alert") == []


# ---------------------------------------------------------------- node, models, status


def test_node_rules() -> None:
    here = GpuInfo("GPU-a", "", 0, 100, 0, host="a")
    there = GpuInfo("GPU-b", "", 0, 100, 0, host="b")
    declared = GpuInfo("gpu0", "", 0, 100, 0)
    assert [on_node(g, None, "a") for g in (here, there, declared)] == [True, False, True]
    assert [on_node(g, "any", "a") for g in (here, there, declared)] == [True, True, True]
    # GPUs without a host (declared ones) are everybody's, whatever node= says (as the Lua placement rule).
    assert [on_node(g, "b", "a") for g in (here, there, declared)] == [False, True, True]
    for bad in ("", " a", 3, "a\n"):
        with pytest.raises(InvalidRequest, match="node"):
            validate_node(bad)
    infos = {g.id: g for g in (here, there)}
    free = effective_free(
        infos,
        {"GPU-a": "100", "GPU-b": "100"},
        {"GPU-a": "10"},
        {"GPU-a": 30},
        {},
        {"GPU-b": '{"id": "r", "vram_mib": 60}'},
    )
    assert free == {"GPU-a": 70, "GPU-b": 40}
    assert effective_free(infos, {"GPU-a": "100", "GPU-b": "100"}, {}, {}, {"GPU-b": "{}"}, {}) == {"GPU-a": 100}


def test_model_resolution_picks_the_best_quantization_that_fits_now(
    backend_url: str, namespace: str, bosses: list[GPUBoss]
) -> None:
    nvml = fk.uniform_host()
    for g in nvml.gpus[1:]:
        g.used_mib = 24_000  # three cards are nearly full
    boss = make_boss(backend_url, namespace, nvml)
    bosses.append(boss)
    boss.register_gpus()
    sampler_of(boss).tick()
    gpu = fk.uuid_of(0x1000)
    choice = boss.choose_model("gemma3:12b")
    assert (choice.quantization, choice.vram_mib, choice.fits, choice.gpu) == ("q8_0", 15360, True, gpu)
    boss.acquire(vram_gb=10, device=gpu, timeout=0)  # 24564 - 10240 = 14324 MiB left
    assert boss.choose_model("gemma3:12b").quantization == "q4_K_M"
    assert boss.choose_model("gemma3:12b", quantizations=["fp16", "q8"]).fits is False
    client = raw_client(backend_url)
    before = snapshot(client, namespace)
    with pytest.raises(InvalidRequest, match="gemma3:12b"):
        boss.choose_model("gemma3:13b")
    with pytest.raises(InvalidRequest, match="node"):
        boss.choose_model("gemma3:12b", node="elsewhere")
    assert snapshot(client, namespace) == before


def test_vram_status_reads_this_host(backend_url: str, namespace: str, bosses: list[GPUBoss]) -> None:
    boss = make_boss(backend_url, namespace, fk.mig_host(), host="node-7")
    bosses.append(boss)
    status = {s.id: s for s in boss.vram_status()}
    assert set(status) == {fk.RTX4090, fk.MIG_A, fk.MIG_B}
    rtx = status[fk.RTX4090]
    assert (rtx.host, rtx.used_mib, rtx.temperature_c, rtx.gpu_util_pct) == ("node-7", 10201, 71, 87)
    assert status[fk.MIG_A].parent_uuid == fk.A100


async def test_async_boss_registers_reads_status_and_resolves_models(backend_url: str, namespace: str) -> None:
    boss = AsyncGPUBoss(backend_url, namespace=namespace, gpus="auto", service="async")
    boss._core.host = "hostA"
    boss._inventory.nvml = fk.uniform_host()
    boss._inventory.autostart = False
    boss._inventory.env = {}
    try:
        registry = await boss.register_gpus()
        assert len(registry) == 4 and {g.host for g in registry} == {"hostA"}
        assert len(await boss.vram_status()) == 4
        assert (await boss.choose_model("gemma3:12b")).quantization == "q8_0"  # fp16 (26624 MiB) fits nowhere
        lease = await boss.acquire(vram_gb=1, device="cuda:3", timeout=0)
        assert (lease.gpu, lease.device, lease.uuid) == (fk.uuid_of(0x1002), "cuda:3", fk.uuid_of(0x1002))
    finally:
        await boss.close()


def test_a_release_just_before_close_is_still_read(backend_url: str, namespace: str, bosses: list[GPUBoss]) -> None:
    """The thread stops at close(); a reading a release asked for just before still goes out. (Here the thread's
    loop runs in this thread, already told to stop: the case of a close() that came before the thread woke.)
    And a release after which nobody waits asks for no reading: nothing could use it."""
    nvml = fk.uniform_host()
    gpu = fk.uuid_of(0x1000)
    holder = make_boss(backend_url, namespace, nvml)
    bosses.append(holder)
    alone = holder.acquire(vram_gb=1, device=gpu, timeout=0)
    sampler = sampler_of(holder)
    holder.release(alone)
    assert sampler._poked == set(), "nobody waits: no reading out of turn"
    held = holder.acquire(vram_gb=16, device=gpu, timeout=0)
    nvml.gpus[0].used_mib = 16_500
    sampler.tick()
    waiter = make_boss(backend_url, namespace, nvml)
    bosses.append(waiter)
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(waiter.acquire(vram_gb=16, device=gpu, timeout=60)))
    thread.start()
    client, keys = raw_client(backend_url), Keys(namespace)
    wait_until(lambda: client.zcard(keys.queue) == 1, "the request queued")
    nvml.gpus[0].used_mib = 300
    holder.release(held)  # the waiter still waits (the reading shows 16500 MiB): the sampler is poked
    assert sampler._poked == {gpu}
    sampler._stop.set()
    before = len(nvml.memory_calls)
    sampler._run()
    assert str(client.hget(keys.observed, gpu)).startswith("300,")
    assert len(nvml.memory_calls) == before + 1, "only the released GPU was read, not the host's four"
    thread.join(30)
    assert got and got[0].gpu == gpu
