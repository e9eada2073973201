"""A release racing the resume of an evicted lease (docs/eviction.md).

The holder's block may end (``release``) while the boss's own thread (or task) hands the lease back and waits
to be granted again under the same id. Each test forces one interleaving with a hook and checks that, once the
resume gave up, nothing is left behind: no lease in Redis that nobody renews (it would block the GPU until its
TTL) or that a stale heartbeat entry renews for ever, and no heartbeat entry for the released lease.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from gpuboss import AsyncGPUBoss, GPUBoss, LeaseState
from gpuboss.core import Call, Pop
from gpuboss.errors import RedisUnavailable
from gpuboss.events import replay
from gpuboss.keys import Keys
from gpuboss.lease import Lease

from tests.conftest import queue_ids, raw_client
from tests.threads import WAIT_S, in_thread, result, until

#: One GPU of 16 GiB: a 16 GB lease fills it.
ONE = [{"id": "g0", "name": "test", "vram_gb": 16, "index": 0}]
#: Long enough that a lease left to its TTL outlives every wait below.
LONG_TTL = 60.0


def make(url: str, ns: str, service: str) -> GPUBoss:
    return GPUBoss(url, namespace=ns, gpus=ONE, service=service)


@pytest.fixture
def trio(real_url: str, namespace: str) -> Iterator[tuple[GPUBoss, GPUBoss, GPUBoss]]:
    """The victim's boss, the requester's (whose high request evicts it), and a third that wants the GPU after."""
    bosses = (make(real_url, namespace, "batch"), make(real_url, namespace, "api"), make(real_url, namespace, "late"))
    yield bosses
    for boss in reversed(bosses):
        boss.close()


def in_redis(url: str, ns: str, lease_id: str) -> bool:
    return bool(raw_client(url).hexists(Keys(ns).leases, lease_id))


def lease_events(url: str, ns: str, lease_id: str) -> list[str]:
    return [e.type for e in replay(url, ns) if e.lease == lease_id]


class Gate:
    """Stops the boss's thread at a hook until the test has done its part (a release)."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.go = threading.Event()
        self.used = False

    def stop_here(self) -> None:
        if self.used:
            return
        self.used = True
        self.reached.set()
        self.go.wait(WAIT_S)


def evicted(victim: GPUBoss, requester: GPUBoss, ttl: float) -> tuple[Lease, Lease]:
    """A low lease of the victim, evicted (resume=True, on_evict) by a high request of the requester."""
    low = victim.acquire(16, priority="low", ttl=ttl, on_evict=lambda: None)
    high = requester.acquire(16, priority="high", timeout=WAIT_S)
    return low, high


def resume_ended(low: Lease) -> None:
    until(lambda: low._handling is not None and not low._handling.locked(), "the boss's thread left the resume")


