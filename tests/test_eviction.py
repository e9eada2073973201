"""Cooperative eviction (docs/eviction.md): victims, reservation, notices, grace, resume, resize, pause rules.

In-process tests run against a real redis-server and fakeredis; the scenario with separate processes is in
``test_eviction_processes.py``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from gpuboss import AsyncGPUBoss, GPUBoss, LeaseEvicted, LeaseState, LeaseTimeout
from gpuboss.errors import InsufficientCapacity, InvalidRequest
from gpuboss.events import replay
from gpuboss.keys import Keys
from gpuboss.lease import EvictNotice, Lease
from gpuboss.redis_io import call_script_sync

from tests.conftest import raw_client
from tests.threads import WAIT_S, in_thread, result, until

# The tests of backend_url (and the fixtures built on it) run on a valkey-server too: tests/conftest.py.
pytestmark = pytest.mark.valkey

#: One GPU of 16 GiB: easy arithmetic for who must leave.
ONE = [{"id": "g0", "name": "test", "vram_gb": 16, "index": 0}]
TWO = [*ONE, {"id": "g1", "name": "test", "vram_gb": 16, "index": 1}]


def make(url: str, ns: str, gpus: list[dict[str, Any]] = ONE, **settings: Any) -> GPUBoss:
    return GPUBoss(url, namespace=ns, gpus=gpus, service=settings.pop("service", "svc"), **settings)


@pytest.fixture
def pair(backend_url: str, namespace: str) -> Iterator[tuple[GPUBoss, GPUBoss]]:
    """Two bosses (two services) on one namespace: the victim's and the requester's."""
    victim, requester = make(backend_url, namespace, service="batch"), make(backend_url, namespace, service="api")
    yield victim, requester
    requester.close()
    victim.close()


def record(url: str, ns: str, lease_id: str) -> dict[str, Any] | None:
    raw = raw_client(url).hget(Keys(ns).leases, lease_id)
    return None if raw is None else dict(json.loads(str(raw)))


def event_types(url: str, ns: str) -> list[str]:
    return [e.type for e in replay(url, ns)]


# ---------------------------------------------------------------- the whole cycle


def test_low_lease_checkpoints_hands_over_and_resumes(
    pair: tuple[GPUBoss, GPUBoss], backend_url: str, namespace: str
) -> None:
    victim, requester = pair
    checkpoints: list[EvictNotice] = []
    low = victim.acquire(16, priority="low", on_evict=checkpoints.append)
    assert low.preemptible and low.state is LeaseState.GRANTED
    first_token = low.token

    high = requester.acquire(16, priority="high", timeout=WAIT_S)  # returns once the low lease handed back
    assert high.gpu == "g0"
    assert [n.need_mib for n in checkpoints] == [16 * 1024]
    assert checkpoints[0].by == high.id
    assert low.state is LeaseState.SUSPENDED and not low.active

    requester.release(high)
    assert low._settled.wait(WAIT_S), "the evicted lease was not resumed"
    assert low.state is LeaseState.GRANTED and low.evictions == 1
    assert low.gpu == "g0" and low.token > high.token > first_token
    rec = record(backend_url, namespace, low.id)
    assert rec is not None and rec["evictions"] == 1 and rec["state"] == "active"
    victim.release(low)
    types = event_types(backend_url, namespace)
    for kind in ("evict_requested", "checkpoint_started", "evicted", "resumed"):
        assert kind in types, kind
    assert types.index("evict_requested") < types.index("evicted") < types.index("resumed")


def test_resumed_request_keeps_its_arrival_position(backend_url: str, namespace: str) -> None:
    """A low lease evicted and resumed goes back ahead of low requests that arrived after it."""
    victim, requester, late = (make(backend_url, namespace, service=s) for s in ("batch", "api", "late"))
    try:
        low = victim.acquire(16, priority="low", on_evict=lambda: None)
        thread, out = in_thread(lambda: late.acquire(16, priority="low", timeout=WAIT_S))  # arrives after `low`
        deadline = time.monotonic() + WAIT_S
        while raw_client(backend_url).zcard(Keys(namespace).queue) < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        high = requester.acquire(16, priority="high", timeout=WAIT_S)
        queue = raw_client(backend_url).zrange(Keys(namespace).queue, 0, -1)
        assert queue[0] == low.id, queue  # the resumed request is first among the low ones
        requester.release(high)
        assert low._settled.wait(WAIT_S) and low.state is LeaseState.GRANTED
        victim.release(low)
        result(thread, out)
    finally:
        for b in (late, requester, victim):
            b.close()


def test_a_round_the_boss_finished_is_reported_at_the_next_safe_point(pair: tuple[GPUBoss, GPUBoss]) -> None:
    """With on_evict, the boss's own thread runs the whole round (checkpoint, hand-back, resume); a holder that
    reaches its safe point only afterwards still learns that it yielded (its GPU state may be stale now)."""
    victim, requester = pair
    low = victim.acquire(16, priority="low", on_evict=lambda: None)
    assert low.yield_if_requested() is False  # nothing asked yet
    high = requester.acquire(16, priority="high", timeout=WAIT_S)  # granted once the boss's thread handed back
    requester.release(high)
    until(lambda: low.state is LeaseState.GRANTED and low.evictions == 1, "the victim resumed")
    assert low.yield_if_requested() is True, "a finished round was not reported"
    assert low.yield_if_requested() is False, "the same round was reported twice"
    victim.release(low)


def test_polling_at_safe_points_without_a_callback(pair: tuple[GPUBoss, GPUBoss]) -> None:
    victim, requester = pair
    low = victim.acquire(16, priority="low")
    assert not low.evict_requested
    assert low.yield_if_requested() is False  # nothing asked
    thread, out = in_thread(lambda: requester.acquire(16, priority="high", timeout=WAIT_S))
    assert low.evict_requested.wait(WAIT_S)  # the flag is also an event
    assert low.notice is not None and low.notice.need_gb == 16
    # The safe point: hand back, and wait to be granted again; the requester is granted meanwhile.
    done, waiting = in_thread(low.yield_if_requested)
    high = result(thread, out)
    assert waiting.get("value") is None and done.is_alive()  # still waiting to resume
    requester.release(high)
    assert result(done, waiting) is True
    assert low.active and low.evictions == 1
    victim.release(low)


def test_resume_false_ends_the_lease_with_lease_evicted(
    pair: tuple[GPUBoss, GPUBoss], backend_url: str, namespace: str
) -> None:
    victim, requester = pair
    saved = threading.Event()
    with pytest.raises(LeaseEvicted), victim.lease(16, priority="low", on_evict=saved.set, resume=False) as device:
        high = requester.acquire(16, priority="high", timeout=WAIT_S)
        assert saved.is_set()
        lease = device.lease
        until(lambda: lease.evicted, "the lease is handed back")
        assert not lease.active
        lease.raise_if_lost()  # the next safe point says so
    assert record(backend_url, namespace, lease.id) is None
    requester.release(high)
    evicted = [e for e in replay(backend_url, namespace) if e.type == "evicted"]
    assert evicted and evicted[0].data["resume"] is False


def test_block_end_reports_an_eviction_the_block_never_looked_at(pair: tuple[GPUBoss, GPUBoss]) -> None:
    victim, requester = pair
    with (
        pytest.raises(LeaseEvicted),
        victim.lease(16, priority="low", on_evict=lambda: None, resume=False) as device,
    ):
        high = requester.acquire(16, priority="high", timeout=WAIT_S)
        until(lambda: device.lease.evicted, "the lease is handed back")
    requester.release(high)


# ---------------------------------------------------------------- who is a candidate


def test_only_lower_preemptible_leases_are_candidates(
    pair: tuple[GPUBoss, GPUBoss], backend_url: str, namespace: str
) -> None:
    victim, requester = pair
    normal = victim.acquire(8, priority="normal", on_evict=lambda: None)  # not preemptible by default
    pinned_low = victim.acquire(8, priority="low", preemptible=False)
    assert not normal.preemptible and not pinned_low.preemptible
    with pytest.raises(LeaseTimeout):
        requester.acquire(8, priority="high", timeout=0.3)
    assert not normal.evict_requested and not pinned_low.evict_requested
    assert "evict_requested" not in event_types(backend_url, namespace)
    victim.release(pinned_low)
    # A normal lease made preemptible is a candidate for a high request, never for another normal one.
    victim.release(normal)
    normal = victim.acquire(16, priority="normal", preemptible=True, on_evict=lambda: None)
    with pytest.raises(LeaseTimeout):
        requester.acquire(8, priority="normal", timeout=0.3)
    assert not normal.evict_requested
    high = requester.acquire(8, priority="high", timeout=WAIT_S)
    assert normal.evictions == 0 and normal.state in (LeaseState.SUSPENDED, LeaseState.GRANTED)
    requester.release(high)
    assert normal._settled.wait(WAIT_S)
    victim.release(normal)


def test_smallest_set_most_recent_first_and_partial_need(backend_url: str, namespace: str) -> None:
    """Need 6 GiB with 2 free: of two low leases of 4 GiB the most recent one is asked, for 4 GiB; a third,
    older one is left alone."""
    victim, requester = make(backend_url, namespace, service="batch"), make(backend_url, namespace, service="api")
    try:
        old = victim.acquire(4, priority="low")
        time.sleep(0.01)
        mid = victim.acquire(6, priority="low")
        time.sleep(0.01)
        new = victim.acquire(4, priority="low")
        thread, out = in_thread(lambda: requester.acquire(6, priority="high", timeout=WAIT_S))
        assert new.evict_requested.wait(WAIT_S)
        assert new.notice is not None and new.notice.need_mib == 4 * 1024
        time.sleep(0.2)
        assert not old.evict_requested and not mid.evict_requested
        holds = raw_client(backend_url).hgetall(Keys(namespace).holds)
        assert list(holds) == ["g0"] and json.loads(holds["g0"])["victims"] == [new.id]
        done, waiting = in_thread(new.yield_if_requested)  # hands back, then waits to resume
        high = result(thread, out)
        requester.release(high)
        assert result(done, waiting) is True
        for lease in (old, mid, new):
            victim.release(lease)
    finally:
        requester.close()
        victim.close()


def test_the_gpu_needing_fewest_victims_is_chosen(backend_url: str, namespace: str) -> None:
    victim, requester = make(backend_url, namespace, TWO, service="b"), make(backend_url, namespace, TWO, service="a")
    try:
        a1, a2 = victim.acquire(8, priority="low", device="g0"), victim.acquire(8, priority="low", device="g0")
        b1 = victim.acquire(12, priority="low", device="g1")
        filler = victim.acquire(4, priority="normal", device="g1")
        thread, out = in_thread(lambda: requester.acquire(12, priority="high", timeout=WAIT_S))
        assert b1.evict_requested.wait(WAIT_S)
        assert not a1.evict_requested and not a2.evict_requested
        done, waiting = in_thread(b1.yield_if_requested)
        high = result(thread, out)
        assert high.gpu == "g1"
        requester.release(high)
        assert result(done, waiting) is True
        for lease in (a1, a2, b1, filler):
            victim.release(lease)
    finally:
        requester.close()
        victim.close()


def test_preemptible_mib_is_counted_per_rank_and_gpu(backend_url: str, namespace: str) -> None:
    """The usage hash sums preemptible MiB per rank and GPU (`pre:<rank>:<gpu>`): a lease over several GPUs
    counts on each, a resize changes its GPU's sum, a release takes it out (and a field at 0 goes)."""
    boss = make(backend_url, namespace, TWO)
    client, keys = raw_client(backend_url), Keys(namespace)

    def pre() -> dict[str, str]:
        return {k: v for k, v in client.hgetall(keys.usage).items() if k.startswith("pre:")}

    try:
        tp = boss.acquire(8, gpus=2, priority="low")  # 4 GiB on each GPU
        one = boss.acquire(4, priority="low", device="g1")
        normal = boss.acquire(2, priority="normal", preemptible=True, device="g0")
        boss.acquire(1, priority="low", preemptible=False, device="g0")  # not preemptible: not counted
        assert pre() == {"pre:0:g0": "4096", "pre:0:g1": "8192", "pre:1:g0": "2048"}
        one.resize(1)
        assert pre() == {"pre:0:g0": "4096", "pre:0:g1": "5120", "pre:1:g0": "2048"}
        boss.release(tp)
        assert pre() == {"pre:0:g1": "1024", "pre:1:g0": "2048"}
        boss.release(one)
        boss.release(normal)
        assert pre() == {}
    finally:
        boss.close()


