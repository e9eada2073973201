"""Scheduling policy (docs/scheduling.md): classes, aging, backfill, time windows, runtime pause, caps, max_hold.

Each rule is stored in the namespace and enforced by the Lua scripts, so the tests use several bosses (the
processes of several services) on one namespace, against a real redis-server and fakeredis.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from click.testing import CliRunner
from gpuboss import GPUBoss, LeaseState, LeaseTimeout
from gpuboss.cli import cli
from gpuboss.config import Window
from gpuboss.core import Call
from gpuboss.errors import ConfigError, InvalidRequest
from gpuboss.events import replay
from gpuboss.keys import Keys
from gpuboss.policy import window_intervals
from gpuboss.redis_io import call_script_sync

from tests.conftest import raw_client
from tests.lease_model import usage_of
from tests.threads import WAIT_S, in_thread, result

# The tests of backend_url (and the fixtures built on it) run on a valkey-server too: tests/conftest.py.
pytestmark = pytest.mark.valkey

ONE = [{"id": "g0", "name": "test", "vram_gb": 16, "index": 0}]
TWO = [*ONE, {"id": "g1", "name": "test", "vram_gb": 16, "index": 1}]


def make(url: str, ns: str, gpus: list[dict[str, Any]] = ONE, **settings: Any) -> GPUBoss:
    return GPUBoss(url, namespace=ns, gpus=gpus, service=settings.pop("service", "svc"), **settings)


class Bosses:
    """Bosses made for one test, closed at its end."""

    def __init__(self, url: str, ns: str) -> None:
        self.url, self.ns, self.made = url, ns, []  # type: ignore[var-annotated]

    def __call__(self, gpus: list[dict[str, Any]] = ONE, **settings: Any) -> GPUBoss:
        boss = make(self.url, self.ns, gpus, **settings)
        self.made.append(boss)
        return boss


@pytest.fixture
def bosses(backend_url: str, namespace: str) -> Iterator[Bosses]:
    made = Bosses(backend_url, namespace)
    yield made
    for boss in reversed(made.made):
        boss.close()


def queued(url: str, ns: str, n: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while raw_client(url).zcard(Keys(ns).queue) < n:
        assert time.monotonic() < deadline, f"fewer than {n} requests queued"
        time.sleep(0.005)


# ---------------------------------------------------------------- classes


def test_custom_priority_classes(bosses: Bosses) -> None:
    classes = {"batch": 0, "interactive": 5, "critical": 9}
    boss = bosses(priorities=classes, default_priority="interactive", preemptible=["batch"])
    lease = boss.acquire(1, priority="critical")
    assert lease.priority == "critical"
    with pytest.raises(InvalidRequest, match="'batch', 'interactive', 'critical'"):
        boss.acquire(1, priority="high")
    boss.release(lease)


def test_unknown_classes_in_config_are_named() -> None:
    with pytest.raises(ConfigError, match=r"pause\.class: unknown priority class 'batch'; the classes are 'low'"):
        _config(pause=[{"class": "batch", "while": ["high"]}])
    with pytest.raises(ConfigError, match="share a rank"):
        _config(priorities={"a": 1, "b": 1}, default_priority="a", preemptible=[])
    with pytest.raises(ConfigError, match="windows"):
        _config(windows=[{"class": "low", "pause": "9-18"}])
    with pytest.raises(ConfigError, match="IANA"):
        _config(windows=[{"class": "low", "pause": "09:00-18:00", "tz": "Mars/Olympus"}])


def _config(**values: Any) -> Any:
    from gpuboss.config import build_config

    return build_config("arguments", gpus=ONE, **values)


# ---------------------------------------------------------------- aging


def test_aging_lets_low_work_overtake_a_stream_of_normal_requests(
    bosses: Bosses, backend_url: str, namespace: str
) -> None:
    aging = {"every_s": 0.2, "max_boost": 1}
    holder = bosses(service="holder", aging=aging)
    low_boss, normal_boss = bosses(service="batch", aging=aging), bosses(service="api", aging=aging)
    held = holder.acquire(16, priority="normal")
    order: list[str] = []
    low_t, low_out = in_thread(lambda: (low_boss.acquire(16, priority="low", timeout=WAIT_S), order.append("low"))[0])
    queued(backend_url, namespace, 1)
    time.sleep(0.3)  # the low request has waited longer than every_s: it counts as normal now
    normal_t, normal_out = in_thread(
        lambda: (normal_boss.acquire(16, priority="normal", timeout=WAIT_S), order.append("normal"))[0]
    )
    queued(backend_url, namespace, 2)
    holder.release(held)
    low = result(low_t, low_out)
    assert order == ["low"]  # served before the normal request that arrived after it
    assert low.priority == "low"  # the lease keeps its class; only its place in line moved
    low_boss.release(low)
    normal_boss.release(result(normal_t, normal_out))
    aged = [e for e in replay(backend_url, namespace) if e.type == "aged"]
    assert aged and aged[0].data["rank"] == 1


def test_aging_false_removes_the_rule_and_leaving_it_out_keeps_it(
    bosses: Bosses, backend_url: str, namespace: str
) -> None:
    policy = Keys(namespace).policy
    client = raw_client(backend_url)
    aging = bosses(aging={"every_s": 60})
    aging.release(aging.acquire(1))
    assert json.loads(client.hget(policy, "aging")) == {"every_ms": 60_000, "max_boost": 1}
    assert client.hexists(policy, "classes")
    other = bosses(service="other")  # no aging setting: the stored rule stays
    other.release(other.acquire(1))
    assert client.hexists(policy, "aging")
    off = bosses(service="off", aging=False)
    off.release(off.acquire(1))
    assert not client.hexists(policy, "aging") and not client.hexists(policy, "classes")
    changed = [e for e in replay(backend_url, namespace) if e.type == "policy_changed"]
    assert [(e["rule"], e["value"]) for e in changed][-2:] == [("classes", ""), ("aging", "")]
    with pytest.raises(ConfigError, match="aging"):
        _config(aging=True)


def test_without_aging_the_stream_wins(bosses: Bosses, backend_url: str, namespace: str) -> None:
    holder, low_boss, normal_boss = bosses(service="h"), bosses(service="b"), bosses(service="a")
    held = holder.acquire(16, priority="normal")
    order: list[str] = []
    low_t, low_out = in_thread(lambda: (low_boss.acquire(16, priority="low", timeout=WAIT_S), order.append("low"))[0])
    queued(backend_url, namespace, 1)
    time.sleep(0.3)
    normal_t, normal_out = in_thread(
        lambda: (normal_boss.acquire(16, priority="normal", timeout=WAIT_S), order.append("normal"))[0]
    )
    queued(backend_url, namespace, 2)
    holder.release(held)
    normal_boss.release(result(normal_t, normal_out))
    low_boss.release(result(low_t, low_out))
    assert order == ["normal", "low"]


def test_aging_looks_past_requests_aged_into_a_class(bosses: Bosses, backend_url: str, namespace: str) -> None:
    """A low request aged into normal sits at the front of the normal band (it keeps its older arrival number)
    and earns no more (max_boost 1): the normal request behind it, which waited as long, still ages to high
    and is served before a high request that came later."""
    aging = {"every_s": 0.3, "max_boost": 1}
    holder = bosses(service="holder", aging=aging)
    low_boss, normal_boss, high_boss = (bosses(service=name, aging=aging) for name in ("batch", "api", "ops"))
    held = holder.acquire(16, priority="high")
    order: list[str] = []

    def wait(boss: GPUBoss, priority: str) -> Any:
        lease = boss.acquire(16, priority=priority, timeout=WAIT_S)
        order.append(priority)
        return lease

    low_t, low_out = in_thread(lambda: wait(low_boss, "low"))
    queued(backend_url, namespace, 1)
    normal_t, normal_out = in_thread(lambda: wait(normal_boss, "normal"))
    queued(backend_url, namespace, 2)
    time.sleep(0.45)  # both have waited longer than every_s
    high_t, high_out = in_thread(lambda: wait(high_boss, "high"))  # its acquire ages the queue first
    queued(backend_url, namespace, 3)
    holder.release(held)
    normal_boss.release(result(normal_t, normal_out))
    high_boss.release(result(high_t, high_out))
    low_boss.release(result(low_t, low_out))
    assert order == ["normal", "high", "low"]
    aged = [(e.data["priority"], e.data["rank"]) for e in replay(backend_url, namespace) if e.type == "aged"]
    assert ("normal", 2) in aged and ("low", 1) in aged


# ---------------------------------------------------------------- backfill


def test_backfill_uses_capacity_the_head_cannot_use_and_protects_its_gpu(bosses: Bosses) -> None:
    """g0 is busy (10 GB used); the head needs g0 whole. Strict: a 4 GB request behind it waits though g1 is
    empty. Backfill: it runs on g1; a later 4 GB request does not take g0's free 6 GB, so the head is granted
    as soon as g0's holder leaves."""
    strict_holder = bosses(TWO, service="holder")
    held = strict_holder.acquire(10, device="g0")
    head_boss, small_boss = bosses(TWO, service="head"), bosses(TWO, service="small")
    head_t, head_out = in_thread(lambda: head_boss.acquire(16, device="g0", timeout=WAIT_S))
    queued(strict_holder.url, strict_holder.namespace, 1)
    with pytest.raises(LeaseTimeout):  # strict: it waits behind the head although g1 is idle
        small_boss.acquire(4, timeout=0.3)
    # Switch the namespace to backfill.
    backfill = bosses(TWO, service="small2", queueing="backfill")
    small = backfill.acquire(4, timeout=WAIT_S)
    assert small.gpu == "g1"  # backfilled; best fit alone would pick g0's 6 GB free, but g0 is kept for the head
    more = backfill.acquire(8, timeout=WAIT_S)
    assert more.gpu == "g1"  # g1 has 4 GB left now
    with pytest.raises(LeaseTimeout):
        backfill.acquire(6, timeout=0.3)  # fits only in g0's free 6 GB: kept for the head, so it waits
    strict_holder.release(held)
    head = result(head_t, head_out)
    assert head.gpu == "g0"
    for lease, boss in ((head, head_boss), (small, backfill), (more, backfill)):
        boss.release(lease)


