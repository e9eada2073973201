"""The state header (``ns:head``; lua/includes/state.lua): what every script call reads first.

It tells a call when the next expiry, stale reading or index check is due and which optional hashes (holds,
offline, observed) hold anything, so that a call skips the reads that would find nothing. These tests hold it
to the promise that skipping changes nothing: an expiry sooner than the next full check is still collected on
time, what the scripts add is seen by the very next call, an edit by hand is seen within ``CHECK_EVERY_MS``
(at once when the header is deleted with it), and a namespace without GPUs keeps no header.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import redis
from gpuboss import GPUBoss, Keys, LeaseTimeout
from gpuboss.core import Call
from gpuboss.events import replay
from gpuboss.redis_io import call_script_sync

from tests.conftest import raw_client, snapshot

# The tests of backend_url (and the fixtures built on it) run on a valkey-server too: tests/conftest.py.
pytestmark = pytest.mark.valkey

#: lua/includes/state.lua CHECK_EVERY_MS, and a margin for a slow machine.
CHECK_EVERY_S = 1.0
MARGIN_S = 0.3

GPUS = [{"id": "g0", "name": "t", "vram_gb": 8, "index": 0}, {"id": "g1", "name": "t", "vram_gb": 8, "index": 1}]


@pytest.fixture
def boss(backend_url: str, namespace: str) -> Iterator[GPUBoss]:
    made = GPUBoss(backend_url, namespace=namespace, gpus=GPUS, service="svc")
    made.register_gpus()
    yield made
    made.close()


def redis_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def dead_holder_lease(client: redis.Redis, boss: GPUBoss, rid: str, vram_gb: int, ttl_s: float, device: str) -> None:
    """A lease whose holder never renews it (a process that died): granted by the script call alone."""
    core = boss._core
    req = core.make_request(vram_gb, priority="normal", timeout=0, ttl=ttl_s, device=device)
    reply = call_script_sync(client, core.acquire_call(rid, req, device, "svc"))
    assert reply[0] == 1, reply


def test_an_expiry_sooner_than_the_next_check_is_collected_on_time(
    boss: GPUBoss, backend_url: str, namespace: str
) -> None:
    client, keys = raw_client(backend_url), Keys(namespace)
    dead_holder_lease(client, boss, "short-lived", 8, 0.3, "g0")
    expires_at = int(client.zscore(keys.lease_exp, "short-lived") or 0)
    due = int(client.hget(keys.head, "due") or 0)
    assert 0 < due <= expires_at, f"the header's next check ({due}) must not come after the expiry ({expires_at})"
    dead_holder_lease(client, boss, "long-lived", 8, 30, "g1")
    time.sleep(max(0.0, (expires_at - redis_ms(client)) / 1000) + 0.05)
    assert redis_ms(client) - expires_at < CHECK_EVERY_S * 1000 - 200, "the machine was too slow to tell"
    # g1 is held, g0's lease expired a moment ago and well before the next regular check: collected now.
    lease = boss.acquire(vram_gb=8, timeout=0)
    assert lease.gpu == "g0"
    boss.release(lease)


def test_what_the_scripts_add_is_seen_by_the_next_call(boss: GPUBoss, backend_url: str, namespace: str) -> None:
    client, keys = raw_client(backend_url), Keys(namespace)
    first = boss.acquire(vram_gb=1, timeout=0)
    boss.release(first)
    assert client.hget(keys.head, "holds") == "0", "no reservation yet: calls skip the holds hash"
    # A preemptible low lease fills g0 and g1 is full: a high request asks it to checkpoint and reserves g0.
    victim = boss.acquire(vram_gb=8, priority="low", preemptible=True, device="g0", timeout=0)
    other = boss.acquire(vram_gb=8, device="g1", timeout=0)
    with pytest.raises(LeaseTimeout):
        boss.acquire(vram_gb=8, priority="high", timeout=0.3)
    assert client.hget(keys.head, "holds") == "1", "a reservation was written: the flag says so at once"
    boss.release(victim)
    boss.release(other)


def test_an_edit_by_hand_is_seen_at_the_next_check_or_at_once_without_the_header(
    boss: GPUBoss, backend_url: str, namespace: str
) -> None:
    client, keys = raw_client(backend_url), Keys(namespace)
    boss.release(boss.acquire(vram_gb=1, timeout=0))
    assert client.hget(keys.head, "offline") == "0"
    silent = {"host": "box", "since": redis_ms(client), "reason": "by hand"}
    client.hset(keys.offline, mapping={"g0": json.dumps(silent), "g1": json.dumps(silent)})
    client.delete(keys.head)
    with pytest.raises(LeaseTimeout):
        boss.acquire(vram_gb=1, timeout=0)  # both GPUs offline: nothing is granted
    client.delete(keys.offline)
    time.sleep(CHECK_EVERY_S + MARGIN_S)
    lease = boss.acquire(vram_gb=1, timeout=0)  # the marks are gone, and the next full check saw it
    boss.release(lease)
    client.hset(keys.offline, mapping={"g0": json.dumps(silent), "g1": json.dumps(silent)})
    time.sleep(CHECK_EVERY_S + MARGIN_S)
    with pytest.raises(LeaseTimeout):
        boss.acquire(vram_gb=1, timeout=0)  # marked again, header kept: seen within CHECK_EVERY_MS
    client.delete(keys.offline)


def test_a_namespace_without_gpus_keeps_no_header(boss: GPUBoss, backend_url: str, namespace: str) -> None:
    client, empty = raw_client(backend_url), Keys(f"{namespace}-empty")
    core = boss._core
    call = core.acquire_call("nobody", core.make_request(1, timeout=0), "", "svc")
    args = [empty.wake_prefix, *call.args[1:]]
    reply = call_script_sync(client, Call(call.script, [*empty.state(), *empty.event_keys()], args))
    assert reply == [-3], "no GPU is registered there"
    assert client.exists(empty.head) == 0, "the call wrote nothing"


def test_a_due_time_too_far_ahead_is_not_trusted(boss: GPUBoss, backend_url: str, namespace: str) -> None:
    """Redis time that went back (a failover to a replica whose clock is behind, a clock step) leaves a `due`
    further ahead than any check sets it: the next call checks anyway, so nothing is collected late."""
    client, keys = raw_client(backend_url), Keys(namespace)
    dead_holder_lease(client, boss, "short-lived", 8, 0.2, "g0")
    dead_holder_lease(client, boss, "long-lived", 8, 30, "g1")
    client.hset(keys.head, "due", redis_ms(client) + 3_600_000)  # as if the clock had been an hour ahead
    time.sleep(0.3)
    lease = boss.acquire(vram_gb=8, timeout=0)  # short-lived expired: collected, and its GPU granted
    assert lease.gpu == "g0"
    assert int(client.hget(keys.head, "due") or 0) <= redis_ms(client) + CHECK_EVERY_S * 1000
    boss.release(lease)


def test_a_try_that_does_not_fit_writes_nothing_even_at_a_full_check(
    boss: GPUBoss, backend_url: str, namespace: str
) -> None:
    client, keys = raw_client(backend_url), Keys(namespace)
    dead_holder_lease(client, boss, "a", 8, 30, "g0")
    dead_holder_lease(client, boss, "b", 8, 30, "g1")
    client.hset(keys.head, "due", 0)  # the next call makes the full check
    before = snapshot(client, namespace)
    core = boss._core
    reply = call_script_sync(client, core.acquire_call("c", core.make_request(8, timeout=0), "", "svc"))
    assert reply[0] == 0, reply  # BUSY
    assert snapshot(client, namespace) == before, "a try that does not fit changed Redis"
    reply = call_script_sync(client, core.acquire_call("d", core.make_request(8, timeout=None), "", "svc"))
    assert reply[0] == 2, reply  # QUEUED: a call that changes something writes the header too
    assert int(client.hget(keys.head, "due") or 0) > 0


def full_check_now(client: redis.Redis, keys: Keys, boss: GPUBoss) -> None:
    """Make the next call's full check due, and make a call (an acquire and release of 1 GB on g1)."""
    client.hset(keys.head, "due", 0)
    boss.release(boss.acquire(vram_gb=1, device="g1", timeout=0))