def test_release_between_a_look_and_the_next_ask_leaves_no_unrenewed_lease(
    trio: tuple[GPUBoss, GPUBoss, GPUBoss], real_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The resume checked that the lease was not released, then the block ended (its release landed in Redis,
    after the queue had granted the resume), then the resume asked again under the same id: Redis saw a new
    request and granted it. That lease must be released, not left to its TTL with nobody renewing it."""
    victim, requester, late = trio
    gate = Gate()
    stop_waiting = victim._stop_waiting

    def hooked(lease: Lease) -> bool:
        stop = stop_waiting(lease)
        gate.stop_here()  # (the first look only: the test releases here)
        return stop

    monkeypatch.setattr(victim, "_stop_waiting", hooked)
    low, high = evicted(victim, requester, LONG_TTL)
    assert gate.reached.wait(WAIT_S), "the resume never looked"
    assert low.suspended
    requester.release(high)  # the queued resume is granted in Redis ...
    assert victim.release(low) is True  # ... and the block ends: that grant is released
    assert not in_redis(real_url, namespace, low.id)
    gate.go.set()
    resume_ended(low)

    types = lease_events(real_url, namespace, low.id)
    assert "granted" in types[types.index("released") :], f"the race was not reproduced: {types}"
    assert low.state is LeaseState.RELEASED and low not in victim.held()
    assert low.id not in victim._heartbeat.held()
    until(lambda: not in_redis(real_url, namespace, low.id), "the lease granted after the release was released", 5)
    other = late.acquire(16, priority="low", timeout=5)  # the GPU is free again (not blocked until the TTL)
    late.release(other)


def test_release_while_the_resume_waits_again_does_not_leave_it_renewed_forever(
    trio: tuple[GPUBoss, GPUBoss, GPUBoss], real_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same race while the GPU is still taken: the resume's new ask is queued (and watched by the heartbeat,
    after the release forgot the id), then granted. The heartbeat must not renew that lease for ever."""
    victim, requester, late = trio
    gate = Gate()
    stop_waiting = victim._stop_waiting

    def hooked(lease: Lease) -> bool:
        stop = stop_waiting(lease)
        gate.stop_here()
        return stop

    monkeypatch.setattr(victim, "_stop_waiting", hooked)
    low, high = evicted(victim, requester, 1.0)  # a short TTL: left alone, it would be gone within a second
    assert gate.reached.wait(WAIT_S)
    assert victim.release(low) is True  # withdraws the queued resume
    assert low.id not in queue_ids(real_url, namespace)
    gate.go.set()
    until(lambda: low.id in queue_ids(real_url, namespace), "the resume asked again (queued behind high)")
    requester.release(high)  # ... and it is granted
    resume_ended(low)

    assert low.state is LeaseState.RELEASED and low not in victim.held()
    until(lambda: not in_redis(real_url, namespace, low.id), "the lease granted after the release was released", 5)
    assert low.id not in victim._heartbeat.held()
    other = late.acquire(16, priority="low", timeout=5)
    late.release(other)


def test_release_before_the_resume_watches_its_request_leaves_no_heartbeat_entry(
    trio: tuple[GPUBoss, GPUBoss, GPUBoss], real_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The release forgot the id just before the resume's first wait started watching it: once the resume gives
    up (LeaseCancelled), the heartbeat must not keep renewing an id that is gone (a ``lost`` event every tick)."""
    victim, requester, _ = trio
    gate = Gate()
    watch = victim._heartbeat.watch

    def hooked(request_id: str, ttl_ms: int) -> None:
        gate.stop_here()
        watch(request_id, ttl_ms)

    monkeypatch.setattr(victim._heartbeat, "watch", hooked)
    low, high = evicted(victim, requester, 1.0)
    assert gate.reached.wait(WAIT_S), "the resume never waited"
    assert victim.release(low) is True
    gate.go.set()
    resume_ended(low)  # its next look saw the release and withdrew (LeaseCancelled)

    assert low.state is LeaseState.RELEASED
    assert low.id not in victim._heartbeat.held()
    assert not in_redis(real_url, namespace, low.id) and low.id not in queue_ids(real_url, namespace)
    requester.release(high)


def test_release_as_the_resumed_lease_is_handed_to_the_heartbeat_leaves_no_heartbeat_entry(
    trio: tuple[GPUBoss, GPUBoss, GPUBoss], real_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The resume was granted and marked granted; the block ended before the heartbeat was given the lease. A
    released lease must not stay in the heartbeat (renewed, then reported ``lost`` by Redis)."""
    victim, requester, _ = trio
    low, high = evicted(victim, requester, LONG_TTL)
    gate = Gate()
    hold = victim._heartbeat.hold

    def hooked(lease: Lease) -> None:
        if lease is low:
            gate.stop_here()
        hold(lease)

    monkeypatch.setattr(victim._heartbeat, "hold", hooked)
    requester.release(high)  # the resume is granted
    assert gate.reached.wait(WAIT_S), "the resumed lease was never held"
    assert low.active
    assert victim.release(low) is True
    gate.go.set()
    resume_ended(low)

    assert low.state is LeaseState.RELEASED and low not in victim.held()
    assert low.id not in victim._heartbeat.held()
    assert not in_redis(real_url, namespace, low.id)


def test_a_resume_given_up_when_redis_failed_leaves_no_request_behind(
    trio: tuple[GPUBoss, GPUBoss, GPUBoss], real_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a release but the same leak: the resume's wait failed (Redis unreachable for a moment) and the lease
    was reported lost, while its queued request stayed in Redis, watched by the heartbeat. Once granted it
    would be a lease of nobody's, renewed for ever."""
    victim, requester, late = trio
    lost: list[Lease] = []
    perform = victim._perform
    failed: list[Pop] = []

    def hooked(op: Any) -> Any:
        if isinstance(op, Pop) and not failed:
            failed.append(op)
            raise RedisUnavailable("injected: Redis could not be reached")
        return perform(op)

    monkeypatch.setattr(victim, "_perform", hooked)
    low = victim.acquire(16, priority="low", ttl=1.0, on_evict=lambda: None, on_lost=lost.append)
    high = requester.acquire(16, priority="high", timeout=WAIT_S)
    until(lambda: low.state is LeaseState.LOST, "the resume gave up")
    resume_ended(low)
    assert failed and lost == [low] and low not in victim.held()
    requester.release(high)  # a request still queued would be granted now

    until(lambda: not in_redis(real_url, namespace, low.id), "no lease is left under the lost lease's id", 5)
    until(lambda: low.id not in queue_ids(real_url, namespace), "the resume's request was withdrawn", 5)
    assert low.id not in victim._heartbeat.held()
    other = late.acquire(16, priority="low", timeout=5)
    late.release(other)


async def test_async_release_between_a_look_and_the_next_ask_leaves_no_unrenewed_lease(
    real_url: str, namespace: str
) -> None:
    """The async twin of the first test: the caller's task releases while the resume task's next ask is on its
    way to Redis (waiting for a connection, say)."""
    victim = AsyncGPUBoss(real_url, namespace=namespace, gpus=ONE, service="batch")
    requester = AsyncGPUBoss(real_url, namespace=namespace, gpus=ONE, service="api")
    late = make(real_url, namespace, "late")
    try:
        low = await victim.acquire(16, priority="low", ttl=LONG_TTL, on_evict=lambda: None)
        reached, go = asyncio.Event(), asyncio.Event()
        perform = victim._perform

        async def hooked(op: Any) -> Any:
            if not reached.is_set() and isinstance(op, Call) and op.script == "acquire" and low.id in op.args:
                reached.set()
                await asyncio.wait_for(go.wait(), WAIT_S)
            return await perform(op)

        victim._perform = hooked  # type: ignore[method-assign]
        high = await requester.acquire(16, priority="high", timeout=WAIT_S)
        await asyncio.wait_for(reached.wait(), WAIT_S)
        assert low.suspended
        await requester.release(high)
        assert await victim.release(low) is True
        go.set()
        for _ in range(int(WAIT_S / 0.01)):
            if low._handling is not None and not low._handling.locked():
                break
            await asyncio.sleep(0.01)
        assert low._handling is not None and not low._handling.locked(), "the resume task did not end"

        types = lease_events(real_url, namespace, low.id)
        assert "granted" in types[types.index("released") :], f"the race was not reproduced: {types}"
        assert low.state is LeaseState.RELEASED and low not in victim.held()
        assert low.id not in victim._heartbeat.held()
        thread, out = in_thread(lambda: late.acquire(16, priority="low", timeout=5))
        other = await asyncio.to_thread(result, thread, out)
        late.release(other)
    finally:
        late.close()
        await requester.close()
        await victim.close()