def passed(url: str, ns: str) -> dict[str, int]:
    """Each queued request's count of later requests granted ahead of it (its ticket's ``passed``)."""
    tickets = raw_client(url).hgetall(Keys(ns).tickets)
    return {str(k): int(json.loads(v).get("passed", 0)) for k, v in tickets.items()}


def test_overtake_lets_later_requests_pass_a_blocked_one_at_most_n_times(bosses: Bosses) -> None:
    """One 16 GB GPU, 10 GB held; the head needs 8 GB. Strict: a 2 GB request behind it waits. With
    ``overtake: 2`` two 2 GB requests pass it; the third, which fits as well, waits behind it. The head is
    granted first when the holder leaves, and its lease record carries no pass count."""
    holder = bosses(service="holder")
    held = holder.acquire(10)
    head_boss = bosses(service="head")
    head_t, head_out = in_thread(lambda: head_boss.acquire(8, timeout=WAIT_S))
    queued(holder.url, holder.namespace, 1)
    small = bosses(service="small")
    with pytest.raises(LeaseTimeout):  # strict: it fits, but waits behind the head
        small.acquire(2, timeout=0.3)
    passing = bosses(service="small2", overtake=2)
    first = passing.acquire(2, timeout=WAIT_S)
    assert list(passed(holder.url, holder.namespace).values()) == [1]
    second = passing.acquire(2, timeout=WAIT_S)
    assert list(passed(holder.url, holder.namespace).values()) == [2]
    with pytest.raises(LeaseTimeout):  # 2 GB are still free, but the head has been passed twice
        passing.acquire(1, timeout=0.3)
    assert head_t.is_alive()
    holder.release(held)
    head = result(head_t, head_out)
    assert head.gpu == "g0" and "passed" not in head.record
    for lease, boss in ((head, head_boss), (first, passing), (second, passing)):
        boss.release(lease)
    events = [e for e in replay(holder.url, holder.namespace) if e.type == "granted"]
    assert [e.data["service"] for e in events][-3:] == ["small2", "small2", "head"]


