"""Scheduling policy (docs/scheduling.md) with several OS processes on a private real redis-server.

``test_scheduling.py`` checks each rule with several bosses in one process; here every request comes from a
separate process (``tests/workers.py agent``: a boss driven line by line over stdin), so what is shown is
that the rules live in Redis and the Lua scripts, and every process obeys them. The test process only
sends commands, reads Redis and the event log (one total order, written by the scripts in the same atomic
step as each change) and, for the runtime pause, runs the ``gpuboss`` command line.

Nothing here asserts a duration: a test waits for a state with a generous deadline, and compares orders
and counts (the grants of a stream between two events of the log), or Redis times against a window's end.
Agents are stopped by their PID at the end of each test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from gpuboss.config import build_config
from gpuboss.core import Call
from gpuboss.events import Event, replay
from gpuboss.keys import Keys
from gpuboss.policy import policy_fields
from gpuboss.redis_io import call_script_sync
from gpuboss.server import RedisProcess, start_redis

from tests.conftest import raw_client
from tests.workers import AgentProcess

pytestmark = pytest.mark.slow

#: How long any wait of this module may take before it fails the test (nothing is asserted about durations).
WAIT_S = 30.0
ONE = [{"id": "g0", "name": "sim-16gb", "vram_gb": 16, "index": 0}]
TWO = [*ONE, {"id": "g1", "name": "sim-16gb", "vram_gb": 16, "index": 1}]
GPUBOSS = Path(sys.executable).parent / "gpuboss"
GB = 1024


class Agents:
    """Agent processes of one test, all on one Redis URL and namespace; each is killed by its PID at the end."""

    def __init__(self, url: str, namespace: str) -> None:
        self.url, self.namespace = url, namespace
        self.made: list[AgentProcess] = []

    def spawn(self, service: str, gpus: list[dict[str, Any]] = ONE, **settings: Any) -> AgentProcess:
        agent = AgentProcess(self.url, self.namespace, gpus, service, **settings)
        self.made.append(agent)
        return agent

    def ready(self) -> None:
        """Wait until every agent spawned so far has its boss (they start in parallel)."""
        for agent in self.made:
            agent.answer("READY", timeout=WAIT_S)

    def close(self) -> None:
        for agent in self.made:
            agent.close()


@pytest.fixture
def agents(real_url: str, namespace: str) -> Iterator[Agents]:
    made = Agents(real_url, namespace)
    try:
        yield made
    finally:
        made.close()


def wait_until(check: Callable[[], Any], what: str, every: float = 0.01) -> Any:
    """Poll ``check()`` until it returns something true (returned); fail naming ``what`` after WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(every)


def with_client(url: str, fn: Callable[[redis.Redis], Any]) -> Any:
    client = raw_client(url)
    try:
        return fn(client)
    finally:
        client.close()


def queued(url: str, ns: str) -> int:
    return int(with_client(url, lambda c: c.zcard(Keys(ns).queue)))


def leased(url: str, ns: str) -> int:
    return int(with_client(url, lambda c: c.hlen(Keys(ns).leases)))


def used_mib(url: str, ns: str) -> dict[str, int]:
    return {str(k): int(v) for k, v in with_client(url, lambda c: c.hgetall(Keys(ns).used)).items()}


def in_redis(url: str, ns: str, lease_id: str) -> bool:
    return bool(with_client(url, lambda c: c.hexists(Keys(ns).leases, lease_id)))


def redis_ms(url: str) -> int:
    seconds, micros = with_client(url, lambda c: c.time())
    return int(seconds) * 1000 + int(micros) // 1000


def events(url: str, ns: str, *types: str) -> list[Event]:
    return [e for e in replay(url, ns) if not types or e.type in types]


def store_policy(url: str, ns: str, pairs: list[tuple[str, str]]) -> None:
    """Write rules to the namespace's policy hash as a boss would (``lua/policy-3.lua``): every process obeys
    them from its next script call on."""
    keys = Keys(ns)
    args: list[str | int] = [x for pair in pairs for x in pair]
    with_client(url, lambda c: call_script_sync(c, Call("policy", [keys.policy, *keys.event_keys()], [*args, 1000])))


def policy_of(**settings: Any) -> list[tuple[str, str]]:
    """The policy fields a boss with these settings stores (``gpuboss/policy.py``)."""
    return policy_fields(build_config("arguments", gpus=ONE, **settings))


