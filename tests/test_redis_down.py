"""``on_redis_down: error | wait | local`` (docs/scheduling.md, section 7), on a private redis-server that each
test stops (by its PID) and starts again on the same socket.

``error`` raises RedisUnavailable at once instead of retrying for ``connect_timeout``; ``wait`` waits for Redis up
to the request's timeout; ``local`` coordinates this process's leases in an in-process store while Redis is away,
goes back to Redis when it returns, and keeps the leases it granted locally valid there until they are released.
The time bounds are loose on purpose: they tell "at once" from "after the whole connect_timeout", nothing finer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
import redis.asyncio
from gpuboss import AsyncGPUBoss, GPUBoss, Keys, Lease, LeaseTimeout, RedisUnavailable, events, redis_io
from gpuboss.fallback import PROBE_EVERY_S
from gpuboss.redis_io import TRANSIENT
from gpuboss.server import RedisProcess, start_redis

from tests.conftest import raw_client

pytestmark = pytest.mark.slow

ONE_GPU = [{"id": "gpu0", "name": "test", "vram_gb": 24, "index": 0}]
#: The default connect_timeout: before on_redis_down, a request retried this long (twice: it also cancelled).
CONNECT_TIMEOUT = 5.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisProcess]:
    folder = tmp_path / "redis"
    proc = start_redis(folder, socket=folder / "redis.sock")
    yield proc
    proc.stop()


def start_again(server: RedisProcess) -> None:
    """A new, empty server on the same socket; the fixture's object points at it (so teardown stops it)."""
    assert server.socket is not None
    new = start_redis(server.workdir, socket=server.socket)
    server.pid, server.process = new.pid, new.process


def restart_later(server: RedisProcess, delay: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(delay), start_again(server)), daemon=True)
    thread.start()
    return thread


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gpuboss" and r.levelno >= logging.WARNING]


def in_redis(server: RedisProcess, namespace: str, lease: Lease) -> bool:
    client = raw_client(server.url)
    try:
        return bool(client.hexists(Keys(namespace).leases, lease.id))
    finally:
        client.close()


# ---------------------------------------------------------------- error (the default)


def test_error_raises_redis_unavailable_at_once(server: RedisProcess, namespace: str) -> None:
    with GPUBoss(server.url, namespace=namespace, gpus=ONE_GPU, connect_timeout=CONNECT_TIMEOUT) as boss:
        assert boss.config.on_redis_down == "error"
        assert boss.release(boss.acquire(4, timeout=0))
        server.stop()

        started = time.monotonic()
        with pytest.raises(RedisUnavailable, match="is unreachable") as err:
            boss.acquire(4, timeout=60)
        assert time.monotonic() - started < 3.0, "error must not retry for the whole connect_timeout"
        assert f"unix://{server.socket}" in str(err.value)

        started = time.monotonic()  # the outage is known now: one more try, then the error
        with pytest.raises(RedisUnavailable):
            boss.acquire(4, timeout=60)
        assert time.monotonic() - started < 1.0

        start_again(server)  # back: requests reach it again (and register the GPUs it lost)
        lease = boss.acquire(4, timeout=5)
        assert not lease.local and in_redis(server, namespace, lease)
        assert boss.release(lease)


def test_error_message_hides_the_password() -> None:
    boss = GPUBoss("redis://user:s3cret@127.0.0.1:1/0", gpus=ONE_GPU, connect_timeout=CONNECT_TIMEOUT)
    started = time.monotonic()
    with pytest.raises(RedisUnavailable) as err:
        boss.acquire(1)
    assert time.monotonic() - started < 3.0
    assert "s3cret" not in str(err.value) and "redis://user:***@127.0.0.1:1/0" in str(err.value)
    boss.close()


async def test_error_raises_at_once_async(server: RedisProcess, namespace: str) -> None:
    async with AsyncGPUBoss(server.url, namespace=namespace, gpus=ONE_GPU, connect_timeout=CONNECT_TIMEOUT) as boss:
        assert await boss.release(await boss.acquire(4, timeout=0))
        server.stop()
        started = time.monotonic()
        with pytest.raises(RedisUnavailable, match="is unreachable"):
            await boss.acquire(4, timeout=60)
        assert time.monotonic() - started < 3.0
        start_again(server)
        lease = await boss.acquire(4, timeout=5)
        assert in_redis(server, namespace, lease)
        assert await boss.release(lease)


# ---------------------------------------------------------------- wait


