"""Crash recovery of the lease engine, on a real private redis-server.

A holder or a waiter SIGKILLed (by PID) gives its VRAM back within its TTL, and a holder killed on the same
machine as a waiter at once (the waiter revokes its lease: gpuboss/procs.py); scripts flushed from Redis are
loaded again; a Redis restart is survived by the bosses and reported as a lost lease; a blocked event
loop does not lose a lease; cancelled and interrupted callers leave nothing behind in Redis.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import gpuboss.core
import pytest
import redis
from gpuboss import (
    AsyncGPUBoss,
    GPUBoss,
    InsufficientCapacity,
    InvalidRequest,
    Keys,
    Lease,
    LeaseTimeout,
    redis_io,
)
from gpuboss.config import BossConfig
from gpuboss.events import replay
from gpuboss.redis_io import call_script_sync
from gpuboss.scripts import all_scripts
from gpuboss.server import RedisProcess, start_redis

from tests.conftest import GPUS, ProcessCore, exited_process, namespace_keys, raw_client
from tests.workers import Worker

pytestmark = pytest.mark.slow

GB = 1024
GPU0_MIB = 24 * GB


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> float:
    """Poll until ``predicate()`` is true; the monotonic time it became true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        time.sleep(0.005)
    return time.monotonic()


def queued(client: redis.Redis, keys: Keys) -> list[str]:
    return [str(x) for x in client.zrange(keys.queue, 0, -1)]


def used(client: redis.Redis, keys: Keys) -> dict[str, int]:
    return {str(k): int(v) for k, v in client.hgetall(keys.used).items()}


def assert_idle(client: redis.Redis, keys: Keys) -> None:
    """Nothing leased or queued: only the fixed keys, every GPU at 0 MiB."""
    left = namespace_keys(client, keys.namespace)
    assert left <= set(keys.fixed()), sorted(left - set(keys.fixed()))
    assert set(used(client, keys).values()) <= {0}


def assert_no_trace(client: redis.Redis, keys: Keys, item_id: str) -> None:
    """``item_id`` is neither queued nor leased, and no grant waits for it."""
    assert item_id not in queued(client, keys)
    assert client.hget(keys.tickets, item_id) is None
    assert client.zscore(keys.queue_exp, item_id) is None
    assert client.hget(keys.leases, item_id) is None
    assert client.zscore(keys.lease_exp, item_id) is None


