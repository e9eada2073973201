"""Telling that a lease's holder process is gone (gpuboss/procs.py), and the waiter's revoke of its leases
(Core.reap_flow), without Redis: real child processes stand for holders. tests/test_recovery.py runs it
against a real redis-server with killed holders."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gpuboss.core
import pytest
from gpuboss import LeaseTimeout
from gpuboss.config import BossConfig
from gpuboss.core import Call, Core, Pop, ReadHash, ReadQueueHead, Reply, RevokeReply, Watch
from gpuboss.procs import ProcessIdentity, holder_id, holder_of, holder_process, identity, is_gone

from tests.conftest import GPUS, Clock

pytestmark = pytest.mark.skipif(identity() is None, reason="needs Linux /proc")


def me() -> ProcessIdentity:
    found = identity()
    assert found is not None
    return found


def start_time(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()[19]


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    if proc.poll() is None:
        proc.kill()  # by its PID
    proc.wait(timeout=10)


def killed(proc: subprocess.Popen[bytes]) -> ProcessIdentity:
    """The identity ``proc`` had, once it is killed (by its PID) and reaped."""
    held = of(proc)
    proc.kill()
    proc.wait()
    return held


def of(proc: subprocess.Popen[bytes]) -> ProcessIdentity:
    mine = me()
    return ProcessIdentity(mine.boot, mine.pidns, proc.pid, start_time(proc.pid))


def lease_record(lease_id: str, holder: ProcessIdentity | str | None, pid: int = 1) -> str:
    notify = None if holder is None else f"ns:holder:{holder if isinstance(holder, str) else holder_id(holder)}"
    return json.dumps(
        {
            "id": lease_id, "gpu": "gpu0", "vram_mib": 1024, "service": "s", "host": "h", "pid": pid,
            "notify": notify,
        }
    )  # fmt: skip


# ---------------------------------------------------------------- procs.py


def test_this_process_reads_its_own_identity_and_a_holder_id_carries_it() -> None:
    mine = me()
    assert mine.pid == os.getpid() and mine.start == start_time(os.getpid())
    assert ProcessIdentity.parse(mine.text()) == mine
    assert holder_of(json.loads(lease_record("a", mine))) == mine
    assert holder_id(mine) != holder_id(mine)  # random first: two bosses of one process differ
    assert not is_gone(mine, mine)


@pytest.mark.parametrize(
    "notify",
    [
        None,
        7,
        "ns:holder:0123456789abcdef0123456789abcdef",
        "ns:holder:abc.x.1.y.3",
        "ns:holder:abc.x.1.2.3.4",
        "ns:holder:abc.x..2.3",
        "",
    ],
)
def test_a_holder_id_without_an_identity_names_no_process(notify: object) -> None:
    assert holder_of({"notify": notify}) is None


def test_a_process_is_gone_once_it_exits_even_before_it_is_reaped(child: subprocess.Popen[bytes]) -> None:
    held = of(child)
    assert not is_gone(held, me())
    child.kill()
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
    assert Path(f"/proc/{child.pid}").exists()
    assert is_gone(held, me())
    child.wait()
    assert not Path(f"/proc/{child.pid}").exists()
    assert is_gone(held, me())


def test_a_pid_used_again_by_another_process_is_gone(child: subprocess.Popen[bytes]) -> None:
    held = of(child)
    reused = ProcessIdentity(held.boot, held.pidns, held.pid, str(int(held.start) - 1))
    assert not is_gone(held, me()) and is_gone(reused, me())


def test_another_machine_or_pid_namespace_is_never_judged(child: subprocess.Popen[bytes]) -> None:
    held, mine = killed(child), me()
    assert is_gone(held, mine)
    for other in (
        ProcessIdentity("0" * 32, held.pidns, held.pid, held.start),  # another boot: another machine
        ProcessIdentity(held.boot, str(int(held.pidns) + 1), held.pid, held.start),  # another container
    ):
        assert not is_gone(other, mine)
    assert not is_gone(held, None)  # this process cannot read its own identity


def test_a_record_tells_whether_its_holder_runs_here(child: subprocess.Popen[bytes]) -> None:
    """What ``gpuboss status`` shows (``holder_process``)."""
    held, mine = of(child), me()
    elsewhere = ProcessIdentity("0" * 32, held.pidns, held.pid, held.start)
    records = {
        "running": json.loads(lease_record("a", held)),
        "elsewhere": json.loads(lease_record("b", elsewhere)),
        "no identity": json.loads(lease_record("c", "0" * 32)),
        "no channel": json.loads(lease_record("d", None)),
    }
    assert {k: holder_process(r, mine) for k, r in records.items()} == {
        "running": "running",
        "elsewhere": None,
        "no identity": None,
        "no channel": None,
    }
    child.kill()
    child.wait()
    assert {k: holder_process(r, mine) for k, r in records.items()} == {
        "running": "gone",
        "elsewhere": None,
        "no identity": None,
        "no channel": None,
    }
    assert holder_process(records["running"], None) is None


def test_identity_is_none_where_proc_cannot_tell(tmp_path: Path) -> None:
    assert identity(tmp_path) is None  # no /proc here (another platform)
    (tmp_path / "sys/kernel/random").mkdir(parents=True)
    (tmp_path / "sys/kernel/random/boot_id").write_text("a9e73b9b-ea65-435a-8e56-2b9ddfc395f5\n")
    (tmp_path / "self/ns").mkdir(parents=True)
    os.symlink("pid:[4026531836]", tmp_path / "self/ns/pid")
    other = os.getpid() + 1  # a /proc of another pid namespace: its "self" is not this process
    (tmp_path / "self/stat").write_text(f"{other} (python) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 77 0 0\n")
    (tmp_path / str(other)).mkdir()
    (tmp_path / str(other) / "stat").write_text((tmp_path / "self/stat").read_text())
    assert identity(tmp_path) is None
    mine = os.getpid()
    (tmp_path / "self/stat").write_text(f"{mine} (a b) c) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 77 0 0\n")
    (tmp_path / str(mine)).mkdir()
    (tmp_path / str(mine) / "stat").write_text((tmp_path / "self/stat").read_text())
    assert identity(tmp_path) == ProcessIdentity("a9e73b9bea65435a8e562b9ddfc395f5", "4026531836", mine, "77")


# ---------------------------------------------------------------- Core.reap_flow


@pytest.fixture
def core() -> Core:
    return Core(BossConfig(namespace="ns", gpus=GPUS))


def drive(
    flow: Any, leases: dict[str, str], replies: dict[str, list[Any]], head: dict[str, str] | None = None, **hashes: Any
) -> tuple[list[Call], Any]:
    """Run a reap or collect flow: a ReadHash of the leases gets ``leases`` (of another hash, ``hashes[<its key's
    last part>]``), ReadQueueHead the requests at the ``head`` of the queue (None: it must not read them); the
    collect script ``replies["collect"]`` (else nothing collected), each revoke the reply for its id. The calls
    (revokes, collects) and the result."""
    calls: list[Call] = []
    sent: Any = None
    try:
        while True:
            op = flow.send(sent)
            if isinstance(op, ReadHash):
                sent = leases if op.key == "ns:leases" else hashes[op.key.removeprefix("ns:")]
            elif isinstance(op, ReadQueueHead):
                assert head is not None, "it read the queue"
                assert (op.queue, op.tickets) == ("ns:queue", "ns:tickets") and op.count <= 2
                sent = dict(list(head.items())[: op.count])
            else:
                assert isinstance(op, Call) and op.script in ("collect", "revoke")
                calls.append(op)
                nothing = [0, 0, 0, -1, [], []]
                sent = replies.get("collect", nothing) if op.script == "collect" else replies[str(op.args[1])]
    except StopIteration as stop:
        return calls, stop.value


def test_the_lease_of_a_gone_holder_is_revoked_and_no_other(
    core: Core, child: subprocess.Popen[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    dead = killed(child)
    mine = me()
    records = {
        "dead": lease_record("dead", dead, dead.pid),
        "mine": lease_record("mine", mine, mine.pid),
        "old": lease_record("old", "0123456789abcdef0123456789abcdef"),  # a holder id without an identity
        "none": lease_record("none", None),
        "elsewhere": lease_record("elsewhere", ProcessIdentity("0" * 32, dead.pidns, dead.pid, dead.start)),
        "junk": "not json",
    }
    with caplog.at_level(logging.WARNING, logger="gpuboss"):
        calls, revoked = drive(core.reap_flow(Clock()), records, {"dead": [RevokeReply.REVOKED, 0, records["dead"]]})
    assert revoked == 1
    [call] = calls
    assert call.args == [
        "ns:wake:",
        "dead",
        core.operator,
        f"holder process gone (pid {dead.pid} on h)",
        "0",
        core.config.events_maxlen,
    ]
    assert f"its process, pid {dead.pid}, is gone" in caplog.text
    assert core.reap_watch is False  # nothing else here that could die (this process is not watched)


def test_a_lease_revoked_meanwhile_by_another_waiter_is_not_counted(core: Core, child: subprocess.Popen[bytes]) -> None:
    dead = killed(child)
    records = {"dead": lease_record("dead", dead)}
    calls, revoked = drive(core.reap_flow(Clock()), records, {"dead": [RevokeReply.NOT_FOUND, 0]})
    assert len(calls) == 1 and revoked == 0


def test_a_live_holder_here_is_watched_and_looks_happen_once_a_second(
    core: Core, child: subprocess.Popen[bytes]
) -> None:
    clock = Clock()
    records = {"live": lease_record("live", of(child))}
    assert drive(core.reap_flow(clock), records, {}) == ([], 0)
    assert core.reap_watch is True
    clock.now += gpuboss.core.REAP_EVERY_S / 2
    flow = core.reap_flow(clock)
    with pytest.raises(StopIteration):  # too soon: no read at all
        next(flow)
    clock.now += gpuboss.core.REAP_EVERY_S / 2
    assert isinstance(next(core.reap_flow(clock)), ReadHash)


def test_a_head_waiter_looks_again_each_second_while_a_holder_here_could_die(
    core: Core, child: subprocess.Popen[bytes]
) -> None:
    clock = Clock()
    records = {"live": lease_record("live", of(child))}
    flow = core.acquire_flow(core.make_request(1, timeout=100), "r1", clock)
    next(flow)
    assert flow.send([Reply.QUEUED, 0, 25000]) == Watch("r1", 30000)
    assert flow.send(None) == ReadHash("ns:leases")
    pop = flow.send(records)
    assert isinstance(pop, Pop) and pop.timeout == pytest.approx(gpuboss.core.REAP_EVERY_S)
    clock.now += gpuboss.core.REAP_EVERY_S
    assert isinstance(flow.send(None), Call)
    assert flow.send([Reply.QUEUED, 5, 25000]) == ReadHash("ns:leases")
    assert flow.send(records) == ReadQueueHead("ns:queue", "ns:tickets", 2)
    pop = flow.send({})  # deep in the queue: only the TTL-bound chunk
    assert isinstance(pop, Pop) and pop.timeout == pytest.approx(30)


def test_timeout_0_revokes_a_gone_holder_and_asks_again(core: Core, child: subprocess.Popen[bytes]) -> None:
    dead = killed(child)
    records = {"dead": lease_record("dead", dead)}
    clock = Clock()
    flow = core.acquire_flow(core.make_request(1, timeout=0), "r1", clock)
    assert isinstance(next(flow), Call)
    assert flow.send([Reply.BUSY, -1]) == ReadHash("ns:leases")
    assert flow.send(records) == ReadQueueHead("ns:queue", "ns:tickets", 2)
    revoke = flow.send({})
    assert isinstance(revoke, Call) and revoke.script == "revoke" and revoke.args[1] == "dead"
    again = flow.send([RevokeReply.REVOKED, 0, records["dead"]])
    assert isinstance(again, Call) and again.script == "acquire"
    with pytest.raises(LeaseTimeout):  # still no room (someone else took it): timeout=0 answers at once
        flow.send([Reply.BUSY, -1])


def test_a_waiter_ahead_whose_process_is_gone_is_withdrawn(core: Core, child: subprocess.Popen[bytes]) -> None:
    dead = killed(child)
    live = me()
    head = {"gone": lease_record("gone", dead), "alive": lease_record("alive", live), "third": "never read"}
    calls, removed = drive(
        core.reap_flow(Clock(), ahead=5), {}, {"gone": [RevokeReply.WITHDRAWN, 1, head["gone"]]}, head
    )
    assert removed == 1
    [call] = calls
    assert call.args[1:5] == ["gone", core.operator, f"holder process gone (pid {dead.pid} on h)", "1"]


def test_a_gone_waiter_ahead_is_withdrawn_before_a_gone_holder_is_revoked(
    core: Core, child: subprocess.Popen[bytes]
) -> None:
    """Else the revoked lease's VRAM would be granted to the gone waiter: a lease nobody holds, until its TTL."""
    dead = killed(child)
    leases, head = {"held": lease_record("held", dead)}, {"waits": lease_record("waits", dead)}
    replies = {"held": [RevokeReply.REVOKED, 1, leases["held"]], "waits": [RevokeReply.WITHDRAWN, 0, head["waits"]]}
    calls, removed = drive(core.reap_flow(Clock(), ahead=1), leases, replies, head)
    assert [(c.args[1], c.args[4]) for c in calls] == [("waits", "1"), ("held", "0")] and removed == 2


