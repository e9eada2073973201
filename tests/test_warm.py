"""Warm models (docs/warm.md): busy/idle/touch on any lease, idle leases as the first candidates, the idle
timeout, ``keep_warm`` with its reloads and events, and two model-server processes sharing one GPU.

In-process tests run against a real redis-server and fakeredis; the scenario with separate processes uses
the real server.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from gpuboss import AsyncGPUBoss, GPUBoss, LeaseState, LeaseTimeout, WarmModel
from gpuboss.cli import cli
from gpuboss.core import Core
from gpuboss.errors import InvalidRequest, LeaseLost
from gpuboss.events import replay
from gpuboss.keys import Keys
from gpuboss.redis_io import connect_sync, evalsha_sync
from gpuboss.warm import ActivityReply, UnloadReply, activity_call

from tests.conftest import raw_client

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


def until(check: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


def in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as err:  # noqa: BLE001  # handed to the test, which re-raises it
            out["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def result(thread: threading.Thread, out: dict[str, Any]) -> Any:
    thread.join(WAIT_S)
    assert not thread.is_alive(), "the call did not return in time"
    if "error" in out:
        raise out["error"]
    return out["value"]


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
    assert usage[f"idle:{lease.id}"] == str(4 * 1024)
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
        reply = evalsha_sync(raw_client(backend_url), activity_call(other._core, lease.id, "idle"))
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


def test_an_idle_model_is_unloaded_after_its_timeout(backend_url: str, namespace: str) -> None:
    boss = make(backend_url, namespace, GPU24, service="alpha", default_ttl=0.3)
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


def test_status_and_leases_show_busy_and_idle(real_url: str, namespace: str) -> None:
    boss = make(real_url, namespace, GPU24, service="alpha")
    try:
        with boss.keep_warm("alpha-16g", 16) as warm:
            args = ["--redis-url", real_url, "--namespace", namespace]
            out = CliRunner().invoke(cli, [*args, "leases"]).output
            assert "active (idle " in out and "alpha-16g" in out, out
            with warm.busy():
                out = CliRunner().invoke(cli, [*args, "status"]).output
                assert "active (busy, alpha-16g)" in out, out
                (rec,) = json.loads(CliRunner().invoke(cli, [*args, "--json", "leases"]).stdout)
                assert rec["busy"] is True and rec["model"] == "alpha-16g"
            (rec,) = json.loads(CliRunner().invoke(cli, [*args, "--json", "leases"]).stdout)
            assert rec["busy"] is False and rec["idle_for_s"] >= 0 and rec["idle_timeout_ms"] == 300_000
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


def test_script_replies(backend_url: str, namespace: str) -> None:
    """activity and unload: every reply code, and the unload of a lease already gone still says so."""
    boss = make(backend_url, namespace)
    client = raw_client(backend_url)
    core: Core = boss._core
    try:
        lease = boss.acquire(4)
        done = evalsha_sync(client, activity_call(core, lease.id, "idle", 1000, "m", "loaded"))
        assert int(done[0]) == ActivityReply.DONE and json.loads(done[1])["idle_timeout_ms"] == 1000
        other = make(backend_url, namespace, service="other")
        try:
            thread, out = in_thread(lambda: other.acquire(16, timeout=WAIT_S))
            until(lambda: evicting(backend_url, namespace, lease.id), "the idle lease is asked to unload")
            assert evalsha_sync(client, core.checkpoint_call(lease.id)) == [1]
            refused = evalsha_sync(client, activity_call(core, lease.id, "busy"))
            assert int(refused[0]) == ActivityReply.EVICTING
            assert json.loads(refused[1])["reason"] == "idle"
            from gpuboss.warm import unload_call

            boss._heartbeat.forget(lease.id)
            assert evalsha_sync(client, unload_call(core, lease, "closed"))[0] == UnloadReply.UNLOADED
            other.release(result(thread, out))
        finally:
            other.close()
        assert evalsha_sync(client, unload_call(core, lease, "lost")) == [UnloadReply.GONE]
        assert int(evalsha_sync(client, activity_call(core, lease.id, "touch"))[0]) == ActivityReply.GONE
        reasons = [e["reason"] for e in events_of(backend_url, namespace, "model_unloaded")]
        assert reasons == ["reclaimed", "lost"]
    finally:
        boss.close()


# ---------------------------------------------------------------- two model servers, separate processes

#: The simulated GPU: 24 GiB, two models of 16 GiB; only one fits.
MODEL_MIB = 16 * 1024
GPU_MIB = 24 * 1024


def model_server(url: str, ns: str, name: str, idle_timeout_s: float, requests: Any, results: Any) -> None:
    """One model server (a process of its own): keeps its 16 GB model warm and serves requests from
    ``requests`` with two threads. Every load adds the model's MiB to a counter of the simulated GPU and
    every unload takes it off, so a load that would not fit shows. At the start and end of each request it
    checks, in Redis, that its lease exists with its fencing token and is busy, and reports the Redis time
    of both checks, for the observer in the test."""
    client = connect_sync(url, 5.0)
    sim = f"{ns}-sim:vram"  # the test's own key, outside gpuboss's namespace
    boss = GPUBoss(url, namespace=ns, gpus=GPU24, service=name, default_ttl=1.0)
    holder: dict[str, WarmModel] = {}

    def redis_ms() -> int:
        seconds, micros = client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def load(lease: Any) -> None:
        total = int(client.incrby(sim, MODEL_MIB))
        results.put({"kind": "load", "name": name, "total_mib": total, "token": lease.token})

    def unload(reason: str) -> None:
        total = int(client.decrby(sim, MODEL_MIB))
        results.put({"kind": "unload", "name": name, "reason": reason, "users": holder["warm"].users, "left": total})

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
                    {
                        "kind": "served",
                        "name": name,
                        "job": job["id"],
                        "lease": device.lease.id,
                        "token": device.lease.token,
                        "ok": ok_start and ok_end,
                        "start_ms": start,
                        "end_ms": end,
                    }
                )

    holder["warm"] = boss.keep_warm(
        f"{name}-16g", vram_gb=16, idle_timeout_s=idle_timeout_s, on_load=load, on_unload=unload
    )
    try:
        with holder["warm"]:
            results.put({"kind": "ready", "name": name})
            threads = [threading.Thread(target=serve) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        boss.close()
        results.put({"kind": "exit", "name": name})


def test_two_model_servers_share_one_gpu(real_url: str, namespace: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    inbox = {"alpha": ctx.Queue(), "beta": ctx.Queue()}
    timeouts = {"alpha": 120.0, "beta": 1.0}  # beta's idle model goes after a second without requests
    procs = {
        name: ctx.Process(target=model_server, args=(real_url, namespace, name, timeouts[name], inbox[name], results))
        for name in ("alpha", "beta")
    }
    seen: list[dict[str, Any]] = []

    def take(kind: str, name: str | None = None) -> dict[str, Any]:
        while True:
            msg = results.get(timeout=60)
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
        for _ in range(3):
            send("alpha")  # beta is resident and idle: it unloads for alpha
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
        # No more requests: beta's model, idle, is unloaded after its timeout; alpha's stays unloaded or idle.
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
    with_results = [m for m in seen if m["kind"] == "served"]
    assert len(with_results) == jobs and sorted(m["job"] for m in with_results) == list(range(1, jobs + 1))
    # No request ran without its lease: each checked its record (token, busy) at its start and end...
    assert all(m["ok"] for m in with_results), [m for m in with_results if not m["ok"]]
    # ... and the observer: each ran between its lease's grant and its hand-back, by the Redis clock.
    log = list(replay(real_url, namespace))
    for m in with_results:
        grant = next(e for e in log if e.type == "granted" and e.lease == m["lease"])
        end = next(e for e in log if e.lease == m["lease"] and e.type in ("evicted", "released", "expired", "revoked"))
        assert grant["token"] == m["token"] and grant.time_ms <= m["start_ms"] <= m["end_ms"] <= end.time_ms, m
    # The simulated GPU never held both models, and no model was unloaded while a request ran.
    loads = [m for m in seen if m["kind"] == "load"]
    unloads = [m for m in seen if m["kind"] == "unload"]
    assert loads and all(m["total_mib"] <= GPU_MIB for m in loads), loads
    assert unloads and all(m["users"] == 0 for m in unloads), unloads
    # Each unloaded for the other when idle; beta also after its idle timeout.
    events = [e for e in log if e.type == "model_unloaded"]
    for name, other in (("alpha", "beta"), ("beta", "alpha")):
        assert any(e.service == name and e["reason"] == "reclaimed" and e["for_service"] == other for e in events)
    assert any(e.service == "beta" and e["reason"] == "idle_timeout" for e in events)
    assert all(e.service == "beta" for e in events if e["reason"] == "idle_timeout")
    assert raw_client(real_url).hlen(Keys(namespace).leases) == 0
    assert int(raw_client(real_url).get(f"{namespace}-sim:vram") or 0) == 0