def test_a_request_that_no_gpu_it_may_use_can_make_room_for_reads_no_lease(backend_url: str, namespace: str) -> None:
    """A queued request first in line looks for victims only where it could find enough: with the only lower
    preemptible lease on another GPU than its pin, it does not read the leases (a record nobody can decode
    proves it), and asks nobody; pinned to that GPU, it asks that lease."""
    victim, requester = make(backend_url, namespace, TWO, service="b"), make(backend_url, namespace, TWO, service="a")
    client, keys = raw_client(backend_url), Keys(namespace)
    core = requester._core

    def queue(rid: str, device: str) -> None:
        req = core.make_request(16, priority="high", timeout=None, device=device)
        reply = call_script_sync(client, core.acquire_call(rid, req, device, "a"))
        assert reply[0] == 2, reply  # QUEUED

    try:
        busy = victim.acquire(16, priority="normal", device="g0")  # not preemptible
        low = victim.acquire(12, priority="low", device="g1")  # preemptible; g1 has 4 GiB free
        client.hset(keys.leases, "trap", "not a record")  # any scan of the leases fails on it
        queue("on-g0", "g0")  # g0: nothing to free there, whatever g1 holds
        assert not low.evict_requested
        assert "evict_requested" not in event_types(backend_url, namespace)
        assert call_script_sync(client, core.release_call("on-g0"))[0] == 2  # withdrawn
        client.hdel(keys.leases, "trap")
        queue("on-g1", "g1")  # 4 GiB free and 12 GiB of low: enough
        assert low.evict_requested.wait(WAIT_S), "the low lease on the request's GPU was not asked"
        assert call_script_sync(client, core.release_call("on-g1"))[0] == 2
        for lease in (busy, low):
            victim.release(lease)
    finally:
        requester.close()
        victim.close()


