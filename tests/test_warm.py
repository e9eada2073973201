"""Warm models (docs/warm.md): busy/idle/touch on any lease, idle leases as the first candidates, the idle
timeout, ``keep_warm`` with its reloads and events, and two model-server processes sharing one GPU.

In-process tests run against a real redis-server and fakeredis; the scenario with separate processes uses
the real server.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import re
import threading
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
from click.testing import CliRunner
from gpuboss import AsyncGPUBoss, GPUBoss, LeaseState, LeaseTimeout, WarmModel
from gpuboss.cli import cli
from gpuboss.core import Core
from gpuboss.errors import InvalidRequest, LeaseLost
from gpuboss.events import replay
from gpuboss.keys import Keys
from gpuboss.redis_io import call_script_sync, connect_sync
from gpuboss.warm import ActivityReply, UnloadReply, activity_call

from tests.conftest import raw_client, snapshot
from tests.threads import in_thread, result, until

# The tests of backend_url (and the fixtures built on it) run on a valkey-server too: tests/conftest.py.
pytestmark = pytest.mark.valkey

#: One GPU of 16 GiB (in-process tests) and one of 24 GiB (two 16 GiB models: only one fits).
ONE = [{"id": "g0", "name": "test", "vram_gb": 16, "index": 0}]
GPU24 = [{"id": "g0", "name": "sim 24 GB", "vram_gb": 24, "index": 0}]
TWO = [*ONE, {"id": "g1", "name": "test", "vram_gb": 16, "index": 1}]
WAIT_S = 15.0


def make(url: str, ns: str, gpus: list[dict[str, Any]] = ONE, **settings: Any) -> GPUBoss:
    return GPUBoss(url, namespace=ns, gpus=gpus, service=settings.pop("service", "svc"), **settings)


@pytest.fixture
def pair(backend_url: str, namespace: str) -> Iterator[tuple[GPUBoss, GPUBoss]]:
    a, b = make(backend_url, namespace, service="alpha"), make(backend_url, namespace, service="beta")
    yield a, b
    b.close()
    a.close()


def record(url: str, ns: str, lease_id: str) -> dict[str, Any] | None:
    raw = raw_client(url).hget(Keys(ns).leases, lease_id)
    return None if raw is None else dict(json.loads(str(raw)))


def events_of(url: str, ns: str, kind: str) -> list[Any]:
    return [e for e in replay(url, ns) if e.type == kind]


def evicting(url: str, ns: str, lease_id: str) -> bool:
    return (record(url, ns, lease_id) or {}).get("state") == "evicting"


def queued(url: str, ns: str) -> int:
    return int(raw_client(url).zcard(Keys(ns).queue))


# ---------------------------------------------------------------- busy, idle, touch on any lease


def test_busy_idle_touch_are_kept_in_the_lease_record(boss: GPUBoss, backend_url: str, namespace: str) -> None:
    lease = boss.acquire(4)
    assert lease.is_busy is None and "busy" not in (record(backend_url, namespace, lease.id) or {})
    lease.idle()
    rec = record(backend_url, namespace, lease.id)
    assert rec is not None and rec["busy"] is False and lease.is_busy is False
    assert lease.idle_since is not None and rec["idle_since"] == round(lease.idle_since * 1000)
    usage = raw_client(backend_url).hgetall(Keys(namespace).usage)
    assert usage[f"idle:{lease.id}"] == f"{4 * 1024} {lease.gpu}"  # its MiB and its GPU: eviction's hint
    before_ms = rec["idle_since"]
    seconds, micros = raw_client(backend_url).time()
    now_ms = seconds * 1000 + micros // 1000
    lease.touch()
    touched = record(backend_url, namespace, lease.id)
    assert touched is not None and touched["idle_since"] >= max(before_ms, now_ms) and touched["busy"] is False
    with lease.busy() as device:
        assert device == lease.device and device.lease is lease
        rec = record(backend_url, namespace, lease.id)
        assert rec is not None and rec["busy"] is True and "idle_since" not in rec and lease.is_busy is True
        assert f"idle:{lease.id}" not in raw_client(backend_url).hgetall(Keys(namespace).usage)
        lease.touch()  # busy: nothing to restart
        still = record(backend_url, namespace, lease.id)
        assert still is not None and "idle_since" not in still
    rec = record(backend_url, namespace, lease.id)
    assert rec is not None and rec["busy"] is False  # idle again after the block
    boss.release(lease)
    with pytest.raises(LeaseLost):
        lease.touch()


def test_a_lease_another_process_holds_cannot_be_marked(backend_url: str, namespace: str) -> None:
    holder, other = make(backend_url, namespace, service="a"), make(backend_url, namespace, service="b")
    try:
        lease = holder.acquire(2)
        reply = call_script_sync(raw_client(backend_url), activity_call(other._core, lease.id, "idle"))
        assert int(reply[0]) == ActivityReply.GONE
        rec = record(backend_url, namespace, lease.id)
        assert rec is not None and "busy" not in rec
        holder.release(lease)
    finally:
        other.close()
        holder.close()


# ---------------------------------------------------------------- who is asked


def test_an_idle_lease_is_asked_before_a_lower_priority_busy_one(
    pair: tuple[GPUBoss, GPUBoss], backend_url: str, namespace: str
) -> None:
    """An idle high lease goes before a busy preemptible low one, even for a normal request."""
    holder, requester = pair
    idle_high = holder.acquire(8, priority="high", on_evict=lambda: None, resume=False)
    low = holder.acquire(8, priority="low", preemptible=True)
    low.busy()
    idle_high.idle()
    granted = requester.acquire(8, priority="normal", timeout=WAIT_S)  # once the idle lease handed back
    until(lambda: idle_high.evicted, "the idle lease is handed back for good")
    assert granted.gpu == "g0" and idle_high.notice is not None
    assert idle_high.notice.reason == "idle" and idle_high.notice.by == granted.id
    assert not low.evict_requested and low.state is LeaseState.GRANTED
    asked = events_of(backend_url, namespace, "evict_requested")
    assert [(e.lease, e["reason"]) for e in asked] == [(idle_high.id, "idle")]
    requester.release(granted)
    holder.release(low)


def test_an_idle_high_lease_is_asked_even_by_a_low_request(
    pair: tuple[GPUBoss, GPUBoss], backend_url: str, namespace: str
) -> None:
    """Idle comes before priority: a low request takes the VRAM of an idle high lease, while a busy lease of the
    requester's own (low) priority, preemptible or not, is not a candidate."""
    holder, requester = pair
    idle_high = holder.acquire(8, priority="high", on_evict=lambda: None, resume=False)
    busy_low = holder.acquire(8, priority="low", preemptible=True)
    busy_low.busy()
    idle_high.idle()
    granted = requester.acquire(8, priority="low", timeout=WAIT_S)
    until(lambda: idle_high.evicted, "the idle high lease is handed back")
    assert granted.gpu == "g0" and idle_high.notice is not None and idle_high.notice.by == granted.id
    assert not busy_low.evict_requested and busy_low.state is LeaseState.GRANTED
    (asked,) = events_of(backend_url, namespace, "evict_requested")
    assert (asked.lease, asked.priority, asked["reason"], asked["by"]) == (idle_high.id, "high", "idle", granted.id)
    requester.release(granted)
    holder.release(busy_low)