def queue_pinned(client: redis.Redis, boss: GPUBoss, rid: str, vram_gb: int, device: str) -> None:
    core = boss._core
    reply = call_script_sync(
        client, core.acquire_call(rid, core.make_request(vram_gb, timeout=None, device=device), device, "svc")
    )
    assert reply[0] == 2, reply  # QUEUED


def release_by_script(client: redis.Redis, boss: GPUBoss, rid: str) -> int:
    return int(call_script_sync(client, boss._core.release_call(rid))[0])


def test_a_blocked_head_is_noted_and_forgotten_with_its_request(
    boss: GPUBoss, backend_url: str, namespace: str
) -> None:
    """The header notes the queue's head that does not fit, so that later calls need not read its record; a
    request of the same id queued later may need something else, so the note goes with the request."""
    client, keys = raw_client(backend_url), Keys(namespace)
    dead_holder_lease(client, boss, "big", 6, 30, "g0")
    dead_holder_lease(client, boss, "small", 1, 30, "g0")  # g0: 1 GB free
    dead_holder_lease(client, boss, "other", 1, 30, "g1")
    queue_pinned(client, boss, "x", 4, "g0")
    assert release_by_script(client, boss, "other") == 1  # serves the queue: x does not fit, and is noted
    assert client.hget(keys.head, "blocked") == "x"
    assert (client.hget(keys.head, "blocked_need") or "").split(" ")[0] == "4096"
    assert release_by_script(client, boss, "x") == 2  # withdrawn
    assert client.hget(keys.head, "blocked") is None, "the note went with the request"
    queue_pinned(client, boss, "x", 2, "g0")  # the same id, needing less: still 1 GB free
    assert release_by_script(client, boss, "small") == 1  # 2 GB free on g0 now: x fits
    assert client.hexists(keys.leases, "x"), "the request needing 2 GB was judged by a note about 4 GB"
    assert client.hget(keys.head, "blocked") is None
    for rid in ("x", "big"):
        release_by_script(client, boss, rid)