def test_preemptible_mib_an_older_gpuboss_counted_without_its_gpu_is_searched_for(
    backend_url: str, namespace: str
) -> None:
    """A `pre:<rank>` field without a GPU (as a gpuboss before per-GPU sums wrote it) cannot tell where its
    MiB is: a request then reads the leases, as it did before, and finds the victim."""
    victim, requester = make(backend_url, namespace, TWO, service="b"), make(backend_url, namespace, TWO, service="a")
    client, keys = raw_client(backend_url), Keys(namespace)
    try:
        low = victim.acquire(16, priority="low", device="g1")
        client.hdel(keys.usage, "pre:0:g1")
        client.hset(keys.usage, "pre:0", 16 * 1024)
        thread, out = in_thread(lambda: requester.acquire(16, priority="high", device="g1", timeout=WAIT_S))
        assert low.evict_requested.wait(WAIT_S), "the low lease counted the old way was not asked"
        done, waiting = in_thread(low.yield_if_requested)
        requester.release(result(thread, out))
        assert result(done, waiting) is True
        victim.release(low)
    finally:
        requester.close()
        victim.close()


# ---------------------------------------------------------------- the reservation


def test_freed_vram_is_reserved_for_the_requester(backend_url: str, namespace: str) -> None:
    victim, requester, other = (make(backend_url, namespace, service=s) for s in ("batch", "api", "other"))
    try:
        low = victim.acquire(16, priority="low")
        thread, out = in_thread(lambda: requester.acquire(10, priority="high", timeout=WAIT_S))
        assert low.evict_requested.wait(WAIT_S)
        # A second high request does not start a second eviction, and cannot take the held VRAM.
        with pytest.raises(LeaseTimeout):
            other.acquire(4, priority="high", timeout=0)
        assert json.loads(raw_client(backend_url).hget(Keys(namespace).holds, "g0"))["victims"] == [low.id]
        low.resize(6)  # shrinks by exactly what the requester needs: the lease continues
        high = result(thread, out)
        assert low.state is LeaseState.GRANTED and not low.evict_requested and low.vram_mib == 6 * 1024
        assert raw_client(backend_url).hlen(Keys(namespace).holds) == 0
        requester.release(high)
        victim.release(low)
    finally:
        for b in (other, requester, victim):
            b.close()