def test_a_lease_reclaimed_while_idle_asks_again_at_its_next_busy(
    pair: tuple[GPUBoss, GPUBoss], backend_url: str, namespace: str
) -> None:
    """With resume (the default) a lease reclaimed while idle is not queued again at once, where it would take
    the VRAM straight back: it waits, suspended, and its next busy() asks again, queued by its priority."""
    holder, requester = pair
    lease = holder.acquire(16, on_evict=lambda: None)
    lease.idle()
    granted = requester.acquire(16, timeout=WAIT_S)
    until(lambda: lease._parked, "the idle lease is handed back")
    assert lease.state is LeaseState.SUSPENDED and queued(backend_url, namespace) == 0
    assert record(backend_url, namespace, lease.id) is None
    busy, marked = in_thread(lease.busy)
    until(lambda: queued(backend_url, namespace) == 1, "the next busy() asks again")
    assert busy.is_alive()
    requester.release(granted)
    result(busy, marked)
    assert lease.state is LeaseState.GRANTED and lease.is_busy is True and lease.evictions == 1
    rec = record(backend_url, namespace, lease.id)
    assert rec is not None and rec["busy"] is True and rec["token"] > granted.token
    holder.release(lease)


def test_a_busy_lease_is_treated_by_its_priority_and_idle_lets_the_waiter_in(
    pair: tuple[GPUBoss, GPUBoss], backend_url: str, namespace: str
) -> None:
    holder, requester = pair
    lease = holder.acquire(16, priority="low", preemptible=False, on_evict=lambda: None, resume=False)
    lease.busy()
    with pytest.raises(LeaseTimeout):
        requester.acquire(8, priority="high", timeout=0.3)
    assert not lease.evict_requested  # busy, and not preemptible: not a candidate
    thread, out = in_thread(lambda: requester.acquire(8, priority="low", timeout=WAIT_S))
    until(lambda: queued(backend_url, namespace) == 1, "the low request waits")
    lease.idle()  # the waiting request asks it to unload in the same step; on_evict hands it back
    granted = result(thread, out)
    assert granted.gpu == "g0"
    until(lambda: lease.evicted, "the idle lease is handed back")
    evicted = events_of(backend_url, namespace, "evict_requested")
    assert [(e.lease, e["reason"], e["by"]) for e in evicted] == [(lease.id, "idle", granted.id)]
    requester.release(granted)


def test_the_gpu_with_idle_victims_is_chosen_over_fewer_busy_ones(backend_url: str, namespace: str) -> None:
    holder = make(backend_url, namespace, TWO, service="h")
    requester = make(backend_url, namespace, TWO, service="r")
    try:
        busy_low = holder.acquire(16, priority="low", device="g0")
        busy_low.busy()
        idle_a, idle_b = holder.acquire(8, device="g1"), holder.acquire(8, device="g1")
        idle_a.idle()
        idle_b.idle()
        thread, out = in_thread(lambda: requester.acquire(16, priority="high", timeout=WAIT_S))
        assert idle_a.evict_requested.wait(WAIT_S) and idle_b.evict_requested.wait(WAIT_S)
        assert not busy_low.evict_requested
        done = [in_thread(lease.yield_if_requested) for lease in (idle_a, idle_b)]
        granted = result(thread, out)
        assert granted.gpu == "g1"
        requester.release(granted)
        for t, o in done:
            assert result(t, o) is True
        for lease in (busy_low, idle_a, idle_b):
            holder.release(lease)
    finally:
        requester.close()
        holder.close()


def test_busy_calls_off_an_idle_eviction_that_has_not_started(
    pair: tuple[GPUBoss, GPUBoss], backend_url: str, namespace: str
) -> None:
    holder, requester = pair
    lease = holder.acquire(16)  # no on_evict: nothing hands it back by itself
    lease.idle()
    thread, out = in_thread(lambda: requester.acquire(8, timeout=1.0))
    until(lambda: evicting(backend_url, namespace, lease.id), "the idle lease is asked to unload")
    lease.busy()  # a request came in before the holder began to unload: it stays, busy
    assert lease.state is LeaseState.GRANTED and not lease.evict_requested
    rec = record(backend_url, namespace, lease.id)
    assert rec is not None and rec["state"] == "active" and rec["busy"] is True and "evict" not in rec
    assert raw_client(backend_url).hlen(Keys(namespace).holds) == 0  # the reservation went with it
    cancelled = events_of(backend_url, namespace, "evict_cancelled")
    assert cancelled and cancelled[0].lease == lease.id and cancelled[0]["reason"] == "busy"
    with pytest.raises(LeaseTimeout):
        result(thread, out)  # busy and of the same priority: not a candidate any more
    holder.release(lease)


def test_busy_after_the_checkpoint_started_hands_back_first(
    pair: tuple[GPUBoss, GPUBoss], backend_url: str, namespace: str
) -> None:
    holder, requester = pair
    lease = holder.acquire(16)
    lease.idle()
    thread, out = in_thread(lambda: requester.acquire(16, timeout=WAIT_S))
    until(lambda: evicting(backend_url, namespace, lease.id), "the idle lease is asked to unload")
    assert holder._eval(holder._core.checkpoint_call(lease.id)) == [1]  # the holder began to unload
    busy, marked = in_thread(lease.busy)  # hands back, waits to be granted again, then busy
    granted = result(thread, out)
    assert busy.is_alive() and lease.state is LeaseState.SUSPENDED
    requester.release(granted)
    result(busy, marked)
    assert lease.state is LeaseState.GRANTED and lease.evictions == 1
    rec = record(backend_url, namespace, lease.id)
    assert rec is not None and rec["busy"] is True and rec["token"] > granted.token
    holder.release(lease)


def test_the_idle_hint_of_a_lease_released_while_idle_is_removed(
    pair: tuple[GPUBoss, GPUBoss], backend_url: str, namespace: str
) -> None:
    holder, requester = pair
    lease = holder.acquire(8)
    lease.idle()
    holder.release(lease)  # release does not know about idleness: the hint stays behind
    hint = f"idle:{lease.id}"
    assert hint in raw_client(backend_url).hgetall(Keys(namespace).usage)
    full = holder.acquire(16)  # active, not idle: no candidate
    with pytest.raises(LeaseTimeout):
        requester.acquire(8, timeout=0.2)  # queued, first in line: the eviction scan removes the stale hint
    assert hint not in raw_client(backend_url).hgetall(Keys(namespace).usage)
    assert not full.evict_requested and "evict_requested" not in [e.type for e in replay(backend_url, namespace)]
    holder.release(full)


def test_an_idle_lease_on_another_gpu_than_the_request_may_use_is_not_searched_for(
    backend_url: str, namespace: str
) -> None:
    """The idle hint names its GPU: a request pinned to another GPU does not read the leases for victims (a
    record nobody can decode proves it), and one pinned to the idle lease's GPU asks it."""
    holder, requester = make(backend_url, namespace, TWO, service="alpha"), make(backend_url, namespace, TWO)
    client, keys = raw_client(backend_url), Keys(namespace)
    core = requester._core
    try:
        busy = holder.acquire(16, device="g0")
        warm = holder.acquire(16, device="g1")
        warm.idle()
        client.hset(keys.leases, "trap", "not a record")  # any scan of the leases fails on it
        req = core.make_request(8, priority="low", timeout=None, device="g0")
        assert call_script_sync(client, core.acquire_call("on-g0", req, "g0", "svc"))[0] == 2  # QUEUED
        assert events_of(backend_url, namespace, "evict_requested") == []
        assert call_script_sync(client, core.release_call("on-g0"))[0] == 2  # withdrawn
        client.hdel(keys.leases, "trap")
        with pytest.raises(LeaseTimeout):  # (nobody hands the idle lease back here: the request times out)
            requester.acquire(8, priority="low", device="g1", timeout=0.3)
        asked = [e.lease for e in events_of(backend_url, namespace, "evict_requested")]
        assert asked == [warm.id], "the idle lease on the request's GPU was not asked (only it)"
        for lease in (busy, warm):
            holder.release(lease)
    finally:
        requester.close()
        holder.close()