def test_wait_gets_its_lease_once_redis_is_back(
    server: RedisProcess, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gpuboss")
    with GPUBoss(server.url, namespace=namespace, gpus=ONE_GPU, on_redis_down="wait") as boss:
        assert boss.release(boss.acquire(4, timeout=0))
        server.stop()
        restarter = restart_later(server, 1.0)
        lease = boss.acquire(4, timeout=None)  # waits for Redis, however long
        restarter.join(10)
        assert server.alive()
        assert not lease.local and in_redis(server, namespace, lease)
        said = warnings_of(caplog)
        assert sum("requests wait for it (on_redis_down: wait)" in m for m in said) == 1, said
        assert any(m.startswith("gpuboss: reaches Redis at") and m.endswith("again") for m in said), said
        assert boss.release(lease)


def test_wait_raises_when_the_request_timeout_runs_out(server: RedisProcess, namespace: str) -> None:
    with GPUBoss(server.url, namespace=namespace, gpus=ONE_GPU, on_redis_down="wait") as boss:
        assert boss.release(boss.acquire(4, timeout=0))
        server.stop()
        started = time.monotonic()
        with pytest.raises(RedisUnavailable, match=r"waited for the request's timeout \(1 s\)") as err:
            boss.acquire(4, timeout=1.0)
        waited = time.monotonic() - started
        assert 0.9 <= waited < 4.0, waited
        assert isinstance(err.value.__cause__, TRANSIENT)  # chained from the last connection error


async def test_wait_async(server: RedisProcess, namespace: str) -> None:
    async with AsyncGPUBoss(server.url, namespace=namespace, gpus=ONE_GPU, on_redis_down="wait") as boss:
        assert await boss.release(await boss.acquire(4, timeout=0))
        server.stop()
        with pytest.raises(RedisUnavailable, match="waited for the request's timeout"):
            await boss.acquire(4, timeout=0.5)
        restarter = restart_later(server, 1.0)
        lease = await boss.acquire(4, timeout=30)
        await asyncio.to_thread(restarter.join, 10)
        assert in_redis(server, namespace, lease)
        assert await boss.release(lease)


# ---------------------------------------------------------------- local


def test_local_coordinates_this_process_then_goes_back_to_redis(
    server: RedisProcess, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gpuboss")
    url = server.url
    with (
        GPUBoss(url, namespace=namespace, gpus=ONE_GPU, on_redis_down="local", service="a") as boss,
        GPUBoss(url, namespace=namespace, gpus=ONE_GPU, on_redis_down="local", service="b") as other,
    ):
        warm = boss.acquire(4, timeout=0)
        assert not warm.local and in_redis(server, namespace, warm)
        assert boss.release(warm)
        server.stop()

        first = boss.acquire(16, ttl=1.0, timeout=5)
        assert first.local
        assert any("WITHIN THIS PROCESS ONLY" in m for m in warnings_of(caplog))
        # 16 + 16 GB do not fit on the 24 GB GPU: neither this boss nor another one of the process over-commits.
        with pytest.raises(LeaseTimeout):
            boss.acquire(16, timeout=0.3)
        with pytest.raises(LeaseTimeout):
            other.acquire(16, timeout=0.3)
        # A waiter is granted when the first lease is released.
        got: list[Lease] = []
        waiter = threading.Thread(target=lambda: got.append(other.acquire(16, ttl=1.0, timeout=10)), daemon=True)
        waiter.start()
        time.sleep(0.3)
        assert not got
        assert boss.release(first)
        waiter.join(10)
        assert got and got[0].local
        second = got[0]

        # Redis is back: new requests go to it; the local lease stays valid in the local store until released.
        start_again(server)
        time.sleep(PROBE_EVERY_S + 0.1)
        back = boss.acquire(4, timeout=5)
        assert not back.local and in_redis(server, namespace, back)
        assert not in_redis(server, namespace, second)
        assert any("reaches Redis at" in m and "lease.local" in m for m in warnings_of(caplog))
        time.sleep(2.5)  # more than two TTLs of the local lease: the heartbeat renews it in the local store
        assert not second.lost and second in other.held()
        assert other.release(second)  # True: it was still held
        assert boss.release(back)


def test_local_counts_the_redis_leases_this_process_holds(server: RedisProcess, namespace: str) -> None:
    """A request waiting on Redis when Redis goes away moves to the local store, where the Redis lease it waits
    behind has a stand-in: it is not granted on VRAM that lease still uses, and is when that lease is released."""
    with GPUBoss(server.url, namespace=namespace, gpus=ONE_GPU, on_redis_down="local") as boss:
        held = boss.acquire(16, timeout=0)
        got: list[Lease] = []
        waiter = threading.Thread(target=lambda: got.append(boss.acquire(16, timeout=20)), daemon=True)
        waiter.start()
        time.sleep(0.3)  # queued on Redis behind `held`
        server.stop()
        time.sleep(2.0)  # the waiter moves to the local store, and still waits there
        assert not got
        with pytest.raises(RedisUnavailable):  # the release reaches Redis later (heartbeat); the stand-in goes now
            boss.release(held)
        waiter.join(10)
        assert got and got[0].local
        assert boss.release(got[0])


async def test_local_async(server: RedisProcess, namespace: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gpuboss")
    async with AsyncGPUBoss(server.url, namespace=namespace, gpus=ONE_GPU, on_redis_down="local") as boss:
        assert await boss.release(await boss.acquire(4, timeout=0))
        server.stop()
        first = await boss.acquire(16, ttl=1.0, timeout=5)
        assert first.local
        assert any("WITHIN THIS PROCESS ONLY" in m for m in warnings_of(caplog))
        with pytest.raises(LeaseTimeout):
            await boss.acquire(16, timeout=0.3)
        start_again(server)
        await asyncio.sleep(PROBE_EVERY_S + 0.1)
        back = await boss.acquire(4, timeout=5)
        assert not back.local and in_redis(server, namespace, back)
        await asyncio.sleep(2.5)
        assert not first.lost and first in boss.held()
        assert await boss.release(first)
        assert await boss.release(back)


# ---------------------------------------------------------------- a Redis that stops answering
# A stopped (SIGSTOP) or partitioned server keeps its socket open and never replies. Every reply is awaited for
# at most connect_timeout (a BLPOP for its own timeout more), so a request raises instead of hanging forever.

FROZEN_TIMEOUT = 0.5
#: Far above what a request takes against a frozen server (about 2 x connect_timeout, plus a BLPOP's timeout):
#: only tells "raised" from "hung", as before the fix, when it never returned.
HANG_S = 30.0


@contextmanager
def frozen(server: RedisProcess) -> Iterator[None]:
    os.kill(server.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.pid, signal.SIGCONT)


def test_a_frozen_redis_raises_instead_of_hanging(server: RedisProcess, namespace: str) -> None:
    with GPUBoss(server.url, namespace=namespace, gpus=ONE_GPU, connect_timeout=FROZEN_TIMEOUT) as boss:
        held = boss.acquire(24, timeout=0)
        waited: list[BaseException] = []

        def wait() -> None:
            try:
                boss.acquire(16, timeout=1)
            except (RedisUnavailable, LeaseTimeout) as err:
                waited.append(err)

        raised: list[BaseException] = []

        def ask() -> None:
            try:
                boss.acquire(4, timeout=1)
            except RedisUnavailable as err:
                raised.append(err)

        asker = threading.Thread(target=ask, daemon=True)  # (a thread: a hang fails the test, not the whole run)
        waiter = threading.Thread(target=wait, daemon=True)
        with frozen(server):
            asker.start()
            asker.join(HANG_S)
            assert not asker.is_alive(), "a request to a frozen Redis must raise, not hang"
        assert len(raised) == 1 and "is unreachable" in str(raised[0])
        waiter.start()
        time.sleep(0.5)  # queued behind `held`, blocked in its BLPOP
        with frozen(server):
            waiter.join(HANG_S)
            assert not waiter.is_alive(), "a waiter blocked on a frozen Redis must give up, not hang"
        assert waited
        assert boss.release(held)  # the server answers again: so does the boss
        assert boss.release(boss.acquire(24, timeout=5))


async def test_a_frozen_redis_raises_instead_of_hanging_async(server: RedisProcess, namespace: str) -> None:
    async with AsyncGPUBoss(server.url, namespace=namespace, gpus=ONE_GPU, connect_timeout=FROZEN_TIMEOUT) as boss:
        held = await boss.acquire(24, timeout=0)
        with frozen(server), pytest.raises(RedisUnavailable, match="is unreachable"):
            await asyncio.wait_for(boss.acquire(4, timeout=1), HANG_S)
        waiter = asyncio.ensure_future(boss.acquire(16, timeout=1))
        await asyncio.sleep(0.5)  # queued behind `held`, blocked in its BLPOP
        with frozen(server):
            done, _ = await asyncio.wait([waiter], timeout=HANG_S)
            assert done, "a waiter blocked on a frozen Redis must give up, not hang"
        assert isinstance(waiter.exception(), (RedisUnavailable, LeaseTimeout))
        assert await boss.release(held)
        assert await boss.release(await boss.acquire(24, timeout=5))


def test_a_blpop_blocks_within_the_socket_timeout_where_its_reply_has_none(
    server: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where redis-py cannot give one reply its own timeout (before redis-py 8; Sentinel and Cluster clients), a
    BLPOP blocks for part of the socket timeout and comes back empty: the socket timeout never cuts it."""
    monkeypatch.setattr(redis_io, "_READ_TIMEOUT_ARG", False)
    client = redis_io.connect_sync(server.url, FROZEN_TIMEOUT, socket_timeout=FROZEN_TIMEOUT)
    try:
        assert redis_io.pop_sync(client, "nothing-here", 30.0, FROZEN_TIMEOUT) is None
        client.rpush("something-here", "grant")
        assert redis_io.pop_sync(client, "something-here", 30.0, FROZEN_TIMEOUT) == "grant"
    finally:
        client.delete("something-here")
        client.close()


async def test_reply_within_times_out_a_silent_reply_and_keeps_a_cancel_a_cancel() -> None:
    """The asyncio deadline on a reply: past it, redis-py's TimeoutError (a transient error, retried); a cancel
    from outside stays a CancelledError (test_api's test_cancelled_release_still_lands shows it end to end); a
    TimeoutError that is not the deadline's passes through unchanged."""
    never = asyncio.get_running_loop().create_future()
    with pytest.raises(redis_io.RedisTimeoutError, match=r"no reply from Redis within 0\.05 s"):
        await redis_io.reply_within(never, 0.05)

    async def answers_at_once() -> str:
        await asyncio.sleep(0)
        return "reply"

    task = asyncio.ensure_future(redis_io.reply_within(answers_at_once(), 5.0))
    await asyncio.sleep(0)  # the reply is on its way...
    task.cancel()  # ...when its caller is cancelled
    with pytest.raises(asyncio.CancelledError):
        await task

    async def own_timeout() -> None:
        raise TimeoutError("the callee's own")

    with pytest.raises(TimeoutError, match="the callee's own"):
        await redis_io.reply_within(own_timeout(), 5.0)


async def test_an_async_subscription_to_a_frozen_redis_raises_waits_and_keeps_a_cancel(
    server: RedisProcess, namespace: str
) -> None:
    """The asyncio subscription bounds each reply as the link does (no socket timeout, whose send tasks could
    swallow a cancel on Python 3.11): subscribing to a frozen server raises RedisUnavailable, a live one that
    freezes gives no event instead of hanging and delivers again when the server answers, and a cancel of a
    subscribe in progress is a cancel."""
    with frozen(server):
        sub = events.asubscribe(server.url, namespace, since=timedelta(minutes=1), connect_timeout=FROZEN_TIMEOUT)
        with pytest.raises(RedisUnavailable, match="is unreachable"):
            await asyncio.wait_for(sub.start(), HANG_S)
        await sub.aclose()
        sub = events.asubscribe(server.url, namespace, connect_timeout=HANG_S)
        task = asyncio.ensure_future(sub.start())
        await asyncio.sleep(0.2)  # waiting for the SUBSCRIBE to be confirmed
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, HANG_S)
        await sub.aclose()
    async with events.asubscribe(server.url, namespace, connect_timeout=FROZEN_TIMEOUT) as live:
        with frozen(server):
            assert await asyncio.wait_for(live.get(timeout=0.5), HANG_S) is None
        async with AsyncGPUBoss(server.url, namespace=namespace, gpus=ONE_GPU) as boss:
            lease = await boss.acquire(4, timeout=0)
            first = await asyncio.wait_for(live.get(timeout=HANG_S), HANG_S)
            second = await asyncio.wait_for(live.get(timeout=HANG_S), HANG_S)
            assert first is not None and second is not None
            assert (first.type, second.type, second.lease) == ("gpu_registered", "granted", lease.id)
            await boss.release(lease)


async def test_an_async_subscription_bounds_each_reply_it_awaits(
    server: RedisProcess, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply that never comes (here TIME's, asked for ``since``) is given up after ``connect_timeout``, and
    the subscription raises RedisUnavailable: its client has no socket timeout to cut the wait."""

    async def never(self: redis.asyncio.Redis) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(redis.asyncio.Redis, "time", never)
    sub = events.asubscribe(server.url, namespace, since=timedelta(minutes=1), connect_timeout=FROZEN_TIMEOUT)
    with pytest.raises(RedisUnavailable, match=r"no reply from Redis within 0\.5 s"):
        await asyncio.wait_for(sub.start(), HANG_S)
    await sub.aclose()