# ---------------------------------------------------------------- 1. priority classes

CLASSES = {"batch": 0, "interactive": 5, "critical": 9}
CLASS_SETTINGS: dict[str, Any] = {"priorities": CLASSES, "default_priority": "interactive", "preemptible": ["batch"]}


def test_processes_with_custom_classes_are_served_by_rank(agents: Agents) -> None:
    """Three processes queue for the whole GPU in the order batch, interactive, critical (the reverse of their
    ranks); when a fourth lets go, they are granted critical, interactive, batch. A class the configuration
    does not define is refused in a worker with the typed error that lists the known ones."""
    url, ns = agents.url, agents.namespace
    holder = agents.spawn("holder", **CLASS_SETTINGS)
    waiters = {cls: agents.spawn(f"svc-{cls}", **CLASS_SETTINGS) for cls in ("batch", "interactive", "critical")}
    agents.ready()
    holder.acquire("h", 16, priority="interactive")  # not preemptible: no eviction shortens the story
    holder.answer("HELD", "h")
    for n, (cls, agent) in enumerate(waiters.items(), 1):
        agent.acquire("w", 16, priority=cls, timeout=WAIT_S)
        wait_until(lambda n=n: queued(url, ns) == n, f"{n} requests queued")  # arrival order fixed

    assert holder.release("h")
    order: list[str] = []
    for _ in waiters:  # each takes the whole GPU: one holder at a time, released as soon as it is seen
        held = wait_until(
            lambda: [(c, a) for c, a in waiters.items() if a.answers("HELD", "w") and c not in order], "the next grant"
        )
        assert len(held) == 1, held
        cls, agent = held[0]
        assert agent.answer("HELD", "w")["priority"] == cls
        order.append(cls)
        assert agent.release("w")
    assert order == ["critical", "interactive", "batch"]
    grants = [e.priority for e in events(url, ns, "granted") if e.service != "holder"]
    assert grants == order  # the scripts' own order, from the event log

    known = "'batch', 'interactive', 'critical'"
    waiters["batch"].acquire("bad", 1, priority="high")  # a default class, not one of this namespace's
    error = waiters["batch"].answer("ERROR", "bad")
    assert error["type"] == "InvalidRequest"
    assert "priority='high'" in error["message"] and known in error["message"]
    waiters["critical"].command("PAUSE", "urgent")
    error = waiters["critical"].answer("ERROR", "urgent")
    assert error["type"] == "InvalidRequest" and known in error["message"]
    assert queued(url, ns) == 0 and leased(url, ns) == 0  # the refused calls wrote nothing


# ---------------------------------------------------------------- 2. aging

STREAM = {"acquire": {"vram_gb": 16, "priority": "normal"}, "hold_s": 0.15}
#: Grants of the normal stream during which the low request, without aging, must still be waiting.
CONTROL_GRANTS = 16
#: Processes of the stream: one holds the GPU and the others wait, so a release always finds a normal request
#: waiting, unless all but the holder are slower than a hold or two to ask again.
STREAMERS = 4