def test_an_idle_hint_without_its_gpu_is_searched_for(backend_url: str, namespace: str) -> None:
    """An idle hint of an older gpuboss ("<MiB>" alone) cannot tell its GPU: the leases are read, as before."""
    holder, requester = make(backend_url, namespace, TWO, service="alpha"), make(backend_url, namespace, TWO)
    client, keys = raw_client(backend_url), Keys(namespace)
    try:
        busy = holder.acquire(16, device="g0")
        warm = holder.acquire(16, device="g1")
        warm.idle()
        client.hset(keys.usage, f"idle:{warm.id}", str(16 * 1024))
        with pytest.raises(LeaseTimeout):
            requester.acquire(8, priority="low", device="g1", timeout=0.3)
        assert [e.lease for e in events_of(backend_url, namespace, "evict_requested")] == [warm.id]
        for lease in (busy, warm):
            holder.release(lease)
    finally:
        requester.close()
        holder.close()


# ---------------------------------------------------------------- keep_warm


class Loads:
    """The on_load / on_unload of a simulated model server, with a log of what happened."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []
        self.warm: WarmModel | None = None
        self.users_at_unload: list[int] = []

    def load(self, lease: Any) -> None:
        self.log.append(("load", lease.token))

    def unload(self, reason: str) -> None:
        self.users_at_unload.append(self.warm.users if self.warm is not None else -1)
        self.log.append(("unload", reason))


def test_two_warm_models_take_turns_on_one_gpu(backend_url: str, namespace: str) -> None:
    a, b = make(backend_url, namespace, GPU24, service="alpha"), make(backend_url, namespace, GPU24, service="beta")
    la, lb = Loads(), Loads()
    la.warm = a.keep_warm("alpha-16g", 16, idle_timeout_s=None, on_load=la.load, on_unload=la.unload)
    lb.warm = b.keep_warm("beta-16g", vram_gb=16, idle_timeout_s=None, on_load=lb.load, on_unload=lb.unload)
    try:
        with la.warm as wa, lb.warm as wb:
            assert wb.loaded and not wa.loaded  # beta's entry took alpha's idle VRAM
            assert la.log[-1] == ("unload", "reclaimed")
            until(lambda: wa.last_unload_reason == "reclaimed", "alpha's hand-back is recorded")
            for _ in range(2):
                with wa.busy() as device:
                    assert device == "cuda:0" and wa.loaded and not wb.loaded
                    rec = record(backend_url, namespace, device.lease.id)
                    assert rec is not None and rec["busy"] is True and rec["model"] == "alpha-16g"
                with wb.busy():
                    assert wb.loaded and not wa.loaded
            until(lambda: wa.unloads == 3, "alpha's last hand-back is recorded")
            assert (wa.loads, wa.reloads) == (3, 2)
            assert wa.wait_s is not None and wa.load_s is not None and wa.total_wait_s >= wa.wait_s
        assert la.users_at_unload and set(la.users_at_unload + lb.users_at_unload) == {0}
        assert lb.log[-1] == ("unload", "closed") and not wb.loaded and wb.lease is None
    finally:
        b.close()
        a.close()
    assert raw_client(backend_url).hlen(Keys(namespace).leases) == 0
    unloaded = events_of(backend_url, namespace, "model_unloaded")
    first = unloaded[0]
    assert (first["model"], first["reason"], first["for_service"], first["evict_reason"]) == (
        "alpha-16g",
        "reclaimed",
        "beta",
        "idle",
    )
    assert first.vram_mib == 16 * 1024 and first.gpu == "g0" and first["idle_ms"] >= 0
    assert unloaded[-1]["reason"] == "closed"
    loaded = events_of(backend_url, namespace, "model_loaded")
    assert sorted(e["model"] for e in loaded) == ["alpha-16g", "beta-16g"]
    reloaded = events_of(backend_url, namespace, "model_reloaded")
    assert [e["reloads"] for e in reloaded if e["model"] == "alpha-16g"] == [1, 2]
    assert all(e["waited_ms"] >= 0 and e["load_ms"] >= 0 for e in reloaded)


def test_a_busy_model_is_not_unloaded_until_its_request_ends(backend_url: str, namespace: str) -> None:
    a, b = make(backend_url, namespace, GPU24, service="alpha"), make(backend_url, namespace, GPU24, service="beta")
    la, lb = Loads(), Loads()
    la.warm = a.keep_warm("alpha", 16, on_load=la.load, on_unload=la.unload)
    lb.warm = b.keep_warm("beta", 16, on_load=lb.load, on_unload=lb.unload)
    release = threading.Event()
    try:
        with la.warm as wa:

            def serve() -> None:
                with wa.busy():
                    la.log.append(("serving", None))
                    release.wait(WAIT_S)
                    la.log.append(("served", None))

            serving, served = in_thread(serve)
            until(lambda: ("serving", None) in la.log, "alpha serves")
            with pytest.raises(LeaseTimeout):  # alpha is busy, and of beta's priority: beta cannot get in
                b.keep_warm("beta", 16, timeout=0.3).__enter__()
            assert wa.lease is not None and ("unload", "reclaimed") not in la.log
            entered, entering = in_thread(lb.warm.__enter__)
            until(lambda: queued(backend_url, namespace) == 1, "beta waits")
            rec = record(backend_url, namespace, wa.lease.id)
            assert rec is not None and rec["busy"] is True and rec["state"] == "active"
            assert ("unload", "reclaimed") not in la.log
            release.set()
            result(entered, entering)
            result(serving, served)
            assert la.log[-2:] == [("served", None), ("unload", "reclaimed")] and la.users_at_unload == [0]
            assert lb.warm.loaded and not wa.loaded
            lb.warm.__exit__(None, None, None)
    finally:
        release.set()
        b.close()
        a.close()


def test_a_busy_preemptible_model_is_evicted_by_priority_once_its_request_ends(
    backend_url: str, namespace: str
) -> None:
    """A busy lease is treated by its priority: a busy low, preemptible model is asked to leave for a high
    request (reason priority), but is unloaded only when its running request ends; a request that comes in
    meanwhile does not join the lease being handed back: it waits and reloads."""
    warm_boss, high_boss = make(backend_url, namespace, service="lowsvc"), make(backend_url, namespace, service="hi")
    loads = Loads()
    release = threading.Event()
    try:
        warm_model = warm_boss.keep_warm(
            "low-16g", 16, priority="low", preemptible=True, idle_timeout_s=None, on_load=loads.load
        )
        warm_model.on_unload = loads.unload
        with warm_model as warm:
            loads.warm = warm
            first = warm.lease
            assert first is not None

            def serve() -> Any:
                with warm.busy() as device:
                    loads.log.append(("serving", device.lease.id))
                    release.wait(WAIT_S)
                    loads.log.append(("served", device.lease.id))
                return device.lease

            serving, served = in_thread(serve)
            until(lambda: ("serving", first.id) in loads.log, "the low model serves")
            high, high_out = in_thread(lambda: high_boss.acquire(16, priority="high", timeout=3 * WAIT_S))
            until(lambda: first.state is LeaseState.EVICTING, "the busy low lease is asked to leave")
            assert first.notice is not None and first.notice.reason == "priority"
            late, late_out = in_thread(lambda: _serve_once(warm))  # does not join the lease being handed back
            time.sleep(0.2)
            assert ("unload", "reclaimed") not in loads.log and late.is_alive() and warm.users == 1
            release.set()
            result(serving, served)
            granted = result(high, high_out)
            assert loads.log[-1] == ("unload", "reclaimed") and loads.users_at_unload == [0]
            assert late.is_alive()  # waits for the high lease to go
            high_boss.release(granted)
            assert result(late, late_out) is not first and warm.reloads == 1
    finally:
        release.set()
        high_boss.close()
        warm_boss.close()
    (unloaded, *_) = events_of(backend_url, namespace, "model_unloaded")
    assert (unloaded.lease, unloaded["reason"], unloaded["evict_reason"], unloaded["for_priority"]) == (
        first.id,
        "reclaimed",
        "priority",
        "high",
    )
    assert unloaded["idle_ms"] is None  # it was busy, not idle, when it was asked


def test_an_idle_model_is_unloaded_after_its_timeout(backend_url: str, namespace: str) -> None:
    boss = make(backend_url, namespace, GPU24, service="alpha", default_ttl=3.0)  # renewed every second
    loads = Loads()
    try:
        with boss.keep_warm("alpha", 4, idle_timeout_s=1.0, on_load=loads.load, on_unload=loads.unload) as warm:
            loads.warm = warm
            rec = record(backend_url, namespace, warm.lease.id if warm.lease else "")
            assert rec is not None and rec["idle_timeout_ms"] == 1000 and rec["busy"] is False
            until(lambda: warm.last_unload_reason is not None, "the idle model is unloaded")
            assert warm.last_unload_reason == "idle_timeout" and not warm.loaded
            assert loads.log[-1] == ("unload", "idle_timeout")
            assert raw_client(backend_url).hlen(Keys(namespace).leases) == 0
            with warm.busy() as device:  # the next request loads it again
                assert warm.loaded and device.lease.token > loads.log[0][1] and warm.reloads == 1
        assert loads.log[-1] == ("unload", "closed")
    finally:
        boss.close()
    unloaded = events_of(backend_url, namespace, "model_unloaded")
    assert [(e["reason"], e["by"]) for e in unloaded] == [("idle_timeout", "idle_timeout"), ("closed", None)]
    assert unloaded[0]["idle_ms"] >= 1000


#: Moves a lease's idle_since back by ARGV[2] ms, in one step (the scripts rewrite the record concurrently).
AGE_IDLE = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local rec = cjson.decode(raw)
if not rec.idle_since then return 0 end
rec.idle_since = rec.idle_since - tonumber(ARGV[2])
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(rec))
return 1
"""