def test_a_blocked_head_edited_by_hand_is_seen_at_the_next_check(
    boss: GPUBoss, backend_url: str, namespace: str
) -> None:
    client, keys = raw_client(backend_url), Keys(namespace)
    dead_holder_lease(client, boss, "big", 7, 30, "g0")  # g0: 1 GB free
    dead_holder_lease(client, boss, "other", 1, 30, "g1")
    queue_pinned(client, boss, "x", 4, "g0")
    release_by_script(client, boss, "other")
    assert client.hget(keys.head, "blocked") == "x"
    ticket = json.loads(client.hget(keys.tickets, "x") or "{}")
    ticket["vram_mib"] = 1024  # by hand: x now fits in g0's free GB
    client.hset(keys.tickets, "x", json.dumps(ticket))
    time.sleep(CHECK_EVERY_S + MARGIN_S)
    dead_holder_lease(client, boss, "other", 1, 30, "g1")  # the next call makes the full check and serves x
    assert client.hexists(keys.leases, "x"), "the edited request was still judged by the note"
    for rid in ("x", "big", "other"):
        release_by_script(client, boss, rid)


def test_a_try_that_does_not_fit_notes_no_blocked_head(boss: GPUBoss, backend_url: str, namespace: str) -> None:
    client, keys = raw_client(backend_url), Keys(namespace)
    dead_holder_lease(client, boss, "a", 8, 30, "g0")
    dead_holder_lease(client, boss, "b", 8, 30, "g1")
    queue_pinned(client, boss, "d", 8, "g0")  # queued by its own acquire: not noted yet
    assert client.hget(keys.head, "blocked") is None
    before = snapshot(client, namespace)
    core = boss._core
    reply = call_script_sync(client, core.acquire_call("c", core.make_request(8, timeout=0), "", "svc"))
    assert reply[0] == 0, reply  # BUSY: it served the queue first and found d blocked, but wrote nothing
    assert snapshot(client, namespace) == before, "a try that does not fit changed Redis"
    for rid in ("d", "a", "b"):
        release_by_script(client, boss, rid)