def test_requester_timeout_calls_the_eviction_off(
    pair: tuple[GPUBoss, GPUBoss], backend_url: str, namespace: str
) -> None:
    victim, requester = pair
    low = victim.acquire(16, priority="low")  # no callback: it will not hand back
    with pytest.raises(LeaseTimeout):
        requester.acquire(16, priority="high", timeout=0.5)
    until(lambda: low.state is LeaseState.GRANTED, "the eviction is called off")
    assert not low.evict_requested
    rec = record(backend_url, namespace, low.id)
    assert rec is not None and rec["state"] == "active" and "evict" not in rec
    assert raw_client(backend_url).hlen(Keys(namespace).holds) == 0
    assert "evict_cancelled" in event_types(backend_url, namespace)
    assert low.yield_if_requested() is False
    victim.release(low)


# ---------------------------------------------------------------- grace


def test_grace_revoke_removes_a_victim_that_does_not_hand_back(backend_url: str, namespace: str) -> None:
    victim = make(backend_url, namespace, service="batch")
    requester = make(backend_url, namespace, service="api", evict_grace_s=0.3, evict_on_grace="revoke")
    lost = threading.Event()
    try:
        low = victim.acquire(16, priority="low", ttl=1, on_lost=lambda _lease: lost.set())
        high = requester.acquire(16, priority="high", timeout=WAIT_S)
        assert high.gpu == "g0"
        assert lost.wait(WAIT_S) and low.lost
        revoked = [e for e in replay(backend_url, namespace) if e.type == "revoked"]
        assert revoked and revoked[0].data["reason"] == "evict_grace" and revoked[0].lease == low.id
        # Its holder's heartbeat found it gone: announced by the renew script.
        assert any(e.type == "lost" and e.lease == low.id for e in replay(backend_url, namespace))
        requester.release(high)
    finally:
        requester.close()
        victim.close()


