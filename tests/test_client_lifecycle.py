"""The lifecycle edges of a boss: an interrupt between a grant and its caller, a resize given up midway, a boss
used after close(), close() with Redis failing, a foreign lease released, a lost lease without on_lost."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from gpuboss import AsyncGPUBoss, GPUBoss, InvalidRequest, Keys, LeaseTimeout
from gpuboss.core import Call, Op, Pop
from gpuboss.errors import BossClosed, RedisUnavailable
from gpuboss.lease import LeaseState

from tests.conftest import queue_ids, raw_client
from tests.threads import until

ONE_GPU: list[dict[str, Any]] = [{"id": "gpu0", "vram_gb": 24}]


def leases_in_redis(url: str, ns: str) -> set[str]:
    return {str(k) for k in raw_client(url).hgetall(Keys(ns).leases)}


def lease_mib(url: str, ns: str, lease_id: str) -> int:
    return int(json.loads(str(raw_client(url).hget(Keys(ns).leases, lease_id)))["vram_mib"])


@pytest.fixture
def pair(backend_url: str, namespace: str) -> Iterator[tuple[GPUBoss, GPUBoss]]:
    """Two bosses of one namespace with one 24 GB GPU."""
    one = GPUBoss(backend_url, namespace=namespace, gpus=ONE_GPU, service="one")
    two = GPUBoss(backend_url, namespace=namespace, gpus=ONE_GPU, service="two")
    yield one, two
    one.close()
    two.close()


# -- 1: an interrupt after the grant, before the caller has the lease


def test_interrupt_after_grant_releases_the_lease(
    pair: tuple[GPUBoss, GPUBoss], backend_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    boss, _ = pair

    def ctrl_c(lease: Any) -> None:  # stands for Ctrl-C landing inside _granted()
        raise KeyboardInterrupt

    monkeypatch.setattr(boss._inventory, "localize", ctrl_c)
    with pytest.raises(KeyboardInterrupt), boss.lease(vram_gb=20, ttl=2):
        pytest.fail("the block must not start")
    assert boss.held() == []
    assert boss._heartbeat.held() == []
    assert leases_in_redis(backend_url, namespace) == set()
    assert queue_ids(backend_url, namespace) == []


# -- 2: AsyncGPUBoss.close() is best effort


async def test_async_close_goes_on_after_a_failed_release(
    backend_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    boss = AsyncGPUBoss(backend_url, namespace=namespace, gpus=ONE_GPU, service="atest")
    first = await boss.acquire(vram_gb=2, ttl=2)
    second = await boss.acquire(vram_gb=2, ttl=2)
    real_eval = boss._eval
    failed: list[str] = []

    async def flaky_eval(call: Call) -> Any:
        if call.script == "release" and not failed:
            failed.append(str(call.args[1]))
            raise RedisUnavailable("redis://test: down for this one call")
        return await real_eval(call)

    monkeypatch.setattr(boss, "_eval", flaky_eval)
    await boss.close()  # no error: the failed release is retried by the heartbeat as it stops
    assert failed == [first.id]
    thread = boss._heartbeat._thread
    assert thread is None or not thread.is_alive()
    assert not boss._notices.running
    assert leases_in_redis(backend_url, namespace) == set()
    assert first.state is LeaseState.RELEASED and second.state is LeaseState.RELEASED


# -- 3: a boss used after close()


def test_sync_boss_refuses_after_close(backend_url: str, namespace: str) -> None:
    boss = GPUBoss(backend_url, namespace=namespace, gpus=ONE_GPU, service="test")
    lease = boss.acquire(vram_gb=2)
    boss.close()
    boss.close()  # twice is harmless
    with pytest.raises(BossClosed, match="this GPUBoss is closed"):
        boss.acquire(vram_gb=2, timeout=1)
    with pytest.raises(BossClosed), boss.lease(vram_gb=2, timeout=1):
        pytest.fail("the block must not start")
    with pytest.raises(BossClosed):
        boss.keep_warm("m", vram_gb=1)
    with pytest.raises(BossClosed):
        lease.resize(4)
    assert leases_in_redis(backend_url, namespace) == set()


async def test_async_boss_refuses_after_close(backend_url: str, namespace: str) -> None:
    boss = AsyncGPUBoss(backend_url, namespace=namespace, gpus=ONE_GPU, service="atest")
    lease = await boss.acquire(vram_gb=2)
    await boss.close()
    await boss.close()
    with pytest.raises(BossClosed, match="this AsyncGPUBoss is closed"):
        await boss.acquire(vram_gb=2, timeout=1)
    with pytest.raises(BossClosed):
        async with boss.lease(vram_gb=2, timeout=1):
            pytest.fail("the block must not start")
    with pytest.raises(BossClosed):
        boss.keep_warm("m", vram_gb=1)
    with pytest.raises(BossClosed):
        await lease.resize(4)
    assert leases_in_redis(backend_url, namespace) == set()


# -- 4 and 5: a growing resize given up midway, and the <id>:grow watch after any waiting resize


def test_interrupted_grow_is_withdrawn(
    pair: tuple[GPUBoss, GPUBoss], backend_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    boss, other = pair
    lease = boss.acquire(vram_gb=12, ttl=1)
    blocker = other.acquire(vram_gb=12)
    grow_id = f"{lease.id}:grow"
    real_perform = boss._perform

    def perform(op: Op) -> Any:
        if isinstance(op, Pop) and grow_id in op.key:  # waiting to grow: Ctrl-C lands here
            raise KeyboardInterrupt
        return real_perform(op)

    monkeypatch.setattr(boss, "_perform", perform)
    with pytest.raises(KeyboardInterrupt):
        lease.resize(20)
    assert grow_id not in queue_ids(backend_url, namespace)
    assert grow_id not in boss._heartbeat.held()
    other.release(blocker)
    time.sleep(0.2)
    assert lease_mib(backend_url, namespace, lease.id) == 12 * 1024
    assert lease.vram_mib == 12 * 1024


async def test_cancelled_grow_is_withdrawn(backend_url: str, namespace: str) -> None:
    boss = AsyncGPUBoss(backend_url, namespace=namespace, gpus=ONE_GPU, service="atest")
    other = GPUBoss(backend_url, namespace=namespace, gpus=ONE_GPU, service="two")
    try:
        lease = await boss.acquire(vram_gb=12, ttl=1)
        blocker = other.acquire(vram_gb=12)
        grow_id = f"{lease.id}:grow"
        task = asyncio.ensure_future(lease.resize(20))
        for _ in range(1000):
            if grow_id in queue_ids(backend_url, namespace):
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("the grow request never queued")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert grow_id not in queue_ids(backend_url, namespace)
        assert grow_id not in boss._heartbeat.held()
        other.release(blocker)
        await asyncio.sleep(0.2)
        assert lease_mib(backend_url, namespace, lease.id) == 12 * 1024
    finally:
        await boss.close()
        other.close()


def test_grow_watch_is_forgotten_after_timeout(pair: tuple[GPUBoss, GPUBoss]) -> None:
    boss, other = pair
    lease = boss.acquire(vram_gb=16, ttl=1)
    other.acquire(vram_gb=8)
    with pytest.raises(LeaseTimeout):
        lease.resize(20, timeout=0.3)
    assert boss._heartbeat.held() == [lease.id]


def test_grow_watch_is_forgotten_after_a_grant(pair: tuple[GPUBoss, GPUBoss]) -> None:
    boss, other = pair
    lease = boss.acquire(vram_gb=16, ttl=1)
    blocker = other.acquire(vram_gb=8)
    timer = threading.Timer(0.3, other.release, args=(blocker,))
    timer.start()
    try:
        lease.resize(20, timeout=10)
    finally:
        timer.join()
    assert lease.vram_mib == 20 * 1024
    assert boss._heartbeat.held() == [lease.id]


# -- 6: releasing another boss's lease object


def test_release_of_a_foreign_lease_leaves_it_alone(
    pair: tuple[GPUBoss, GPUBoss], backend_url: str, namespace: str
) -> None:
    holder, stranger = pair
    lease = holder.acquire(vram_gb=4)
    with pytest.raises(InvalidRequest):
        stranger.release(lease)
    assert lease.state is LeaseState.GRANTED
    assert lease.active
    assert lease in holder.held()
    assert lease.id in leases_in_redis(backend_url, namespace)


# -- 7: revoke() with bad input


def test_revoke_validates_its_arguments(boss: GPUBoss) -> None:
    lease = boss.acquire(vram_gb=1)
    for bad in (None, ["x"], 5, ""):
        with pytest.raises(InvalidRequest) as err:
            boss.revoke(bad)  # type: ignore[arg-type]
        assert err.value.field == "lease_id"
    with pytest.raises(InvalidRequest) as err:
        boss.revoke(lease.id, reason=None)  # type: ignore[arg-type]
    assert err.value.field == "reason"
    assert lease.active


async def test_async_revoke_validates_its_arguments(aboss: AsyncGPUBoss) -> None:
    with pytest.raises(InvalidRequest) as err:
        await aboss.revoke(None)  # type: ignore[arg-type]
    assert err.value.field == "lease_id"
    with pytest.raises(InvalidRequest) as err:
        await aboss.revoke("abc", reason=3)  # type: ignore[arg-type]
    assert err.value.field == "reason"


# -- 8 and 9: the Lease objects after close(), and a lost lease in held()


def test_sync_close_marks_leases_released(backend_url: str, namespace: str) -> None:
    boss = GPUBoss(backend_url, namespace=namespace, gpus=ONE_GPU, service="test")
    lease = boss.acquire(vram_gb=2)
    boss.close()
    assert lease.state is LeaseState.RELEASED
    assert not lease.active
    assert boss.held() == []
    assert leases_in_redis(backend_url, namespace) == set()


def test_lost_lease_leaves_held_without_on_lost(pair: tuple[GPUBoss, GPUBoss]) -> None:
    boss, admin = pair
    lease = boss.acquire(vram_gb=2, ttl=0.6)
    assert admin.revoke(lease.id, "test")
    boss._heartbeat.tick()  # (the round the thread runs every ttl/3)
    until(lambda: lease.state is LeaseState.LOST, "the lease is seen lost")
    assert boss.held() == []