def test_a_blocked_head_with_victims_only_on_other_gpus_is_not_read_again(
    boss: GPUBoss, backend_url: str, namespace: str
) -> None:
    """A blocked head whose GPU holds nothing it could ask to checkpoint stays noted while a lower preemptible
    lease sits on another GPU: later calls do not read its record (a record nobody can decode proves it)."""
    client, keys = raw_client(backend_url), Keys(namespace)
    full_check_now(client, keys, boss)  # (the next full check, which reads the head again, is ~1 s away)
    low = boss.acquire(vram_gb=8, priority="low", device="g1", timeout=0)
    assert low.preemptible
    dead_holder_lease(client, boss, "big", 6, 30, "g0")
    dead_holder_lease(client, boss, "small", 1, 30, "g0")  # g0: 1 GB free
    queue_pinned(client, boss, "x", 4, "g0")
    assert release_by_script(client, boss, "small") == 1  # 2 GB free: x still does not fit, and is noted
    assert client.hget(keys.head, "blocked") == "x"
    ticket = client.hget(keys.tickets, "x")
    client.hset(keys.tickets, "x", "not a record")
    core = boss._core
    try:
        reply = call_script_sync(client, core.acquire_call("c", core.make_request(1, timeout=0), "g0", "svc"))
        assert reply[0] == 0, reply  # BUSY: behind x, and x was not read
    finally:
        client.hset(keys.tickets, "x", str(ticket))
    for rid in ("x", "big"):
        release_by_script(client, boss, rid)
    boss.release(low)


def test_a_preemptible_lease_of_a_lower_rank_lowers_the_evict_rank_at_once(
    boss: GPUBoss, backend_url: str, namespace: str
) -> None:
    """`evict_rank` lets a request of that rank or lower skip the search for someone to evict: a grant of a
    preemptible lease of a lower rank must lower it in the same call, or a request above it would not evict."""
    client, keys = raw_client(backend_url), Keys(namespace)
    normal = boss.acquire(vram_gb=8, priority="normal", preemptible=True, device="g0", timeout=0)
    full_check_now(client, keys, boss)  # the lowest rank is normal's
    assert client.hget(keys.head, "evict_rank") == "1"
    low = boss.acquire(vram_gb=8, priority="low", preemptible=True, device="g1", timeout=0)
    assert client.hget(keys.head, "evict_rank") == "0", "the header still says nothing below normal"
    with pytest.raises(LeaseTimeout):  # the low lease holds g1 and does not yield: nothing is granted
        boss.acquire(vram_gb=8, priority="normal", device="g1", timeout=0.3)
    asked = [e for e in replay(backend_url, namespace) if e.type == "evict_requested"]
    assert [e.lease for e in asked] == [low.id], "a normal request did not ask the low preemptible lease"
    boss.release(low)
    boss.release(normal)


def test_a_lease_marked_idle_lowers_the_evict_rank_below_every_rank(
    boss: GPUBoss, backend_url: str, namespace: str
) -> None:
    client, keys = raw_client(backend_url), Keys(namespace)
    low = boss.acquire(vram_gb=8, priority="low", preemptible=True, device="g0", timeout=0)
    full_check_now(client, keys, boss)
    assert client.hget(keys.head, "evict_rank") == "0"
    high = boss.acquire(vram_gb=4, priority="high", device="g1", timeout=0)
    high.idle()
    assert client.hget(keys.head, "evict_rank") == "-1", "an idle lease is a candidate for a request of any rank"
    boss.release(high)
    boss.release(low)