def test_grace_wait_keeps_waiting_and_reports_it(backend_url: str, namespace: str) -> None:
    victim = make(backend_url, namespace, service="batch")
    requester = make(backend_url, namespace, service="api", evict_grace_s=0.2)
    try:
        low = victim.acquire(16, priority="low", ttl=1)
        with pytest.raises(LeaseTimeout):
            requester.acquire(16, priority="high", timeout=1.0)
        assert "evict_overdue" in event_types(backend_url, namespace)
        assert low.active
        victim.release(low)
    finally:
        requester.close()
        victim.close()


# ---------------------------------------------------------------- delivery without pub/sub


def test_a_missed_notice_arrives_with_the_next_heartbeat(pair: tuple[GPUBoss, GPUBoss]) -> None:
    victim, requester = pair
    victim._notices.start = lambda wait=2.0: None  # type: ignore[method-assign]  # as if it never heard
    called = threading.Event()
    low = victim.acquire(16, priority="low", ttl=0.6, on_evict=called.set)
    assert not victim._notices.running
    high = requester.acquire(16, priority="high", timeout=WAIT_S)
    assert called.is_set()
    requester.release(high)
    assert low._settled.wait(WAIT_S)
    victim.release(low)


# ---------------------------------------------------------------- resize


def test_resize_shrink_hands_the_difference_to_a_waiter(pair: tuple[GPUBoss, GPUBoss]) -> None:
    holder, waiter = pair
    big = holder.acquire(16, priority="normal")
    thread, out = in_thread(lambda: waiter.acquire(4, priority="normal", timeout=WAIT_S))
    until(lambda: raw_client_queue_len(holder) == 1, "the waiter is queued")
    assert big.resize(12) is big
    small = result(thread, out)
    assert big.vram_mib == 12 * 1024 and small.vram_mib == 4 * 1024
    # Growing waits while the GPU is full, and is granted when the waiter leaves.
    grow, grown = in_thread(lambda: big.resize(16, timeout=WAIT_S))
    time.sleep(0.1)
    assert grow.is_alive() and big.vram_mib == 12 * 1024
    waiter.release(small)
    assert result(grow, grown) is big and big.vram_mib == 16 * 1024
    with pytest.raises(InsufficientCapacity):
        big.resize(17)
    # A growth that times out is withdrawn; the lease keeps what it had.
    big.resize(12)
    small = waiter.acquire(4, priority="normal", timeout=0)
    with pytest.raises(LeaseTimeout):
        big.resize(16, timeout=0.2)
    assert big.vram_mib == 12 * 1024 and raw_client_queue_len(holder) == 0
    waiter.release(small)
    holder.release(big)