def renewed_after(url: str, ns: str, lease_id: str, expires_at: int) -> bool:
    return int((record(url, ns, lease_id) or {}).get("expires_at", 0)) > expires_at


def age_idle(url: str, ns: str, lease_id: str, ms: int) -> None:
    assert raw_client(url).eval(AGE_IDLE, 1, Keys(ns).leases, lease_id, ms) == 1


def test_the_idle_timeout_is_decided_by_the_scripts_with_redis_time(backend_url: str, namespace: str) -> None:
    """No timer in the process: the record says since when the lease is idle (Redis ms) and the heartbeat's
    renew script compares that with Redis time. An hour's timeout is not due after a few renewals; moved back
    by an hour in Redis, it is due at the next renewal, and the model is unloaded (reason idle_timeout)."""
    boss = make(backend_url, namespace, GPU24, service="alpha", default_ttl=3.0)  # renewed every second
    loads = Loads()
    try:
        with boss.keep_warm("alpha", 4, idle_timeout_s=3600, on_load=loads.load, on_unload=loads.unload) as warm:
            loads.warm = warm
            assert warm.lease is not None
            lease_id = warm.lease.id
            rec = record(backend_url, namespace, lease_id)
            assert rec is not None and rec["idle_timeout_ms"] == 3_600_000 and rec["busy"] is False
            for _ in range(2):  # two renewals: the hour is not up
                until(partial(renewed_after, backend_url, namespace, lease_id, int(rec["expires_at"])), "a renewal")
                rec = record(backend_url, namespace, lease_id)
                assert rec is not None and rec["state"] == "active"
            assert warm.loaded and warm.unloads == 0
            age_idle(backend_url, namespace, lease_id, 3_600_000)
            until(lambda: warm.last_unload_reason is not None, "the idle model is unloaded")
            assert warm.last_unload_reason == "idle_timeout" and loads.log[-1] == ("unload", "idle_timeout")
            assert record(backend_url, namespace, lease_id) is None
    finally:
        boss.close()
    (asked,) = events_of(backend_url, namespace, "evict_requested")
    assert (asked.lease, asked["by"], asked["reason"]) == (lease_id, "idle_timeout", "idle_timeout")
    unloaded = events_of(backend_url, namespace, "model_unloaded")
    assert unloaded[0].lease == lease_id and unloaded[0]["reason"] == "idle_timeout"
    assert unloaded[0]["idle_ms"] >= 3_600_000  # by the Redis clock, as moved


def test_idle_timeout_on_any_lease(backend_url: str, namespace: str) -> None:
    """lease.idle(idle_timeout_s=...) without the helper: handed back after the timeout (on_evict runs), with no
    contention; the next busy() asks again by its priority, and the timeout holds for the lease granted again."""
    boss = make(backend_url, namespace, service="alpha", default_ttl=3.0)
    reasons: list[str] = []
    try:
        lease = boss.acquire(8, on_evict=lambda notice: reasons.append(notice.reason))  # resume=True
        with pytest.raises(InvalidRequest) as err:
            lease.idle(idle_timeout_s=-1)
        assert err.value.field == "idle_timeout_s"
        lease.idle(idle_timeout_s=0.5)
        rec = record(backend_url, namespace, lease.id)
        assert rec is not None and rec["idle_timeout_ms"] == 500 and rec["busy"] is False
        until(lambda: lease._parked, "the idle lease is handed back after its timeout")
        assert reasons == ["idle_timeout"] and record(backend_url, namespace, lease.id) is None
        lease.busy()  # asks again; nothing else holds the GPU
        assert lease.state is LeaseState.GRANTED and lease.is_busy is True and lease.evictions == 1
        lease.idle()  # the timeout it was given is kept
        rec = record(backend_url, namespace, lease.id)
        assert rec is not None and rec["idle_timeout_ms"] == 500
        lease.touch()
        lease.idle(idle_timeout_s=None)  # removed
        rec = record(backend_url, namespace, lease.id)
        assert rec is not None and "idle_timeout_ms" not in rec
        boss.release(lease)
    finally:
        boss.close()
    asked = events_of(backend_url, namespace, "evict_requested")
    assert [(e.lease, e["by"], e["reason"]) for e in asked] == [(lease.id, "idle_timeout", "idle_timeout")]