def test_overtake_with_backfill_keeps_the_gpu_once_the_passes_are_spent(bosses: Bosses) -> None:
    """Backfill alone keeps g0 for a head pinned to it; with ``overtake: 1`` one later request may still use
    g0's free VRAM, and then g0 is kept: the next one waits although it fits there."""
    holders = bosses(TWO, service="holder")
    on_g0, on_g1 = holders.acquire(10, device="g0"), holders.acquire(16, device="g1")
    head_boss = bosses(TWO, service="head", queueing="backfill")
    head_t, head_out = in_thread(lambda: head_boss.acquire(12, device="g0", timeout=WAIT_S))
    queued(holders.url, holders.namespace, 1)
    with pytest.raises(LeaseTimeout):  # backfill: g0 is kept for the head
        head_boss.acquire(2, timeout=0.3)
    passing = bosses(TWO, service="small", queueing="backfill", overtake=1)
    small = passing.acquire(2, timeout=WAIT_S)
    assert small.gpu == "g0"
    with pytest.raises(LeaseTimeout):  # g0 has 4 GB free, kept for the head again
        passing.acquire(2, timeout=0.3)
    holders.release(on_g0)
    head = result(head_t, head_out)
    assert head.gpu == "g0"
    for lease, boss in ((head, head_boss), (small, passing), (on_g1, holders)):
        boss.release(lease)