def test_aging_serves_low_work_under_a_steady_stream_of_normal_requests(agents: Agents) -> None:
    """Four processes keep a stream of normal requests for the whole GPU (one holds, three wait). A low request
    of a fourth process is not served while the stream makes CONTROL_GRANTS grants without aging; once the
    namespace ages requests it is served (with an ``aged`` event) while the stream goes on, and a new low
    request is served after fewer grants of the stream than the control run saw."""
    url, ns = agents.url, agents.namespace
    streams = [agents.spawn("api") for _ in range(STREAMERS)]
    low = agents.spawn("batch")
    agents.ready()
    for agent in streams:
        agent.command("STREAM", "s", STREAM)

    def stream_grants(log: list[Event], after: Event, before: Event | None = None) -> list[Event]:
        """The stream's grants between two events of the log (which is in the order the scripts ran)."""
        ids = [e.id for e in log]
        start, end = ids.index(after.id), (ids.index(before.id) if before else len(log))
        return [e for e in log[start + 1 : end] if e.type == "granted" and e.service == "api"]

    def grants_since(event: Event) -> list[Event]:
        return stream_grants(events(url, ns), event)

    def queued_event(service: str, n: int) -> Event | None:
        found = events(url, ns, "queued")
        mine = [e for e in found if e.service == service]
        return mine[n] if len(mine) > n else None

    wait_until(lambda: len(events(url, ns, "granted")) >= 3, "the stream runs", every=0.05)
    # Control: no aging rule in the namespace.
    # Not preemptible: the stream's requests do not ask it to checkpoint once it holds the GPU.
    low.acquire("first", 16, priority="low", preemptible=False, timeout=2 * WAIT_S)
    first_queued = wait_until(lambda: queued_event("batch", 0), "the low request is queued")
    wait_until(lambda: len(grants_since(first_queued)) >= CONTROL_GRANTS, "the stream's grants", every=0.05)
    assert not low.answers("HELD", "first"), "served without aging: the stream was not steady"
    assert not [e for e in events(url, ns, "granted") if e.service == "batch"]

    # Aging on (one class per 0.5 s, at most two): the waiting request is served while the stream goes on.
    store_policy(url, ns, policy_of(aging={"every_s": 0.5, "max_boost": 2}))
    first = low.answer("HELD", "first")
    assert first["priority"] == "low"  # the lease keeps its class
    assert low.release("first")
    aged = [e for e in events(url, ns, "aged") if e.lease == first["id"]]
    assert aged and aged[-1].data["rank"] > 0

    low.acquire("second", 16, priority="low", preemptible=False, timeout=WAIT_S)
    second = low.answer("HELD", "second")
    log = events(url, ns)
    second_queued = next(e for e in log if e.type == "queued" and e.lease == second["id"])
    second_granted = next(e for e in log if e.type == "granted" and e.lease == second["id"])
    between = stream_grants(log, second_queued, second_granted)
    assert len(between) < CONTROL_GRANTS, len(between)  # served sooner (in grants) than the control ever was
    assert any(e.type == "aged" and e.lease == second["id"] for e in log)  # and because it aged
    assert low.release("second")
    wait_until(lambda: len(grants_since(second_granted)) >= 2, "the stream goes on after it", every=0.05)
    for agent in streams:
        agent.command("STOP", "s")
    for agent in streams:
        assert agent.answer("STREAMED", "s")["count"] > 0
        assert not agent.answers("ERROR", "s")


# ---------------------------------------------------------------- 3. backfill


def test_backfill_raises_utilisation_and_the_head_still_gets_its_gpu(agents: Agents) -> None:
    """The same scenario, first with ``queueing: strict``, then ``backfill``, by four processes on two 16 GB GPUs:
    a holder has 10 GB of g0; the head asks for all of g0; then 4 GB, 8 GB and 6 GB requests come. Strict:
    everything waits behind the head (10 GB leased). Backfill: 4 and 8 GB run on g1 (22 GB leased); 6 GB
    would fit only in g0's free 6 GB, which is kept for the head. In both, the holder's release grants the
    head g0 before any request that came after it is granted there."""
    url, ns = agents.url, agents.namespace
    holder, head, small, mid = (agents.spawn(s, TWO) for s in ("holder", "head", "small", "mid"))
    agents.ready()

    def settle(n: int) -> None:
        wait_until(lambda: leased(url, ns) + queued(url, ns) == n, f"{n} requests leased or queued")

    def round_(mode: str) -> dict[str, Any]:
        holder.acquire(mode, 10, device="g0")
        holder.answer("HELD", mode)
        head.acquire(mode, 16, device="g0", timeout=WAIT_S)
        settle(2)
        small.acquire(f"{mode}-4", 4, timeout=WAIT_S)
        settle(3)
        small.acquire(f"{mode}-8", 8, timeout=WAIT_S)
        settle(4)
        mid.acquire(mode, 6, timeout=WAIT_S)
        settle(5)
        out: dict[str, Any] = {"used_while_head_waits": sum(used_mib(url, ns).values())}
        out["granted_behind_head"] = sorted(t for t in (f"{mode}-4", f"{mode}-8") if small.answers("HELD", t))
        assert not head.answers("HELD", mode) and not mid.answers("HELD", mode)
        assert holder.release(mode)
        out["head"] = head.answer("HELD", mode)
        for tag in (f"{mode}-4", f"{mode}-8"):
            out[tag] = small.answer("HELD", tag)  # granted now in strict, already in backfill
        assert not mid.answers("HELD", mode)  # g1 has 4 GB left, g0 is the head's: the 6 GB request still waits
        assert head.release(mode)
        out["mid"] = mid.answer("HELD", mode)  # granted when the head lets go
        assert mid.release(mode) and small.release(f"{mode}-4") and small.release(f"{mode}-8")
        out["order"] = [e.lease for e in events(url, ns, "granted")]
        settle(0)
        return out

    strict = round_("strict")
    store_policy(url, ns, policy_of(queueing="backfill"))
    backfill = round_("backfill")

    assert strict["used_while_head_waits"] == 10 * GB  # the head blocks everyone behind it
    assert strict["granted_behind_head"] == []
    assert backfill["used_while_head_waits"] == 22 * GB  # 4 + 8 GB ran on g1 meanwhile
    assert backfill["granted_behind_head"] == ["backfill-4", "backfill-8"]
    assert backfill["used_while_head_waits"] > strict["used_while_head_waits"]
    assert backfill["backfill-4"]["gpu"] == backfill["backfill-8"]["gpu"] == "g1"
    for run in (strict, backfill):
        assert run["head"]["gpu"] == "g0"  # and the head still got its GPU
        order = run["order"]
        assert order.index(run["head"]["id"]) < order.index(run["mid"]["id"])
    # Strict grants in arrival order behind the head; backfill granted the small ones before it.
    s_order, b_order = strict["order"], backfill["order"]
    assert s_order.index(strict["head"]["id"]) < s_order.index(strict["strict-4"]["id"])
    assert b_order.index(backfill["backfill-8"]["id"]) < b_order.index(backfill["head"]["id"])