def test_the_head_of_the_queue_reads_no_requests(core: Core) -> None:
    assert drive(core.reap_flow(Clock(), ahead=0), {}, {}, None) == ([], 0)


# ---------------------------------------------------------------- Core.collect_flow (boss.collect(), gpuboss gc)


def test_collect_takes_back_what_expired_and_what_gone_processes_held(
    core: Core, child: subprocess.Popen[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    dead = killed(child)
    mine = me()
    expired = lease_record("old", mine)
    leases = {"dead": lease_record("dead", dead), "mine": lease_record("mine", mine), "junk": "not json"}
    tickets = {
        "dead-wait": lease_record("dead-wait", dead),
        "far-wait": lease_record("far-wait", ProcessIdentity("0" * 32, dead.pidns, dead.pid, dead.start)),
    }
    replies = {
        "collect": [1, 0, 2, -1, [expired], []],
        "dead": [RevokeReply.REVOKED, 1, leases["dead"]],
        "dead-wait": [RevokeReply.WITHDRAWN, 0, tickets["dead-wait"]],
    }
    with caplog.at_level(logging.WARNING, logger="gpuboss"):
        calls, done = drive(core.collect_flow("ops@box"), leases, replies, tickets=tickets)
    assert [c.script for c in calls] == ["collect", "revoke", "revoke"]
    assert [c.args[1:5] for c in calls[1:]] == [  # (the request first: the lease's VRAM would go to it)
        ["dead-wait", "ops@box", f"holder process gone (pid {dead.pid} on h)", "1"],
        ["dead", "ops@box", f"holder process gone (pid {dead.pid} on h)", "0"],
    ]
    assert done.counts() == {"leases": 1, "requests": 0, "revoked": 1, "withdrawn": 1, "granted": 3}
    assert [r["id"] for r in done.leases + done.revoked + done.withdrawn] == ["old", "dead", "dead-wait"]
    assert caplog.text.count("is gone") == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gpuboss"):  # (gpuboss gc prints what it did itself)
        drive(core.collect_flow(announce=False), leases, replies, tickets=tickets)
    assert "is gone" not in caplog.text
    # A lease whose TTL ran out between the collect and its revoke is counted as expired.
    _, late = drive(
        core.collect_flow(), {"dead": leases["dead"]}, {"dead": [RevokeReply.EXPIRED, 0, leases["dead"]]}, tickets={}
    )
    assert late.counts() == {"leases": 1, "requests": 0, "revoked": 0, "withdrawn": 0, "granted": 0}


def test_collect_without_an_identity_only_collects(core: Core) -> None:
    core.me = None  # (a platform without /proc: no holder's process can be judged)
    calls, done = drive(core.collect_flow(), {}, {"collect": [0, 1, 0, -1, [], [lease_record("w", None)]]})
    assert [c.script for c in calls] == ["collect"]
    assert done.counts() == {"leases": 0, "requests": 1, "revoked": 0, "withdrawn": 0, "granted": 0}
