"""Leases over several GPUs of one host (``lease(vram_gb=40, gpus=2)``, tensor parallel): all or nothing,
queued and ordered like any request, never holding half a grant while waiting."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from gpuboss import GPUBoss, InsufficientCapacity, InvalidRequest, Keys, LeaseState, LeaseTimeout

from tests import fake_nvml as fk
from tests.conftest import raw_client
from tests.test_inventory_wiring import make_boss

TWO = [
    {"id": "g0", "name": "test", "vram_gb": 24, "index": 0},
    {"id": "g1", "name": "test", "vram_gb": 24, "index": 1},
]
WAIT_S = 10.0


@pytest.fixture
def pair(backend_url: str, namespace: str) -> Iterator[tuple[GPUBoss, GPUBoss]]:
    a = GPUBoss(backend_url, namespace=namespace, gpus=TWO, service="tp")
    b = GPUBoss(backend_url, namespace=namespace, gpus=TWO, service="other")
    yield a, b
    b.close()
    a.close()


def used(boss: GPUBoss) -> dict[str, int]:
    return {k: int(v) for k, v in raw_client(boss.url).hgetall(Keys(boss.namespace).used).items()}


def test_one_lease_spans_two_gpus_and_frees_both(pair: tuple[GPUBoss, GPUBoss]) -> None:
    boss, _ = pair
    with boss.lease(vram_gb=40, gpus=2, timeout=0) as device:
        lease = device.lease
        assert lease.gpus == ["g0", "g1"] and lease.devices == ["cuda:0", "cuda:1"]
        assert lease.vram_mib == 40 * 1024 and device == "cuda:0"
        assert used(boss) == {"g0": 20 * 1024, "g1": 20 * 1024}  # the total, split evenly
        assert lease.child_env() == {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert used(boss) == {"g0": 0, "g1": 0}


def test_all_or_nothing_while_waiting_and_in_order(pair: tuple[GPUBoss, GPUBoss]) -> None:
    tp, other = pair
    small = other.acquire(10, device="g0")
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(tp.acquire(40, gpus=2, timeout=WAIT_S)), daemon=True)
    waiter.start()
    deadline = time.monotonic() + WAIT_S
    while raw_client(tp.url).zcard(Keys(tp.namespace).queue) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert used(tp) == {"g0": 10 * 1024, "g1": 0}  # nothing held on g1 while it waits
    with pytest.raises(LeaseTimeout):  # strict order: it fits on g1, but the head waits first
        other.acquire(4, device="g1", timeout=0)
    other.release(small)
    waiter.join(WAIT_S)
    assert got and got[0].gpus == ["g0", "g1"]
    tp.release(got[0])


def test_requests_that_can_never_fit_and_bad_arguments(pair: tuple[GPUBoss, GPUBoss]) -> None:
    boss, _ = pair
    with pytest.raises(InsufficientCapacity, match="2 GPUs"):
        boss.acquire(60, gpus=2, timeout=0)  # 30 GB on each of two 24 GB GPUs
    with pytest.raises(InsufficientCapacity, match="3 GPUs"):
        boss.acquire(3, gpus=3, timeout=0)
    for bad in (0, True, 65, 1.5, "2"):
        with pytest.raises(InvalidRequest, match="gpus"):
            boss.acquire(4, gpus=bad, timeout=0)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="device"):
        boss.acquire(4, gpus=2, device="g0", timeout=0)
    lease = boss.acquire(4, gpus=2)
    with pytest.raises(InvalidRequest, match="several GPUs"):
        lease.resize(8)
    boss.release(lease)


def test_an_expired_multi_gpu_lease_frees_every_gpu(pair: tuple[GPUBoss, GPUBoss]) -> None:
    boss, other = pair
    lease = boss.acquire(8, gpus=2, ttl=0.3)
    boss._heartbeat.forget(lease.id)  # as if its holder died
    time.sleep(0.4)
    other.collect()
    assert used(boss) == {"g0": 0, "g1": 0}


def test_a_preemptible_multi_gpu_lease_is_evicted_and_resumes_on_two_gpus(pair: tuple[GPUBoss, GPUBoss]) -> None:
    tp, other = pair
    low = tp.acquire(48, gpus=2, priority="low", on_evict=lambda: None)
    high = other.acquire(20, priority="high", timeout=WAIT_S)  # needs one of them: the whole lease goes
    assert low.state is LeaseState.SUSPENDED
    other.release(high)
    assert low._settled.wait(WAIT_S) and low.state is LeaseState.GRANTED
    assert low.gpus == ["g0", "g1"] and low.evictions == 1 and low.vram_mib == 48 * 1024
    tp.release(low)
    assert used(tp) == {"g0": 0, "g1": 0}


# Plain host names are read from the declarations' JSON text; others (here a space and a '+') are decoded
# (state.lua host_of): both must keep a lease on one host.
@pytest.mark.parametrize("host_a, host_b", [("hostA", "hostB"), ("rack 7+a", "rack 7+b")])
def test_a_multi_gpu_lease_stays_on_one_host(backend_url: str, namespace: str, host_a: str, host_b: str) -> None:
    a = make_boss(backend_url, namespace, fk.mixed_host(), host=host_a)  # 3 GPUs of different sizes
    b = make_boss(backend_url, namespace, fk.uniform_host(), host=host_b)  # 4 x 24 GB
    try:
        a.register_gpus()
        hosts = {g.id: g.host for g in b.register_gpus()}
        lease = b.acquire(40, gpus=4, node="any", timeout=0)
        assert len(set(lease.gpus)) == 4 and {hosts[g] for g in lease.gpus} == {host_b}
        assert len(lease.uuids) == 4 and lease.child_env()["CUDA_VISIBLE_DEVICES"].count("GPU-") == 4
        b.release(lease)
    finally:
        b.close()
        a.close()