def raw_client_queue_len(boss: GPUBoss) -> int:
    return int(raw_client(boss.url).zcard(Keys(boss.namespace).queue))


def test_on_evict_receives_the_need_and_may_shrink_instead(pair: tuple[GPUBoss, GPUBoss]) -> None:
    victim, requester = pair
    holder: dict[str, Lease] = {}

    def drop_cache(notice: EvictNotice) -> None:
        holder["lease"].resize(16 - notice.need_gb)

    holder["lease"] = low = victim.acquire(16, priority="low", on_evict=drop_cache)
    high = requester.acquire(5, priority="high", timeout=WAIT_S)  # granted by the resize itself
    until(lambda: low.state is LeaseState.GRANTED, "the shrink ends the eviction")
    assert low.vram_mib == 11 * 1024 and low.evictions == 0
    time.sleep(0.3)  # a heartbeat renewal that raced the resize must not start the eviction again
    assert low.state is LeaseState.GRANTED and low.vram_mib == 11 * 1024
    requester.release(high)
    victim.release(low)


def test_bad_arguments_are_refused_before_redis(boss: GPUBoss) -> None:
    with pytest.raises(InvalidRequest, match="on_evict"):
        boss.acquire(1, on_evict="save")
    with pytest.raises(InvalidRequest, match="preemptible"):
        boss.acquire(1, preemptible="yes")
    with pytest.raises(InvalidRequest, match="resume"):
        boss.acquire(1, resume=1)
    lease = boss.acquire(1)
    with pytest.raises(InvalidRequest, match="vram_gb"):
        lease.resize(-1)
    boss.release(lease)


# ---------------------------------------------------------------- pause rules


def test_pause_rule_holds_low_while_high_is_active_and_evicts(backend_url: str, namespace: str) -> None:
    rule = [{"class": "low", "while": ["high"], "evict": True}]
    batch = make(backend_url, namespace, service="batch", pause=rule)
    realtime = make(backend_url, namespace, service="rt", pause=rule)
    try:
        running = batch.acquire(4, priority="low", on_evict=lambda: None)
        high = realtime.acquire(2, priority="high")  # fits: nothing needs to leave for it, but the rule says so
        until(lambda: running.state is LeaseState.SUSPENDED, "the low lease checkpointed and waits")
        with pytest.raises(LeaseTimeout):  # fits, but low is paused: it waits, it does not fail
            batch.acquire(1, priority="low", timeout=0.3)
        normal = batch.acquire(1, priority="normal", timeout=0)  # other classes are not paused
        realtime.release(high)
        assert running._settled.wait(WAIT_S) and running.state is LeaseState.GRANTED
        batch.release(normal)
        batch.release(running)
    finally:
        realtime.close()
        batch.close()


# ---------------------------------------------------------------- async


async def test_async_cycle_with_an_async_callback_and_await_flag(backend_url: str, namespace: str) -> None:
    victim = AsyncGPUBoss(backend_url, namespace=namespace, gpus=ONE, service="batch")
    requester = AsyncGPUBoss(backend_url, namespace=namespace, gpus=ONE, service="api")
    saved: list[int] = []

    async def checkpoint() -> None:
        await asyncio.sleep(0.01)
        saved.append(1)

    try:
        async with victim.lease(vram_gb=12, priority="low", on_evict=checkpoint) as device:
            lease = device.lease
            task = asyncio.ensure_future(requester.acquire(12, priority="high", timeout=WAIT_S))
            await asyncio.wait_for(_await(lease.evict_requested), WAIT_S)
            high = await asyncio.wait_for(task, WAIT_S)
            assert saved == [1]
            waiter = asyncio.ensure_future(lease.yield_if_requested())  # the safe point waits for the resume
            await asyncio.sleep(0.05)
            assert not waiter.done() and lease.state is LeaseState.SUSPENDED
            await requester.release(high)
            assert await asyncio.wait_for(waiter, WAIT_S) is True
            assert lease.active and lease.evictions == 1
            assert await lease.yield_if_requested() is False  # that round was reported once
    finally:
        await requester.close()
        await victim.close()


async def _await(flag: Any) -> None:
    await flag