def test_overtake_zero_removes_the_rule_and_bad_values_are_refused(bosses: Bosses, backend_url: str) -> None:
    from gpuboss.policy import policy_fields

    boss = bosses(overtake=3)
    boss.release(boss.acquire(1))
    keys = Keys(boss.namespace)
    assert raw_client(backend_url).hget(keys.policy, "overtake") == "3"
    plain = bosses(overtake=0)
    plain.release(plain.acquire(1))
    assert raw_client(backend_url).hget(keys.policy, "overtake") is None
    assert ("overtake", "") in policy_fields(plain.config)
    before = raw_client(backend_url).hgetall(keys.policy)
    for bad in (-1, 1001, "many"):
        with pytest.raises(ConfigError, match="overtake"):
            make(backend_url, boss.namespace, overtake=bad)
    assert raw_client(backend_url).hgetall(keys.policy) == before


# ---------------------------------------------------------------- time windows


def test_window_intervals_follow_the_time_zone() -> None:
    window = Window.model_validate({"class": "low", "pause": "09:00-18:00", "tz": "Europe/Berlin", "days": ["mon"]})
    # 2026-03-30 is a Monday after the change to summer time (UTC+2); 2026-03-23 one before it (UTC+1).
    spans = window_intervals(window, date(2026, 3, 24))
    starts = [datetime.fromtimestamp(i["from"] / 1000, UTC) for i in spans]
    assert datetime(2026, 3, 23, 8, 0, tzinfo=UTC) in starts
    assert datetime(2026, 3, 30, 7, 0, tzinfo=UTC) in starts
    assert all(datetime.fromtimestamp(i["from"] / 1000, UTC).weekday() == 0 for i in spans)
    night = Window.model_validate({"class": "low", "pause": "22:00-06:00"})
    first = window_intervals(night, date(2026, 1, 10))[0]
    assert first["to"] - first["from"] == 8 * 3600 * 1000  # spans midnight


