"""AsyncGPUBoss on uvloop, the event loop uvicorn (and so many inference servers) runs when it is installed:
leases, a handoff to a waiting task, a cancelled waiter, the asyncio subscription, and the reply deadlines
(gpuboss/deadlines.py), which reach the loop only through its public API. Each test runs its own uvloop loop
(``uvloop.run``), not pytest-asyncio's."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from gpuboss import AsyncGPUBoss, events, redis_io
from gpuboss.deadlines import deadlines

from tests.conftest import GPUS, queue_ids, timed_out_and_cancelled_waiters_leave_nothing

uvloop = pytest.importorskip("uvloop")

GB = 1024


def test_leases_and_a_handoff_on_uvloop(real_url: str, namespace: str) -> None:
    async def main() -> None:
        assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        async with AsyncGPUBoss(real_url, namespace=namespace, gpus=GPUS, service="uv") as boss:
            async with boss.lease(vram_gb=8, device="gpu0") as device:
                assert device == "cuda:0"
            held = await boss.acquire(24, device="gpu0")
            waiter = asyncio.create_task(boss.acquire(24, device="gpu0", timeout=10))
            for _ in range(100):
                if queue_ids(real_url, namespace):
                    break
                await asyncio.sleep(0.02)
            assert len(queue_ids(real_url, namespace)) == 1
            assert await boss.release(held)
            granted = await asyncio.wait_for(waiter, 10)
            assert granted.vram_mib == 24 * GB and granted.id != held.id
            assert await boss.release(granted)
            assert deadlines().waits == set()

    uvloop.run(main())


def test_a_timed_out_and_a_cancelled_waiter_leave_nothing_on_uvloop(real_url: str, namespace: str) -> None:
    async def main() -> None:
        async with AsyncGPUBoss(real_url, namespace=namespace, gpus=GPUS, service="uv") as boss:
            await timed_out_and_cancelled_waiters_leave_nothing(boss, real_url, namespace)

    uvloop.run(main())


def test_reply_deadlines_on_uvloop() -> None:
    """A silent reply times out at its deadline; a cancel from outside stays a cancel."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(redis_io.RedisTimeoutError, match=r"within 0\.05 s"):
            await redis_io.reply_within(loop.create_future(), 0.05)
        assert 0.04 <= loop.time() - started < 1.0
        task = asyncio.ensure_future(redis_io.reply_within(loop.create_future(), 5.0))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert deadlines().waits == set()

    uvloop.run(main())


def test_the_asyncio_subscription_on_uvloop(real_url: str, namespace: str) -> None:
    async def main() -> None:
        async with AsyncGPUBoss(real_url, namespace=namespace, gpus=GPUS, service="uv") as boss:
            await boss.release(await boss.acquire(2))
            seen = []
            async with events.asubscribe(real_url, namespace, since=timedelta(minutes=1)) as sub:
                async for ev in sub:  # (replayed from the log: the GPUs' registration first)
                    seen.append(ev.type)
                    if ev.type == "released":
                        break
                await boss.release(await boss.acquire(3))
                live = [await sub.get(timeout=5) for _ in range(2)]
            assert [t for t in seen if t != "gpu_registered"] == ["granted", "released"]
            assert [e.type for e in live if e is not None] == ["granted", "released"]
            assert live[0] is not None and live[0].vram_mib == 3 * GB

    uvloop.run(main())
