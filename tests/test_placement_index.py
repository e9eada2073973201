"""The placement index (``ns:free``, ``ns:free_host``, ``ns:observed_exp``; lua/includes/state.lua, place.lua).

The scripts find the best-fit GPU from a sorted set instead of reading every GPU on each call. These tests hold
the index to what a full scan of the hashes would decide: on many GPUs, by host, with NVML readings that go
stale, and when the index is missing (data written by an older version, or a Redis that lost it).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from gpuboss import GPUBoss, Keys, LeaseTimeout
from gpuboss.core import Call, Core
from gpuboss.redis_io import call_script_sync
from gpuboss.sampler import sample_call

from tests import fake_nvml as fk
from tests.conftest import raw_client

# The tests of backend_url (and the fixtures built on it) run on a valkey-server too: tests/conftest.py.
pytestmark = pytest.mark.valkey

MANY = 40


@pytest.fixture
def bosses() -> Iterator[list[GPUBoss]]:
    made: list[GPUBoss] = []
    yield made
    for b in made:
        b.close()


def hashes(client: redis.Redis, keys: Keys) -> tuple[dict[str, int], dict[str, int]]:
    capacity = {g: int(v) for g, v in client.hgetall(keys.capacity).items()}
    used = {g: int(v) for g, v in client.hgetall(keys.used).items()}
    return capacity, used


def full_scan_best_fit(client: redis.Redis, keys: Keys, need: int, allowed: set[str] | None = None) -> str | None:
    """What placement must choose, from the hashes alone: the least MiB left after the grant, ties to the id."""
    capacity, used = hashes(client, keys)
    fits = [
        (cap - used.get(g, 0) - need, g)
        for g, cap in capacity.items()
        if cap - used.get(g, 0) >= need and (allowed is None or g in allowed)
    ]
    return min(fits)[1] if fits else None


def index_of(client: redis.Redis, keys: Keys) -> dict[str, int]:
    return {g: int(v) for g, v in client.zrange(keys.free, 0, -1, withscores=True)}


def test_best_fit_over_many_gpus_is_what_a_full_scan_decides(
    backend_url: str, namespace: str, bosses: list[GPUBoss]
) -> None:
    rng = random.Random(7)
    gpus = [
        {"id": f"g{i:02d}", "name": "t", "vram_gb": rng.choice([8, 12, 16, 24, 40, 80]), "index": i}
        for i in range(MANY)
    ]
    boss = GPUBoss(backend_url, namespace=namespace, gpus=gpus, service="svc")
    bosses.append(boss)
    boss.register_gpus()
    client, keys = raw_client(backend_url), Keys(namespace)
    held = []
    for step in range(150):
        need_gb = rng.choice([0.5, 1, 2, 3, 4, 6, 8, 12, 20, 30])
        if held and rng.random() < 0.4:
            boss.release(held.pop(rng.randrange(len(held))))
            continue
        expected = full_scan_best_fit(client, keys, int(need_gb * 1024))
        if expected is None:
            with pytest.raises(LeaseTimeout):
                boss.acquire(vram_gb=need_gb, timeout=0)
            continue
        lease = boss.acquire(vram_gb=need_gb, timeout=0)
        assert lease.gpu == expected, f"step {step}: {need_gb} GB went to {lease.gpu}, best fit is {expected}"
        held.append(lease)
        capacity, used = hashes(client, keys)
        assert index_of(client, keys) == {g: cap - used[g] for g, cap in capacity.items()}
    for lease in held:
        boss.release(lease)
    capacity, _ = hashes(client, keys)
    assert index_of(client, keys) == capacity, "everything released: the index says every GPU is free"


def test_a_missing_index_is_rebuilt_from_the_hashes(backend_url: str, namespace: str, bosses: list[GPUBoss]) -> None:
    gpus = [{"id": f"g{i}", "name": "t", "vram_gb": 8 * (i + 1), "index": i} for i in range(4)]
    boss = GPUBoss(backend_url, namespace=namespace, gpus=gpus, service="svc")
    bosses.append(boss)
    client, keys = raw_client(backend_url), Keys(namespace)
    a = boss.acquire(vram_gb=7, timeout=0)
    assert a.gpu == "g0"
    # Data of a version without the index (nor the state header), or a Redis that lost them: the next call
    # rebuilds the index.
    client.delete(keys.free, keys.free_host, keys.head)
    b = boss.acquire(vram_gb=7, timeout=0)
    assert b.gpu == "g1", "g0 is full: the rebuilt index must know what is leased"
    capacity, used = hashes(client, keys)
    assert index_of(client, keys) == {g: cap - used[g] for g, cap in capacity.items()}
    assert client.zcard(keys.free_host) == 0, "declared GPUs have no host"
    # The index alone deleted by hand: rebuilt at the next full check, at most CHECK_EVERY_MS later. Until then
    # nothing is granted from the missing entries (never more than a GPU holds).
    client.delete(keys.free, keys.free_host)
    time.sleep(1.2)
    c = boss.acquire(vram_gb=7, timeout=0)
    assert c.gpu == "g1", "g0 is full and g1 has 9 GB left: the rebuilt index must know what is leased"
    capacity, used = hashes(client, keys)
    assert index_of(client, keys) == {g: cap - used[g] for g, cap in capacity.items()}
    for lease in (a, b, c):
        boss.release(lease)


def test_a_reading_counts_until_it_goes_stale_then_its_gpu_is_reindexed(
    backend_url: str, namespace: str, bosses: list[GPUBoss]
) -> None:
    gpus = [
        {"id": "big", "name": "t", "vram_gb": 24, "index": 0},
        {"id": "small", "name": "t", "vram_gb": 12, "index": 1},
    ]
    boss = GPUBoss(backend_url, namespace=namespace, gpus=gpus, service="svc")
    bosses.append(boss)
    boss.register_gpus()
    client, keys = raw_client(backend_url), Keys(namespace)
    core: Core = boss._core
    max_age = 400
    # Something outside gpuboss fills "small" (12 GB); the reading stays valid for 400 ms.
    reply = call_script_sync(client, sample_call(core, "small", "sampler-1", 12 * 1024, max_age, 60_000))
    assert int(reply[0]) == 1
    assert index_of(client, keys)["small"] == 0
    assert client.zscore(keys.observed_exp, "small") is not None
    first = boss.acquire(vram_gb=4, timeout=0)
    assert first.gpu == "big", "the reading leaves small no room"
    boss.release(first)
    deadline = time.monotonic() + 30
    while True:  # a liveness bound, not a timing assertion: the reading must go stale within max_age
        time.sleep(max_age / 1000 + 0.05)
        lease = boss.acquire(vram_gb=4, timeout=0)
        if lease.gpu == "small":
            break
        boss.release(lease)
        assert time.monotonic() < deadline, "the stale reading kept counting"
    assert index_of(client, keys)["small"] == 12 * 1024 - 4 * 1024
    assert client.zscore(keys.observed_exp, "small") is None
    boss.release(lease)


@pytest.mark.parametrize("hostless", [0, 3], ids=["hosts-only", "mixed"])
def test_a_request_for_a_host_gets_that_hosts_best_fit(
    backend_url: str, namespace: str, bosses: list[GPUBoss], hostless: int
) -> None:
    client, keys = raw_client(backend_url), Keys(namespace)
    rng = random.Random(3)
    decls: list[dict[str, Any]] = []
    hosts = {}
    for i in range(27 + hostless):
        host = ["alpha", "beta", "gamma"][i % 3] if i < 27 else None
        gb = rng.choice([16, 24, 48, 80])
        decls.append({"id": f"gpu-{i:02d}", "name": "t", "index": i % 9, "capacity_mib": gb * 1024, "reserve_mib": 0})
        if host:
            decls[-1]["host"] = host
        hosts[decls[-1]["id"]] = host
    call_script_sync(client, Call("register", [*keys.register(), *keys.event_keys()], [*map(json.dumps, decls), 100]))
    by_host = set(client.zrange(keys.free_host, 0, -1))
    assert by_host == {f"{d['host']} {d['capacity_mib']:012d} {d['id']}" for d in decls if "host" in d}
    boss = GPUBoss(backend_url, namespace=namespace, service="svc", gpus=None)
    bosses.append(boss)
    boss._core.host = "beta"
    boss._inventory.nvml = fk.FakeNvml([], init_error=fk.DRIVER_NOT_LOADED)
    boss._inventory.autostart = False
    for step in range(60):
        node = rng.choice([None, "alpha", "any"])
        need_gb = rng.choice([4, 8, 16, 30, 60])
        mine = {"alpha" if node == "alpha" else "beta", None} if node != "any" else None
        allowed = None if mine is None else {g for g, h in hosts.items() if h in mine}
        expected = full_scan_best_fit(client, keys, need_gb * 1024, allowed)
        if expected is None:
            with pytest.raises(LeaseTimeout):
                boss.acquire(vram_gb=need_gb, node=node, timeout=0)
            continue
        lease = boss.acquire(vram_gb=need_gb, node=node, timeout=0)
        assert lease.gpu == expected, f"step {step}: {need_gb} GB for node {node} went to {lease.gpu}, not {expected}"
    capacity, used = hashes(client, keys)
    free = {g: cap - used[g] for g, cap in capacity.items()}
    assert set(client.zrange(keys.free_host, 0, -1)) == {
        f"{hosts[g]} {n:012d} {g}" for g, n in free.items() if hosts[g]
    }
    assert index_of(client, keys) == free
