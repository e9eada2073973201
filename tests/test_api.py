"""The lease semantics of issue 2, through the public API, on a real redis-server and on fakeredis."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import time
from typing import Any

import pytest
from gpuboss import (
    AsyncGPUBoss,
    Device,
    EventLoopError,
    GPUBoss,
    InsufficientCapacity,
    InvalidRequest,
    Keys,
    Lease,
    LeaseLost,
    LeaseTimeout,
    redis_io,
)
from gpuboss.lease import LeaseState

from tests.conftest import (
    GPUS,
    namespace_keys,
    queue_ids,
    raw_client,
    snapshot,
    timed_out_and_cancelled_waiters_leave_nothing,
)

# The tests of backend_url (and the fixtures built on it) run on a valkey-server too: tests/conftest.py.
pytestmark = pytest.mark.valkey

GB = 1024


def used(url: str, ns: str) -> dict[str, int]:
    return {k: int(v) for k, v in raw_client(url).hgetall(Keys(ns).used).items()}


def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


class Waiter(threading.Thread):
    """Acquire in a thread and keep the result (or the error)."""

    def __init__(self, boss: GPUBoss, *args: Any, **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self.boss, self.args, self.kwargs = boss, args, kwargs
        self.lease: Lease | None = None
        self.error: BaseException | None = None
        self.granted_at = 0.0

    def run(self) -> None:
        try:
            self.lease = self.boss.acquire(*self.args, **self.kwargs)
            self.granted_at = time.monotonic()
        except BaseException as err:  # noqa: BLE001 - kept for the test to assert on
            self.error = err


def start_waiter(boss: GPUBoss, url: str, ns: str, *args: Any, **kwargs: Any) -> Waiter:
    before = len(queue_ids(url, ns))
    w = Waiter(boss, *args, **kwargs)
    w.start()
    wait_until(lambda: len(queue_ids(url, ns)) > before or w.lease is not None or w.error is not None)
    return w


# ------------------------------------------------------------------ grants, placement, capacity


def test_lease_block_yields_device_string_and_releases(boss: GPUBoss, backend_url: str, namespace: str) -> None:
    with boss.lease(vram_gb=8) as device:
        assert isinstance(device, Device) and isinstance(device, str)
        assert device in ("cuda:0", "cuda:1")
        assert device.lease.vram_mib == 8 * GB
        assert used(backend_url, namespace)[device.lease.gpu] == 8 * GB
        assert device.lease.state is LeaseState.GRANTED
    assert used(backend_url, namespace) == {"gpu0": 0, "gpu1": 0}
    assert device.lease.state is LeaseState.RELEASED


def test_vram_is_integer_mib_rounded_up(boss: GPUBoss) -> None:
    lease = boss.acquire(0.001)
    assert lease.vram_mib == 2  # ceil(0.001 * 1024)
    boss.release(lease)
    lease = boss.acquire(1.5)
    assert lease.vram_mib == 1536
    boss.release(lease)


def test_best_fit_and_pins(boss: GPUBoss) -> None:
    # gpu1 leases 15 GB, gpu0 24 GB: 10 GB fits best on gpu1 (5 left) rather than gpu0 (14 left).
    a = boss.acquire(10)
    assert (a.gpu, a.device) == ("gpu1", "cuda:1")
    # 6 GB no longer fits on gpu1 (5 left): it goes to gpu0.
    b = boss.acquire(6)
    assert b.gpu == "gpu0"
    # 4 GB fits on both; best fit is gpu1 (1 left) over gpu0 (14 left).
    c = boss.acquire(4)
    assert c.gpu == "gpu1"
    for pin in ("gpu0", "cuda:0", 0):
        d = boss.acquire(1, device=pin)
        assert d.gpu == "gpu0", pin
        boss.release(d)
    for lease in (a, b, c):
        boss.release(lease)


def test_reserve_is_never_leased(boss: GPUBoss) -> None:
    # gpu1 has 16 GB with 1 GB reserve: 15 GB is the most it leases out.
    lease = boss.acquire(15, device="gpu1")
    with pytest.raises(LeaseTimeout):
        boss.acquire(0.01, device="gpu1", timeout=0)
    boss.release(lease)
    with pytest.raises(InsufficientCapacity) as err:
        boss.acquire(15.5, device="gpu1")
    assert err.value.largest_mib == 15 * GB


def test_request_that_never_fits_fails_at_once(boss: GPUBoss, backend_url: str, namespace: str) -> None:
    started = time.monotonic()
    with pytest.raises(InsufficientCapacity, match="can never be granted"):
        boss.acquire(25, timeout=None)
    assert time.monotonic() - started < 2
    assert queue_ids(backend_url, namespace) == []


def test_never_over_commit_queues_when_full(boss: GPUBoss, backend_url: str, namespace: str) -> None:
    big = boss.acquire(24)
    small = boss.acquire(15)
    assert {big.gpu, small.gpu} == {"gpu0", "gpu1"}
    with pytest.raises(LeaseTimeout):
        boss.acquire(1, timeout=0.2)
    assert used(backend_url, namespace) == {"gpu0": 24 * GB, "gpu1": 15 * GB}
    assert queue_ids(backend_url, namespace) == []
    boss.release(big)
    boss.release(small)


def test_timeout_zero_tries_once_without_queueing(boss: GPUBoss, backend_url: str, namespace: str) -> None:
    held = boss.acquire(24, device="gpu0")
    started = time.monotonic()
    with pytest.raises(LeaseTimeout, match="timeout=0"):
        boss.acquire(1, device="gpu0", timeout=0)
    assert time.monotonic() - started < 1
    assert queue_ids(backend_url, namespace) == []
    boss.release(held)


# ------------------------------------------------------------------ queue order and handoff


def test_waiter_is_handed_capacity_by_the_release(boss: GPUBoss, backend_url: str, namespace: str) -> None:
    held = boss.acquire(24, device="gpu0")
    w = start_waiter(boss, backend_url, namespace, 20, device="gpu0", timeout=10)
    assert w.lease is None
    # (a wait of its own: queued and handed over within one Redis millisecond, `waited` is 0 by that clock)
    time.sleep(0.02)
    released_at = time.monotonic()
    boss.release(held)
    w.join(5)
    assert w.error is None and w.lease is not None
    assert w.lease.gpu == "gpu0"
    assert w.granted_at - released_at < 1.0
    assert w.lease.waited >= 0.015  # the Redis clock saw the wait (ms resolution)
    boss.release(w.lease)


def test_priority_then_fifo_order(boss: GPUBoss, backend_url: str, namespace: str) -> None:
    held = boss.acquire(24, device="gpu0")
    order: list[str] = []
    waiters = []
    for name, prio in [("low1", "low"), ("n1", "normal"), ("high1", "high"), ("n2", "normal"), ("high2", "high")]:
        w = start_waiter(boss, backend_url, namespace, 24, priority=prio, device="gpu0", timeout=20)
        waiters.append((name, w))
    tickets = raw_client(backend_url).hgetall(Keys(namespace).tickets)
    queued_prios = [json.loads(tickets[i])["priority"] for i in queue_ids(backend_url, namespace)]
    assert queued_prios == ["high", "high", "normal", "normal", "low"]
    boss.release(held)
    remaining = dict(waiters)
    while remaining:
        wait_until(lambda: any(w.lease is not None for w in remaining.values()))
        name = next(n for n, w in remaining.items() if w.lease is not None)
        # exactly one holder at a time: the GPU is 24 GB and each asks for all of it
        assert sum(w.lease is not None for w in remaining.values()) == 1
        order.append(name)
        lease = remaining.pop(name).lease
        assert lease is not None
        boss.release(lease)
    assert order == ["high1", "high2", "n1", "n2", "low1"]


def test_newcomer_never_jumps_a_waiting_request_of_same_priority(
    boss: GPUBoss, backend_url: str, namespace: str
) -> None:
    held = boss.acquire(20, device="gpu0")  # 4 GB left on gpu0
    head = start_waiter(boss, backend_url, namespace, 10, device="gpu0", timeout=10)
    # 2 GB would fit on gpu0 right now, but a normal request is waiting ahead of it: strict order.
    with pytest.raises(LeaseTimeout):
        boss.acquire(2, device="gpu0", timeout=0)
    follower = start_waiter(boss, backend_url, namespace, 2, device="gpu0", timeout=10)
    assert follower.lease is None
    assert len(queue_ids(backend_url, namespace)) == 2
    # A higher priority newcomer that fits is served before the waiting normal ones.
    high = boss.acquire(2, device="gpu0", priority="high", timeout=0)
    boss.release(high)
    boss.release(held)
    head.join(5)
    follower.join(5)
    assert head.lease is not None and follower.lease is not None
    assert head.lease.token < follower.lease.token
    boss.release(head.lease)
    boss.release(follower.lease)


def test_strict_head_blocks_followers_that_would_fit(boss: GPUBoss, backend_url: str, namespace: str) -> None:
    held = boss.acquire(20, device="gpu0")
    head = start_waiter(boss, backend_url, namespace, 24, device="gpu0", timeout=10)
    follower = start_waiter(boss, backend_url, namespace, 1, device="gpu0", timeout=10)
    time.sleep(0.2)
    assert follower.lease is None  # 4 GB are free, but the head waits for 24
    boss.release(held)
    head.join(5)
    assert head.lease is not None
    boss.release(head.lease)
    follower.join(5)
    assert follower.lease is not None
    boss.release(follower.lease)


def test_lower_priority_head_does_not_block_a_higher_newcomer(boss: GPUBoss, backend_url: str, namespace: str) -> None:
    held = boss.acquire(20, device="gpu0")
    low = start_waiter(boss, backend_url, namespace, 24, device="gpu0", priority="low", timeout=10)
    high = boss.acquire(4, device="gpu0", priority="high", timeout=0)
    assert high.gpu == "gpu0"
    for lease in (high, held):
        boss.release(lease)
    low.join(5)
    assert low.lease is not None
    boss.release(low.lease)


# ------------------------------------------------------------------ timeouts


def test_timeout_leaves_no_queue_entry(boss: GPUBoss, backend_url: str, namespace: str) -> None:
    held = boss.acquire(24, device="gpu0")
    started = time.monotonic()
    with pytest.raises(LeaseTimeout, match=r"within 0\.3 s"):
        boss.acquire(10, device="gpu0", timeout=0.3)
    assert 0.25 < time.monotonic() - started < 2
    keys = Keys(namespace)
    client = raw_client(backend_url)
    assert client.zcard(keys.queue) == 0 and client.hlen(keys.tickets) == 0 and client.zcard(keys.queue_exp) == 0
    assert not [k for k in namespace_keys(client, namespace) if ":wake:" in k]
    boss.release(held)


def test_grant_that_races_the_timeout_is_released(
    boss: GPUBoss, backend_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The grant lands in the wake list but the waiter's wait ends first: the grant must not leak."""
    held = boss.acquire(24, device="gpu0")
    real_perform = boss._perform

    def perform(op: Any) -> Any:
        from gpuboss.core import Pop

        if isinstance(op, Pop):
            boss.release(held)  # the capacity is granted to us now, pushed to our wake list...
            time.sleep(op.timeout)
            return None  # ...but the wait "times out" before taking it
        return real_perform(op)

    monkeypatch.setattr(boss, "_perform", perform)
    with pytest.raises(LeaseTimeout):
        boss.acquire(20, device="gpu0", timeout=0.2)
    client = raw_client(backend_url)
    assert used(backend_url, namespace)["gpu0"] == 0
    assert client.hlen(Keys(namespace).leases) == 0
    assert namespace_keys(client, namespace) <= Keys(namespace).fixed()