def test_a_window_pauses_a_class_until_it_ends(bosses: Bosses, backend_url: str, namespace: str) -> None:
    boss = bosses(service="batch")
    lease = boss.acquire(1)  # registers the GPUs
    boss.release(lease)
    client = raw_client(backend_url)
    seconds, micros = client.time()
    now_ms = seconds * 1000 + micros // 1000
    windows = json.dumps([{"class": "low", "from": now_ms - 1000, "to": now_ms + 1200}])
    keys = Keys(namespace)
    call_script_sync(client, Call("policy", [keys.policy, *keys.event_keys()], ["windows", windows, 100]))
    assert boss.acquire(1, priority="high", timeout=0) is not None  # other classes are not paused
    low_t, low_out = in_thread(lambda: boss.acquire(1, priority="low", ttl=0.5, timeout=WAIT_S))
    queued(backend_url, namespace, 1)
    time.sleep(0.3)
    assert low_t.is_alive()  # it waits: it fits, but its class is paused now
    low = result(low_t, low_out)  # granted once the window is over (Redis time)
    seconds, micros = client.time()
    assert seconds * 1000 + micros // 1000 >= now_ms + 1200
    boss.release(low)


def test_config_windows_reach_the_namespace(bosses: Bosses, backend_url: str, namespace: str) -> None:
    now = datetime.now(UTC)
    start, end = now - timedelta(minutes=2), now + timedelta(minutes=5)
    if start.date() != end.date():
        pytest.skip("too close to midnight UTC for a same-day window")
    window = {"class": "low", "pause": f"{start:%H:%M}-{end:%H:%M}", "tz": "UTC"}
    boss = bosses(service="batch", windows=[window])
    with pytest.raises(LeaseTimeout):
        boss.acquire(1, priority="low", timeout=0.3)
    boss.release(boss.acquire(1, priority="normal", timeout=0))
    stored = json.loads(raw_client(backend_url).hget(Keys(namespace).policy, "windows"))
    assert any(w["class"] == "low" and w["from"] <= now.timestamp() * 1000 < w["to"] for w in stored)


# ---------------------------------------------------------------- runtime pause


def test_pause_and_resume_a_class_at_runtime(bosses: Bosses, backend_url: str, namespace: str) -> None:
    ops, worker = bosses(service="ops"), bosses(service="batch")
    running = worker.acquire(2, priority="low")
    assert ops.pause("low") is True and ops.pause("low") is False
    with pytest.raises(LeaseTimeout):
        worker.acquire(1, priority="low", timeout=0.3)  # waits, does not fail at once
    assert running.active  # active leases continue
    normal = worker.acquire(1, priority="normal", timeout=0)
    waiting_t, waiting_out = in_thread(lambda: worker.acquire(1, priority="low", timeout=WAIT_S))
    queued(backend_url, namespace, 1)
    assert ops.resume("low") is True
    worker.release(result(waiting_t, waiting_out))
    for lease in (normal, running):
        worker.release(lease)
    types = [e.type for e in replay(backend_url, namespace)]
    assert "paused" in types and "unpaused" in types
    with pytest.raises(InvalidRequest, match="priority"):
        ops.pause("nope")


def test_cli_pause_and_resume(real_url: str, namespace: str) -> None:
    runner = CliRunner()
    base = ["--redis-url", real_url, "--namespace", namespace]
    done = runner.invoke(cli, [*base, "pause", "low"])
    assert done.exit_code == 0, done.output
    assert "low: paused" in done.output
    assert json.loads(raw_client(real_url).hget(Keys(namespace).policy, "paused"))["low"]["by"]
    again = runner.invoke(cli, [*base, "--json", "pause", "low"])
    assert json.loads(again.stdout)["changed"] is False
    done = runner.invoke(cli, [*base, "resume", "low"])
    assert done.exit_code == 0 and "low: resumed" in done.output
    assert raw_client(real_url).hget(Keys(namespace).policy, "paused") is None
    bad = runner.invoke(cli, [*base, "pause", "nope"])
    assert bad.exit_code != 0 and "priority" in bad.output and "Traceback" not in bad.output


