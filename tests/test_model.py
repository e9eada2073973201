"""Model-checked invariants: the real Lua scripts and a pure-Python reference model, side by side.

A hypothesis state machine sends random sequences of acquire (any size, priority, pin or none, wait or
try, ttl), re-acquire of an id (the idempotent retry a waiter makes), release (of a lease, of a queued
request, of an id that holds nothing, with every reason), renew, revoke, a waiter taking its grant, collect
and time passing beyond TTLs, through the very calls :class:`gpuboss.core.Core` builds (so a change of a
script's KEYS or ARGV is picked up here), and the same operations through ``tests/lease_model.py``.
After every step it checks, on Redis itself: nothing leased beyond capacity - reserve; the per-GPU
counters equal the sum of the lease records; queue, tickets and queue deadlines hold the same ids, and so do
leases and lease deadlines; the queue is in priority-then-arrival order; its head does not fit (else it
would have been granted); nothing past its deadline survives a call; fencing tokens only grow; no key
but the fixed ones remains once nothing is held or queued. And the scripts agree with the model on every
reply and on the whole state (which id holds what on which GPU, queue order, wake lists, counters).

Time: the scripts read Redis ``TIME``. On fakeredis the test freezes the server's clock and moves it
itself, so deadlines are hit to the millisecond. A real redis-server's clock cannot be moved, so there
time passing is simulated by moving every deadline and record time back by the same amount (what a script
sees is then exactly what it would see later), with TTLs and steps in units of 10 s so that the few
milliseconds that really pass during an example never cross a deadline.

``GPUBOSS_MODEL_EXAMPLES`` (default 80) and ``GPUBOSS_MODEL_STEPS`` (default 50) set the size of a run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import redis
from gpuboss import scripts
from gpuboss.config import PRIORITIES, BossConfig
from gpuboss.core import Call, Core, ReleaseReply, RenewStatus, Reply, RevokeReply
from gpuboss.redis_io import connect_sync, evalsha_sync
from gpuboss.server import RedisProcess
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.conftest import namespace_keys, snapshot
from tests.lease_model import LeaseModel, ModelGpu, ModelLease, ModelRequest

EXAMPLES = int(os.environ.get("GPUBOSS_MODEL_EXAMPLES", "80"))
STEPS = int(os.environ.get("GPUBOSS_MODEL_STEPS", "50"))

#: Small GPUs so that requests collide: 4096, 3072 and 3072 MiB leasable (gpu1 and gpu2 tie on best fit).
MODEL_GPUS: list[dict[str, Any]] = [
    {"id": "gpu0", "name": "A", "vram_gb": 4, "index": 0},
    {"id": "gpu1", "name": "B", "vram_gb": 4, "index": 1, "reserve_gb": 1},
    {"id": "gpu2", "name": "C", "vram_gb": 3, "index": 2},
]
SIZES_MIB = [512, 1024, 2048, 2048, 2560, 3072, 3072, 3584, 4096, 4608]  # 3584 and 4096 fit gpu0 only, 4608 none
PINS = ["", "", "", "gpu0", "gpu1", "gpu2", "gpu9"]  # mostly unpinned; gpu9 is not registered
IDS = [f"r{i}" for i in range(10)]
GHOST = "ghost"  # never acquired
REASONS = ["release", "timeout", "cancel", "close"]
HAS_REVOKE = "revoke" in scripts.all_scripts() and hasattr(Core, "revoke_call")


# ---------------------------------------------------------------- clocks


class FrozenClock:
    """fakeredis: Redis TIME (also inside Lua) reads a clock the test moves; deadlines are exact."""

    exact = True

    def __init__(self, start_ms: int) -> None:
        self.ms = start_ms

    def install(self, monkeypatch: pytest.MonkeyPatch, client: redis.Redis) -> bool:
        from fakeredis.commands_mixins import server_mixin

        if getattr(server_mixin, "time", None) is None:
            return False
        monkeypatch.setattr(server_mixin, "time", types.SimpleNamespace(time=lambda: self.ms / 1000))
        seconds, micros = client.time()
        return seconds * 1000 + micros // 1000 == self.ms

    def now_ms(self, client: redis.Redis) -> int:
        return self.ms

    def advance(self, client: redis.Redis, core: Core, ms: int) -> None:
        self.ms += ms


class ShiftClock:
    """A real redis-server: its clock cannot move, so every deadline and record time moves back instead."""

    exact = False

    def now_ms(self, client: redis.Redis) -> int:
        seconds, micros = client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def advance(self, client: redis.Redis, core: Core, ms: int) -> None:
        keys = core.keys
        pipe = client.pipeline(transaction=True)
        for zset in (keys.lease_exp, keys.queue_exp):
            for member, score in client.zrange(zset, 0, -1, withscores=True):
                pipe.zadd(zset, {member: int(score) - ms})
        for hash_key in (keys.leases, keys.tickets):
            for rid, raw in client.hgetall(hash_key).items():
                rec = json.loads(raw)
                for name, value in rec.items():
                    if name.endswith("_at") and isinstance(value, int | float) and not isinstance(value, bool):
                        rec[name] = value - ms
                pipe.hset(hash_key, rid, json.dumps(rec))
        pipe.execute()


@dataclass
class Backend:
    name: str
    client: redis.Redis
    clock: FrozenClock | ShiftClock
    ttls_ms: tuple[int, ...]
    advances_ms: tuple[int, ...]
    quantum_ms: int  # how far a real reading of "ms until the next expiry" may lag the model's


FAKE_TTLS, FAKE_ADVANCES = (20, 40, 80, 160), (1, 10, 19, 20, 40, 100)
UNIT = 10_000
REAL_TTLS, REAL_ADVANCES = (UNIT, 2 * UNIT, 4 * UNIT), (UNIT, 2 * UNIT, 5 * UNIT)


@pytest.fixture(params=["fake", "real"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    if request.param == "fake":
        client = connect_sync(f"fakeredis://model-{uuid.uuid4().hex[:8]}", 5.0)
        frozen = FrozenClock(1_800_000_000_000)
        if frozen.install(monkeypatch, client):
            yield Backend("fake", client, frozen, FAKE_TTLS, FAKE_ADVANCES, 1)
        else:  # a fakeredis whose clock cannot be frozen: move deadlines, as on a real server
            yield Backend("fake", client, ShiftClock(), REAL_TTLS, REAL_ADVANCES, UNIT)
    else:
        server: RedisProcess = request.getfixturevalue("redis_server")
        client = connect_sync(server.url, 5.0)
        yield Backend("real", client, ShiftClock(), REAL_TTLS, REAL_ADVANCES, UNIT)
    client.close()


# ---------------------------------------------------------------- the machine


@dataclass(frozen=True)
class Ask:
    """A request as a rule draws it; ``ttl`` picks one of the backend's TTLs."""

    need: int
    priority: str
    pin: str
    ttl: int
    wait: bool