# ------------------------------------------------------------------ heartbeats, fencing, time, inspection


def test_heartbeat_renews_a_short_lease(boss: GPUBoss, backend_url: str, namespace: str) -> None:
    lease = boss.acquire(4, ttl=0.6)
    first = lease.expires_at
    time.sleep(1.5)  # longer than the TTL: only the heartbeat keeps it
    assert not lease.lost
    assert lease.expires_at > first
    assert json.loads(raw_client(backend_url).hget(Keys(namespace).leases, lease.id))["expires_at"] / 1000 > first
    boss.release(lease)


def test_lost_lease_is_reported_and_raises_at_block_end(boss: GPUBoss, backend_url: str, namespace: str) -> None:
    other = GPUBoss(backend_url, namespace=namespace, gpus=GPUS, service="admin")
    lost: list[Lease] = []
    lease = boss.acquire(4, ttl=0.6, on_lost=lost.append)
    with pytest.raises(InvalidRequest, match="only its holder"):
        other.release(lease.id)  # another boss cannot release it: it lacks the holder's secret
    assert lease.active
    assert other.revoke(lease.id, reason="test")  # the admin path
    wait_until(lambda: bool(lost), 3)
    assert lost[0] is lease and lease.lost and lease.state is LeaseState.LOST
    with pytest.raises(LeaseLost):
        lease.raise_if_lost()
    with pytest.raises(LeaseLost), boss.lease(vram_gb=4, ttl=0.6) as device:
        other.revoke(device.lease.id)
        wait_until(lambda: device.lease.lost, 3)
    other.close()


