"""The chaos soak (``make chaos``, ``bench/chaos.py``): its invariant checks, its proxy, and a short run.

The observer's checks are tested on made-up snapshots first (each must catch what it is for), the proxy on a
real redis-server, then a short soak with every fault kind runs end to end and must report every must-be-0
figure as 0.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from bench.chaos import (
    FULL_AFTER_S,
    KINDS,
    STRANDED_S,
    Fault,
    Logs,
    Observer,
    Snapshot,
    Tally,
    check_full,
    client_over_commits,
    stored_rules,
)
from bench.chaos import main as chaos_main
from bench.env import free_port
from bench.proxy import Proxy
from gpuboss import GPUBoss, LeaseTimeout
from gpuboss.server import RedisProcess, start_redis

from tests.conftest import GPUS

ROOT = Path(__file__).resolve().parent.parent
CAP = {"gpu0": 24576, "gpu1": 15360}
NOW = 1_700_000_000_000


def lease(lease_id: str, gpu: str, mib: int, token: int, pid: int = 1) -> str:
    return json.dumps({"id": lease_id, "gpu": gpu, "vram_mib": mib, "token": token, "pid": pid})


def ticket(req_id: str, mib: int, pin: str = "", pid: int = 2) -> str:
    return json.dumps({"id": req_id, "vram_mib": mib, "pin": pin, "pid": pid})


def snap(
    leases: dict[str, str] | None = None,
    used: dict[str, int] | None = None,
    queue: list[str] | None = None,
    tickets: dict[str, str] | None = None,
    token: int | None = 100,
    now_ms: int = NOW,
    lease_exp: dict[str, float] | None = None,
    queue_exp: dict[str, float] | None = None,
    rules: dict[str, str] | None = None,
    cap: dict[str, int] | None = None,
) -> Snapshot:
    leases = leases or {}
    queue = queue or []
    if used is None:
        used = dict.fromkeys(CAP, 0)
        for raw in leases.values():
            rec = json.loads(raw)
            used[rec["gpu"]] += rec["vram_mib"]
    return Snapshot(
        now_ms=now_ms,
        cap=dict(CAP if cap is None else cap),
        used=used,
        leases=leases,
        lease_exp=lease_exp if lease_exp is not None else dict.fromkeys(leases, NOW + 5000.0),
        queue=[(q, float(i)) for i, q in enumerate(queue)],
        tickets=tickets if tickets is not None else {q: ticket(q, 1024) for q in queue},
        queue_exp=queue_exp if queue_exp is not None else dict.fromkeys(queue, NOW + 5000.0),
        token=token,
        offline=set(),
        holds=0,
        rules=rules or {},
    )


def violations(obs: Observer) -> dict[str, int]:
    return {k: v for k, v in obs.violations.items() if v}


# ---------------------------------------------------------------- the observer's checks


def test_consistent_snapshots_pass() -> None:
    obs = Observer()
    obs.check(snap({"a": lease("a", "gpu0", 24576, 99)}, queue=["w"], tickets={"w": ticket("w", 2048)}), 0.0)
    obs.check(snap({"b": lease("b", "gpu1", 2048, 101)}, token=101), 0.1)
    assert violations(obs) == {}
    assert obs.leases["a/99"][1:4] == ["gpu0", 99, 24576]
    assert obs.tickets["w"][0] == 2


def test_over_commit_is_caught() -> None:
    obs = Observer()
    obs.check(snap({"a": lease("a", "gpu1", 10240, 1), "b": lease("b", "gpu1", 6144, 2)}), 0.0)
    assert violations(obs) == {"over_commit_events": 1}


def test_used_counter_out_of_step_is_caught() -> None:
    obs = Observer()
    obs.check(snap({"a": lease("a", "gpu0", 1024, 1)}, used={"gpu0": 2048, "gpu1": 0}), 0.0)
    assert violations(obs) == {"counter_mismatches": 1}


def test_queue_entry_without_record_is_caught() -> None:
    obs = Observer()
    obs.check(snap(queue=["w"], tickets={}), 0.0)
    assert violations(obs) == {"index_mismatches": 1}
    obs = Observer()
    obs.check(snap({"a": lease("a", "gpu0", 1024, 1)}, lease_exp={}), 0.0)
    assert violations(obs) == {"index_mismatches": 1}


def test_tokens_must_grow_also_across_a_restart() -> None:
    obs = Observer()
    obs.check(snap({"a": lease("a", "gpu0", 1024, 100)}, token=100), 0.0)
    obs.check(snap(token=None), 0.1)  # Redis restarted: the counter is gone
    obs.check(snap({"b": lease("b", "gpu0", 1024, 17_000_000_000_001)}, token=17_000_000_000_001), 0.2)
    assert violations(obs) == {}
    obs.check(snap({"c": lease("c", "gpu0", 1024, 50)}, token=17_000_000_000_001), 0.3)  # a stale token
    obs.check(snap(token=60), 0.4)  # the counter went down
    assert violations(obs) == {"token_regressions": 2}


def test_stranded_head_is_caught_only_after_it_fits_long_enough() -> None:
    obs = Observer()
    full = {"a": lease("a", "gpu0", 24576, 1), "b": lease("b", "gpu1", 15360, 2)}
    # The head does not fit: waiting is fine, however long.
    for i in range(10):
        obs.check(snap(full, queue=["w"]), i * 1.0)
    assert violations(obs) == {}
    # It fits (nothing leased) but is not granted: stranded once STRANDED_S has passed, counted once.
    t0 = 20.0
    for step in (0.0, STRANDED_S / 2, STRANDED_S + 0.5, STRANDED_S + 1.0):
        obs.check(snap(queue=["w"]), t0 + step)
    assert violations(obs) == {"stranded_waiters": 1}
    assert obs.stranded_ids == ["w"]


def test_expired_leases_count_as_free_for_the_stranded_check() -> None:
    obs = Observer()
    full = {"a": lease("a", "gpu0", 24576, 1), "b": lease("b", "gpu1", 15360, 2)}
    expired = dict.fromkeys(full, NOW - 1000.0)  # nobody collected them, and nobody woke to do it
    for step in (0.0, 1.0, STRANDED_S + 0.5):
        obs.check(snap(full, queue=["w"], lease_exp=expired), step)
    assert violations(obs) == {"stranded_waiters": 1}


def test_expired_head_is_not_the_head() -> None:
    obs = Observer()
    tickets = {"dead": ticket("dead", 1024), "w": ticket("w", 30000)}  # w can never fit a GPU
    queue_exp = {"dead": NOW - 1.0, "w": NOW + 5000.0}
    for step in (0.0, 1.0, STRANDED_S + 0.5):
        obs.check(snap(queue=["dead", "w"], tickets=tickets, queue_exp=queue_exp), step)
    assert violations(obs) == {}


def test_a_failed_read_breaks_the_stranded_streak() -> None:
    obs = Observer()
    obs.check(snap(queue=["w"]), 0.0)
    obs.blind(1.0)  # Redis was restarting
    obs.check(snap(queue=["w"]), STRANDED_S + 0.5)
    assert violations(obs) == {}
    assert obs.failed_reads == 1


def stranded_over_time(queue: list[str], tickets: dict[str, str], rules: dict[str, str], **kw: Any) -> Observer:
    """An observer that saw the same snapshot for longer than STRANDED_S."""
    obs = Observer()
    for step in (0.0, STRANDED_S / 2, STRANDED_S + 0.5):
        obs.check(snap(queue=queue, tickets=tickets, rules=rules, **kw), step)
    return obs


def test_behind_a_blocked_head_only_the_rules_make_a_request_due() -> None:
    """gpu0 is full; gpu1 has 15 GB free. The head, pinned to gpu0, does not fit; the 1 GB request behind it
    fits on gpu1. Strict order: it waits, rightly. Backfill: the head keeps gpu0 only, so it is due."""
    full0 = {"a": lease("a", "gpu0", 24576, 1)}
    tickets = {"head": ticket("head", 4096, pin="gpu0"), "w": ticket("w", 1024)}
    assert violations(stranded_over_time(["head", "w"], tickets, {}, leases=full0)) == {}
    assert violations(stranded_over_time(["head", "w"], tickets, {"overtake": "0"}, leases=full0)) == {}
    obs = stranded_over_time(["head", "w"], tickets, {"queueing": "backfill"}, leases=full0)
    assert violations(obs) == {"stranded_waiters": 1}
    assert obs.stranded_ids == ["w"]
    assert "(1 ahead of it)" in obs.details["stranded_waiters"][0]


def test_backfill_keeps_the_gpu_a_blocked_request_waits_for() -> None:
    """An unpinned head waits for the GPU closest to fitting it (the most free MiB): a later request that
    fits only there is not due; one that fits on the other GPU is."""
    leases = {"a": lease("a", "gpu0", 22528, 1), "b": lease("b", "gpu1", 14336, 2)}  # 2048 / 1024 MiB free
    rules = {"queueing": "backfill"}
    tickets = {"head": ticket("head", 4096), "w": ticket("w", 2048)}  # w fits gpu0 only: the head's
    assert violations(stranded_over_time(["head", "w"], tickets, rules, leases=leases)) == {}
    tickets = {"head": ticket("head", 4096), "w": ticket("w", 1024, pin="gpu1")}
    obs = stranded_over_time(["head", "w"], tickets, rules, leases=leases)
    assert obs.stranded_ids == ["w"]
    # A head too big for the 15 GB GPU keeps gpu0 although gpu1 has more free MiB.
    leases = {"a": lease("a", "gpu0", 20480, 1)}  # 4096 free on gpu0, 15360 on gpu1
    tickets = {"head": ticket("head", 20480), "w": ticket("w", 4096, pin="gpu0"), "v": ticket("v", 8192)}
    obs = stranded_over_time(["head", "w", "v"], tickets, rules, leases=leases)
    assert obs.stranded_ids == ["v"]  # (w may not take the head's GPU; v fits on gpu1)


def test_overtake_makes_a_request_behind_a_passable_head_due() -> None:
    full0 = {"a": lease("a", "gpu0", 24576, 1)}
    head = json.loads(ticket("head", 20480))
    tickets = {"head": json.dumps(head), "w": ticket("w", 1024)}
    obs = stranded_over_time(["head", "w"], tickets, {"overtake": "2"}, leases=full0)
    assert obs.stranded_ids == ["w"]
    head["passed"] = 2  # passed as often as the rule allows: it holds everyone behind it again
    tickets["head"] = json.dumps(head)
    assert violations(stranded_over_time(["head", "w"], tickets, {"overtake": "2"}, leases=full0)) == {}
    # With backfill too, it keeps its GPU (gpu1, the only one it fits) instead; w fits only there: not due.
    tickets["w"] = ticket("w", 1024, pin="gpu1")
    full0 = {"a": lease("a", "gpu0", 24576, 1), "b": lease("b", "gpu1", 8192, 2)}
    rules = {"overtake": "2", "queueing": "backfill"}
    head["vram_mib"] = 12288
    tickets["head"] = json.dumps(head)
    assert violations(stranded_over_time(["head", "w"], tickets, rules, leases=full0)) == {}


def test_rules_this_check_does_not_model_are_not_judged() -> None:
    full0 = {"a": lease("a", "gpu0", 24576, 1)}
    tickets = {"head": ticket("head", 4096, pin="gpu0"), "w": ticket("w", 1024)}
    rules = {"queueing": "backfill", "caps": '{"services": {}}'}
    assert violations(stranded_over_time(["head", "w"], tickets, rules, leases=full0)) == {}
    # Not even a head that fits: a cap or a pause may hold it back rightly.
    assert violations(stranded_over_time(["w"], {"w": tickets["w"]}, rules, leases=full0)) == {}
    assert stranded_over_time(["w"], {"w": tickets["w"]}, {"queueing": "backfill"}, leases=full0).stranded_ids == ["w"]


def test_rules_missing_while_gpus_are_registered_are_caught_once_per_episode() -> None:
    rules = {"queueing": "backfill", "overtake": "4"}
    obs = Observer(rules=rules)
    obs.check(snap(rules=rules), 0.0)
    for step in (1.0, 2.0):  # a restart wiped them: the bosses store them again soon
        obs.check(snap(rules={}), step)
    obs.check(snap(rules=rules), 2.5)
    for step in (3.0, 4.0, 5.0):  # no GPU registered yet: nothing to grant under any rules
        obs.check(snap(rules={}, cap={}, used={}), step)
    assert violations(obs) == {}
    t0 = 10.0
    for step in (0.0, STRANDED_S / 2, STRANDED_S + 0.5, STRANDED_S + 1.0):
        obs.check(snap(rules={"queueing": "backfill"}), t0 + step)  # one rule lost for good
    assert violations(obs) == {"rules_lost": 1}
    assert "instead of" in obs.details["rules_lost"][0]
    obs.blind(20.0)  # a failed read ends the episode, and the next one counts again
    for step in (21.0, 22.0, 21.0 + STRANDED_S + 0.5):
        obs.check(snap(rules={}), step)
    assert violations(obs) == {"rules_lost": 2}


@pytest.mark.parametrize("value", ["5,1", "1", "a,b", "-1,5"])
def test_hold_ms_must_be_two_ordered_numbers(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        chaos_main([f"--hold-ms={value}"])
    assert exc.value.code == 2
    assert f"--hold-ms: {value!r} is not allowed; give MIN,MAX in ms" in capsys.readouterr().err


def test_default_rules_are_not_checked() -> None:
    obs = Observer()
    for step in (0.0, STRANDED_S + 1.0):
        obs.check(snap(rules={"overtake": "2"}), step)
    assert violations(obs) == {}


def test_the_observer_expects_the_rules_the_bosses_store() -> None:
    assert stored_rules({}) == {}
    assert stored_rules({"queueing": "backfill", "overtake": 4}) == {"queueing": "backfill", "overtake": "4"}
    assert stored_rules({"overtake": 0}) == {}  # 0 removes the rule: an empty field


def test_client_side_over_commit_is_caught() -> None:
    """Leases as their holders saw them (acquire returned -> release called) must fit the GPU too."""
    logs = Logs()
    logs.held["gpu1"] += [(0.0, 1.0, 10240), (1.0, 2.0, 10240)]  # a handoff: the first is released first
    logs.held["gpu0"] += [(0.0, 1.0, 24576)]
    assert client_over_commits(logs, Tally()) == 0
    logs.held["gpu1"].append((0.5, 0.7, 6144))  # 16 GB on a GPU that leases out 15 GB
    tally = Tally()
    assert client_over_commits(logs, tally) == 1
    assert "gpu1" in tally.notes[0]


def test_a_lease_lost_to_a_full_redis_is_caught() -> None:
    """redis_full: a lease held when it began, whose holder lived on and was not stopped, must not be found lost
    (on_lost, or a release answering False) until FULL_AFTER_S past its end."""
    held = [{"id": f"l{pid}", "pid": pid, "tok": 7} for pid in (1, 2, 3, 4, 5)]
    fault = Fault("redis_full", 10.0, {"leases": held, "end_at": 12.0, "t_end": 12.0})
    logs = Logs()
    logs.alive_until.update(dict.fromkeys((1, 2, 3, 4, 5), 100.0))
    logs.lost[1][("l1", 7)] = 12.5  # lost to it
    logs.released[2]["l2"].append((11.0, False))  # its release found it gone: lost to it too
    logs.released[3]["l3"].append((11.0, True))  # released while Redis was full: fine
    logs.lost[4][("l4", 7)] = 12.5
    logs.stops[4].append((9.0, 13.0))  # stopped through it: its loss is the stop's
    logs.lost[5][("l5", 7)] = 12.0 + FULL_AFTER_S + 5  # lost long after: another cause
    logs.grants.append((12.02, 12.01, "x", 8, "gpu0"))
    tally = Tally()
    assert check_full(fault, logs, tally) == [pytest.approx(0.02)]  # memory back -> next grant
    assert tally.must["leases_lost_to_a_full_redis"] == 2
    assert [note.split()[1] for note in tally.notes] == ["l1", "l2"]
    logs.alive_until[1] = 12.5  # killed just after: not counted
    tally = Tally()
    check_full(fault, logs, tally)
    assert tally.must["leases_lost_to_a_full_redis"] == 1


# ---------------------------------------------------------------- the proxy


@pytest.fixture
def tcp_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = start_redis(tmp_path / "redis", port=free_port())
    yield server
    server.stop()


def test_proxy_relays_and_cuts(tcp_redis: RedisProcess) -> None:
    proxy = Proxy("127.0.0.1", tcp_redis.port).start()
    try:
        client = redis.Redis.from_url(proxy.url, decode_responses=True, socket_timeout=5)
        assert client.ping()
        first = client.client_id()
        assert proxy.live() == 1
        assert proxy.cut() == 1
        assert proxy.live() == 0
        # The old connection is dead; the client connects again (through the proxy) and gets a new id.
        assert client.set("k", "v")
        assert client.client_id() != first
        assert proxy.stats.cut == 1 and proxy.stats.accepted == 2
        client.close()
    finally:
        proxy.stop()


def test_proxy_closes_clients_while_the_target_is_down(tmp_path: Path) -> None:
    proxy = Proxy("127.0.0.1", free_port()).start()  # nothing listens there
    try:
        client = redis.Redis.from_url(proxy.url, socket_timeout=5, retry=None)
        with pytest.raises(redis.ConnectionError):
            client.ping()
        assert proxy.stats.refused >= 1
        client.close()
    finally:
        proxy.stop()


# ---------------------------------------------------------------- found by the chaos run


@pytest.mark.slow
@pytest.mark.parametrize("device", [None, "gpu0"])
def test_registry_client_after_a_redis_restart(tmp_path: Path, device: str | None) -> None:
    """A boss without GPU declarations leases from the namespace's registry. After a restart that lost the
    registry it waits (LeaseTimeout at its timeout) until a boss that declares the GPUs registers them again,
    instead of failing as misconfigured. (Found by `make chaos --registry-clients 2`.)"""
    folder = tmp_path / "redis"
    server = start_redis(folder, socket=folder / "redis.sock")
    try:
        owner = GPUBoss(server.url, namespace="reg", gpus=GPUS, service="owner")
        client = GPUBoss(server.url, namespace="reg", service="client")  # declares nothing
        try:
            owner.release(owner.acquire(1, timeout=0))
            assert client.release(client.acquire(1, timeout=0, device=device))
            server.stop()
            server = start_redis(folder, socket=folder / "redis.sock")
            with pytest.raises(LeaseTimeout, match="lost its GPU registry"):
                client.acquire(1, timeout=0.6, device=device)  # waits for the registry, then times out
            got: list[Any] = []
            waiter = threading.Thread(target=lambda: got.append(client.acquire(1, timeout=10, device=device)))
            waiter.start()
            owner.release(owner.acquire(1, timeout=0))  # the owner's next request registers the GPUs again
            waiter.join(15)
            assert got and got[0].gpu == (device or got[0].gpu) and got[0].gpu in {g["id"] for g in GPUS}
            assert client.release(got[0])
        finally:
            client.close()
            owner.close()
    finally:
        server.stop()


# ---------------------------------------------------------------- a short soak


def soak(*args: str, timeout: float) -> dict[str, Any]:
    """Run the chaos soak with ``args``: its JSON report, once every must-be-0 figure is 0 and it exited 0."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.chaos", *args, "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.stdout, result.stderr[-3000:]
    report: dict[str, Any] = json.loads(result.stdout)
    assert report["must_be_zero"] == dict.fromkeys(report["must_be_zero"], 0), (
        json.dumps(report["details"], indent=1) + result.stderr[-3000:]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert report["ok"] is True
    return report


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_chaos_smoke_injects_every_fault_and_keeps_every_invariant() -> None:
    report = soak("--duration", "20", "--workers", "8", "--fault-every", "1.5", timeout=380)
    for kind in KINDS:
        assert report["faults"][kind]["injected"] >= 1, kind
    assert report["grants"] > 0
    assert report["observer"]["snapshots"] > 100
    # A stopped holder was told that its lease was lost, for each stop (and the restart told holders too).
    stops = report["faults"]["stop_holder"]
    assert stops["recovery"]["n"] >= stops["injected"]
    told = report["lost_told"]["stop_holder"]
    assert told["on_lost"] + told["release"] >= stops["injected"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_chaos_smoke_with_scheduling_rules_and_long_holds_keeps_them_in_force() -> None:
    """Every boss configured with `queueing: backfill` and `overtake: 2`, through Redis restarts, cut connections
    and a Redis out of memory: the invariants hold, the observer finds the rules in force (back after each
    restart), and no lease held through a full Redis is lost (holds of 1.5 to 4 s outlast the fault's 2 s and
    the shortest TTLs, so a renewal refused there would lose the lease)."""
    only = "redis_restart,proxy_drop,redis_full"
    rules = ("--queueing", "backfill", "--overtake", "2", "--hold-ms", "1500,4000")
    report = soak("--duration", "12", "--workers", "6", "--fault-every", "1.5", "--only", only, *rules, timeout=280)
    assert report["rules"] == {"queueing": "backfill", "overtake": 2}
    assert report["hold_ms"] == [1500.0, 4000.0]
    assert "rules_lost" in report["must_be_zero"]  # (checked, and 0, with the others)
    assert "leases_lost_to_a_full_redis" in report["must_be_zero"]
    assert report["faults"]["redis_restart"]["injected"] >= 1
    assert report["faults"]["redis_full"]["injected"] >= 1
    assert report["grants"] > 0
    assert report["observer"]["snapshots"] > 50
    assert report["observer"]["longest_due_s"] <= STRANDED_S  # (a request due longer is a stranded waiter)