# ---------------------------------------------------------------- 4. time windows


def test_a_window_holds_a_class_in_other_processes_until_it_ends(agents: Agents) -> None:
    """A window on ``low`` from one second ago to three seconds ahead (Redis time) is stored; two processes ask
    for low leases and wait, a third gets a normal one at once, and a fourth keeps the low lease it held
    before the window. The low requests are granted, by Redis time, no earlier than the window's end."""
    url, ns = agents.url, agents.namespace
    runner, api = agents.spawn("runner"), agents.spawn("api")
    batch = [agents.spawn(f"batch{i}") for i in range(2)]
    agents.ready()
    runner.acquire("run", 2, priority="low", ttl=0.5)  # renewed every ~0.17 s, through the window
    running = runner.answer("HELD", "run")
    for agent in (api, *batch):  # each has reached Redis once: its request below is one script call
        agent.acquire("warm", 1, priority="normal", timeout=0)
        agent.answer("HELD", "warm")
        assert agent.release("warm")

    now = redis_ms(url)
    end = now + 3000
    store_policy(url, ns, [("windows", json.dumps([{"class": "low", "from": now - 1000, "to": end}]))])
    for agent in batch:
        agent.acquire("w", 2, priority="low", ttl=0.5, timeout=WAIT_S)  # a waiter looks again every ttl
    api.acquire("n", 2, priority="normal", timeout=0)  # other classes are not paused: granted on the spot
    assert api.answer("HELD", "n")["priority"] == "normal"
    wait_until(lambda: queued(url, ns) == 2, "both low requests queued")

    grants = [agent.answer("HELD", "w") for agent in batch]
    log = events(url, ns)
    for lease in grants:
        granted = next(e for e in log if e.type == "granted" and e.lease == lease["id"])
        was_queued = next(e for e in log if e.type == "queued" and e.lease == lease["id"])
        assert was_queued.time_ms < end <= granted.time_ms  # waited in the window, granted after it
    assert in_redis(url, ns, running["id"]) and not runner.answers("LOST", "run")  # active leases continue
    for agent, tag in ((runner, "run"), (api, "n"), *((a, "w") for a in batch)):
        assert agent.release(tag)


# ---------------------------------------------------------------- 5. runtime pause and resume