def test_expired_lease_goes_to_waiters(boss: GPUBoss, backend_url: str, namespace: str) -> None:
    """A holder that stops heartbeating (dead) loses its lease after its TTL; the queue gets it."""
    dead = GPUBoss(backend_url, namespace=namespace, gpus=GPUS, service="dead")
    lease = dead.acquire(24, device="gpu0", ttl=0.5)
    dead._heartbeat.close(release=False)  # the process "dies": no heartbeat, no release
    started = time.monotonic()
    mine = boss.acquire(24, device="gpu0", ttl=5, timeout=5)
    waited = time.monotonic() - started
    assert waited < 0.5 + 1.0
    assert mine.token > lease.token
    boss.release(mine)


def test_fencing_tokens_strictly_increase(boss: GPUBoss) -> None:
    tokens = []
    for _ in range(5):
        lease = boss.acquire(1)
        tokens.append(lease.token)
        boss.release(lease)
    assert tokens == sorted(tokens) and len(set(tokens)) == 5


def test_fencing_token_is_the_counter_plus_one_or_redis_time(boss: GPUBoss, backend_url: str, namespace: str) -> None:
    """A token is max(counter + 1, Redis ms x 10 + 1): the counter when it is ahead of the clock (several grants
    in one ms), the clock when it is behind, missing, or not a number (written by hand: started again)."""
    client, keys = raw_client(backend_url), Keys(namespace)

    def clock_token() -> int:
        seconds, micros = client.time()
        return (int(seconds) * 1000 + int(micros) // 1000) * 10  # Redis ms x 10

    ahead = clock_token() + 10**9
    client.set(keys.token, ahead)
    lease = boss.acquire(1)
    assert lease.token == ahead + 1 and int(client.get(keys.token)) == ahead + 1
    boss.release(lease)
    for stored in (None, "1", "not-a-number"):
        if stored is None:
            client.delete(keys.token)
        else:
            client.set(keys.token, stored)
        before = clock_token()
        lease = boss.acquire(1)
        assert before < lease.token <= clock_token() + 1
        assert int(client.get(keys.token)) == lease.token
        boss.release(lease)


def test_times_come_from_redis(boss: GPUBoss, backend_url: str) -> None:
    seconds, micros = raw_client(backend_url).time()
    lease = boss.acquire(1, ttl=7)
    assert abs(lease.acquired_at - (seconds + micros / 1e6)) < 2
    assert lease.expires_at - lease.acquired_at == pytest.approx(7, abs=0.01)
    boss.release(lease)


def test_inspection_record_and_no_key_leak(boss: GPUBoss, backend_url: str, namespace: str) -> None:
    client = raw_client(backend_url)
    keys = Keys(namespace)
    lease = boss.acquire(3, priority="high", ttl=10)
    record = json.loads(client.hgetall(keys.leases)[lease.id])
    for field in (
        "gpu",
        "device",
        "vram_mib",
        "priority",
        "service",
        "host",
        "pid",
        "acquired_at",
        "expires_at",
        "token",
    ):
        assert field in record, field
    assert record["service"] == "test" and record["vram_mib"] == 3 * GB and record["priority"] == "high"
    assert client.hget(keys.used, lease.gpu) == str(3 * GB)
    boss.release(lease)
    assert boss.release(lease) is False  # twice is harmless
    assert namespace_keys(client, namespace) <= keys.fixed()
    assert keys.gpus in namespace_keys(client, namespace)


def test_conflicting_gpu_declaration_is_an_error(boss: GPUBoss, backend_url: str, namespace: str) -> None:
    from gpuboss import ConfigError

    boss.release(boss.acquire(1))  # registers gpu0 as 24 GB
    other = GPUBoss(backend_url, namespace=namespace, gpus=[{"id": "gpu0", "vram_gb": 48}])
    with pytest.raises(ConfigError, match="already registers it"):
        other.acquire(1)
    assert json.loads(raw_client(backend_url).hget(Keys(namespace).gpus, "gpu0"))["capacity_mib"] == 24 * GB
    other.close()


def test_close_releases_held_leases(backend_url: str, namespace: str) -> None:
    b = GPUBoss(backend_url, namespace=namespace, gpus=GPUS)
    b.acquire(5)
    b.acquire(6)
    assert sum(used(backend_url, namespace).values()) == 11 * GB
    b.close()
    assert sum(used(backend_url, namespace).values()) == 0


def test_keyboard_interrupt_in_block_releases(boss: GPUBoss, backend_url: str, namespace: str) -> None:
    with pytest.raises(KeyboardInterrupt), boss.lease(vram_gb=2):
        raise KeyboardInterrupt
    assert sum(used(backend_url, namespace).values()) == 0


# ------------------------------------------------------------------ async


async def test_async_lease_and_handoff(aboss: AsyncGPUBoss, backend_url: str, namespace: str) -> None:
    async with aboss.lease(vram_gb=24, priority="high") as device:
        assert device == "cuda:0" and device.lease.priority == "high"
        waiter = asyncio.create_task(aboss.acquire(24, device="gpu0", timeout=10))
        await asyncio.sleep(0.2)
        assert not waiter.done()
        assert len(queue_ids(backend_url, namespace)) == 1
    lease = await asyncio.wait_for(waiter, 5)
    assert lease.gpu == "gpu0"
    assert await aboss.release(lease) is True
    assert await aboss.release(lease.id) is False


async def test_async_timeout_and_cancel_leave_nothing(aboss: AsyncGPUBoss, backend_url: str, namespace: str) -> None:
    await timed_out_and_cancelled_waiters_leave_nothing(aboss, backend_url, namespace)


async def test_async_cancel_inside_block_releases(aboss: AsyncGPUBoss, backend_url: str, namespace: str) -> None:
    entered = asyncio.Event()

    async def work() -> None:
        async with aboss.lease(vram_gb=8):
            entered.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(work())
    await entered.wait()
    assert sum(used(backend_url, namespace).values()) == 8 * GB
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sum(used(backend_url, namespace).values()) == 0


async def test_async_on_lost_coroutine_runs_on_the_loop(aboss: AsyncGPUBoss, backend_url: str, namespace: str) -> None:
    seen: list[str] = []
    loop = asyncio.get_running_loop()

    async def on_lost(lease: Lease) -> None:
        assert asyncio.get_running_loop() is loop
        seen.append(lease.id)

    lease = await aboss.acquire(2, ttl=0.6, on_lost=on_lost)
    other = GPUBoss(backend_url, namespace=namespace, gpus=GPUS)
    other.revoke(lease.id)  # the admin path: another boss cannot release it
    for _ in range(300):
        if seen:
            break
        await asyncio.sleep(0.01)
    assert seen == [lease.id] and lease.lost
    other.close()


async def test_async_heartbeat_survives_a_blocked_loop(aboss: AsyncGPUBoss, backend_url: str, namespace: str) -> None:
    async with aboss.lease(vram_gb=24, device="gpu0", ttl=1) as device:
        time.sleep(3)  # synchronous GPU work blocking the event loop
        assert not device.lease.lost
        record = raw_client(backend_url).hget(Keys(namespace).leases, device.lease.id)
        assert record is not None


def test_waiting_request_heartbeats_its_queue_entry(boss: GPUBoss, backend_url: str, namespace: str) -> None:
    held = boss.acquire(24, device="gpu0")
    w = start_waiter(boss, backend_url, namespace, 24, device="gpu0", ttl=0.4, timeout=10)
    time.sleep(1.2)  # three TTLs: only the heartbeat keeps the queue entry
    assert len(queue_ids(backend_url, namespace)) == 1 and w.lease is None
    boss.release(held)
    w.join(5)
    assert w.lease is not None
    boss.release(w.lease)


@pytest.mark.parametrize("midway", ["before the call is sent", "awaiting the reply"])
async def test_cancelled_release_still_lands(
    aboss: AsyncGPUBoss,
    backend_url: str,
    backend_kind: str,
    namespace: str,
    midway: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A release whose caller is cancelled midway still lands (the heartbeat thread finishes it)."""
    if midway == "awaiting the reply" and backend_kind == "fake":
        pytest.skip("fakeredis answers without a reply to wait for: nothing is in flight")
    lease = await aboss.acquire(8)
    if midway == "before the call is sent":  # (a slow path to Redis: the call has not left when the cancel comes)
        original = aboss._eval

        async def slow(call: Any) -> Any:
            await asyncio.sleep(0.2)
            return await original(call)

        monkeypatch.setattr(aboss, "_eval", slow)
    task = asyncio.create_task(aboss.release(lease))
    await asyncio.sleep(0)  # the release has started...
    task.cancel()  # ...and its caller is cancelled midway
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(200):
        if sum(used(backend_url, namespace).values()) == 0:
            break
        await asyncio.sleep(0.01)
    assert sum(used(backend_url, namespace).values()) == 0
    assert raw_client(backend_url).hlen(Keys(namespace).leases) == 0


def test_async_boss_serves_one_event_loop_after_another(real_url: str, namespace: str) -> None:
    """One AsyncGPUBoss used by one asyncio.run after another (as pytest-asyncio's loop per test does): each
    loop gets its own connections, closed as that loop shuts down (never left to the garbage collector, whose
    ResourceWarning is an error here); a lease taken in one loop is released in the next."""
    control = raw_client(real_url)
    boss = AsyncGPUBoss(real_url, namespace=namespace, gpus=GPUS, service="loops")

    def live_ids() -> set[int]:
        return {int(c["id"]) for c in control.client_list()}

    def outlived(ids: set[int]) -> set[int]:
        """Those of ``ids`` still connected after 2 s (a closed socket's EOF may reach Redis after our next call)."""
        for _ in range(200):
            if not ids & live_ids():
                break
            time.sleep(0.01)
        return ids & live_ids()

    async def connection_ids() -> set[int]:
        kept = await redis_io.direct_command_async(boss._redis, ("CLIENT", "ID"))  # the kept connection
        ids = {int(kept), int(await boss._redis.client_id())}  # and one from the pool
        assert len(ids) == 2 and ids <= live_ids()
        return ids

    async def first() -> tuple[Lease, set[int]]:
        async with boss.lease(vram_gb=8, device="gpu0") as device:
            assert device == "cuda:0"
        return await boss.acquire(4, device="gpu0"), await connection_ids()

    held, first_ids = asyncio.run(first())
    assert not outlived(first_ids), "the first loop's connections outlived it"

    async def second() -> tuple[bool, set[int]]:
        released = await boss.release(held)
        async with boss.lease(vram_gb=24, device="gpu0", timeout=0) as device:  # all of it: the first loop's is gone
            assert device == "cuda:0"
        return released, await connection_ids()

    released, second_ids = asyncio.run(second())
    assert released is True and not second_ids & first_ids
    assert not outlived(second_ids)
    asyncio.run(boss.close())
    gc.collect()  # (an abandoned connection would warn now)
    assert control.hlen(Keys(namespace).leases) == 0 and set(used(real_url, namespace).values()) == {0}


def test_async_boss_refuses_a_second_loop_running_at_once(real_url: str, namespace: str) -> None:
    """Two event loops running at once (two threads) cannot share a boss: the second gets EventLoopError, before
    anything is sent to Redis; the first goes on."""
    control = raw_client(real_url)
    boss = AsyncGPUBoss(real_url, namespace=namespace, gpus=GPUS, service="two-loops")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="other-loop", daemon=True)
    thread.start()
    try:
        lease = asyncio.run_coroutine_threadsafe(boss.acquire(4), loop).result(10)
        before = snapshot(control, namespace)
        for call in (lambda: boss.acquire(4), lambda: boss.release(lease), boss.gpus, boss.register_gpus):
            with pytest.raises(EventLoopError, match="create one AsyncGPUBoss per event loop"):
                asyncio.run(call())
        assert snapshot(control, namespace) == before
        assert asyncio.run_coroutine_threadsafe(boss.release(lease), loop).result(10) is True
        asyncio.run_coroutine_threadsafe(boss.close(), loop).result(10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    assert set(used(real_url, namespace).values()) == {0}


@pytest.mark.parametrize("front", ["sync", "async"])
def test_interpreter_exit_releases(real_url: str, namespace: str, front: str) -> None:
    import subprocess
    import sys

    program = f"""
import asyncio, sys
from gpuboss import GPUBoss, AsyncGPUBoss
gpus = [{{"id": "gpu0", "vram_gb": 24, "index": 0}}]
if {front!r} == "sync":
    boss = GPUBoss({real_url!r}, namespace={namespace!r}, gpus=gpus)
    boss.acquire(10, ttl=600)
else:
    async def main():
        boss = AsyncGPUBoss({real_url!r}, namespace={namespace!r}, gpus=gpus)
        await boss.acquire(10, ttl=600)
    asyncio.run(main())
print("held", flush=True)
"""
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "held" in result.stdout, result.stderr
    assert used(real_url, namespace) == {"gpu0": 0}  # released at exit, not left to its 600 s TTL
    assert raw_client(real_url).hlen(Keys(namespace).leases) == 0