# ---------------------------------------------------------------- caps


def test_service_lease_cap_is_enforced_with_the_grant(bosses: Bosses) -> None:
    caps = {"services": {"ai": {"max_leases": 1}}}
    ai, other = bosses(service="ai", caps=caps), bosses(service="web", caps=caps)
    first = ai.acquire(1)
    with pytest.raises(LeaseTimeout):
        ai.acquire(1, timeout=0.3)  # concurrency 1 for this service
    web = other.acquire(1, timeout=0)  # other services are not held back by it
    second_t, second_out = in_thread(lambda: ai.acquire(1, timeout=WAIT_S))
    queued(ai.url, ai.namespace, 1)
    ai.release(first)
    ai.release(result(second_t, second_out))
    other.release(web)


def test_service_vram_cap_and_class_cap(bosses: Bosses) -> None:
    caps = {"services": {"ai": {"max_vram_gb": 6}}, "classes": {"high": {"max_leases": 1}}}
    ai, web = bosses(service="ai", caps=caps), bosses(service="web", caps=caps)
    a = ai.acquire(4)
    with pytest.raises(LeaseTimeout):
        ai.acquire(4, timeout=0.3)  # 8 GB > 6 GB for this service
    b = ai.acquire(2, timeout=0)  # 6 GB: at the cap, allowed
    h = web.acquire(1, priority="high")
    with pytest.raises(LeaseTimeout):
        web.acquire(1, priority="high", timeout=0.3)
    for lease, boss in ((a, ai), (b, ai), (h, web)):
        boss.release(lease)


def test_the_service_vram_cap_counts_every_gpu_of_a_lease(bosses: Bosses) -> None:
    """A lease over several GPUs holds its size on each: the cap counts all of it (it counted one GPU's)."""
    caps = {"services": {"ai": {"max_vram_gb": 6}}}
    ai = bosses(TWO, service="ai", caps=caps)
    with pytest.raises(LeaseTimeout):
        ai.acquire(8, gpus=2, timeout=0.3)  # 4 GB on each, 8 GB in all > 6 GB
    lease = ai.acquire(6, gpus=2, timeout=0)  # 3 GB on each: at the cap, allowed
    queued_t, queued_out = in_thread(lambda: ai.acquire(2, gpus=2, timeout=WAIT_S))  # 2 GB more: waits
    queued(ai.url, ai.namespace, 1)
    ai.release(lease)  # granted from the queue once the cap has room, by the same count
    ai.release(result(queued_t, queued_out))


def _counters(url: str, ns: str) -> tuple[dict[str, int], str | None]:
    """The rules' counters in the usage hash, and the header's ``counting`` field."""
    client, keys = raw_client(url), Keys(ns)
    usage = client.hgetall(keys.usage)
    counters = {f: int(v) for f, v in usage.items() if f.split(":")[0] in ("class", "svc", "svcmib")}
    return counters, client.hget(keys.head, "counting")


def _leases_add_up(url: str, ns: str) -> dict[str, int]:
    records = [json.loads(raw) for raw in raw_client(url).hgetall(Keys(ns).leases).values()]
    return usage_of(records, counting=True)


