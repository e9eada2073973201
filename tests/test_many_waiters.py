"""One boss with more requests waiting at once than redis-py's connection pool holds by default (100): each
waiter blocks on its own connection (BLPOP of its grant), so a service with 150 requests in line (a web server
under load, a thread pool) must get 150 connections, not RedisUnavailable ("Too many connections") for the
51st and after. Every waiter is granted in turn when the GPU frees up."""

from __future__ import annotations

import asyncio
import threading
import time

from gpuboss import AsyncGPUBoss, GPUBoss, GPUBossError, Lease

from tests.conftest import GPUS, queue_ids

#: More than redis-py's default max_connections (100) per pool.
WAITERS = 150


def wait_for_queue(url: str, namespace: str, n: int) -> None:
    deadline = time.monotonic() + 30
    while len(queue_ids(url, namespace)) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(queue_ids(url, namespace)) == n


def test_a_sync_boss_serves_more_waiting_threads_than_a_default_pool(real_url: str, namespace: str) -> None:
    granted: list[str] = []
    errors: list[BaseException] = []
    with GPUBoss(real_url, namespace=namespace, gpus=GPUS, service="many") as boss:
        held = boss.acquire(24, device="gpu0")

        def wait() -> None:
            try:
                lease = boss.acquire(24, device="gpu0", timeout=60)
                granted.append(lease.id)
                boss.release(lease)
            except GPUBossError as err:  # (RedisUnavailable, say: reported below, with the others)
                errors.append(err)

        threads = [threading.Thread(target=wait) for _ in range(WAITERS)]
        for t in threads:
            t.start()
        wait_for_queue(real_url, namespace, WAITERS)
        boss.release(held)
        for t in threads:
            t.join(timeout=60)
    assert errors == []
    assert len(set(granted)) == WAITERS
    assert queue_ids(real_url, namespace) == []


async def test_an_async_boss_serves_more_waiting_tasks_than_a_default_pool(real_url: str, namespace: str) -> None:
    async with AsyncGPUBoss(real_url, namespace=namespace, gpus=GPUS, service="many") as boss:
        held = await boss.acquire(24, device="gpu0")

        async def wait() -> str:
            lease: Lease = await boss.acquire(24, device="gpu0", timeout=60)
            await boss.release(lease)
            return lease.id

        tasks = [asyncio.create_task(wait()) for _ in range(WAITERS)]
        await asyncio.to_thread(wait_for_queue, real_url, namespace, WAITERS)
        await boss.release(held)
        granted = await asyncio.wait_for(asyncio.gather(*tasks), 60)
    assert len(set(granted)) == WAITERS
    assert queue_ids(real_url, namespace) == []