class Waiter(threading.Thread):
    """``boss.acquire(...)`` on a thread; keeps the lease (or the error) and when ``acquire`` returned."""

    def __init__(self, boss: GPUBoss, *args: Any, **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self.boss, self.args, self.kwargs = boss, args, kwargs
        self.lease: Lease | None = None
        self.error: BaseException | None = None
        self.granted_at: float | None = None

    def run(self) -> None:
        try:
            self.lease = self.boss.acquire(*self.args, **self.kwargs)
            self.granted_at = time.monotonic()
        except BaseException as err:  # noqa: BLE001 - kept for the test to assert on
            self.error = err

    def result(self, timeout: float) -> Lease:
        self.join(timeout)
        assert not self.is_alive(), f"acquire() still waiting after {timeout} s"
        assert self.error is None, repr(self.error)
        assert self.lease is not None
        return self.lease


@pytest.fixture
def client(redis_server: RedisProcess) -> Iterator[redis.Redis]:
    c = raw_client(redis_server.url)
    yield c
    c.close()


@pytest.fixture
def bosses(redis_server: RedisProcess, namespace: str) -> Iterator[Callable[[str], GPUBoss]]:
    """Make bosses on the shared server; every one is closed after the test."""
    made: list[GPUBoss] = []

    def make(service: str) -> GPUBoss:
        made.append(GPUBoss(redis_server.url, namespace=namespace, gpus=GPUS, service=service))
        return made[-1]

    yield make
    for b in made:
        b.close()


@pytest.fixture
def workers() -> Iterator[Callable[..., Worker]]:
    """Start worker processes; each is killed by its PID (if still alive) and reaped after the test."""
    started: list[Worker] = []

    def start(*args: Any) -> Worker:
        started.append(Worker(*args))
        return started[-1]

    yield start
    for w in started:
        w.close()


def holding_gpu0(workers: Callable[..., Worker], url: str, namespace: str, ttl: float) -> tuple[Worker, dict[str, Any]]:
    """A worker process that holds the whole gpu0 (a lease of TTL ``ttl``): it, and its lease as it printed it."""
    holder = workers("hold", url, namespace, GPUS, "--vram", "24", "--device", "gpu0", "--ttl", str(ttl))
    holder.expect("READY", timeout=30)
    return holder, json.loads(holder.expect("HELD", timeout=30))


def waiting_for_gpu0(
    workers: Callable[..., Worker], url: str, client: redis.Redis, keys: Keys, ttl: float
) -> tuple[Worker, str]:
    """A worker process that waits for the whole gpu0 (its entry's TTL ``ttl``), once queued: it, and its request id."""
    w = workers("wait", url, keys.namespace, GPUS, "--vram", "24", "--device", "gpu0", "--ttl", str(ttl))
    w.expect("READY", timeout=30)
    w.expect("QUEUING")
    wait_until(lambda: len(queued(client, keys)) == 1, what="W is queued")
    return w, queued(client, keys)[0]


# ---------------------------------------------------------------- SIGKILL


def test_sigkilled_holder_frees_its_vram_within_ttl(
    redis_server: RedisProcess,
    namespace: str,
    client: redis.Redis,
    bosses: Callable[[str], GPUBoss],
    workers: Callable[..., Worker],
) -> None:
    keys = Keys(namespace)
    ttl = 2.0
    holder, held = holding_gpu0(workers, redis_server.url, namespace, ttl=str(ttl))
    assert (held["gpu"], held["vram_mib"], held["pid"]) == ("gpu0", GPU0_MIB, holder.pid)

    waiter_boss = bosses("waiter")
    waiter_boss._core.me = None  # as on another machine: it cannot tell the holder is gone (the next section)
    waiter = Waiter(waiter_boss, 24, device="gpu0", timeout=20, ttl=10)
    waiter.start()
    wait_until(lambda: len(queued(client, keys)) == 1, what="the waiter is queued")
    # While the holder lives, its heartbeat keeps the lease past its TTL: the waiter waits.
    time.sleep(ttl + 0.5)
    assert waiter.is_alive() and waiter.lease is None, "the waiter got the VRAM of a live holder"
    assert client.hexists(keys.leases, held["id"])

    holder.kill()  # SIGKILL by PID: no release, no atexit; only the TTL frees the VRAM
    killed_at = time.monotonic()

    lease = waiter.result(timeout=ttl + 5)
    assert waiter.granted_at is not None
    waited = waiter.granted_at - killed_at
    assert waited <= ttl + 1.0, f"the waiter got the lease {waited:.2f} s after the kill (ttl {ttl} s)"
    assert (lease.gpu, lease.vram_mib) == ("gpu0", GPU0_MIB)
    assert lease.token > held["token"]
    assert_no_trace(client, keys, held["id"])
    assert used(client, keys)["gpu0"] == GPU0_MIB
    assert waiter.boss.release(lease)
    assert_idle(client, keys)


@pytest.mark.parametrize("release", ["right_after_kill", "after_entry_expired"])
def test_sigkilled_head_waiter_does_not_block_the_queue(
    release: str,
    redis_server: RedisProcess,
    namespace: str,
    client: redis.Redis,
    bosses: Callable[[str], GPUBoss],
    workers: Callable[..., Worker],
) -> None:
    keys = Keys(namespace)
    entry_ttl = 2.0
    holder = bosses("holder")
    held = holder.acquire(24, device="gpu0", timeout=0, ttl=30)

    # W queues for the whole gpu0; it is the head.
    w, w_id = waiting_for_gpu0(workers, redis_server.url, client, keys, ttl=entry_ttl)
    assert json.loads(client.hget(keys.tickets, w_id))["pid"] == w.pid

    # X asks for 4 GB: it would fit once the holder releases, but strict order keeps it behind W.
    x_boss = bosses("x")
    x_boss._core.me = None  # as on another machine: it cannot tell that W is gone (see the next section)
    x = Waiter(x_boss, 4, device="gpu0", timeout=20, ttl=10)
    x.start()
    wait_until(lambda: len(queued(client, keys)) == 2, what="X is queued")
    assert queued(client, keys)[0] == w_id

    # W's heartbeat keeps its entry alive past the entry TTL while W lives.
    time.sleep(entry_ttl + 0.5)
    assert queued(client, keys)[0] == w_id, "a live waiter lost its queue entry"

    w.kill()
    killed_at = time.monotonic()
    if release == "after_entry_expired":
        # Nobody renews W's entry now: it is reclaimed within its TTL (by X, which wakes at the expiry).
        gone_at = wait_until(lambda: w_id not in queued(client, keys), timeout=entry_ttl + 1, what="W's entry expired")
        assert gone_at - killed_at <= entry_ttl + 1.0
        assert x.is_alive(), "X was granted while the holder still held all of gpu0"
    released_at = time.monotonic()
    assert holder.release(held)

    lease = x.result(timeout=entry_ttl + 5)
    assert x.granted_at is not None
    after_kill = x.granted_at - killed_at
    assert after_kill <= entry_ttl + 1.0, f"X got its lease {after_kill:.2f} s after W was killed"
    if release == "after_entry_expired":
        # W's entry was already gone: the release hands gpu0 to X at once.
        assert x.granted_at - released_at <= 0.5, f"X waited {x.granted_at - released_at:.2f} s after the release"
    assert (lease.gpu, lease.vram_mib) == ("gpu0", 4 * GB)
    assert_no_trace(client, keys, w_id)  # W's queue entry (and any lease granted to the dead W) is gone
    assert queued(client, keys) == []
    assert set(client.hkeys(keys.leases)) == {lease.id}
    assert used(client, keys)["gpu0"] == 4 * GB
    assert x.boss.release(lease)
    assert set(used(client, keys).values()) == {0}


def test_grant_to_a_dead_waiter_leaves_no_wake_list(
    redis_server: RedisProcess,
    namespace: str,
    client: redis.Redis,
    bosses: Callable[[str], GPUBoss],
    workers: Callable[..., Worker],
) -> None:
    keys = Keys(namespace)
    holder = bosses("holder")
    held = holder.acquire(24, device="gpu0", timeout=0, ttl=30)
    w, w_id = waiting_for_gpu0(workers, redis_server.url, client, keys, ttl=1)
    w.kill()
    assert holder.release(held)  # granted to W (its entry has not expired yet); nobody will take it
    assert client.hexists(keys.leases, w_id)
    time.sleep(1.2)
    holder.collect()  # the dead W's lease expired and is collected
    assert_no_trace(client, keys, w_id)
    assert set(used(client, keys).values()) == {0}
    # keys.py: "every other key exists only while a lease or a waiting request does"
    assert not client.exists(keys.wake(w_id)), f"{keys.wake(w_id)} outlives the lease it granted"
    assert_idle(client, keys)


def test_sigint_while_queued_withdraws_the_request(
    redis_server: RedisProcess,
    namespace: str,
    client: redis.Redis,
    bosses: Callable[[str], GPUBoss],
    workers: Callable[..., Worker],
) -> None:
    """KeyboardInterrupt inside a blocking acquire() takes the request out of the queue at once."""
    keys = Keys(namespace)
    holder = bosses("holder")
    held = holder.acquire(24, device="gpu0", timeout=0, ttl=30)
    w = workers("wait", redis_server.url, namespace, GPUS, "--vram", "8", "--device", "gpu0", "--ttl", "30")
    w.expect("READY", timeout=30)
    w.expect("QUEUING")
    wait_until(lambda: len(queued(client, keys)) == 1, what="W is queued")
    w_id = queued(client, keys)[0]
    w.interrupt()  # SIGINT by PID
    w.expect("INTERRUPTED", timeout=10)
    # Checked before the worker exits (its close() would withdraw it too): acquire() itself withdrew it.
    assert w.proc.poll() is None
    assert_no_trace(client, keys, w_id)
    assert not client.exists(keys.wake(w_id))
    assert w.wait(timeout=10) == 3
    assert holder.release(held)
    assert_idle(client, keys)


@pytest.mark.parametrize("exit_on_sigterm", [False, True], ids=["default", "sys-exit-handler"])
def test_sigterm_releases_only_where_it_becomes_a_normal_exit(
    redis_server: RedisProcess,
    namespace: str,
    client: redis.Redis,
    workers: Callable[..., Worker],
    exit_on_sigterm: bool,
) -> None:
    """docs/concepts.md: Python's default SIGTERM skips atexit (the lease stays until its TTL, as after a
    kill); with SIGTERM turned into sys.exit, the lease is released as the process exits."""
    keys = Keys(namespace)
    extra = ["--exit-on-sigterm"] if exit_on_sigterm else []
    w = workers("hold", redis_server.url, namespace, GPUS, "--vram", "8", "--ttl", "30", *extra)
    w.expect("READY", timeout=30)
    lease = json.loads(w.expect("HELD"))
    w.proc.terminate()  # SIGTERM by PID
    assert w.wait(timeout=10) == (143 if exit_on_sigterm else -15)
    # Read once the process is gone, far inside the lease's 30 s TTL: no expiry can have happened.
    assert bool(client.hexists(keys.leases, lease["id"])) is not exit_on_sigterm


# ---------------------------------------------------------------- a holder gone from this machine


def revoked_events(url: str, namespace: str) -> list[dict[str, Any]]:
    return [dict(e.data) for e in replay(url, namespace) if e.type == "revoked"]


def test_a_waiter_revokes_at_once_the_lease_of_a_holder_killed_on_its_machine(
    redis_server: RedisProcess,
    namespace: str,
    client: redis.Redis,
    bosses: Callable[[str], GPUBoss],
    workers: Callable[..., Worker],
) -> None:
    keys = Keys(namespace)
    holder, held = holding_gpu0(workers, redis_server.url, namespace, ttl=60)

    waiter = Waiter(bosses("waiter"), 24, device="gpu0", timeout=30, ttl=10)
    waiter.start()
    wait_until(lambda: len(queued(client, keys)) == 1, what="the waiter is queued")
    # A live holder is never revoked: the waiter, the head, looks again every REAP_EVERY_S and finds it running.
    time.sleep(3 * gpuboss.core.REAP_EVERY_S)
    assert waiter.is_alive() and waiter.lease is None, "the waiter got the VRAM of a live holder"
    assert client.hexists(keys.leases, held["id"])
    assert revoked_events(redis_server.url, namespace) == []

    holder.kill()  # SIGKILL by PID: its lease would stay for 60 s, past the waiter's timeout
    lease = waiter.result(timeout=20)
    assert (lease.gpu, lease.vram_mib) == ("gpu0", GPU0_MIB)
    assert lease.token > held["token"]
    assert_no_trace(client, keys, held["id"])
    [event] = revoked_events(redis_server.url, namespace)
    assert (event["lease"], event["by"]) == (held["id"], f"waiter@{waiter.boss._core.host}")
    assert event["reason"] == f"holder process gone (pid {holder.pid} on {waiter.boss._core.host})"
    assert waiter.boss.release(lease)
    assert_idle(client, keys)


def test_a_request_with_timeout_0_gets_the_vram_of_a_holder_killed_on_its_machine(
    redis_server: RedisProcess,
    namespace: str,
    client: redis.Redis,
    bosses: Callable[[str], GPUBoss],
    workers: Callable[..., Worker],
) -> None:
    keys = Keys(namespace)
    holder, held = holding_gpu0(workers, redis_server.url, namespace, ttl=60)
    boss = bosses("next")
    with pytest.raises(LeaseTimeout):
        boss.acquire(24, device="gpu0", timeout=0)  # it lives: no room now
    holder.kill()  # (and reaped: no zombie)
    boss._core.reap_due = 0.0  # (the refusal above looked less than REAP_EVERY_S ago)
    lease = boss.acquire(24, device="gpu0", timeout=0)
    assert lease.gpu == "gpu0"
    assert not client.hexists(keys.leases, held["id"])
    assert [e["lease"] for e in revoked_events(redis_server.url, namespace)] == [held["id"]]
    assert boss.release(lease)
    assert_idle(client, keys)


def test_a_stopped_holder_is_not_revoked(
    redis_server: RedisProcess,
    namespace: str,
    client: redis.Redis,
    bosses: Callable[[str], GPUBoss],
    workers: Callable[..., Worker],
) -> None:
    """SIGSTOP leaves the process in place: it is not gone, and only its TTL may take its lease."""
    keys = Keys(namespace)
    holder, held = holding_gpu0(workers, redis_server.url, namespace, ttl=60)
    os.kill(holder.pid, signal.SIGSTOP)
    try:
        with pytest.raises(LeaseTimeout):
            bosses("waiter").acquire(24, device="gpu0", timeout=3 * gpuboss.core.REAP_EVERY_S)
    finally:
        os.kill(holder.pid, signal.SIGCONT)
    assert client.hexists(keys.leases, held["id"])
    assert revoked_events(redis_server.url, namespace) == []


def test_a_waiter_withdraws_at_once_the_request_of_a_waiter_ahead_killed_on_its_machine(
    redis_server: RedisProcess,
    namespace: str,
    client: redis.Redis,
    bosses: Callable[[str], GPUBoss],
    workers: Callable[..., Worker],
) -> None:
    keys = Keys(namespace)
    holder = bosses("holder")
    held = holder.acquire(20, device="gpu0", timeout=0, ttl=60)
    # W waits for the whole gpu0: it is the head, and its entry lives 60 s without renewal.
    w, w_id = waiting_for_gpu0(workers, redis_server.url, client, keys, ttl=60)
    # X asks for 4 GB: they are free, but strict order keeps X behind W.
    x = Waiter(bosses("x"), 4, device="gpu0", timeout=30, ttl=10)
    x.start()
    wait_until(lambda: len(queued(client, keys)) == 2, what="X is queued")
    time.sleep(3 * gpuboss.core.REAP_EVERY_S)
    assert x.is_alive() and queued(client, keys)[0] == w_id, "a live waiter lost its turn"

    w.kill()  # SIGKILL by PID: its entry would hold X back for 60 s, past X's timeout
    lease = x.result(timeout=20)
    assert (lease.gpu, lease.vram_mib) == ("gpu0", 4 * GB)
    assert_no_trace(client, keys, w_id)
    [event] = [e.data for e in replay(redis_server.url, namespace) if e.type == "withdrawn"]
    assert (event["lease"], event["by"]) == (w_id, f"x@{x.boss._core.host}")
    assert event["reason"] == f"holder process gone (pid {w.pid} on {x.boss._core.host})"
    assert x.boss.release(lease) and holder.release(held)
    assert_idle(client, keys)


async def test_an_async_waiter_revokes_the_lease_of_a_holder_killed_on_its_machine(
    redis_server: RedisProcess,
    namespace: str,
    client: redis.Redis,
    workers: Callable[..., Worker],
) -> None:
    keys = Keys(namespace)
    holder, held = holding_gpu0(workers, redis_server.url, namespace, ttl=60)
    boss = AsyncGPUBoss(redis_server.url, namespace=namespace, gpus=GPUS, service="async-waiter")
    try:
        waiting = asyncio.create_task(boss.acquire(24, device="gpu0", timeout=30))
        await asyncio.sleep(2 * gpuboss.core.REAP_EVERY_S)
        assert not waiting.done(), "the waiter got the VRAM of a live holder"
        holder.kill()
        lease = await asyncio.wait_for(waiting, 20)
        assert lease.gpu == "gpu0"
        assert not client.hexists(keys.leases, held["id"])
        assert await boss.release(lease)
    finally:
        await boss.close()
    assert_idle(client, keys)


@pytest.mark.parametrize("front", ["sync", "async"])
def test_collect_takes_back_at_once_what_a_process_gone_from_this_machine_held(
    redis_server: RedisProcess,
    namespace: str,
    client: redis.Redis,
    bosses: Callable[[str], GPUBoss],
    front: str,
) -> None:
    """boss.collect() (as gpuboss gc) needs no request to wait: a gone holder's lease and request go now."""
    keys = Keys(namespace)
    dead = exited_process()
    ghost = ProcessCore(BossConfig(namespace=namespace, gpus=GPUS, service="ghost"), dead)
    register = ghost.register_call()
    assert register is not None
    call_script_sync(client, register)
    call_script_sync(client, ghost.acquire_call("gone0001", ghost.make_request(24, ttl=60), "gpu0", "ghost"))
    call_script_sync(client, ghost.acquire_call("gone0002", ghost.make_request(8, ttl=60), "gpu0", "ghost"))
    assert queued(client, keys) == ["gone0002"] and client.hexists(keys.leases, "gone0001")

    async def collect_async() -> dict[str, int]:
        async with AsyncGPUBoss(redis_server.url, namespace=namespace, gpus=GPUS, service="ops") as ops:
            return await ops.collect()

    counts = bosses("ops").collect() if front == "sync" else asyncio.run(collect_async())
    assert counts == {"leases": 0, "requests": 0, "revoked": 1, "withdrawn": 1, "granted": 0}
    assert_idle(client, keys)
    events = [e for e in replay(redis_server.url, namespace) if e.type in ("revoked", "withdrawn")]
    assert [(e.type, e["lease"], e["reason"]) for e in events] == [
        ("withdrawn", "gone0002", f"holder process gone (pid {dead.pid} on {ghost.host})"),
        ("revoked", "gone0001", f"holder process gone (pid {dead.pid} on {ghost.host})"),
    ]  # (the request first: the lease's VRAM would go to it, and it is gone too)
    assert {e["by"] for e in events} == {f"ops@{ghost.host}"}


# ---------------------------------------------------------------- scripts flushed, Redis restarted


@pytest.mark.parametrize("calls", ["auto", "evalsha"], ids=["function-flush", "script-flush"])
def test_script_flush_is_recovered(
    fresh_redis: RedisProcess, namespace: str, calls: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FUNCTION FLUSH (the library, FCALL) or SCRIPT FLUSH (EVALSHA) under live leases: every call reloads."""
    monkeypatch.setattr(redis_io, "SCRIPT_CALLS", calls)
    keys = Keys(namespace)
    client = raw_client(fresh_redis.url)
    shas = [sha for s in all_scripts().values() for sha in {s.sha, s.flagged[1]}]  # (with and without flags)

    def flush() -> None:
        if calls == "auto":
            client.function_flush()
            assert client.function_list() == []
        else:
            client.script_flush()
            assert client.script_exists(*shas) == [False] * len(shas)

    with GPUBoss(fresh_redis.url, namespace=namespace, gpus=GPUS, service="flush") as boss:
        lease = boss.acquire(8, ttl=0.6, timeout=0)  # renewed every 0.2 s
        first_expiry = lease.expires_at
        flush()
        time.sleep(1.5)  # the heartbeat's renew meets NOSCRIPT / Function not found, loads and renews
        assert not lease.lost
        assert client.hexists(keys.leases, lease.id)
        assert lease.expires_at > first_expiry + 0.5

        flush()
        assert boss.release(lease)  # release after a flush
        assert_idle(client, keys)

        flush()
        with boss.lease(20, device="gpu0", timeout=0):  # acquire after a flush
            assert used(client, keys)["gpu0"] == 20 * GB
            flush()
            # queued path after a flush: a request that must wait, then times out and is withdrawn
            with pytest.raises(LeaseTimeout):
                boss.acquire(8, device="gpu0", timeout=0.3)
            flush()
        assert_idle(client, keys)
        flush()
        assert boss.collect() == {"leases": 0, "requests": 0, "revoked": 0, "withdrawn": 0, "granted": 0}
    stats = client.info("commandstats")
    assert stats["cmdstat_fcall" if calls == "auto" else "cmdstat_evalsha"]["calls"] > 0
    if calls == "auto":
        assert "cmdstat_evalsha" not in stats
    client.close()


async def test_script_flush_is_recovered_async(fresh_redis: RedisProcess, namespace: str) -> None:
    keys = Keys(namespace)
    client = raw_client(fresh_redis.url)
    async with AsyncGPUBoss(fresh_redis.url, namespace=namespace, gpus=GPUS, service="aflush") as boss:
        client.script_flush()
        lease = await boss.acquire(8, timeout=0)
        client.script_flush()
        assert await boss.release(lease)
        client.script_flush()
        async with boss.lease(4, device="gpu1", timeout=0):
            assert used(client, keys)["gpu1"] == 4 * GB
            client.script_flush()
        assert_idle(client, keys)
    client.close()


def restart(server: RedisProcess) -> None:
    """Stop the server by its PID and start a new, empty one on the same socket.

    The fixture's object is pointed at the new process, so the fixture's teardown stops the new server
    (by its PID) and never signals the PID of the old, already reaped one.
    """
    assert server.socket is not None
    server.stop()
    new = start_redis(server.workdir, socket=server.socket)
    server.pid, server.process = new.pid, new.process


def test_redis_restart_is_survived_and_held_lease_reported_lost(fresh_redis: RedisProcess, namespace: str) -> None:
    keys = Keys(namespace)
    ttl = 1.0
    lost = threading.Event()
    seen: list[Lease] = []

    def on_lost(lease: Lease) -> None:
        seen.append(lease)
        lost.set()

    url = fresh_redis.url
    with (
        GPUBoss(url, namespace=namespace, gpus=GPUS, service="restart") as boss,
        GPUBoss(url, namespace=namespace, gpus=GPUS, service="restart-waiter") as other,
    ):
        lease = boss.acquire(8, device="gpu0", ttl=ttl, timeout=0, on_lost=on_lost)
        # A waiter queued across the restart: 20 GB do not fit next to the 8 GB lease.
        waiter = Waiter(other, 20, device="gpu0", timeout=20, ttl=10)
        waiter.start()
        before = raw_client(url)
        assert before.hexists(keys.leases, lease.id)
        wait_until(lambda: len(queued(before, keys)) == 1, what="the waiter is queued")
        before.close()

        restart(fresh_redis)
        restarted_at = time.monotonic()
        client = raw_client(url)

        # The heartbeat finds the lease gone and reports it, within a few TTL periods.
        assert lost.wait(timeout=4 * ttl), "on_lost did not fire after the restart"
        assert time.monotonic() - restarted_at <= 4 * ttl
        assert lease.lost
        assert seen == [lease]
        assert lease not in boss.held()

        # The waiter asks again on the new server (registering the GPUs) and gets gpu0, which is free now.
        waited = waiter.result(timeout=10)
        assert waiter.granted_at is not None
        assert waiter.granted_at - restarted_at <= 3.0
        assert (waited.gpu, waited.vram_mib) == ("gpu0", 20 * GB)
        assert other.release(waited)

        # The boss that held the lost lease leases again.
        again = boss.acquire(24, device="gpu0", timeout=0)
        assert (again.gpu, again.vram_mib) == ("gpu0", GPU0_MIB)
        assert set(client.hkeys(keys.gpus)) == {"gpu0", "gpu1"}
        assert {k: int(v) for k, v in client.hgetall(keys.capacity).items()} == {"gpu0": 24 * GB, "gpu1": 15 * GB}
        assert again.token > waited.token
        assert waited.token > lease.token  # fencing survives a restart that lost the counter
        unpinned = boss.acquire(15, timeout=0)  # the only room left is gpu1's 15 leasable GB
        assert unpinned.gpu == "gpu1"
        assert boss.release(again)
        assert boss.release(unpinned)
        assert not boss.release(lease)  # the lost lease is simply not found
        assert_idle(client, keys)
        assert seen == [lease]  # on_lost fired once, for that lease only
    client.close()


async def test_redis_restart_is_survived_async(fresh_redis: RedisProcess, namespace: str) -> None:
    keys = Keys(namespace)
    lost = asyncio.Event()
    async with AsyncGPUBoss(fresh_redis.url, namespace=namespace, gpus=GPUS, service="arestart") as boss:
        lease = await boss.acquire(4, ttl=1, timeout=0, on_lost=lambda _lease: lost.set())
        restart(fresh_redis)
        await asyncio.wait_for(lost.wait(), timeout=4)  # on_lost runs on this loop
        assert lease.lost
        async with boss.lease(10, device="gpu1", timeout=0) as device:
            assert device == "cuda:1"
            client = raw_client(fresh_redis.url)
            assert used(client, keys) == {"gpu0": 0, "gpu1": 10 * GB}
        assert_idle(client, keys)
        client.close()


# ---------------------------------------------------------------- the scheduling rules of a wiped namespace

RULES: dict[str, Any] = {"queueing": "backfill", "overtake": 2}
STORED_RULES = {"queueing": "backfill", "overtake": "2"}


def wipe(server: RedisProcess, how: str) -> None:
    """``restart``: an empty server on the same socket (the clients' connections break); ``flushall``: the same
    server emptied, every connection kept (no client notices an outage)."""
    if how == "restart":
        restart(server)
        return
    client = raw_client(server.url)
    client.flushall()
    client.close()


@pytest.mark.parametrize("how", ["flushall", "restart"])
@pytest.mark.parametrize("then", ["acquire", "pinned acquire", "register_gpus"])
def test_scheduling_rules_are_stored_again_when_the_namespace_lost_them(
    fresh_redis: RedisProcess, namespace: str, how: str, then: str
) -> None:
    """A namespace that lost its state (Redis restarted empty, FLUSHALL, a failover to an empty replica) gets its
    GPUs registered again by the next boss that uses it: that boss stores its scheduling rules again too, before
    its GPUs, not only on the next UTC day. (FLUSHALL found the rules gone for good: no outage was noticed.)"""
    keys = Keys(namespace)
    with GPUBoss(fresh_redis.url, namespace=namespace, gpus=GPUS, service="rules", **RULES) as boss:
        boss.release(boss.acquire(1, timeout=0))
        client = raw_client(fresh_redis.url)
        assert client.hgetall(keys.policy) == STORED_RULES
        client.close()
        wipe(fresh_redis, how)
        client = raw_client(fresh_redis.url)
        assert client.hgetall(keys.policy) == {}
        assert client.hgetall(keys.gpus) == {}
        if then == "register_gpus":
            assert {g.id for g in boss.register_gpus()} == {"gpu0", "gpu1"}
        else:
            lease = boss.acquire(1, device="gpu1" if then == "pinned acquire" else None, timeout=5)
            assert boss.release(lease)
        assert client.hgetall(keys.policy) == STORED_RULES
        assert set(client.hkeys(keys.gpus)) == {"gpu0", "gpu1"}
    client.close()


def test_a_refused_first_request_stores_no_rules(fresh_redis: RedisProcess, namespace: str) -> None:
    """A boss's first request, refused as too large or pinned to a GPU nobody declares, writes nothing: not
    its scheduling rules either (they are stored, with the GPUs, by the first request that passes the checks)."""
    keys = Keys(namespace)
    client = raw_client(fresh_redis.url)
    with GPUBoss(fresh_redis.url, namespace=namespace, gpus=GPUS, service="rules", **RULES) as boss:
        with pytest.raises(InsufficientCapacity):
            boss.acquire(100, timeout=0)
        with pytest.raises(InvalidRequest):
            boss.acquire(1, device="gpu7", timeout=0)
        assert namespace_keys(client, namespace) == set()
        assert boss.release(boss.acquire(1, timeout=0))
        assert client.hgetall(keys.policy) == STORED_RULES
        assert set(client.hkeys(keys.gpus)) == {"gpu0", "gpu1"}
    client.close()


def rules_changed(url: str, namespace: str) -> list[str]:
    """The rules named by the `policy_changed` events in the namespace's event log, in order."""
    return [e.data["rule"] for e in replay(url, namespace) if e.type == "policy_changed"]


def test_a_boss_stores_its_rules_again_where_a_boss_without_rules_registered_the_gpus(
    fresh_redis: RedisProcess, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bosses configured differently share a namespace that lost its state: the one without rules registers the
    GPUs again, and the one with rules finds its rules missing at its next check (one read every RULES_CHECK_S,
    0 here) and stores them again; where they are all there, the check writes nothing."""
    keys = Keys(namespace)
    url = fresh_redis.url
    with (
        GPUBoss(url, namespace=namespace, gpus=GPUS, service="ruled", **RULES) as ruled,
        GPUBoss(url, namespace=namespace, gpus=GPUS, service="plain") as plain,
    ):
        assert ruled.release(ruled.acquire(1, timeout=0))
        wipe(fresh_redis, "flushall")
        assert plain.release(plain.acquire(1, timeout=5))  # registers the GPUs again; it has no rules to store
        client = raw_client(url)
        assert set(client.hkeys(keys.gpus)) == {"gpu0", "gpu1"}
        assert client.hgetall(keys.policy) == {}
        assert ruled.release(ruled.acquire(1, timeout=5))  # its check is not due yet (every 30 s)
        assert client.hgetall(keys.policy) == {}
        monkeypatch.setattr(gpuboss.core, "RULES_CHECK_S", 0.0)
        assert ruled.release(ruled.acquire(1, timeout=5))
        assert client.hgetall(keys.policy) == STORED_RULES
        assert sorted(rules_changed(url, namespace)) == ["overtake", "queueing"]
        assert ruled.release(ruled.acquire(1, timeout=5))  # checked again: all there, nothing stored
        assert len(rules_changed(url, namespace)) == 2
        client.hdel(keys.policy, "overtake")  # one rule deleted by hand
        assert ruled.release(ruled.acquire(1, timeout=5))
        assert client.hgetall(keys.policy) == STORED_RULES
        assert rules_changed(url, namespace)[2:] == ["overtake"]
    client.close()


async def test_scheduling_rules_are_stored_again_after_flushall_async(
    fresh_redis: RedisProcess, namespace: str
) -> None:
    keys = Keys(namespace)
    async with AsyncGPUBoss(fresh_redis.url, namespace=namespace, gpus=GPUS, service="arules", **RULES) as boss:
        assert await boss.release(await boss.acquire(1, timeout=0))
        wipe(fresh_redis, "flushall")
        client = raw_client(fresh_redis.url)
        assert client.hgetall(keys.policy) == {}
        assert await boss.release(await boss.acquire(1, timeout=5))
        assert client.hgetall(keys.policy) == STORED_RULES
        client.close()


# ---------------------------------------------------------------- async: blocked loop, cancellation


async def test_async_lease_survives_a_blocked_event_loop(
    redis_server: RedisProcess, namespace: str, client: redis.Redis, bosses: Callable[[str], GPUBoss]
) -> None:
    keys = Keys(namespace)
    rival = bosses("rival")
    probes: list[tuple[float, str]] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            try:
                rival.release(rival.acquire(1, device="gpu0", timeout=0))
                probes.append((time.monotonic(), "granted"))
            except LeaseTimeout:
                probes.append((time.monotonic(), "timeout"))
            except BaseException as err:  # noqa: BLE001 - reported by the assertions below
                probes.append((time.monotonic(), repr(err)))
            stop.wait(0.1)

    async with AsyncGPUBoss(redis_server.url, namespace=namespace, gpus=GPUS, service="blocked") as boss:
        async with boss.lease(24, device="gpu0", ttl=1, timeout=0) as device:
            lease = device.lease
            first_expiry = lease.expires_at
            prober = threading.Thread(target=probe, daemon=True)
            prober.start()
            time.sleep(3.0)  # synchronous GPU work: the event loop cannot run for 3 TTLs
            stop.set()
            prober.join(timeout=5)
            assert not lease.lost
            assert client.hexists(keys.leases, lease.id)
            assert lease.expires_at >= first_expiry + 1.5  # renewed all along by the heartbeat thread
        assert not lease.lost  # and the block ended without LeaseLost
    assert len(probes) >= 10
    assert probes[-1][0] - probes[0][0] >= 2.5
    assert {outcome for _, outcome in probes} == {"timeout"}, probes
    assert_idle(client, keys)
    assert rival.release(rival.acquire(24, device="gpu0", timeout=0))  # free once the block is over


@pytest.mark.parametrize("how", ["cancel", "asyncio_timeout"])
async def test_cancelled_waiting_acquire_leaves_no_queue_entry(
    how: str, redis_server: RedisProcess, namespace: str, client: redis.Redis, bosses: Callable[[str], GPUBoss]
) -> None:
    keys = Keys(namespace)
    holder = bosses("holder")
    held = holder.acquire(24, device="gpu0", timeout=0, ttl=30)
    async with AsyncGPUBoss(redis_server.url, namespace=namespace, gpus=GPUS, service="cancel") as boss:

        async def wait() -> Lease:
            if how == "asyncio_timeout":
                async with asyncio.timeout(0.5):
                    return await boss.acquire(8, device="gpu0", timeout=30, ttl=30)
            return await boss.acquire(8, device="gpu0", timeout=30, ttl=30)

        task = asyncio.create_task(wait())
        while not queued(client, keys):
            assert not task.done()
            await asyncio.sleep(0.005)
        entry = queued(client, keys)[0]
        if how == "cancel":
            await asyncio.sleep(0.2)  # well inside the BLPOP
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            with pytest.raises(TimeoutError):
                await task
        # Right after the cancellation: the entry is gone, not left to expire in 30 s.
        assert_no_trace(client, keys, entry)
        assert not client.exists(keys.wake(entry))
        assert boss.held() == []
        # Nothing is granted to the cancelled request when the holder releases: gpu0 simply goes idle.
        assert holder.release(held)
        assert_idle(client, keys)


async def test_cancelled_task_inside_async_with_releases(
    redis_server: RedisProcess, namespace: str, client: redis.Redis
) -> None:
    keys = Keys(namespace)
    inside = asyncio.Event()
    leases: list[Lease] = []
    async with AsyncGPUBoss(redis_server.url, namespace=namespace, gpus=GPUS, service="cancel-held") as boss:

        async def work() -> None:
            async with boss.lease(8, device="gpu0", timeout=0, ttl=30) as device:
                leases.append(device.lease)
                inside.set()
                await asyncio.sleep(60)

        task = asyncio.create_task(work())
        await asyncio.wait_for(inside.wait(), timeout=10)
        assert used(client, keys)["gpu0"] == 8 * GB
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Right after the cancellation, before the boss closes: released, not left to its 30 s TTL.
        assert not client.hexists(keys.leases, leases[0].id)
        assert client.zscore(keys.lease_exp, leases[0].id) is None
        assert used(client, keys)["gpu0"] == 0
        assert boss.held() == []
        assert_idle(client, keys)


def test_keyboard_interrupt_in_sync_block_releases(
    namespace: str, client: redis.Redis, bosses: Callable[[str], GPUBoss]
) -> None:
    keys = Keys(namespace)
    boss = bosses("kbd")
    leases: list[Lease] = []
    with pytest.raises(KeyboardInterrupt), boss.lease(8, device="gpu0", timeout=0, ttl=30) as device:
        leases.append(device.lease)
        assert used(client, keys)["gpu0"] == 8 * GB
        raise KeyboardInterrupt
    assert not client.hexists(keys.leases, leases[0].id)
    assert used(client, keys)["gpu0"] == 0
    assert boss.held() == []
    assert_idle(client, keys)