def test_a_reload_waits_by_its_priority_calls_on_load_and_reports_the_wait(backend_url: str, namespace: str) -> None:
    """A high warm model, idle, is reclaimed by a low request (idle comes before priority). Its next busy() asks
    again as high: ahead of a normal request that came first, granted first once the GPU is free; on_load runs
    before the block, and the wait and the load are reported (attributes and model_reloaded)."""
    warm_boss = make(backend_url, namespace, service="alpha")
    low_boss = make(backend_url, namespace, service="lowsvc")
    normal_boss = make(backend_url, namespace, service="normalsvc")
    load_s, held_s = 0.2, 0.3
    loads = Loads()
    entered, leave = threading.Event(), threading.Event()

    def load(lease: Any) -> None:
        time.sleep(load_s)  # the model loads
        loads.load(lease)

    try:
        warm_model = warm_boss.keep_warm("alpha-16g", 16, priority="high", idle_timeout_s=None, on_load=load)
        warm_model.on_unload = loads.unload
        with warm_model as warm:
            loads.warm = warm
            assert warm.lease is not None
            first = warm.lease
            low = low_boss.acquire(16, priority="low", preemptible=False, timeout=WAIT_S)
            until(lambda: warm.last_unload_reason == "reclaimed", "the idle high model is unloaded for low")
            normal, normal_out = in_thread(lambda: normal_boss.acquire(16, priority="normal", timeout=3 * WAIT_S))
            until(lambda: queued(backend_url, namespace) == 1, "a normal request waits")

            def serve() -> Any:
                with warm.busy() as device:
                    entered.set()
                    leave.wait(WAIT_S)
                    return device.lease

            serving, served = in_thread(serve)
            until(lambda: queued(backend_url, namespace) == 2, "the reload waits")
            client = raw_client(backend_url)
            head = str(client.zrange(Keys(namespace).queue, 0, 0)[0])
            assert json.loads(str(client.hget(Keys(namespace).tickets, head)))["priority"] == "high"
            time.sleep(held_s)  # the reload waits at least this long: low holds the GPU
            assert not entered.is_set() and loads.log[-1] == ("unload", "reclaimed")
            low_boss.release(low)
            assert entered.wait(WAIT_S), "the reload was not granted"
            assert normal.is_alive() and loads.log[-1][0] == "load"  # granted before the earlier normal request
            assert warm.reloads == 1 and warm.wait_s is not None and warm.load_s is not None
            assert warm.wait_s >= held_s and warm.load_s >= load_s
            leave.set()
            lease = result(serving, served)
            assert lease is not first and lease.priority == "high"
            granted = result(normal, normal_out)  # the model, idle again, unloads for the normal request
            assert loads.log[-1] == ("unload", "reclaimed")
            normal_boss.release(granted)
    finally:
        leave.set()
        for b in (normal_boss, low_boss, warm_boss):
            b.close()
    (loaded,) = events_of(backend_url, namespace, "model_loaded")
    assert (loaded.lease, loaded["model"], loaded.gpu, loaded.vram_mib) == (first.id, "alpha-16g", "g0", 16 * 1024)
    assert loaded["load_ms"] >= load_s * 1000
    (reloaded,) = events_of(backend_url, namespace, "model_reloaded")
    assert (reloaded.lease, reloaded["model"], reloaded.gpu, reloaded.vram_mib, reloaded.priority) == (
        lease.id,
        "alpha-16g",
        "g0",
        16 * 1024,
        "high",
    )
    assert reloaded["reloads"] == 1 and reloaded["waited_ms"] >= held_s * 1000 and reloaded["load_ms"] >= load_s * 1000
    unloaded = events_of(backend_url, namespace, "model_unloaded")
    assert [
        (e.lease, e["reason"], e["by"], e["for_service"], e["for_priority"], e["evict_reason"]) for e in unloaded
    ] == [
        (first.id, "reclaimed", low.id, "lowsvc", "low", "idle"),
        (lease.id, "reclaimed", granted.id, "normalsvc", "normal", "idle"),
    ]
    assert all((e["model"], e.gpu, e.vram_mib) == ("alpha-16g", "g0", 16 * 1024) for e in unloaded)


