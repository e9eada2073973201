"""The I/O-free core: the state machine table, the acquisition protocol step by step, key names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from gpuboss import InsufficientCapacity, LeaseTimeout
from gpuboss.config import BossConfig
from gpuboss.core import Call, Core, Pop, ReadHash, ReadQueueHead, Reply, Watch
from gpuboss.keys import FIXED_SUFFIXES, Keys
from gpuboss.lease import TRANSITIONS, IllegalTransition, LeaseState, advance

from tests.conftest import GPUS, Clock

ROOT = Path(__file__).resolve().parent.parent


def record(lease_id: str = "r1") -> str:
    return json.dumps(
        {
            "id": lease_id, "gpu": "gpu0", "device": "cuda:0", "vram_mib": 1024, "priority": "normal",
            "token": 7, "service": "s", "host": "h", "pid": 1, "acquired_at": 2000, "expires_at": 32000,
            "requested_at": 1000, "ttl_ms": 30000,
        }
    )  # fmt: skip


@pytest.fixture
def core() -> Core:
    return Core(BossConfig(namespace="ns", gpus=GPUS))


def test_state_machine_allows_only_the_table() -> None:
    assert advance(LeaseState.REQUESTED, "queued") is LeaseState.QUEUED
    assert advance(LeaseState.QUEUED, "granted") is LeaseState.GRANTED
    assert advance(LeaseState.GRANTED, "lost") is LeaseState.LOST
    assert advance(LeaseState.LOST, "released") is LeaseState.LOST
    for state in LeaseState:
        for event in ("queued", "granted", "released", "lost", "timed_out", "cancelled"):
            if (state, event) not in TRANSITIONS:
                with pytest.raises(IllegalTransition):
                    advance(state, event)
    with pytest.raises(IllegalTransition):
        advance(LeaseState.RELEASED, "granted")


def test_flow_grants_at_once(core: Core) -> None:
    flow = core.acquire_flow(core.make_request(1), "r1")
    call = next(flow)
    assert isinstance(call, Call) and call.script == "acquire"
    assert call.keys == [*Keys("ns").state(), "ns:events", "ns:event_log"]
    assert call.args[1:8] == ["r1", 1024, 1, "normal", "", 30000, "wait"]
    with pytest.raises(StopIteration) as stop:
        flow.send([Reply.GRANTED, record()])
    lease = stop.value.value
    assert (lease.id, lease.device, lease.token, lease.acquired_at, lease.waited) == ("r1", "cuda:0", 7, 2.0, 1.0)


def test_flow_registers_when_redis_lost_the_registry(core: Core) -> None:
    flow = core.acquire_flow(core.make_request(1), "r1")
    next(flow)
    register = flow.send([Reply.NO_GPUS])
    assert isinstance(register, Call) and register.script == "register"
    again = flow.send([1, 2])
    assert isinstance(again, Call) and again.script == "acquire"


def test_flow_waits_by_pop_and_the_head_wakes_at_the_next_expiry(core: Core) -> None:
    clock = Clock()
    flow = core.acquire_flow(core.make_request(1, timeout=10), "r1", clock)
    next(flow)
    watch = flow.send([Reply.QUEUED, 0, 1500])
    assert watch == Watch("r1", 30000)
    assert flow.send(None) == ReadHash("ns:leases")  # does a lease here have a holder that is gone? (none)
    pop = flow.send({})
    assert isinstance(pop, Pop) and pop.key == "ns:wake:r1"
    assert pop.timeout == pytest.approx(1.502)  # the head wakes when the next lease could expire
    clock.now += 1.6
    again = flow.send(None)  # nothing pushed: look again
    assert isinstance(again, Call) and again.script == "acquire"
    assert flow.send([Reply.QUEUED, 5, 100]) == ReadHash("ns:leases")  # (one look per REAP_EVERY_S)
    assert flow.send({}) == ReadQueueHead("ns:queue", "ns:tickets", 2)  # and at the waiters ahead
    pop = flow.send({})
    assert isinstance(pop, Pop) and pop.timeout == pytest.approx(10 - 1.6)  # deep in the queue: no expiry watch
    with pytest.raises(StopIteration) as stop:
        flow.send(record())
    assert stop.value.value.id == "r1"


def test_flow_timeout_withdraws_then_raises(core: Core) -> None:
    clock = Clock()
    flow = core.acquire_flow(core.make_request(1, timeout=2), "r1", clock)
    next(flow)
    flow.send([Reply.QUEUED, 3, -1])
    assert flow.send(None) == ReadHash("ns:leases")
    assert flow.send({}) == ReadQueueHead("ns:queue", "ns:tickets", 2)
    pop = flow.send({})
    assert isinstance(pop, Pop) and pop.timeout == pytest.approx(2)
    clock.now += 2.5
    release = flow.send(None)
    assert isinstance(release, Call) and release.script == "release" and release.args[1] == "r1"
    with pytest.raises(LeaseTimeout):
        flow.send([1, 0])


def test_flow_checks_size_before_any_io(core: Core) -> None:
    flow = core.acquire_flow(core.make_request(16, device="gpu1"), "r1")
    with pytest.raises(InsufficientCapacity, match="15360 MiB"):
        next(flow)


def test_key_names_live_in_keys_module_only() -> None:
    """No module but keys.py spells a key: a suffix in a string literal next to a colon is a key literal."""
    suffixes = {*FIXED_SUFFIXES, "leases", "lease_exp", "queue", "tickets", "queue_exp", "wake", "events"}
    alternatives = "|".join(sorted(suffixes))
    pattern = re.compile(rf"""["'][^"'\n]*:({alternatives})\b""")
    offenders = []
    for path in (ROOT / "gpuboss").glob("*.py"):
        if path.name == "keys.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.name}:{n}: {line.strip()}")
    assert offenders == []


def test_keys_share_one_namespace() -> None:
    keys = Keys("{team}")
    names = [*keys.state(), keys.hosts, keys.sampler("g"), keys.holder_channel("h"), keys.wake("x"), *keys.event_keys()]
    assert all(n.startswith("{team}:") for n in names)
    assert len(set(names)) == len(names)