def test_the_rules_counters_are_kept_only_while_a_rule_reads_them(
    bosses: Bosses, backend_url: str, namespace: str
) -> None:
    """Without a pause rule or a cap, grants and releases write no class/service counters; a cap set later counts
    the leases granted before it (made from their records), and is enforced by that count."""
    plain = bosses(service="ai")
    first, second = plain.acquire(2), plain.acquire(3)
    counters, counting = _counters(backend_url, namespace)
    assert counters == {} and counting in (None, "0")

    capped = bosses(service="ai", caps={"services": {"ai": {"max_leases": 3, "max_vram_gb": 8}}})
    third = capped.acquire(1, timeout=0)  # the third lease: at the lease cap
    counters, counting = _counters(backend_url, namespace)
    assert counters == {"class:normal": 3, "svc:ai": 3, "svcmib:ai": 6144} == _leases_add_up(backend_url, namespace)
    assert counting == "1"
    with pytest.raises(LeaseTimeout):
        capped.acquire(1, timeout=0.3)  # a fourth: over the cap counted from the two earlier leases
    plain.release(first)
    fourth = capped.acquire(2, timeout=0)  # 3 leases, 6 GB: within both caps again
    assert _counters(backend_url, namespace)[0] == {"class:normal": 3, "svc:ai": 3, "svcmib:ai": 6144}

    # The header lost (deleted by hand): the next call makes the counters again from the records, not on top.
    raw_client(backend_url).delete(Keys(namespace).head)
    with pytest.raises(LeaseTimeout):
        capped.acquire(1, timeout=0.3)
    assert _counters(backend_url, namespace) == ({"class:normal": 3, "svc:ai": 3, "svcmib:ai": 6144}, "1")

    # The caps removed (an empty caps section): the next call deletes the counters, and later calls keep none.
    uncapped = bosses(service="ai", caps={})
    fifth = uncapped.acquire(1, timeout=0)
    assert _counters(backend_url, namespace) == ({}, "0")
    uncapped.release(fifth)
    assert _counters(backend_url, namespace) == ({}, "0")

    # And set again: counted from the records once more.
    again = bosses(service="ai", caps={"services": {"ai": {"max_leases": 3}}})
    with pytest.raises(LeaseTimeout):
        again.acquire(1, timeout=0.3)
    assert _counters(backend_url, namespace) == ({"class:normal": 3, "svc:ai": 3, "svcmib:ai": 6144}, "1")
    plain.release(second)
    for lease in (third, fourth):
        capped.release(lease)
    assert _counters(backend_url, namespace) == ({}, "1")  # (fields at 0 are deleted)


def test_counting_from_the_records_passes_over_a_record_that_is_not_one(
    bosses: Bosses, backend_url: str, namespace: str
) -> None:
    """A lease record written by hand that does not decode (or lacks its class, service or size) is left out of
    the counters made when a cap comes, instead of failing every call from then on."""
    plain = bosses(service="ai")
    lease = plain.acquire(2)
    client = raw_client(backend_url)
    client.hset(Keys(namespace).leases, mapping={"bogus": "not json", "partial": json.dumps({"id": "partial"})})
    try:
        capped = bosses(service="ai", caps={"services": {"ai": {"max_leases": 1}}})
        with pytest.raises(LeaseTimeout):
            capped.acquire(1, timeout=0.3)  # the one real lease is counted: at the cap
        assert _counters(backend_url, namespace) == ({"class:normal": 1, "svc:ai": 1, "svcmib:ai": 2048}, "1")
    finally:
        client.hdel(Keys(namespace).leases, "bogus", "partial")
    plain.release(lease)


def test_a_pause_rule_set_later_sees_the_leases_already_active(bosses: Bosses) -> None:
    """The class counts a pause rule reads are made from the lease records when the rule comes: a high lease
    granted before it holds low back at once, and low is granted when it goes."""
    web = bosses(service="web")
    high = web.acquire(2, priority="high")  # no rule yet: nothing counted
    batch = bosses(service="batch", pause=[{"class": "low", "while": ["high"]}])
    with pytest.raises(LeaseTimeout):
        batch.acquire(1, priority="low", timeout=0.3)
    waiting_t, waiting_out = in_thread(lambda: batch.acquire(1, priority="low", timeout=WAIT_S))
    queued(batch.url, batch.namespace, 1)
    web.release(high)
    batch.release(result(waiting_t, waiting_out))


