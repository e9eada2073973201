"""Events: published and logged from inside the scripts, the schema of each type, replay, live subscription
(sync and asyncio) without gaps or duplicates, the log's cap, and what an event costs Redis."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from gpuboss import ConfigError, GPUBoss, InvalidRequest, Keys, LeaseTimeout, events
from gpuboss.config import BossConfig
from gpuboss.core import Core, RevokeReply
from gpuboss.events import EVENT_TYPES, Event
from gpuboss.redis_io import call_script_sync
from gpuboss.server import RedisProcess

from tests.conftest import GPUS, raw_client
from tests.test_scripts import server_binaries

COMMON = {"v", "type", "time", "lease", "gpu", "service", "priority", "vram_mib"}


def run(client: redis.Redis, call: object) -> list[Any]:
    return call_script_sync(client, call)  # type: ignore[arg-type,no-any-return]


def log(url: str, namespace: str) -> list[Event]:
    return events.replay(url, namespace)


def kinds(evs: list[Event]) -> list[str]:
    return [e.type for e in evs]


@pytest.fixture
def core(namespace: str) -> Core:
    return Core(BossConfig(namespace=namespace, gpus=GPUS, service="raw"))


@pytest.fixture
def client(backend_url: str) -> Iterator[redis.Redis]:
    c = raw_client(backend_url)
    yield c
    c.close()


def test_every_event_type_with_its_fields(backend_url: str, namespace: str, client: redis.Redis, core: Core) -> None:
    """One scenario through every script: each state change leaves exactly the event it should."""
    before_ms = int(client.time()[0]) * 1000
    register = core.register_call()
    assert register is not None
    run(client, register)
    run(client, register)  # nothing new: no event
    evs = log(backend_url, namespace)
    assert kinds(evs) == ["gpu_registered", "gpu_registered"]
    gpu0 = next(e for e in evs if e.gpu == "gpu0")
    assert (gpu0["name"], gpu0["index"], gpu0["capacity_mib"], gpu0["reserve_mib"]) == ("RTX 4090", 0, 24576, 0)
    assert gpu0.lease is None and gpu0.service is None and gpu0.vram_mib is None

    big = core.make_request(24)
    assert run(client, core.acquire_call("h", big, "gpu0", "holder"))[0] == 1
    assert run(client, core.acquire_call("w", core.make_request(8), "gpu0", "waiter"))[0] == 2
    assert run(client, core.acquire_call("x", core.make_request(2, priority="high"), "", "other"))[0] == 1  # gpu1
    time.sleep(0.01)
    assert run(client, core.release_call("h"))[:2] == [1, 1]  # released, and "w" granted in the same call
    assert run(client, core.acquire_call("t", big, "gpu0", "late"))[0] == 2
    assert run(client, core.release_call("t", "timeout"))[0] == 2
    assert run(client, core.acquire_call("c", big, "gpu0", "gone"))[0] == 2
    assert run(client, core.release_call("c", "cancel"))[0] == 2
    code, granted, record = core.revoked(run(client, core.revoke_call("w", "ops@box", "stuck")))
    assert (code, granted, record is not None and record["id"]) == (RevokeReply.REVOKED, 0, "w")
    assert core.revoked(run(client, core.revoke_call("w", "ops@box")))[0] is RevokeReply.NOT_FOUND
    short = core.make_request(1, ttl=0.1)
    run(client, core.acquire_call("dead", short, "gpu1", "dying"))
    run(client, core.acquire_call("q1", core.make_request(23, ttl=0.1), "gpu0", "a"))
    run(client, core.acquire_call("q2", core.make_request(23, ttl=0.1), "gpu0", "b"))  # queued: q1 holds
    time.sleep(0.2)
    collected = run(client, core.collect_call())
    assert collected[:3] == [2, 1, 0]
    leases, requests = core.collected_records(collected)
    assert {r["id"] for r in leases} == {"dead", "q1"} and [r["id"] for r in requests] == ["q2"]
    run(client, core.release_call("x"))

    evs = log(backend_url, namespace)[2:]
    seen = [(e.type, e.lease) for e in evs]
    assert seen[:7] == [
        ("granted", "h"),
        ("queued", "w"),
        ("granted", "x"),
        ("released", "h"),
        ("granted", "w"),
        ("queued", "t"),
        ("timed_out", "t"),
    ]
    assert seen[7:] == [
        ("queued", "c"),
        ("withdrawn", "c"),
        ("revoked", "w"),
        ("granted", "dead"),
        ("granted", "q1"),
        ("queued", "q2"),
        ("expired", "dead"),  # leases first, in expiry order, then queue entries
        ("expired", "q1"),
        ("expired", "q2"),
        ("released", "x"),
    ]
    assert len(seen) == 17

    by = {(e.type, e.lease): e for e in evs}
    for e in evs:
        assert set(e.data) >= COMMON, e
        assert e.version == 1 and e.type in EVENT_TYPES
        assert e.id is not None and e.time_ms >= before_ms
    ids = [events.parse_id(str(e.id)) for e in evs]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert [e.time_ms for e in evs] == sorted(e.time_ms for e in evs)

    g = by[("granted", "h")]
    assert (g.gpu, g.service, g.priority, g.vram_mib, g["waited_ms"], g["ttl_ms"]) == (
        "gpu0",
        "holder",
        "normal",
        24576,
        0,
        30000,
    )
    assert isinstance(g["token"], int) and by[("granted", "w")]["token"] > g["token"]
    assert by[("granted", "w")]["waited_ms"] >= 10  # it queued, then the release handed it the GPU
    q = by[("queued", "w")]
    assert (q.gpu, q.vram_mib, q["ahead"], q["ttl_ms"]) == ("gpu0", 8192, 0, 30000)
    assert by[("granted", "x")].gpu == "gpu1" and by[("granted", "x")].priority == "high"
    r = by[("released", "h")]
    assert r["reason"] == "release" and r["held_ms"] >= 10 and r.service == "holder"
    assert by[("timed_out", "t")]["reason"] == "timeout" and by[("timed_out", "t")]["waited_ms"] >= 0
    assert by[("withdrawn", "c")]["reason"] == "cancel"
    rv = by[("revoked", "w")]
    assert (rv["by"], rv["reason"], rv.service, rv.vram_mib) == ("ops@box", "stuck", "waiter", 8192)
    assert rv["held_ms"] >= 0
    assert by[("expired", "dead")]["entry"] == "lease" and by[("expired", "dead")]["held_ms"] >= 100
    assert by[("expired", "q2")]["entry"] == "request" and by[("expired", "q2")]["waited_ms"] >= 100
    assert by[("expired", "q2")].service == "b"
    assert client.hgetall(core.keys.used) == {"gpu0": "0", "gpu1": "0"}


def test_revoked_expired_lease_is_reported_as_expired(backend_url: str, client: redis.Redis, core: Core) -> None:
    register = core.register_call()
    assert register is not None
    run(client, register)
    run(client, core.acquire_call("a", core.make_request(1, ttl=0.05), "", "s"))
    time.sleep(0.1)
    code, _, record = core.revoked(run(client, core.revoke_call("a", "ops")))
    assert code is RevokeReply.EXPIRED and record is not None and record["id"] == "a"
    assert kinds(log(backend_url, core.config.namespace))[-1] == "expired"


def test_boss_releases_carry_their_reason(boss: GPUBoss, backend_url: str, namespace: str) -> None:
    other = GPUBoss(backend_url, namespace=namespace, gpus=GPUS, service="late")
    try:
        lease = boss.acquire(24, device="gpu0")
        with pytest.raises(LeaseTimeout):
            other.acquire(1, device="gpu0", timeout=0.2)
        boss.release(lease)
    finally:
        other.close()
    evs = [e for e in log(backend_url, namespace) if e.type != "gpu_registered"]
    assert kinds(evs) == ["granted", "queued", "timed_out", "released"]
    assert evs[2].service == "late" and evs[2]["reason"] == "timeout"
    assert evs[3]["reason"] == "release" and evs[3].lease == lease.id


def test_live_subscription_sees_what_the_log_keeps(boss: GPUBoss, backend_url: str, namespace: str) -> None:
    with events.subscribe(backend_url, namespace) as sub:
        boss.release(boss.acquire(2))
        live = [sub.get(timeout=5) for _ in range(4)]
        assert sub.get(timeout=0.2) is None
    assert all(e is not None for e in live)
    logged = log(backend_url, namespace)
    assert [e.to_dict() for e in live if e is not None] == [e.to_dict() for e in logged]
    assert kinds(logged) == ["gpu_registered", "gpu_registered", "granted", "released"]


def test_since_replays_then_goes_live_without_gaps_or_duplicates(
    boss: GPUBoss, backend_url: str, namespace: str
) -> None:
    boss.release(boss.acquire(1))  # 2 registrations + granted + released, before the subscription
    got: list[Event] = []
    with events.subscribe(backend_url, namespace, since=timedelta(minutes=5)) as sub:
        for _ in range(4):
            e = sub.get(timeout=5)
            assert e is not None
            got.append(e)
        boss.release(boss.acquire(2))
        for _ in range(2):
            e = sub.get(timeout=5)
            assert e is not None
            got.append(e)
        assert sub.get(timeout=0.3) is None
    assert kinds(got) == ["gpu_registered", "gpu_registered", "granted", "released", "granted", "released"]
    assert [e.id for e in got] == [e.id for e in log(backend_url, namespace)]
    # since= an id: only what came after it
    after_first = events.replay(backend_url, namespace, since=str(got[3].id))
    assert [e.id for e in after_first] == [got[4].id, got[5].id]
    assert events.replay(backend_url, namespace, since=timedelta(0)) == []
    assert len(events.replay(backend_url, namespace, count=3)) == 3


def test_replay_since_overlapping_live_traffic_is_exact(real_url: str, namespace: str) -> None:
    """Events emitted while the subscription replays are neither lost nor doubled."""
    boss = GPUBoss(real_url, namespace=namespace, gpus=GPUS, service="busy")
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            boss.release(boss.acquire(1))

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        time.sleep(0.1)
        with events.subscribe(real_url, namespace, since=timedelta(minutes=1)) as sub:
            time.sleep(0.2)
            stop.set()
            thread.join()
            got = []
            while (e := sub.get(timeout=0.5)) is not None:
                got.append(e)
    finally:
        stop.set()
        thread.join()
        boss.close()
    logged = log(real_url, namespace)
    assert len(logged) > 20
    assert [e.id for e in got] == [e.id for e in logged]


async def test_async_subscription(backend_url: str, namespace: str) -> None:
    from gpuboss import AsyncGPUBoss

    boss = AsyncGPUBoss(backend_url, namespace=namespace, gpus=GPUS, service="async")
    try:
        await boss.release(await boss.acquire(1))
        async with events.asubscribe(backend_url, namespace, since=timedelta(minutes=1)) as sub:
            replayed = [await sub.get(timeout=5) for _ in range(4)]
            await boss.release(await boss.acquire(3))
            live = []
            async for e in sub:
                live.append(e)
                if len(live) == 2:
                    break
            assert await sub.get(timeout=0.2) is None
    finally:
        await boss.close()
    assert kinds([e for e in replayed if e is not None]) == ["gpu_registered", "gpu_registered", "granted", "released"]
    assert kinds(live) == ["granted", "released"] and live[0].vram_mib == 3072 and live[0].service == "async"


def test_subscription_catches_up_after_a_dropped_connection(fresh_redis: RedisProcess, namespace: str) -> None:
    url = fresh_redis.url
    boss = GPUBoss(url, namespace=namespace, gpus=GPUS)
    admin = raw_client(url)
    try:
        with events.subscribe(url, namespace) as sub:
            lease = boss.acquire(1)
            first = [sub.get(timeout=5) for _ in range(3)]
            assert kinds([e for e in first if e is not None]) == ["gpu_registered", "gpu_registered", "granted"]
            assert admin.client_kill_filter(_type="pubsub") >= 1
            boss.release(lease)  # published while nobody listens: only the log has it
            caught = sub.get(timeout=10)
            assert caught is not None and caught.type == "released" and caught.lease == lease.id
            boss.release(boss.acquire(2))
            assert kinds([sub.get(timeout=5), sub.get(timeout=5)]) == ["granted", "released"]  # type: ignore[list-item]
    finally:
        boss.close()
        admin.close()


def test_zero_cap_publishes_without_a_log(backend_url: str, namespace: str) -> None:
    boss = GPUBoss(backend_url, namespace=namespace, gpus=GPUS, events_maxlen=0)
    try:
        with events.subscribe(backend_url, namespace) as sub:
            boss.release(boss.acquire(1))
            got = [sub.get(timeout=5) for _ in range(4)]
        assert kinds(got) == ["gpu_registered", "gpu_registered", "granted", "released"]  # type: ignore[arg-type]
        assert all(e is not None and e.id is None for e in got)
        assert raw_client(backend_url).exists(Keys(namespace).event_log) == 0
        assert log(backend_url, namespace) == []
    finally:
        boss.close()


def test_the_log_is_capped(real_url: str, namespace: str) -> None:
    boss = GPUBoss(real_url, namespace=namespace, gpus=GPUS, events_maxlen=50)
    try:
        for _ in range(300):
            boss.release(boss.acquire(1))
    finally:
        boss.close()
    length = raw_client(real_url).xlen(Keys(namespace).event_log)
    assert 50 <= length <= 50 + 200  # approximate trimming: whole nodes of up to 100 entries at a time
    newest = log(real_url, namespace)[-1]
    assert newest.type == "released"


def test_one_xadd_and_one_publish_per_event(fresh_redis: RedisProcess, namespace: str) -> None:
    client = raw_client(fresh_redis.url)
    boss = GPUBoss(fresh_redis.url, namespace=namespace, gpus=GPUS)
    try:
        boss.release(boss.acquire(1))
        client.config_resetstat()
        for _ in range(10):
            boss.release(boss.acquire(1))
        stats = client.info("commandstats")
    finally:
        boss.close()
        client.close()
    assert stats["cmdstat_xadd"]["calls"] == 20
    assert stats["cmdstat_publish"]["calls"] == 20


def test_bad_input_is_refused(backend_url: str, namespace: str) -> None:
    with pytest.raises(InvalidRequest, match="since"):
        events.replay(backend_url, namespace, since="yesterday")
    with pytest.raises(InvalidRequest, match="since"):
        events.subscribe(backend_url, namespace, since=timedelta(seconds=-1))
    with pytest.raises(InvalidRequest, match="count"):
        events.replay(backend_url, namespace, count=0)
    for bad in (-1, "many", 1.5, True):
        with pytest.raises(ConfigError, match="events_maxlen"):
            GPUBoss(backend_url, namespace=namespace, events_maxlen=bad)


def test_event_parsing() -> None:
    raw = json.dumps({"id": "5-1", "v": 1, "type": "granted", "time": 5, "lease": "a", "gpu": "g", "vram_mib": 3})
    e = Event.from_json(raw)
    assert (e.id, e.type, e.lease, e.gpu, e.vram_mib, e.service, e["time"]) == ("5-1", "granted", "a", "g", 3, None, 5)
    assert e.to_dict()["id"] == "5-1" and "id" not in e.data
    for bad in ("[]", '{"no": "type"}', "nope"):
        with pytest.raises(ValueError):
            Event.from_json(bad)
    assert events.after("17-3") == "17-4" and events.parse_id("17-3") < events.parse_id("18-0")


@pytest.mark.parametrize("binary", server_binaries())
def test_events_and_revoke_on_every_redis_version(binary: str, tmp_path: Path, namespace: str) -> None:
    """XADD MAXLEN ~ and PUBLISH inside scripts, and every revoke reply, on Redis 6.2 and 7.x and Valkey alike."""
    from gpuboss.server import start_redis

    server = start_redis(tmp_path, socket=tmp_path / "r.sock", binary=binary)
    core = Core(BossConfig(namespace=namespace, gpus=GPUS, events_maxlen=5))
    client = raw_client(server.url)
    try:
        with events.subscribe(server.url, namespace) as sub:
            register = core.register_call()
            assert register is not None
            run(client, register)
            run(client, core.acquire_call("a", core.make_request(1), "gpu0", "s"))
            run(client, core.acquire_call("dead", core.make_request(1, ttl=0.05), "", "s"))
            run(client, core.acquire_call("q", core.make_request(24), "gpu0", "s"))  # queued behind "a"
            assert core.revoked(run(client, core.revoke_call("q", "ops")))[0] is RevokeReply.NOT_FOUND
            assert core.revoked(run(client, core.revoke_call("q", "ops", queued=True)))[0] is RevokeReply.WITHDRAWN
            assert core.revoked(run(client, core.revoke_call("a", "ops")))[0] is RevokeReply.REVOKED
            assert core.revoked(run(client, core.revoke_call("a", "ops")))[0] is RevokeReply.NOT_FOUND
            time.sleep(0.1)
            assert core.revoked(run(client, core.revoke_call("dead", "ops")))[0] is RevokeReply.EXPIRED
            live = []
            while (e := sub.get(timeout=0.5)) is not None:
                live.append(e.type)
        expected = [
            *("gpu_registered", "gpu_registered", "granted", "granted", "queued", "withdrawn", "revoked", "expired")
        ]
        assert live == expected
        assert kinds(events.replay(server.url, namespace)) == expected  # 8 > 5: MAXLEN ~ trims lazily
        assert set(RevokeReply) == {
            RevokeReply.REVOKED,
            RevokeReply.NOT_FOUND,
            RevokeReply.EXPIRED,
            RevokeReply.WITHDRAWN,
        }
    finally:
        client.close()
        server.stop()