def test_an_unload_that_fails_keeps_the_lease_and_busy_unloads_first(
    backend_url: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """on_unload raises when the model is reclaimed: the model may still be loaded, so the lease stays (being
    handed back; the failure is logged). The next busy() unloads first; when on_unload raises again the error
    reaches the request; once it succeeds the VRAM goes to the waiter and busy() reloads."""
    a, b = make(backend_url, namespace, GPU24, service="alpha"), make(backend_url, namespace, GPU24, service="beta")
    calls: list[str] = []

    def unload(reason: str) -> None:
        calls.append(reason)
        if len(calls) <= 2:
            raise RuntimeError(f"unload {len(calls)} failed")

    try:
        with a.keep_warm("alpha", 16, idle_timeout_s=None, on_unload=unload) as warm:
            lease = warm.lease
            assert lease is not None
            waiting, waited = in_thread(lambda: b.acquire(16, timeout=3 * WAIT_S))
            until(lambda: any("on_evict" in r.getMessage() for r in caplog.records), "the failure is logged")
            assert calls == ["reclaimed"] and warm.lease is lease
            rec = record(backend_url, namespace, lease.id)
            assert rec is not None and rec["state"] == "evicting" and queued(backend_url, namespace) == 1
            with pytest.raises(RuntimeError, match="unload 2 failed"), warm.busy():
                pytest.fail("a block ran while its model was being unloaded")
            assert warm.lease is lease and record(backend_url, namespace, lease.id) is not None
            serving, served = in_thread(lambda: _serve_once(warm))
            granted = result(waiting, waited)  # the third unload worked: the VRAM went to beta
            assert calls == ["reclaimed"] * 3 and serving.is_alive()
            b.release(granted)
            reloaded = result(serving, served)
            assert reloaded is not lease and warm.reloads == 1 and warm.unloads == 1
    finally:
        b.close()
        a.close()
    assert raw_client(backend_url).hlen(Keys(namespace).leases) == 0


def _serve_once(warm: WarmModel) -> Any:
    with warm.busy() as device:
        return device.lease


def test_failing_callbacks_leave_nothing_held(backend_url: str, namespace: str) -> None:
    """on_unload raising at the end of the block: the lease is handed back all the same and the error raised.
    on_load raising: the lease is released and the error raised (at entry, or to the busy() that reloads)."""
    boss, other = make(backend_url, namespace, service="alpha"), make(backend_url, namespace, service="beta")

    def unload() -> None:
        raise RuntimeError("unload failed")

    try:
        with pytest.raises(RuntimeError, match="unload failed"), boss.keep_warm("a", 4, on_unload=unload) as warm:
            lease = warm.lease
            assert lease is not None
        assert warm.lease is None and warm.last_unload_reason == "closed" and boss.held() == []
        assert record(backend_url, namespace, lease.id) is None
        fail_load = [False, True, False]

        def load() -> None:
            if fail_load.pop(0):
                raise ValueError("load failed")

        with boss.keep_warm("b", 16, on_load=load) as warm:
            first = warm.lease
            assert first is not None
            other.release(other.acquire(16, timeout=WAIT_S))  # reclaims the idle model
            until(lambda: warm.lease is None, "the model is unloaded")
            with pytest.raises(ValueError, match="load failed"), warm.busy():
                pytest.fail("a block ran without its model")
            assert (
                warm.lease is None and boss.held() == [] and raw_client(backend_url).hlen(Keys(namespace).leases) == 0
            )
            assert _serve_once(warm) is not first and warm.loaded
    finally:
        other.close()
        boss.close()
    assert raw_client(backend_url).hlen(Keys(namespace).leases) == 0


def test_keep_warm_takes_its_size_from_the_model_registry(boss: GPUBoss) -> None:
    with boss.keep_warm("gemma3:12b", on_load=lambda: None) as warm:
        assert warm.vram_gb is not None and warm.lease is not None
        assert warm.lease.vram_mib == round(warm.vram_gb * 1024) and warm.lease.model == "gemma3:12b"


def test_bad_arguments_name_the_field(boss: GPUBoss) -> None:
    cases: list[tuple[str, dict[str, Any]]] = [
        ("model", {"model": ""}),
        ("vram_gb", {"model": "m", "vram_gb": -1}),
        ("idle_timeout_s", {"model": "m", "vram_gb": 1, "idle_timeout_s": 0}),
        ("idle_timeout_s", {"model": "m", "vram_gb": 1, "idle_timeout_s": "5m"}),
        ("on_unload", {"model": "m", "vram_gb": 1, "on_unload": "unload"}),
        ("on_load", {"model": "m", "vram_gb": 1, "on_load": 3}),
        ("priority", {"model": "m", "vram_gb": 1, "priority": "urgent"}),
        ("ttl", {"model": "m", "vram_gb": 1, "ttl": -1}),
        ("timeout", {"model": "m", "vram_gb": 1, "timeout": -1}),
    ]
    for field, kwargs in cases:
        with pytest.raises(InvalidRequest) as err:
            boss.keep_warm(**kwargs)
        assert err.value.field == field, kwargs
    warm = boss.keep_warm("m", 1)
    with pytest.raises(RuntimeError, match="not open"), warm.busy():
        pass
    lease = boss.acquire(1)
    with pytest.raises(InvalidRequest) as err:
        boss._activity(lease, "sleep")
    assert err.value.field == "op"
    boss.release(lease)


#: keep_warm arguments checked when it is called (the core's checks of a lease request), before any I/O.
BAD_WARM: list[tuple[str, dict[str, Any], str]] = [
    ("node", {"node": " padded"}, "'any' (every host)"),
    ("node", {"node": 5}, "'any' (every host)"),
    ("device", {"device": -1}, "a GPU id, 'cuda:N'"),
    ("device", {"device": ""}, "a GPU id, 'cuda:N'"),
    ("preemptible", {"preemptible": "yes"}, "True or False"),
    ("model", {"model": "gemma3:13b"}, "gemma3:12b"),  # sized from the model registry: an unknown name
]


@pytest.mark.parametrize(("field", "kwargs", "allowed"), BAD_WARM)
@pytest.mark.parametrize("vram_gb", [None, 4])
def test_keep_warm_checks_every_argument_when_called_and_writes_nothing(
    backend_url: str, namespace: str, field: str, kwargs: dict[str, Any], allowed: str, vram_gb: float | None
) -> None:
    if field == "model" and vram_gb is not None:
        pytest.skip("with vram_gb the model is only a label")
    boss = make(backend_url, namespace)
    before = snapshot(raw_client(backend_url), namespace)
    try:
        with pytest.raises(InvalidRequest) as err:
            boss.keep_warm(**{"model": "gemma3:4b", "vram_gb": vram_gb, **kwargs})
        assert err.value.field == field and allowed in str(err.value)
        assert snapshot(raw_client(backend_url), namespace) == before
    finally:
        boss.close()


@pytest.mark.parametrize(("field", "kwargs", "allowed"), BAD_WARM)
async def test_async_keep_warm_checks_every_argument_when_called(
    backend_url: str, namespace: str, field: str, kwargs: dict[str, Any], allowed: str
) -> None:
    boss = AsyncGPUBoss(backend_url, namespace=namespace, gpus=ONE, service="svc")
    before = snapshot(raw_client(backend_url), namespace)
    try:
        with pytest.raises(InvalidRequest) as err:
            boss.keep_warm(**{"model": "gemma3:4b", **kwargs})
        assert err.value.field == field and allowed in str(err.value)
        assert snapshot(raw_client(backend_url), namespace) == before
    finally:
        await boss.close()


def test_keep_warm_sized_by_the_registry_with_an_unknown_gpu_writes_nothing(backend_url: str, namespace: str) -> None:
    """A pin only the registry can judge fails at entry, after the model is sized, and still writes nothing."""
    boss = make(backend_url, namespace)
    before = snapshot(raw_client(backend_url), namespace)
    loads: list[object] = []
    try:
        with pytest.raises(InvalidRequest) as err, boss.keep_warm("gemma3:4b", device="g9", on_load=loads.append):
            pytest.fail("the block must not start")
        assert err.value.field == "device" and "g0 (cuda:0)" in str(err.value)
        assert snapshot(raw_client(backend_url), namespace) == before and loads == []
    finally:
        boss.close()


async def test_async_keep_warm_sized_by_the_registry_with_an_unknown_gpu_writes_nothing(
    backend_url: str, namespace: str
) -> None:
    boss = AsyncGPUBoss(backend_url, namespace=namespace, gpus=ONE, service="svc")
    before = snapshot(raw_client(backend_url), namespace)
    try:
        with pytest.raises(InvalidRequest) as err:
            async with boss.keep_warm("gemma3:4b", device="g9"):
                pytest.fail("the block must not start")
        assert err.value.field == "device" and "g0 (cuda:0)" in str(err.value)
        assert snapshot(raw_client(backend_url), namespace) == before
    finally:
        await boss.close()


def test_status_and_leases_show_busy_and_idle(real_url: str, namespace: str) -> None:
    """The record's busy/idle_since (and model, idle timeout) in `gpuboss status`, `gpuboss leases` and --json."""
    boss = make(real_url, namespace, GPU24, service="alpha")
    args = ["--redis-url", real_url, "--namespace", namespace]

    def run(*command: str) -> str:
        done = CliRunner().invoke(cli, [*args, *command])
        assert done.exit_code == 0, done.output
        return done.stdout

    try:
        with boss.keep_warm("alpha-16g", 16) as warm:
            assert re.search(r"active \(idle [^,]+ of 5 min 00 s, alpha-16g\)", run("status")), run("status")
            assert re.search(r"active \(idle [^,]+ of 5 min 00 s, alpha-16g\)", run("leases")), run("leases")
            (rec,) = json.loads(run("--json", "leases"))
            assert rec["busy"] is False and rec["idle_for_s"] >= 0 and rec["idle_timeout_ms"] == 300_000
            assert warm.lease is not None and warm.lease.idle_since is not None
            assert rec["idle_since"] == round(warm.lease.idle_since * 1000)
            with warm.busy():
                assert "active (busy, alpha-16g)" in run("status")
                assert "active (busy, alpha-16g)" in run("leases")
                (rec,) = json.loads(run("--json", "leases"))
                assert rec["busy"] is True and rec["model"] == "alpha-16g" and "idle_since" not in rec
                (lease,) = json.loads(run("--json", "status"))["leases"]
                assert lease["busy"] is True and lease["model"] == "alpha-16g"
            (lease,) = json.loads(run("--json", "status"))["leases"]
            assert lease["busy"] is False and "idle_since" in lease and lease["model"] == "alpha-16g"
    finally:
        boss.close()


async def test_async_keep_warm_with_async_callbacks(backend_url: str, namespace: str) -> None:
    a = AsyncGPUBoss(backend_url, namespace=namespace, gpus=GPU24, service="alpha")
    b = AsyncGPUBoss(backend_url, namespace=namespace, gpus=GPU24, service="beta")
    log: list[str] = []

    def callbacks(name: str) -> dict[str, Any]:
        async def load(lease: Any) -> None:
            await asyncio.sleep(0.001)
            log.append(f"load {name} {lease.device}")

        async def unload(reason: str) -> None:
            await asyncio.sleep(0.001)
            log.append(f"unload {name} {reason}")

        return {"on_load": load, "on_unload": unload}

    try:
        async with (
            a.keep_warm("alpha", 16, **callbacks("alpha")) as wa,
            b.keep_warm("beta", 16, **callbacks("beta")) as wb,
        ):
            assert wb.loaded and not wa.loaded
            async with wa.busy() as device:
                assert device == "cuda:0" and wa.loaded and not wb.loaded and wa.users == 1
                async with wa.busy():  # a second request at the same time joins
                    assert wa.users == 2
            assert wa.reloads == 1
            lease = await a.acquire(1)  # the lease-level API on an async boss
            async with lease.busy():
                assert lease.is_busy is True
            assert lease.is_busy is False
            await lease.touch()
            await lease.busy()
            assert lease.is_busy is True
            await a.release(lease)
        assert log == [
            "load alpha cuda:0",
            "unload alpha reclaimed",
            "load beta cuda:0",
            "unload beta reclaimed",
            "load alpha cuda:0",
            "unload alpha closed",
        ]
    finally:
        await b.close()
        await a.close()


async def test_async_failing_unloads_are_handled_like_the_blocking_ones(backend_url: str, namespace: str) -> None:
    """The async twin of the two tests above: a failed unload on reclaim keeps the lease and the next busy()
    unloads first; a failed unload at the end of the block still hands the lease back and raises."""
    a = AsyncGPUBoss(backend_url, namespace=namespace, gpus=GPU24, service="alpha")
    b = AsyncGPUBoss(backend_url, namespace=namespace, gpus=GPU24, service="beta")
    calls: list[str] = []

    async def unload(reason: str) -> None:
        calls.append(reason)
        if len(calls) in (1, 3):
            raise RuntimeError(f"unload {len(calls)} failed")

    try:
        with pytest.raises(RuntimeError, match="unload 3 failed"):
            async with a.keep_warm("alpha", 16, idle_timeout_s=None, on_unload=unload) as warm:
                lease = warm.lease
                assert lease is not None
                waiting = asyncio.ensure_future(b.acquire(16, timeout=3 * WAIT_S))
                deadline = time.monotonic() + WAIT_S
                while not (calls and lease.state is LeaseState.EVICTING and warm._phase == "ready"):
                    assert time.monotonic() < deadline, "the failed unload did not settle"
                    await asyncio.sleep(0.01)
                assert warm.lease is lease and not waiting.done()
                rec = record(backend_url, namespace, lease.id)
                assert rec is not None and rec["state"] == "evicting"

                async def serve() -> Any:
                    async with warm.busy() as device:
                        return device.lease

                serving = asyncio.ensure_future(serve())
                granted = await asyncio.wait_for(waiting, WAIT_S)  # busy() unloaded first (call 2)
                assert calls == ["reclaimed", "reclaimed"] and not serving.done()
                await b.release(granted)
                assert await asyncio.wait_for(serving, WAIT_S) is not lease and warm.reloads == 1
        assert calls == ["reclaimed", "reclaimed", "closed"]
        assert warm.lease is None and a.held() == []
    finally:
        await b.close()
        await a.close()
    assert raw_client(backend_url).hlen(Keys(namespace).leases) == 0


def test_script_replies(backend_url: str, namespace: str) -> None:
    """activity and unload: every reply code, and the unload of a lease already gone still says so."""
    boss = make(backend_url, namespace)
    client = raw_client(backend_url)
    core: Core = boss._core
    try:
        lease = boss.acquire(4)
        done = call_script_sync(client, activity_call(core, lease.id, "idle", 1000, "m", "loaded"))
        assert int(done[0]) == ActivityReply.DONE and json.loads(done[1])["idle_timeout_ms"] == 1000
        other = make(backend_url, namespace, service="other")
        try:
            thread, out = in_thread(lambda: other.acquire(16, timeout=WAIT_S))
            until(lambda: evicting(backend_url, namespace, lease.id), "the idle lease is asked to unload")
            assert call_script_sync(client, core.checkpoint_call(lease.id)) == [1]
            refused = call_script_sync(client, activity_call(core, lease.id, "busy"))
            assert int(refused[0]) == ActivityReply.EVICTING
            assert json.loads(refused[1])["reason"] == "idle"
            from gpuboss.warm import unload_call

            boss._heartbeat.forget(lease.id)
            assert call_script_sync(client, unload_call(core, lease, "closed"))[0] == UnloadReply.UNLOADED
            other.release(result(thread, out))
        finally:
            other.close()
        assert call_script_sync(client, unload_call(core, lease, "lost")) == [UnloadReply.GONE]
        assert int(call_script_sync(client, activity_call(core, lease.id, "touch"))[0]) == ActivityReply.GONE
        reasons = [e["reason"] for e in events_of(backend_url, namespace, "model_unloaded")]
        assert reasons == ["reclaimed", "lost"]
    finally:
        boss.close()


# ---------------------------------------------------------------- two model servers, separate processes

#: The simulated GPU: 24 GiB, two models of 16 GiB; only one fits.
MODEL_MIB = 16 * 1024
GPU_MIB = 24 * 1024
#: Seconds a simulated model takes to load (a lower bound of each load_ms reported).
LOAD_S = 0.05


def model_server(url: str, ns: str, name: str, idle_timeout_s: float, requests: Any, results: Any) -> None:
    """One model server (a process of its own): keeps its 16 GB model warm and serves the requests of
    ``requests`` with two threads. Everything it reports is stamped with the Redis clock (the one the scripts
    use): when each load and unload began and ended, with the lease it ran under, and the start and end of each
    request with its lease id and fencing token. At the start and end of each request it also checks, in Redis,
    that its lease exists with that token and is busy. The simulated GPU is a counter: a load adds the model's
    MiB, an unload takes them off, so two resident models would show."""
    client = connect_sync(url, 5.0)
    sim = f"{ns}-sim:vram"  # the test's own key, outside gpuboss's namespace
    boss = GPUBoss(url, namespace=ns, gpus=GPU24, service=name, default_ttl=3.0)
    holder: dict[str, WarmModel] = {}

    def redis_ms() -> int:
        seconds, micros = client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def load(lease: Any) -> None:
        begin = redis_ms()
        time.sleep(LOAD_S)
        total = int(client.incrby(sim, MODEL_MIB))
        results.put(
            {"kind": "load", "name": name, "lease": lease.id, "token": lease.token, "total_mib": total}
            | {"begin_ms": begin, "end_ms": redis_ms()}
        )

    def unload(reason: str) -> None:
        warm = holder["warm"]
        begin = redis_ms()
        left = int(client.decrby(sim, MODEL_MIB))
        lease_id = warm.lease.id if warm.lease is not None else None
        results.put(
            {"kind": "unload", "name": name, "lease": lease_id, "reason": reason, "users": warm.users, "left": left}
            | {"begin_ms": begin, "end_ms": redis_ms()}
        )

    def lease_ok(warm: WarmModel) -> bool:
        lease = warm.lease
        raw = client.hget(Keys(ns).leases, lease.id) if lease is not None else None
        rec = json.loads(raw) if raw else {}
        return lease is not None and rec.get("token") == lease.token and rec.get("busy") is True

    def serve() -> None:
        warm = holder["warm"]
        while True:
            job = requests.get()
            if job is None:
                return
            with warm.busy() as device:
                start, ok_start = redis_ms(), lease_ok(warm)
                time.sleep(job["hold_s"])  # the model answers
                ok_end, end = lease_ok(warm), redis_ms()
            results.put(
                {"kind": "served", "name": name, "job": job["id"], "lease": device.lease.id}
                | {"token": device.lease.token, "ok": ok_start and ok_end, "start_ms": start, "end_ms": end}
            )

    holder["warm"] = warm = boss.keep_warm(
        f"{name}-16g", vram_gb=16, idle_timeout_s=idle_timeout_s, on_load=load, on_unload=unload
    )
    try:
        with warm:
            results.put({"kind": "ready", "name": name})
            threads = [threading.Thread(target=serve) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        results.put(
            {"kind": "stats", "name": name, "loads": warm.loads, "reloads": warm.reloads, "unloads": warm.unloads}
            | {"total_wait_s": warm.total_wait_s, "total_load_s": warm.total_load_s}
        )
    finally:
        boss.close()
        results.put({"kind": "exit", "name": name})


def within(inner: tuple[int, int], outer: tuple[int, int]) -> bool:
    return outer[0] <= inner[0] <= inner[1] <= outer[1]


def test_two_model_servers_share_one_gpu(real_url: str, namespace: str) -> None:
    """The issue's done-when: two model-server processes on one simulated 24 GB GPU, each keeping a 16 GB model
    warm. Requests to both are served; each model is unloaded for the other only while idle, never while a
    request runs; an idle model is unloaded after its timeout; no request runs without its lease. Checked from
    what the processes report and the event log, on the Redis clock; no duration is asserted."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    inbox = {"alpha": ctx.Queue(), "beta": ctx.Queue()}
    timeouts = {"alpha": 600.0, "beta": 3.0}  # beta's idle model goes after 3 s without requests
    procs = {
        name: ctx.Process(target=model_server, args=(real_url, namespace, name, timeouts[name], inbox[name], results))
        for name in ("alpha", "beta")
    }
    seen: list[dict[str, Any]] = []

    def take(kind: str, name: str | None = None) -> dict[str, Any]:
        while True:
            msg = results.get(timeout=90)
            seen.append(msg)
            if msg["kind"] == kind and (name is None or msg["name"] == name):
                return msg

    jobs = 0

    def send(name: str, hold_s: float = 0.03) -> None:
        nonlocal jobs
        jobs += 1
        inbox[name].put({"id": jobs, "hold_s": hold_s})

    def served(count: int) -> None:
        for _ in range(count):
            take("served")

    try:
        procs["alpha"].start()
        take("ready", "alpha")
        procs["beta"].start()
        take("ready", "beta")  # beta's load took alpha's idle VRAM
        for _ in range(3):  # one at a time: each request finds the other model resident and idle
            send("alpha")
            served(1)
            send("beta")
            served(1)
        for _ in range(3):  # both at once, and two requests to one model at once
            send("alpha", 0.1)
            send("beta", 0.1)
            send("alpha", 0.1)
            served(3)
        send("beta")
        served(1)
        # No more requests: beta's model, idle, is unloaded after its timeout.
        last = len(seen)
        while not any(m["kind"] == "unload" and m["reason"] == "idle_timeout" for m in seen[last:]):
            take("unload", "beta")
        for name in ("alpha", "beta"):
            inbox[name].put(None)
            inbox[name].put(None)
        for name in ("alpha", "beta"):
            while not any(m["kind"] == "exit" and m["name"] == name for m in seen):
                take("exit")
            procs[name].join(30)
            assert procs[name].exitcode == 0, name
    finally:
        for proc in procs.values():
            if proc.is_alive():
                proc.kill()
                proc.join(10)
    log = list(replay(real_url, namespace))
    requests = [m for m in seen if m["kind"] == "served"]
    loads = [m for m in seen if m["kind"] == "load"]
    unloads = [m for m in seen if m["kind"] == "unload"]
    stats = {m["name"]: m for m in seen if m["kind"] == "stats"}

    # Requests to both were served, each once.
    assert sorted(m["job"] for m in requests) == list(range(1, jobs + 1))
    assert {m["name"] for m in requests} == {"alpha", "beta"}
    # No lease was lost or taken away: every one ended by a hand-back.
    assert not [e for e in log if e.type in ("expired", "revoked", "lost")]

    # Each lease's interval, from its grant to its hand-back, by the Redis clock.
    held: dict[str, tuple[int, int]] = {}
    tokens: dict[str, int] = {}
    for e in log:
        if e.type == "granted":
            held[e.lease] = (e.time_ms, 2**62)
            tokens[e.lease] = e["token"]
        elif e.type in ("evicted", "released") and e.lease in held:
            held[e.lease] = (held[e.lease][0], e.time_ms)
    # Each model's resident intervals, from the start of a load to the end of its unload, under one lease.
    # (lease, load began, load ended, unload began, unload ended)
    resident: dict[str, list[tuple[str, int, int, int, int]]] = {"alpha": [], "beta": []}
    for load in loads:
        unload = next(u for u in unloads if u["lease"] == load["lease"])
        assert load["name"] == unload["name"] and load["token"] == tokens[load["lease"]]
        assert within((load["begin_ms"], unload["end_ms"]), held[load["lease"]]), (load, unload)
        times = (load["begin_ms"], load["end_ms"], unload["begin_ms"], unload["end_ms"])
        resident[load["name"]].append((load["lease"], *times))
    assert len(unloads) == len(loads)
    # The two 16 GB models were never resident at the same time (nor did the simulated GPU ever hold both).
    for _, a_begin, _, _, a_end in resident["alpha"]:
        for _, b_begin, _, _, b_end in resident["beta"]:
            assert a_end <= b_begin or b_end <= a_begin, (a_begin, a_end, b_begin, b_end)
    assert all(m["total_mib"] <= GPU_MIB for m in loads) and all(m["left"] >= 0 for m in unloads)
    assert int(raw_client(real_url).get(f"{namespace}-sim:vram") or 0) == 0

    # No request ran without its lease, nor without its model: each lies within its lease's interval, with the
    # lease's token, and between the end of its model's load and the start of that model's unload; and each
    # saw its lease busy in Redis at its start and end.
    for m in requests:
        assert m["ok"], m
        assert m["token"] == tokens[m["lease"]] and within((m["start_ms"], m["end_ms"]), held[m["lease"]]), m
        spans = [(r[2], r[3]) for r in resident[m["name"]] if r[0] == m["lease"]]
        assert any(within((m["start_ms"], m["end_ms"]), span) for span in spans), m
    # Never unloaded while busy: no request was running in that process when on_unload was called.
    assert all(u["users"] == 0 for u in unloads), unloads

    # Each was unloaded for the other, only because it was idle; beta also after its idle timeout.
    events = [e for e in log if e.type == "model_unloaded"]
    for name, other in (("alpha", "beta"), ("beta", "alpha")):
        assert any(e.service == name and e["reason"] == "reclaimed" and e["for_service"] == other for e in events)
    reclaimed = [e for e in events if e["reason"] == "reclaimed"]
    assert all(e["evict_reason"] == "idle" and e["idle_ms"] is not None for e in reclaimed), reclaimed
    for e in reclaimed:  # by: the other model's request, which was granted the VRAM
        assert next(g for g in log if g.type == "granted" and g.lease == e["by"]).service != e.service
    timed_out = [e for e in events if e["reason"] == "idle_timeout"]
    assert timed_out and all(e.service == "beta" and e["idle_ms"] >= 3000 for e in timed_out), timed_out
    assert all((e.gpu, e.vram_mib) == ("g0", MODEL_MIB) for e in events)
    reloads = [e for e in log if e.type == "model_reloaded"]
    assert {e.service for e in reloads} == {"alpha", "beta"}
    assert all(e["waited_ms"] >= 0 and e["load_ms"] >= LOAD_S * 1000 for e in reloads), reloads
    assert raw_client(real_url).hlen(Keys(namespace).leases) == 0

    print(  # the figures (pytest -s shows them)
        f"\n{jobs} requests: "
        + ", ".join(f"{n} {sum(m['name'] == n for m in requests)}" for n in ("alpha", "beta"))
        + "; "
        + "; ".join(
            f"{n}: {s['loads']} loads ({s['reloads']} reloads, waited {s['total_wait_s']:.2f} s, loading "
            f"{s['total_load_s']:.2f} s), {s['unloads']} unloads"
            for n, s in sorted(stats.items())
        )
        + f"; unload reasons {sorted((e.service, e['reason']) for e in events)}"
    )