def test_a_lease_at_its_lease_cap_can_grow(bosses: Bosses, backend_url: str, namespace: str) -> None:
    """max_leases counts leases: a growth adds none, at once or after waiting in the queue."""
    caps = {"services": {"ai": {"max_leases": 1}}, "classes": {"normal": {"max_leases": 2}}}
    ai, web = bosses(service="ai", caps=caps), bosses(service="web", caps=caps)
    lease = ai.acquire(4)
    lease.resize(6, timeout=0.5)  # VRAM is free: at once
    assert lease.vram_mib == 6144
    other = web.acquire(10)  # the GPU is full now, and the class at its cap
    grow_t, grow_out = in_thread(lambda: lease.resize(12, timeout=WAIT_S))
    queued(backend_url, namespace, 1)
    web.release(other)  # the queued growth is granted though both caps are reached
    result(grow_t, grow_out)
    assert lease.vram_mib == 12288
    waited = [e for e in replay(backend_url, namespace) if e.type == "queued" and e.data.get("grow_of") == lease.id]
    assert waited and waited[0].data["ttl_ms"] == round(lease.ttl * 1000) and "held_back" not in waited[0].data
    ai.release(lease)


def test_a_growth_over_the_service_vram_cap_waits(bosses: Bosses, backend_url: str, namespace: str) -> None:
    caps = {"services": {"ai": {"max_leases": 1, "max_vram_gb": 6}}}
    ai = bosses(service="ai", caps=caps)
    lease = ai.acquire(4)
    with pytest.raises(LeaseTimeout):
        lease.resize(8, timeout=0.3)  # 8 GB > 6 GB for this service, though the GPU has room
    assert lease.vram_mib == 4096
    lease.resize(6, timeout=0.5)  # at the cap: allowed
    assert lease.vram_mib == 6144
    waited = [e.data for e in replay(backend_url, namespace) if e.type == "queued" and e.data.get("grow_of")]
    assert [(e["held_back"], e["ttl_ms"]) for e in waited] == [("service_cap", round(lease.ttl * 1000))]
    ai.release(lease)


def test_the_resize_script_refuses_a_lease_over_several_gpus(bosses: Bosses, backend_url: str, namespace: str) -> None:
    boss = bosses(TWO)
    lease = boss.acquire(8, gpus=2)  # 4 GB on each
    client = raw_client(backend_url)
    used = client.hgetall(Keys(namespace).used)
    reply = call_script_sync(client, boss._core.resize_call(lease.id, 6144))  # the client refuses before this
    assert [int(reply[0]), int(reply[1])] == [-1, 0]
    assert client.hgetall(Keys(namespace).used) == used
    boss.release(lease)
    assert {int(v) for v in client.hgetall(Keys(namespace).used).values()} == {0}


# ---------------------------------------------------------------- max_hold


def test_max_hold_revokes_a_lease_held_too_long(bosses: Bosses, backend_url: str, namespace: str) -> None:
    boss = bosses(service="batch", max_hold={"low": {"seconds": 0.4, "action": "revoke"}})
    lost = threading.Event()
    lease = boss.acquire(1, priority="low", ttl=0.6, on_lost=lambda _lease: lost.set())
    assert lost.wait(WAIT_S) and lease.state is LeaseState.LOST
    revoked = [e for e in replay(backend_url, namespace) if e.type == "revoked"]
    assert revoked and revoked[0].data["reason"] == "max_hold"
    normal = boss.acquire(1, priority="normal", ttl=0.6)  # other classes have no limit
    time.sleep(0.6)
    assert normal.active
    boss.release(normal)


def test_max_hold_asks_to_checkpoint(bosses: Bosses, backend_url: str, namespace: str) -> None:
    boss = bosses(service="batch", max_hold={"low": {"seconds": 0.4}})
    asked = threading.Event()
    lease = boss.acquire(1, priority="low", ttl=0.6, on_evict=asked.set)
    assert asked.wait(WAIT_S)
    deadline = time.monotonic() + WAIT_S
    while lease.evictions < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lease.evictions == 1 and lease.active  # handed back and granted again (nobody else wanted it)
    requested = [e for e in replay(backend_url, namespace) if e.type == "evict_requested"]
    assert requested and requested[0].data["reason"] == "max_hold"
    boss.release(lease)