@dataclass(frozen=True)
class Args:
    """A request as sent: MiB, priority name, pinned gpu id or '', TTL in ms, wait (else try once)."""

    need: int
    priority: str
    pin: str
    ttl_ms: int
    wait: bool


class LeaseMachine(RuleBasedStateMachine):
    backend: ClassVar[Backend]

    def __init__(self) -> None:
        super().__init__()
        self.client = self.backend.client
        self.clock = self.backend.clock
        self.exact = self.clock.exact
        self.core = Core(BossConfig(namespace=f"m{uuid.uuid4().hex[:10]}", gpus=MODEL_GPUS, service="model"))
        start = self.clock.now_ms(self.client)
        seed = (lambda now: now * 10) if self.exact else None  # tokens count up from Redis time (ms x 10)
        self.model = LeaseModel(gpus={}, now=start, token_seed=seed)
        self.args: dict[str, Args] = {}
        self.max_token = 0
        self.tokens: dict[str, int] = {}
        self.scripted = False  # the last step ran a script (so nothing past its deadline may remain)

    def teardown(self) -> None:
        keys = namespace_keys(self.client, self.core.config.namespace)
        if keys:
            self.client.delete(*keys)

    # -- helpers

    def run(self, call: Call) -> list[Any]:
        reply = evalsha_sync(self.client, call)
        self.scripted = True
        return list(reply)

    def ttl(self, index: int) -> int:
        return self.backend.ttls_ms[index % len(self.backend.ttls_ms)]

    def check_next(self, got: object, want: int, what: str) -> None:
        got = int(got)  # type: ignore[call-overload]
        if self.exact or want < 0:
            assert got == want, f"{what}: next expiry in {got} ms, model says {want}"
        else:
            assert want - self.backend.quantum_ms < got <= want, f"{what}: next expiry {got} ms vs model {want}"

    def some_id(self, data: st.DataObject, pool: set[str], label: str) -> str:
        return data.draw(st.sampled_from(sorted(pool)), label=label)

    # -- setup

    @initialize()
    def register(self) -> None:
        before = snapshot(self.client, self.core.config.namespace)
        reply = self.run(self.acquire_call("r0", Args(1024, "normal", "", self.ttl(0), True)))
        assert (
            reply == [Reply.NO_GPUS] and self.model.acquire("r0", 1024, 1, "normal", "", 1, "wait")[0] is Reply.NO_GPUS
        )
        assert snapshot(self.client, self.core.config.namespace) == before, "NO_GPUS wrote something"
        register = self.core.register_call()
        assert register is not None
        assert self.run(register) == [1, len(MODEL_GPUS)]
        for g in self.core.declared.values():
            self.model.gpus[g.id] = ModelGpu(g.id, g.index, g.leasable_mib)

    def acquire_call(self, rid: str, a: Args) -> Call:
        # Not preemptible: eviction is checked by its own tests (tests/test_eviction.py), not modelled here yet.
        req = self.core.make_request(a.need / 1024, a.priority, None if a.wait else 0, a.ttl_ms / 1000, preemptible=False)
        req = dataclasses.replace(req, vram_mib=a.need, ttl_ms=a.ttl_ms)  # exact, whatever the float rounding
        return self.core.acquire_call(rid, req, a.pin, self.core.config.service)

    # -- rules

    def do_acquire(self, rid: str, a: Args) -> None:
        scripted, namespace = self.scripted, self.core.config.namespace
        refused = self.model.refusal(a.need, a.pin) is not None
        before = snapshot(self.client, namespace) if refused else None
        reply = self.run(self.acquire_call(rid, a))
        code, detail, next_ms = self.model.acquire(
            rid, a.need, PRIORITIES[a.priority], a.priority, a.pin, a.ttl_ms, "wait" if a.wait else "try"
        )
        got = Reply(int(reply[0]))
        assert got is code, f"acquire {rid} {a}: script says {got.name}, model says {code.name}"
        if code is Reply.GRANTED:
            record = json.loads(reply[1])
            assert record["id"] == rid
            self.adopt_tokens({rid: record})
            self.check_lease(record, self.model.leases[rid])
        elif code is Reply.QUEUED:
            assert int(reply[1]) == detail, f"acquire {rid}: queue position {reply[1]}, model says {detail}"
            assert next_ms is not None
            self.check_next(reply[2], next_ms, f"acquire {rid} (queued)")
        elif code is Reply.BUSY:
            assert next_ms is not None
            self.check_next(reply[1], next_ms, f"acquire {rid} (busy)")
        if code in (Reply.INSUFFICIENT, Reply.UNKNOWN_GPU, Reply.NO_GPUS):
            assert code is not Reply.INSUFFICIENT or int(reply[1]) == detail
            assert before is not None and snapshot(self.client, namespace) == before, f"{code.name} wrote"
            self.scripted = scripted  # these answer before collecting anything

    # Every rule takes one or two arguments: hypothesis orders rules by their number of arguments and
    # favours the first, so a rule without any (or with many) would be drawn far more (or less) often.
    NEW = st.tuples(
        st.sampled_from(IDS),
        st.builds(
            Ask,
            need=st.sampled_from(SIZES_MIB),
            priority=st.sampled_from(sorted(PRIORITIES)),
            pin=st.sampled_from(PINS),
            ttl=st.integers(0, 3),
            wait=st.booleans(),
        ),
    )

    @rule(new=NEW)
    def acquire(self, new: tuple[str, Ask]) -> None:
        """A new request; for an id that is still live, the same call again (what a retrying waiter sends)."""
        rid, ask = new
        if rid not in self.model.live() or rid not in self.args:
            self.args[rid] = Args(ask.need, ask.priority, ask.pin, self.ttl(ask.ttl), ask.wait)
        self.do_acquire(rid, self.args[rid])

    # The same rule twice more, and bursts: queues only form when acquires clearly outnumber releases.
    @rule(new=NEW)
    def acquire_2(self, new: tuple[str, Ask]) -> None:
        self.acquire(new)

    @rule(new=NEW)
    def acquire_3(self, new: tuple[str, Ask]) -> None:
        self.acquire(new)

    @rule(news=st.lists(NEW, min_size=2, max_size=4))
    def acquire_burst(self, news: list[tuple[str, Ask]]) -> None:
        """Several requests in a row, which is what builds a queue."""
        for new in news:
            self.acquire(new)

    @precondition(lambda self: bool(self.args))
    @rule(data=st.data())
    def reacquire(self, data: st.DataObject) -> None:
        """An id already used, sent again with its own arguments: idempotent while it is live, new after."""
        rid = self.some_id(data, set(self.args), "id")
        self.do_acquire(rid, self.args[rid])

    def do_release(self, rid: str, reason: str) -> None:
        reply = self.run(self.core.release_call(rid, reason))  # type: ignore[arg-type]
        code, granted = self.model.release(rid)
        assert [ReleaseReply(int(reply[0])), int(reply[1])] == [code, granted], f"release {rid}: {reply}"

    @rule(data=st.data(), reason=st.sampled_from(REASONS))
    def release(self, data: st.DataObject, reason: str) -> None:
        """Mostly a lease or a queued request; else an id released or expired before, or never seen."""
        live = sorted(self.model.live())
        other = sorted({GHOST, *self.args} - set(live))
        choices = st.sampled_from(live) | st.sampled_from(other) if live else st.sampled_from(other)
        self.do_release(data.draw(choices, label="id"), reason)

    @precondition(lambda self: bool(self.model.queue))
    @rule(data=st.data(), reason=st.sampled_from(REASONS))
    def release_queued(self, data: st.DataObject, reason: str) -> None:
        """A waiter that times out or is cancelled withdraws its request."""
        self.do_release(self.some_id(data, set(self.model.queue), "request"), reason)

    @precondition(lambda self: len(self.model.live()) >= 4)
    @rule(reason=st.sampled_from(REASONS))
    def release_everything(self, reason: str) -> None:
        while self.model.live():
            self.do_release(min(self.model.live()), reason)

    @rule(data=st.data())
    def renew(self, data: st.DataObject) -> None:
        live = sorted(self.model.live())
        pool = st.sampled_from(live) | st.sampled_from([GHOST, *IDS]) if live else st.sampled_from([GHOST, *IDS])
        ids = data.draw(st.lists(pool, unique=True, max_size=4), label="ids")
        items = {rid: self.ttl(data.draw(st.integers(0, 3), label=f"ttl {rid}")) for rid in ids}
        reply = self.run(self.core.renew_call(items))
        next_ms, statuses = self.model.renew(items)
        assert [RenewStatus(int(x)) for x in reply[2:]] == statuses, f"renew {items}: {reply}"
        self.check_next(reply[0], next_ms, "renew")
        if self.exact:
            assert int(reply[1]) == self.model.now

    @precondition(lambda self: HAS_REVOKE)
    @rule(data=st.data())
    def revoke(self, data: st.DataObject) -> None:
        rid = self.some_id(data, self.model.live() | {GHOST}, "id")
        reply = self.run(self.core.revoke_call(rid, "model@test", "because"))
        code, granted = self.model.revoke(rid)
        assert [RevokeReply(int(reply[0])), int(reply[1])] == [code, granted], f"revoke {rid}: {reply[:2]}"
        if code is RevokeReply.NOT_FOUND:
            assert len(reply) == 2
        else:
            assert json.loads(reply[2])["id"] == rid

    @rule(step=st.integers(-6, 5))
    def collect(self, step: int) -> None:
        """Collect, at once (step < 0) or after some time passes."""
        if step >= 0:
            self.time_passes(step)
        reply = self.run(self.core.collect_call())
        leases, requests, granted, next_ms = self.model.collect()
        got_leases = [json.loads(r)["id"] for r in reply[4]]
        got_requests = [json.loads(r)["id"] for r in reply[5]]
        if not self.exact:  # equal virtual deadlines are ordered by real time there
            got_leases, got_requests, leases, requests = map(sorted, (got_leases, got_requests, leases, requests))
        assert [int(x) for x in reply[:3]] == [len(leases), len(requests), granted], f"collect: {reply[:4]}"
        assert (got_leases, got_requests) == (leases, requests)
        self.check_next(reply[3], next_ms, "collect")

    @precondition(lambda self: bool(self.model.wake))
    @rule(data=st.data())
    def take_grant(self, data: st.DataObject) -> None:
        """The waiter of a granted request pops its wake list, as its BLPOP would."""
        rid = self.some_id(data, set(self.model.wake), "waiter")
        raw = self.client.lpop(self.core.keys.wake(rid))
        got = None if raw is None else json.loads(raw)["id"]
        assert got == self.model.take(rid)
        assert self.client.lpop(self.core.keys.wake(rid)) is None and self.model.take(rid) is None

    @rule(step=st.integers(0, 5))
    def time_passes(self, step: int) -> None:
        ms = self.backend.advances_ms[step % len(self.backend.advances_ms)]
        self.clock.advance(self.client, self.core, ms)
        self.model.now += ms
        self.scripted = False

    # -- the checks after every step

    def adopt_tokens(self, records: dict[str, dict[str, Any]]) -> None:
        """A real Redis seeds the token counter from its own clock: the model learns it at the first grant."""
        for rid, lease in self.model.leases.items():
            if lease.token is None and rid in records:
                self.model.adopt_token(rid, int(records[rid]["token"]))

    def check_lease(self, rec: dict[str, Any], lease: ModelLease) -> None:
        names = ["id", "gpu", "device", "vram_mib", "rank", "priority", "ttl_ms", "seq", "token"]
        if self.exact:
            names += ["requested_at", "acquired_at", "expires_at"]
        got = {n: rec.get(n) for n in names}
        want = {n: getattr(lease, n) for n in names}
        assert got == want, f"lease {lease.id}: script {got} vs model {want}"

    def check_ticket(self, rec: dict[str, Any], req: ModelRequest) -> None:
        names = ["id", "vram_mib", "rank", "priority", "pin", "ttl_ms", "seq"]
        if self.exact:
            names += ["requested_at"]
        got = {n: rec.get(n) for n in names}
        want = {n: getattr(req, n) for n in names}
        assert got == want, f"request {req.id}: script {got} vs model {want}"

    @invariant()
    def state_holds_and_matches_the_model(self) -> None:
        c, k, model = self.client, self.core.keys, self.model
        capacity = {g: int(v) for g, v in c.hgetall(k.capacity).items()}
        used = {g: int(v) for g, v in c.hgetall(k.used).items()}
        leases = {rid: json.loads(raw) for rid, raw in c.hgetall(k.leases).items()}
        lease_exp = {rid: int(score) for rid, score in c.zrange(k.lease_exp, 0, -1, withscores=True)}
        queue = list(c.zrange(k.queue, 0, -1))
        tickets = {rid: json.loads(raw) for rid, raw in c.hgetall(k.tickets).items()}
        queue_exp = {rid: int(score) for rid, score in c.zrange(k.queue_exp, 0, -1, withscores=True)}
        all_keys = namespace_keys(c, self.core.config.namespace)
        wake_keys = {key for key in all_keys if key.startswith(k.wake_prefix)}

        # Invariants of the state itself, whatever the model says.
        assert capacity == {g: m.leasable_mib for g, m in model.gpus.items()}, "capacity - reserve per GPU"
        sums = Counter({g: 0 for g in capacity})
        for rec in leases.values():
            sums[rec["gpu"]] += rec["vram_mib"]
        assert used == dict(sums), f"used counters {used} != sum of lease records {dict(sums)}"
        for g, cap in capacity.items():
            assert 0 <= used[g] <= cap, f"{g} over-committed: {used[g]} MiB leased of {cap}"
        assert set(lease_exp) == set(leases), "lease records and lease deadlines differ"
        assert set(queue) == set(tickets) == set(queue_exp), "queue, tickets and queue deadlines differ"
        order = [(-tickets[rid]["rank"], tickets[rid]["seq"]) for rid in queue]
        assert order == sorted(set(order)), f"queue not in priority-then-arrival order: {order}"
        if queue:
            head = tickets[queue[0]]
            eligible = [head["pin"]] if head["pin"] else list(capacity)
            fits = [g for g in eligible if capacity[g] - used[g] >= head["vram_mib"]]
            assert not fits, f"head {queue[0]} ({head['vram_mib']} MiB) fits on {fits} but waits"
        if self.scripted:
            now = self.clock.now_ms(c)
            late = {rid: s for rid, s in [*lease_exp.items(), *queue_exp.items()] if s <= now}
            assert not late, f"entries past their deadline survived a call: {late} (now {now})"
        counter = c.get(k.token)
        tokens = {rid: int(rec["token"]) for rid, rec in leases.items()}
        assert all(counter is not None and t <= int(counter) for t in tokens.values()), "token above its counter"
        fresh = {rid: t for rid, t in tokens.items() if self.tokens.get(rid) != t}  # granted since the last step
        assert all(t > self.max_token for t in fresh.values()), f"fencing token went back: {fresh} <= {self.max_token}"
        assert len(set(tokens.values())) == len(tokens), f"two leases share a token: {tokens}"
        self.max_token = max([self.max_token, *fresh.values()])
        self.tokens = tokens
        allowed = set(k.fixed()) | {k.leases, k.lease_exp, k.queue, k.tickets, k.queue_exp} | wake_keys
        assert all_keys <= allowed, f"unknown keys: {sorted(all_keys - allowed)}"
        if model.empty():
            assert all_keys <= set(k.fixed()), f"keys left once nothing is held: {sorted(all_keys - k.fixed())}"

        # Agreement with the model.
        self.adopt_tokens(leases)
        assert set(leases) == set(model.leases), f"leases: script {sorted(leases)} vs model {sorted(model.leases)}"
        for rid, rec in leases.items():
            self.check_lease(rec, model.leases[rid])
        assert queue == [r.id for r in model.ordered_queue()], f"queue: script {queue} vs model"
        for rid, rec in tickets.items():
            self.check_ticket(rec, model.queue[rid])
        if self.exact:
            assert lease_exp == {rid: x.expires_at for rid, x in model.leases.items()}
            assert queue_exp == {rid: x.expires_at for rid, x in model.queue.items()}
        wake = {key[len(k.wake_prefix) :]: [json.loads(r)["id"] for r in c.lrange(key, 0, -1)] for key in wake_keys}
        assert wake == model.wake, f"wake lists: script {wake} vs model {model.wake}"
        assert int(c.get(k.seq) or 0) == model.seq
        if model.token is not None:
            assert counter is not None and int(counter) == model.token


def machine_settings() -> settings:
    return settings(
        max_examples=EXAMPLES,
        stateful_step_count=STEPS,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


@pytest.mark.timeout(900)  # room for hypothesis to shrink a failure to its shortest form
def test_scripts_match_the_model(backend: Backend) -> None:
    machine = type("BoundLeaseMachine", (LeaseMachine,), {"backend": backend})
    run_state_machine_as_test(machine, settings=machine_settings())


def test_revoke_is_covered_when_the_script_exists() -> None:
    """The machine drives ``revoke`` whenever lua/revoke-*.lua and Core.revoke_call exist."""
    assert ("revoke" in scripts.all_scripts()) is HAS_REVOKE