def cli(url: str, ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(GPUBOSS), "--redis-url", url, "--namespace", ns, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_pause_and_resume_reach_every_process(agents: Agents) -> None:
    """``gpuboss pause low`` (a separate process): a low lease held by one process continues (renewed through
    the pause), another process's low request waits although it fits, a normal one is served; ``gpuboss
    resume low`` grants the waiting one. Then the same through the API of a fourth process."""
    url, ns = agents.url, agents.namespace
    holder, waiter, api, ops = (agents.spawn(s) for s in ("batch-a", "batch-b", "api", "ops"))
    agents.ready()
    holder.acquire("run", 2, priority="low", ttl=0.5)
    running = holder.answer("HELD", "run")

    assert "low: paused" in cli(url, ns, "pause", "low").stdout
    paused_at = redis_ms(url)
    waiter.acquire("w", 2, priority="low", ttl=0.5, timeout=WAIT_S)
    wait_until(lambda: queued(url, ns) == 1, "the low request queued")
    api.acquire("n", 2, priority="normal", timeout=0)
    api.answer("HELD", "n")
    assert api.release("n")  # the release serves the queue: the low request is passed over, not granted
    assert queued(url, ns) == 1 and not waiter.answers("HELD", "w")

    def expires_at() -> int:
        raw = with_client(url, lambda c: c.hget(Keys(ns).leases, running["id"]))
        return int(json.loads(raw)["expires_at"]) if raw else 0

    # The paused class's active lease lives on: renewed by its holder's heartbeat a second past the pause.
    wait_until(lambda: expires_at() > paused_at + 1000, "the held low lease renewed during the pause")
    assert not holder.answers("LOST", "run") and not waiter.answers("HELD", "w")

    assert "low: resumed" in cli(url, ns, "resume", "low").stdout
    assert waiter.answer("HELD", "w")["priority"] == "low"
    assert queued(url, ns) == 0

    ops.command("PAUSE", "low")
    assert ops.answer("PAUSED", "low")["changed"] is True
    holder.acquire("more", 1, priority="low", ttl=0.5, timeout=WAIT_S)
    wait_until(lambda: queued(url, ns) == 1, "the second low request queued")
    assert not holder.answers("HELD", "more")
    ops.command("RESUME", "low")
    assert ops.answer("UNPAUSED", "low")["changed"] is True
    holder.answer("HELD", "more")
    for agent, tag in ((holder, "run"), (holder, "more"), (waiter, "w")):
        assert agent.release(tag)
    kinds = [(e.type, e.data["by"]) for e in events(url, ns, "paused", "unpaused")]
    assert [k for k, _ in kinds] == ["paused", "unpaused", "paused", "unpaused"]
    assert kinds[2][1].startswith("ops@") and kinds[3][1].startswith("ops@")


# ---------------------------------------------------------------- 6. caps

CAPS = {
    "services": {"ai": {"max_leases": 2}, "emb": {"max_vram_gb": 6}},
    "classes": {"high": {"max_leases": 1}},
}
BIG = [{"id": "g0", "name": "sim-80gb", "vram_gb": 80, "index": 0}]  # the caps bind, never the GPU
ENDS = ("released", "expired", "revoked", "evicted")


def peaks(log: list[Event]) -> dict[str, int]:
    """Sweep the event log (one order for all processes): the most leases of service ai, MiB of service emb
    and leases of class high that were active at once."""
    active: dict[str, Event] = {}
    peak = {"ai": 0, "emb_mib": 0, "high": 0}
    for e in log:
        if e.type == "granted" and e.lease:
            active[e.lease] = e
        elif e.type in ENDS and e.lease:
            active.pop(e.lease, None)
        else:
            continue
        now = list(active.values())
        peak["ai"] = max(peak["ai"], sum(1 for a in now if a.service == "ai"))
        peak["emb_mib"] = max(peak["emb_mib"], sum(a.vram_mib or 0 for a in now if a.service == "emb"))
        peak["high"] = max(peak["high"], sum(1 for a in now if a.priority == "high"))
    return peak


def test_caps_hold_across_processes_of_one_service(agents: Agents) -> None:
    """Three processes of service ``ai`` (max_leases 2), two of ``emb`` (max_vram_gb 6) and two of ``web``
    asking ``high`` (class max_leases 1) on an 80 GB GPU. Each cap is reached and a request over it waits,
    without holding back other services, until a lease of its own service (class) goes. Then all seven
    processes churn through requests at once, and the event log shows no cap was ever exceeded."""
    url, ns = agents.url, agents.namespace
    ai = [agents.spawn("ai", BIG, caps=CAPS) for _ in range(3)]
    emb = [agents.spawn("emb", BIG, caps=CAPS) for _ in range(2)]
    web = [agents.spawn("web", BIG, caps=CAPS) for _ in range(2)]
    agents.ready()

    # ai: two of three granted, the third waits until one of the two lets go.
    for agent in ai:
        agent.acquire("a", 1, timeout=WAIT_S)
    wait_until(lambda: leased(url, ns) == 2 and queued(url, ns) == 1, "two ai leases and one waiting")
    holders = [a for a in ai if a.answers("HELD", "a")]
    (late,) = [a for a in ai if a not in holders]
    # Other services are not held back by ai's waiting request.
    emb[0].acquire("e4", 4, timeout=0)
    emb[0].answer("HELD", "e4")
    emb[1].acquire("e4", 4, timeout=WAIT_S)  # 8 GB > 6 GB for emb: waits
    wait_until(lambda: queued(url, ns) == 2, "the second emb request waiting")
    emb[0].acquire("e2", 2, timeout=0)  # 6 GB: at the cap, granted past emb's waiting request
    emb[0].answer("HELD", "e2")
    web[0].acquire("h", 1, priority="high", timeout=0)
    web[0].answer("HELD", "h")
    web[1].acquire("h", 1, priority="high", timeout=WAIT_S)
    wait_until(lambda: queued(url, ns) == 3, "the second high request waiting")
    assert not late.answers("HELD", "a") and not emb[1].answers("HELD", "e4") and not web[1].answers("HELD", "h")

    assert holders[0].release("a")
    late.answer("HELD", "a")  # a slot of its service freed
    assert emb[0].release("e4")
    emb[1].answer("HELD", "e4")  # 2 + 4 GB
    assert web[0].release("h")
    web[1].answer("HELD", "h")
    assert queued(url, ns) == 0
    for agent, tag in ((holders[1], "a"), (late, "a"), (emb[0], "e2"), (emb[1], "e4"), (web[1], "h")):
        assert agent.release(tag)

    # Churn: every process requests as fast as it can.
    count = 6
    plans: list[tuple[AgentProcess, dict[str, Any]]] = [(a, {"vram_gb": 1}) for a in ai]
    plans += [(emb[0], {"vram_gb": 4}), (emb[1], {"vram_gb": 2})]
    plans += [(w, {"vram_gb": 1, "priority": "high"}) for w in web]
    for agent, request in plans:
        agent.command("STREAM", "c", {"acquire": {**request, "timeout": WAIT_S}, "count": count, "hold_s": 0.03})
    for agent, _ in plans:
        assert agent.answer("STREAMED", "c", timeout=2 * WAIT_S)["count"] == count, agent.answers("ERROR", "c")

    log = events(url, ns)
    assert peaks(log) == {"ai": 2, "emb_mib": 6 * GB, "high": 1}  # reached, never exceeded
    granted = [e for e in log if e.type == "granted"]
    assert len(granted) == 3 + 3 + 2 + count * len(plans)  # every request was granted in the end


# ---------------------------------------------------------------- 7. on_redis_down


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server of this test's own, stopped (by its PID) and started again on the same socket."""
    folder = tmp_path / "redis"
    proc = start_redis(folder, socket=folder / "redis.sock")
    try:
        yield proc
    finally:
        proc.stop()


def start_again(server: RedisProcess) -> None:
    assert server.socket is not None
    new = start_redis(server.workdir, socket=server.socket)
    server.pid, server.process = new.pid, new.process


def test_on_redis_down_in_several_processes(server: RedisProcess, namespace: str) -> None:
    """Redis stops (SIGTERM to its PID). Two processes with ``error`` get RedisUnavailable well inside their
    connect_timeout; two with ``wait`` keep waiting and, once a new server answers, are coordinated by it
    again (one lease, then the other); two with ``local`` get local leases that count within each process
    (its second 16 GB request on the 24 GB GPU waits) but not across processes."""
    url = server.url
    gpu = [{"id": "g0", "name": "sim-24gb", "vram_gb": 24, "index": 0}]
    made = Agents(url, namespace)
    try:
        errors = [made.spawn("err", gpu, on_redis_down="error", connect_timeout=20) for _ in range(2)]
        waits = [made.spawn("wait", gpu, on_redis_down="wait") for _ in range(2)]
        locals_ = [made.spawn("local", gpu, on_redis_down="local") for _ in range(2)]
        made.ready()
        for agent in made.made:  # each has reached Redis once (GPUs registered, scripts loaded)
            agent.acquire("warm", 1, timeout=0)
            assert not agent.answer("HELD", "warm")["local"]
            assert agent.release("warm")
        server.stop()

        for agent in errors:
            agent.acquire("x", 4, timeout=60)
        for agent in waits:
            agent.acquire("x", 16, timeout=60)
        for agent in errors:
            error = agent.answer("ERROR", "x")
            assert error["type"] == "RedisUnavailable", error
            assert error["elapsed"] < 10, error  # not the whole connect_timeout (20 s), let alone the 60 s timeout

        first = locals_[0]
        first.acquire("a", 16, ttl=1.0, timeout=WAIT_S)
        assert first.answer("HELD", "a")["local"] is True
        first.acquire("b", 16, timeout=1.0)  # the process's own local lease counts: 16 + 16 > 24 GB
        first.answer("TIMEOUT", "b")
        locals_[1].acquire("a", 16, ttl=1.0, timeout=WAIT_S)  # another process: not coordinated (documented)
        assert locals_[1].answer("HELD", "a")["local"] is True
        for agent in waits:  # still waiting for Redis: neither granted nor failed
            assert not agent.answers("HELD", "x") and not agent.answers("ERROR", "x")

        start_again(server)
        wait_until(lambda: [a for a in waits if a.answers("HELD", "x")], "a wait-mode request granted")
        wait_until(lambda: queued(url, namespace) == 1, "the other one queued in the new Redis")
        (granted,) = [a for a in waits if a.answers("HELD", "x")]
        (other,) = [a for a in waits if a is not granted]
        lease = granted.answer("HELD", "x")
        assert not lease["local"] and in_redis(url, namespace, lease["id"])
        assert granted.release("x")
        second = other.answer("HELD", "x")  # coordinated through Redis again
        assert not second["local"] and in_redis(url, namespace, second["id"])
        assert other.release("x")
        for agent in locals_:  # local leases stay valid in their process's store until released
            assert agent.release("a")
        for agent in errors:  # and error-mode processes reach the new server
            agent.acquire("y", 1, timeout=WAIT_S)
            assert not agent.answer("HELD", "y")["local"]
            assert agent.release("y")
    finally:
        made.close()


# ---------------------------------------------------------------- 8. max_hold


@pytest.mark.parametrize("action", ["revoke", "evict"])
def test_max_hold_frees_the_gpu_for_another_process(agents: Agents, action: str) -> None:
    """A low lease of the whole GPU held longer than ``max_hold.low`` (1 s) is revoked, or asked to checkpoint
    (it hands the GPU back and, with resume, waits again); the normal request of another process waiting
    for the GPU is granted. The event names the reason, and the normal lease has no limit."""
    url, ns = agents.url, agents.namespace
    settings = {"max_hold": {"low": {"seconds": 1.0, "action": action}}}
    batch, api = agents.spawn("batch", **settings), agents.spawn("api", **settings)
    agents.ready()
    # Not preemptible: only max_hold, not the waiting normal request, may take the GPU from it.
    batch.acquire("job", 16, priority="low", ttl=0.6, preemptible=False, checkpoint=action == "evict")
    job = batch.answer("HELD", "job")
    api.acquire("n", 16, priority="normal", ttl=0.6, timeout=WAIT_S)
    wait_until(lambda: queued(url, ns) == 1, "the normal request waiting")

    normal = api.answer("HELD", "n")
    log = events(url, ns)
    if action == "revoke":
        batch.answer("LOST", "job")
        revoked = [e for e in log if e.type == "revoked" and e.lease == job["id"]]
        assert revoked and revoked[0].data["reason"] == "max_hold" and revoked[0].data["by"] == "policy"
    else:
        batch.answer("EVICT", "job")  # its on_evict ran (the checkpoint)
        asked = [e for e in log if e.type == "evict_requested" and e.lease == job["id"]]
        assert asked and asked[0].data["reason"] == "max_hold"
        assert any(e.type == "evicted" and e.lease == job["id"] for e in log)
    granted = next(e for e in log if e.type == "granted" and e.lease == normal["id"])
    wait_until(lambda: redis_ms(url) > granted.time_ms + 1500, "the normal lease held past max_hold", every=0.1)
    assert in_redis(url, ns, normal["id"]) and not api.answers("LOST", "n")
    assert not [e for e in events(url, ns, "revoked", "evict_requested") if e.lease == normal["id"]]
    assert api.release("n")
    if action == "evict":  # resumed once the GPU was free again, with its eviction counted
        batch.answer("STATE", "job", where=lambda s: s["state"] == "granted" and s["evictions"] >= 1)
        batch.release("job")  # (its next max_hold request may be under way: the answer may be either)
