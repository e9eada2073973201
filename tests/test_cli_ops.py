"""The operator's commands: leases, queue, gpus, health, config check, gc, release (force-release, also of a
lease another process holds), watch and top; through click's runner and the installed executable."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result
from gpuboss import GPUBoss, GPUBossError, Keys, Lease, events
from gpuboss.cli import cli
from gpuboss.config import BossConfig
from gpuboss.core import Core
from gpuboss.events import EVENT_TYPES
from gpuboss.procs import ProcessIdentity
from gpuboss.redis_io import call_script_sync

from tests.conftest import ProcessCore, exited_process, raw_client, snapshot, this_process
from tests.workers import Worker

GPUS2 = [
    {"id": "gpu0", "name": "RTX 4090", "vram_gb": 24, "index": 0, "reserve_gb": 1},
    {"id": "gpu1", "name": "RTX 4080", "vram_gb": 16, "index": 1},
]
GPUBOSS = Path(sys.executable).parent / "gpuboss"


@pytest.fixture(autouse=True)
def no_outside_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPUBOSS_REDIS_URL", raising=False)
    monkeypatch.delenv("GPUBOSS_CONFIG", raising=False)


def gpuboss(url: str, namespace: str, *args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, ["--redis-url", url, "--namespace", namespace, *args], input=input)


def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@pytest.fixture
def busy(real_url: str, namespace: str) -> Iterator[dict[str, Any]]:
    """chat holds 20 GB (high) of gpu0 (23 GB leasable), batch 10 GB (low) of gpu1, and "api" waits for
    8 GB (normal) on any GPU, then "late" for 2 GB (low) pinned to gpu1."""
    chat = GPUBoss(real_url, namespace=namespace, service="chat", gpus=GPUS2)
    batch = GPUBoss(real_url, namespace=namespace, service="batch", gpus=GPUS2)
    api = GPUBoss(real_url, namespace=namespace, service="api", gpus=GPUS2)
    late = GPUBoss(real_url, namespace=namespace, service="late", gpus=GPUS2)
    held = {"chat": chat.acquire(20, device="gpu0", priority="high", ttl=3), "batch": batch.acquire(10, device="gpu1")}
    granted: list[tuple[GPUBoss, Lease]] = []

    def wait(boss: GPUBoss, gb: float, **kw: Any) -> None:
        with contextlib.suppress(GPUBossError):  # a timeout: the tests check the state themselves
            granted.append((boss, boss.acquire(gb, timeout=30, **kw)))

    client = raw_client(real_url)
    threads = [threading.Thread(target=wait, args=(api, 8), kwargs={"priority": "normal"})]
    threads[0].start()
    wait_until(lambda: client.zcard(f"{namespace}:queue") == 1)
    threads.append(threading.Thread(target=wait, args=(late, 2), kwargs={"priority": "low", "device": "gpu1"}))
    threads[1].start()
    wait_until(lambda: client.zcard(f"{namespace}:queue") == 2)
    try:
        yield {"held": held, "bosses": {"chat": chat, "batch": batch}}
    finally:
        for name, boss in (("chat", chat), ("batch", batch)):
            boss.release(held[name])
        for t in threads:
            t.join(timeout=30)
        for boss, lease in granted:
            boss.release(lease)
        for boss in (chat, batch, api, late):
            boss.close()
        client.close()


# ---------------------------------------------------------------- reads


def test_leases_table_filters_and_json(real_url: str, namespace: str, busy: dict[str, Any]) -> None:
    every = gpuboss(real_url, namespace, "leases")
    assert every.exit_code == 0, every.output
    assert "Leases (2 of 2, 30.0 GB in all)" in every.stdout
    assert busy["held"]["chat"].id[:8] in every.stdout and busy["held"]["batch"].id[:8] in every.stdout

    chat = gpuboss(real_url, namespace, "leases", "--service", "chat")
    assert "Leases (1 of 2, 20.0 GB in all)" in chat.stdout
    line = next(x for x in chat.stdout.splitlines() if busy["held"]["chat"].id[:8] in x)
    assert line.split()[1:4] == ["chat", "high", "gpu0"]
    assert busy["held"]["batch"].id[:8] not in chat.stdout

    data = json.loads(gpuboss(real_url, namespace, "--json", "leases", "--gpu", "cuda:1").stdout)
    assert [(r["id"], r["service"], r["vram_mib"]) for r in data] == [(busy["held"]["batch"].id, "batch", 10240)]
    assert json.loads(gpuboss(real_url, namespace, "--json", "leases", "--priority", "low").stdout) == []
    both = json.loads(
        gpuboss(real_url, namespace, "--json", "leases", "--priority", "low", "--priority", "high").stdout
    )
    assert [r["service"] for r in both] == ["chat"]

    bad = gpuboss(real_url, namespace, "leases", "--gpu", "gpu7")
    assert bad.exit_code == 1 and "--gpu 'gpu7': no such GPU" in bad.stderr
    wrong = gpuboss(real_url, namespace, "leases", "--priority", "urgent")
    assert wrong.exit_code == 1 and "urgent" in wrong.stderr


def test_queue_says_who_waits_and_why(real_url: str, namespace: str, busy: dict[str, Any]) -> None:
    result = gpuboss(real_url, namespace, "queue")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "Queue (2 of 2 waiting" in lines[0]
    head = next(x for x in lines if " api " in x)
    assert head.split()[:2] == ["1", head.split()[1]] and "normal" in head
    assert "needs 8.0 GB, at most 6.0 GB free (on gpu1)" in head
    second = next(x for x in lines if " late " in x)
    assert second.split()[0] == "2" and "behind #1 (strict order)" in second and "gpu1" in second

    data = json.loads(gpuboss(real_url, namespace, "--json", "queue", "--gpu", "gpu0").stdout)
    assert [r["service"] for r in data] == ["api"]  # unpinned: may land on gpu0; "late" is pinned to gpu1
    assert data[0]["position"] == 1 and data[0]["why"].startswith("needs 8.0 GB")
    assert 0 < data[0]["expires_in_s"] <= 30
    data = json.loads(gpuboss(real_url, namespace, "--json", "queue", "--service", "late").stdout)
    assert [(r["position"], r["pin"], r["priority"]) for r in data] == [(2, "gpu1", "low")]


def test_gpus(real_url: str, namespace: str, busy: dict[str, Any]) -> None:
    text = gpuboss(real_url, namespace, "gpus")
    assert text.exit_code == 0
    row = next(x for x in text.stdout.splitlines() if x.strip().startswith("gpu1"))
    assert row.split() == ["gpu1", "cuda:1", "RTX", "4080", "16.0", "GB", "0.0", "GB", "10.0", "GB", "6.0", "GB", "1"]
    data = json.loads(gpuboss(real_url, namespace, "--json", "gpus").stdout)
    assert [(g["id"], g["capacity_mib"], g["reserve_mib"], g["used_mib"], g["free_mib"]) for g in data] == [
        ("gpu0", 24576, 1024, 20480, 3072),
        ("gpu1", 16384, 0, 10240, 6144),
    ]


def test_health(real_url: str, namespace: str, busy: dict[str, Any]) -> None:
    result = gpuboss(real_url, namespace, "health")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"gpu_available": True, "vram_total": 40960, "vram_free": 3072 + 6144}
    picky = gpuboss(real_url, namespace, "health", "--min-free-gb", "7")
    assert picky.exit_code == 3
    assert json.loads(picky.stdout)["gpu_available"] is False


def test_health_without_gpus_and_without_redis(real_url: str, namespace: str) -> None:
    empty = gpuboss(real_url, namespace, "health")
    assert empty.exit_code == 3
    assert json.loads(empty.stdout) == {"gpu_available": False, "vram_total": 0, "vram_free": 0}
    down = CliRunner().invoke(cli, ["--redis-url", "redis://127.0.0.1:1/0", "--connect-timeout", "0.2", "health"])
    assert down.exit_code == 2 and down.stdout == ""


def test_reads_write_nothing(real_url: str, namespace: str, busy: dict[str, Any]) -> None:
    client = raw_client(real_url)
    stable = {f"{namespace}:{k}" for k in ("gpus", "capacity", "used", "queue", "token", "seq", "event_log")}
    before = {k: v for k, v in snapshot(client, namespace).items() if k in stable}
    for args in (["leases"], ["queue"], ["gpus"], ["health"], ["--json", "status"], ["top", "--once"]):
        assert gpuboss(real_url, namespace, *args).exit_code == 0, args
    after = {k: v for k, v in snapshot(client, namespace).items() if k in stable}
    assert before == after


# ---------------------------------------------------------------- config check


def test_config_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = tmp_path / "config.yaml"
    good.write_text(
        "namespace: prod\nservice: kiwi\nevents_maxlen: 500\nredis_url: redis://:secret@db:6379/0\n"
        "gpus:\n  - {id: gpu0, name: RTX 4090, vram_gb: 24, index: 0, reserve_gb: 1.5}\n"
    )
    result = CliRunner().invoke(cli, ["config", "check", str(good)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"{good}: valid" in out
    assert "namespace         prod" in out and "events_maxlen     500" in out and "default_ttl       30 s" in out
    assert "redis://:***@db:6379/0" in out and "secret" not in out
    gpu = next(x for x in out.splitlines() if x.strip().startswith("gpu0"))
    assert gpu.split()[-6:] == ["24.0", "GB", "1.5", "GB", "22.5", "GB"]

    monkeypatch.setenv("GPUBOSS_REDIS_URL", "redis://other:6379/1")
    data = json.loads(CliRunner().invoke(cli, ["--json", "--namespace", "ns2", "config", "check", str(good)]).stdout)
    assert data["valid"] is True and data["path"] == str(good)
    assert data["settings"]["redis_url"] == "redis://other:6379/1"
    assert data["settings"]["namespace"] == "ns2"  # the global option applies, as for every command
    assert data["settings"]["gpus"][0]["reserve_gb"] == 1.5
    assert any("GPUBOSS_REDIS_URL" in n for n in data["notes"])

    monkeypatch.setenv("GPUBOSS_CONFIG", str(good))
    from_env = CliRunner().invoke(cli, ["config", "check"])
    assert from_env.exit_code == 0 and f"{good}: valid" in from_env.stdout


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("gpus:\n  - {id: gpu0, vram_gb: -1}\n", "gpus.0.vram_gb"),
        ("events_maxlen: lots\n", "events_maxlen"),
        ("default_priority: urgent\n", "default_priority"),
        ("nonsense_key: 1\n", "nonsense_key"),
        ("gpus: [\n", "malformed YAML"),
    ],
)
def test_config_check_names_the_field(tmp_path: Path, text: str, field: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    result = CliRunner().invoke(cli, ["config", "check", str(bad)])
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("gpuboss: error:") and field in line


def test_config_check_without_a_file(tmp_path: Path) -> None:
    none = CliRunner().invoke(cli, ["config", "check"])
    assert none.exit_code == 1 and "no configuration file" in none.stderr
    missing = CliRunner().invoke(cli, ["config", "check", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 1 and "cannot read configuration" in missing.stderr


def test_status_lists_the_first_leases_and_requests_and_says_where_the_rest_are(real_url: str, namespace: str) -> None:
    """With more leases or waiting requests than STATUS_ROWS, ``status`` lists the first of each and names the
    command that lists them all; that command and ``--json`` keep every one."""
    from gpuboss.cli import STATUS_ROWS

    core = Core(BossConfig(namespace=namespace, gpus=GPUS2, service="many"))
    client = raw_client(real_url)
    register = core.register_call()
    assert register is not None
    call_script_sync(client, register)
    extra = 7
    for n in range(STATUS_ROWS + extra):
        call_script_sync(client, core.acquire_call(f"lease{n:04d}", core.make_request(0.25, ttl=60), "gpu0", "many"))
    for n in range(STATUS_ROWS + extra):
        call_script_sync(client, core.acquire_call(f"queued{n:04d}", core.make_request(20, ttl=60), "gpu0", "many"))
    assert client.zcard(f"{namespace}:queue") == STATUS_ROWS + extra

    out = gpuboss(real_url, namespace, "status").stdout
    assert f"Leases ({STATUS_ROWS + extra})" in out and f"Queue ({STATUS_ROWS + extra} waiting" in out
    assert sum(1 for line in out.splitlines() if line.lstrip().startswith("lease0")) == STATUS_ROWS
    assert sum(1 for line in out.splitlines() if " queued00" in line) == STATUS_ROWS
    assert f"... and {extra} more: `gpuboss leases` lists them all" in out
    assert f"... and {extra} more: `gpuboss queue` lists them all" in out
    listed = gpuboss(real_url, namespace, "queue").stdout
    assert sum(1 for line in listed.splitlines() if " queued00" in line) == STATUS_ROWS + extra
    assert sum(1 for line in gpuboss(real_url, namespace, "leases").stdout.splitlines() if "lease0" in line) == (
        STATUS_ROWS + extra
    )
    shown = json.loads(gpuboss(real_url, namespace, "--json", "status").stdout)
    assert len(shown["leases"]) == len(shown["queue"]) == STATUS_ROWS + extra
    assert "more:" not in gpuboss(real_url, namespace, "--json", "status").stdout


# ---------------------------------------------------------------- gc


def test_gc_says_what_it_collected(real_url: str, namespace: str) -> None:
    core = Core(BossConfig(namespace=namespace, gpus=GPUS2, service="dead"))
    client = raw_client(real_url)
    register = core.register_call()
    assert register is not None
    call_script_sync(client, register)
    call_script_sync(client, core.acquire_call("deadbeef01", core.make_request(23, ttl=0.1), "gpu0", "ghost"))
    call_script_sync(client, core.acquire_call("deadbeef02", core.make_request(4, ttl=0.1), "gpu0", "lurker"))
    call_script_sync(client, core.acquire_call("alive00001", core.make_request(16, ttl=60), "gpu1", "alive"))
    time.sleep(0.2)
    text = gpuboss(real_url, namespace, "gc")
    assert text.exit_code == 0, text.output
    assert "expired lease deadbeef: ghost on gpu0, 23.0 GB normal" in text.stdout
    assert "expired queue entry deadbeef: lurker waiting for 4.0 GB normal" in text.stdout
    assert client.hkeys(f"{namespace}:leases") == ["alive00001"]
    again = gpuboss(real_url, namespace, "--json", "gc")
    assert json.loads(again.stdout) == {"leases": [], "requests": [], "revoked": [], "withdrawn": [], "granted": 0}
    assert "nothing had expired" in gpuboss(real_url, namespace, "gc").stdout
    call_script_sync(client, core.release_call("alive00001"))
    client.close()


def test_gc_revokes_and_withdraws_what_a_process_gone_from_this_machine_held(real_url: str, namespace: str) -> None:
    me, dead = this_process(), exited_process()
    elsewhere = dataclasses.replace(dead, boot="f" * 32)  # the same pid on another machine: never judged from here

    def core(service: str, process: ProcessIdentity) -> Core:
        return ProcessCore(BossConfig(namespace=namespace, gpus=GPUS2, service=service), process)

    ghost, far, live = core("ghost", dead), core("far", elsewhere), core("live", me)
    client = raw_client(real_url)
    register = live.register_call()
    assert register is not None
    call_script_sync(client, register)
    for boss, request_id, gb, gpu in (
        (ghost, "aaaa0001", 20, "gpu0"),  # a lease of the gone process
        (far, "bbbb0001", 2, "gpu0"),
        (live, "cccc0001", 10, "gpu1"),
        (ghost, "aaaa0002", 12, "gpu1"),  # queued (6 GB free there), the head of the queue
        (live, "cccc0002", 20, "gpu0"),  # queued behind it (strict order)
    ):
        call_script_sync(client, boss.acquire_call(request_id, boss.make_request(gb, ttl=60), gpu, boss.config.service))
    assert sorted(client.hkeys(f"{namespace}:leases")) == ["aaaa0001", "bbbb0001", "cccc0001"]
    assert client.zrange(f"{namespace}:queue", 0, -1) == ["aaaa0002", "cccc0002"]

    shown = json.loads(gpuboss(real_url, namespace, "--json", "status").stdout)
    assert {r["id"]: r["holder_process"] for r in shown["leases"]} == {
        "aaaa0001": "gone",
        "bbbb0001": None,
        "cccc0001": "running",
    }
    assert {r["id"]: r["holder_process"] for r in shown["queue"]} == {"aaaa0002": "gone", "cccc0002": "running"}
    host = live.host
    table = gpuboss(real_url, namespace, "--plain", "leases").stdout
    assert f"gone ({host}:{dead.pid})" in table and f" {host}:{me.pid}" in table
    assert table.count("gone (") == 1
    assert f"gone ({host}:{dead.pid})" in gpuboss(real_url, namespace, "--plain", "queue").stdout

    text = gpuboss(real_url, namespace, "gc")
    assert text.exit_code == 0, text.output
    assert text.stdout.splitlines() == [
        f"revoked lease aaaa0001: ghost on gpu0, 20.0 GB normal, held by {host}:{dead.pid}: its process is gone",
        f"withdrew queue entry aaaa0002: ghost waiting for 12.0 GB normal, from {host}:{dead.pid}: its process is gone",
        "granted 1 waiting request(s) the freed VRAM",
    ]
    assert sorted(client.hkeys(f"{namespace}:leases")) == ["bbbb0001", "cccc0001", "cccc0002"]
    assert client.zcard(f"{namespace}:queue") == 0 and client.hlen(f"{namespace}:tickets") == 0
    removed = [e for e in events.replay(real_url, namespace) if e.type in ("revoked", "withdrawn")]
    assert [(e.type, e["lease"], e["reason"]) for e in removed] == [
        ("withdrawn", "aaaa0002", f"holder process gone (pid {dead.pid} on {host})"),
        ("revoked", "aaaa0001", f"holder process gone (pid {dead.pid} on {host})"),
    ]  # (the request first: the lease's VRAM would have gone to it)
    assert all("@" in e["by"] for e in removed)

    again = gpuboss(real_url, namespace, "--json", "gc")
    assert json.loads(again.stdout) == {"leases": [], "requests": [], "revoked": [], "withdrawn": [], "granted": 0}
    assert gpuboss(real_url, namespace, "gc").stdout == "nothing had expired, and no holder's process is gone\n"
    for boss, lease_id in ((far, "bbbb0001"), (live, "cccc0001"), (live, "cccc0002")):
        assert Core.released(call_script_sync(client, boss.release_call(lease_id)), lease_id)
    client.close()


# ---------------------------------------------------------------- release


def test_release_by_id_prefix_hands_capacity_to_the_waiter(real_url: str, namespace: str, busy: dict[str, Any]) -> None:
    chat = busy["held"]["chat"]
    result = gpuboss(real_url, namespace, "release", chat.id[:6], "--reason", "stuck")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"revoked {chat.id[:8]} (chat on gpu0, 20.0 GB")
    assert "granted 2 waiting request(s)" in result.stdout  # the head, then "late" behind it
    client = raw_client(real_url)
    placed = sorted((json.loads(r)["service"], json.loads(r)["gpu"]) for r in client.hvals(f"{namespace}:leases"))
    assert placed == [("api", "gpu0"), ("batch", "gpu1"), ("late", "gpu1")]  # in the same step
    revoked = [e for e in events.replay(real_url, namespace) if e.type == "revoked"]
    assert [(e.lease, e["reason"]) for e in revoked] == [(chat.id, "stuck")]
    assert "@" in revoked[0]["by"]
    wait_until(lambda: chat.lost, timeout=5)  # the holder's heartbeat finds it gone
    client.close()


def test_release_refuses_bad_ids_and_writes_nothing(real_url: str, namespace: str, busy: dict[str, Any]) -> None:
    client = raw_client(real_url)
    leases_before = client.hgetall(f"{namespace}:leases").keys()
    queued = client.zrange(f"{namespace}:queue", 0, 0)[0]
    for args, message in (
        (["release", busy["held"]["chat"].id, "nope-nope"], "no lease 'nope-nope'"),
        (["release", "ab"], "at least 4 characters"),
        (["release", queued[:2]], "at least 4 characters"),  # (a short prefix of a queued request names it neither)
        (["release", queued], "is a queued request, not a lease"),
        (["release"], "name the leases to release"),
        (["release", busy["held"]["chat"].id, "--all"], "not both"),
        (["release", "--all", "--expired"], "--all selects every lease"),
    ):
        result = gpuboss(real_url, namespace, *args)
        assert result.exit_code == 1, (args, result.output)
        assert message in result.stderr, (args, result.stderr)
    assert client.hgetall(f"{namespace}:leases").keys() == leases_before
    assert not [e for e in events.replay(real_url, namespace) if e.type == "revoked"]
    client.close()


def test_release_selections_ask_first(real_url: str, namespace: str, busy: dict[str, Any]) -> None:
    client = raw_client(real_url)
    declined = gpuboss(real_url, namespace, "release", "--service", "batch", input="n\n")
    assert declined.exit_code == 1 and "not confirmed: nothing released" in declined.stderr
    assert "About to force-release 1 lease(s)" in declined.stdout
    no_input = gpuboss(real_url, namespace, "release", "--all", input="")
    assert no_input.exit_code == 1
    assert client.hlen(f"{namespace}:leases") == 2

    nothing = gpuboss(real_url, namespace, "release", "--service", "nobody")
    assert nothing.exit_code == 0 and "nothing to release" in nothing.stdout
    assert gpuboss(real_url, namespace, "release", "--expired", "--yes").stdout.startswith("no lease matches")

    confirmed = gpuboss(real_url, namespace, "release", "--service", "batch", input="y\n")
    assert confirmed.exit_code == 0, confirmed.output
    assert f"revoked {busy['held']['batch'].id[:8]} (batch on gpu1" in confirmed.stdout
    data = json.loads(gpuboss(real_url, namespace, "--json", "release", "--all", "--yes").stdout)
    assert {r["result"] for r in data} == {"revoked"}
    assert busy["held"]["chat"].id in {r["id"] for r in data}
    assert _only_waiters(client, namespace)  # the waiters got the VRAM in the same steps
    client.close()


def _only_waiters(client: Any, namespace: str) -> bool:
    return {json.loads(r)["service"] for r in client.hvals(f"{namespace}:leases")} <= {"api", "late"}


def test_release_expired_collects_what_expired(real_url: str, namespace: str) -> None:
    core = Core(BossConfig(namespace=namespace, gpus=GPUS2))
    client = raw_client(real_url)
    register = core.register_call()
    assert register is not None
    call_script_sync(client, register)
    call_script_sync(client, core.acquire_call("stale0001", core.make_request(2, ttl=0.1), "gpu0", "ghost"))
    time.sleep(0.2)
    result = gpuboss(real_url, namespace, "release", "--expired", "--yes")
    assert result.exit_code == 0, result.output
    assert "stale000 (ghost on gpu0, 2.0 GB" in result.stdout and "had expired: collected" in result.stdout
    assert client.hlen(f"{namespace}:leases") == 0
    client.close()


def test_force_release_of_a_lease_held_by_another_process(real_url: str, namespace: str) -> None:
    """The holder is another process: the executable's force-release makes its on_lost fire, and the
    waiter (a third process) is granted the VRAM in the same step."""
    gpu = [{"id": "gpu0", "vram_gb": 24, "index": 0}]
    holder = Worker("hold", real_url, namespace, gpu, "--vram", "20", "--ttl", "1.5", "--report-lost")
    waiter: Worker | None = None
    try:
        holder.expect("READY")
        held = json.loads(holder.expect("HELD"))
        waiter = Worker("wait", real_url, namespace, gpu, "--vram", "8", "--ttl", "10")
        waiter.expect("READY")
        waiter.expect("QUEUING")
        client = raw_client(real_url)
        wait_until(lambda: client.zcard(Keys(namespace).queue) == 1)
        done = subprocess.run(
            [str(GPUBOSS), "--redis-url", real_url, "--namespace", namespace, "release", held["id"], "--yes"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert f"revoked {held['id'][:8]}" in done.stdout and "granted 1 waiting request(s)" in done.stdout
        granted = json.loads(waiter.expect("HELD", timeout=10))
        assert granted["vram_mib"] == 8192 and granted["token"] > held["token"]
        assert holder.expect("LOST", timeout=10) == held["id"]  # its heartbeat found the lease gone
        kinds = [(e.type, e.lease) for e in events.replay(real_url, namespace) if e.type in ("revoked", "granted")]
        assert kinds[-2:] == [("revoked", held["id"]), ("granted", granted["id"])]
        client.close()
    finally:
        holder.close()
        if waiter is not None:
            waiter.close()


# ---------------------------------------------------------------- watch and top


def test_watch_since_replays(real_url: str, namespace: str) -> None:
    boss = GPUBoss(real_url, namespace=namespace, gpus=GPUS2, service="kiwi")
    lease = boss.acquire(3, priority="high")
    boss.release(lease)
    boss.close()
    result = gpuboss(real_url, namespace, "watch", "--since", "10m", "--count", "4", "--timeout", "10")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split()[1] for line in lines] == ["gpu_registered", "gpu_registered", "granted", "released"]
    assert lines[2].split()[2:7] == [lease.id[:8], "kiwi", "high", "3.0", "GB"]
    assert "waited 0 ms" in lines[2] and "held " in lines[3] and "reason: release" in lines[3]

    only = gpuboss(real_url, namespace, "--json", "watch", "--since", "1h", "--type", "released", "--timeout", "0.5")
    (event,) = [json.loads(x) for x in only.stdout.splitlines()]
    assert event["type"] == "released" and event["lease"] == lease.id and event["id"]
    assert gpuboss(real_url, namespace, "watch", "--since", "0s", "--timeout", "0.3").stdout == ""
    bad = gpuboss(real_url, namespace, "watch", "--since", "last tuesday")
    assert bad.exit_code == 1 and "not a duration" in bad.stderr


@contextlib.contextmanager
def watching(url: str, namespace: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    """The installed `gpuboss watch` with ``args``, once it has subscribed; killed at the end if still running."""
    watcher = subprocess.Popen(
        [str(GPUBOSS), "--redis-url", url, "--namespace", namespace, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        client = raw_client(url)
        wait_until(lambda: client.pubsub_numsub(Keys(namespace).events)[0][1] == 1, timeout=20)
        yield watcher
    finally:
        if watcher.poll() is None:
            os.kill(watcher.pid, 9)
            watcher.wait()


def test_watch_live_with_the_executable(real_url: str, namespace: str) -> None:
    with watching(real_url, namespace, "--json", "watch", "--count", "4") as watcher:
        boss = GPUBoss(real_url, namespace=namespace, gpus=GPUS2, service="live")
        boss.release(boss.acquire(1))
        boss.close()
        out, err = watcher.communicate(timeout=20)
    assert watcher.returncode == 0, err
    got = [json.loads(x) for x in out.splitlines()]
    assert [e["type"] for e in got] == ["gpu_registered", "gpu_registered", "granted", "released"]
    assert got[2]["service"] == "live"


def test_watch_stops_cleanly_on_sigterm(real_url: str, namespace: str) -> None:
    """A supervisor (systemd, a container runtime) stops a `gpuboss watch` with SIGTERM: it ends as Ctrl-C ends
    it, with status 0 (it died with 143 before)."""
    with watching(real_url, namespace, "watch") as watcher:
        watcher.terminate()
        _, err = watcher.communicate(timeout=20)
    assert watcher.returncode == 0, err
    assert "Traceback" not in err


def test_eviction_and_inventory_events_read_well() -> None:
    from gpuboss.cli import format_event
    from gpuboss.events import Event

    def line(**fields: Any) -> str:
        base = {"time": 1_700_000_000_000, "lease": None, "gpu": "gpu0", "service": None, "priority": None}
        return format_event(Event.from_json(json.dumps({**base, **fields})))

    asked = line(
        type="evict_requested",
        lease="abcdef0123",
        service="batch",
        priority="low",
        vram_mib=20480,
        by="feedbeef99",
        need_mib=8192,
        reason="priority",
    )
    assert asked.split()[1:8] == ["evict_requested", "abcdef01", "batch", "low", "20.0", "GB", "on"]
    assert asked.endswith("for feedbeef, needs 8.0 GB back, reason: priority")
    gone = line(
        type="evicted",
        lease="abcdef0123",
        vram_mib=20480,
        by="feedbeef99",
        held_ms=65_000,
        checkpoint_ms=1500,
        resume=True,
    )
    assert gone.endswith("held 1 min 05 s, for feedbeef, checkpoint 1.5 s, queued again")
    alert = line(type="vram_alert", pid=4242, used_mib=9000, leased_mib=8192, over_mib=808)
    assert alert.endswith("pid 4242 uses 8.8 GB of 8.0 GB leased")
    off = line(type="gpu_offline", host="box2", reason="host_timeout")
    assert off.endswith("on gpu0  host box2, reason: host_timeout")


def test_top_once(real_url: str, namespace: str, busy: dict[str, Any]) -> None:
    result = gpuboss(real_url, namespace, "top", "--once", "--events", "3")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for section in ("GPUs (2)", "Leases (2)", "Queue (2 waiting", "Recent events (3)"):
        assert section in out
    assert "\x1b[" not in out  # --once does not clear the screen
    recent = out[out.index("Recent events") :].splitlines()[1:]
    assert [line.split()[1] for line in recent] == ["granted", "queued", "queued"]
    data = json.loads(gpuboss(real_url, namespace, "--json", "top", "--once").stdout)
    assert len(data["leases"]) == 2 and len(data["queue"]) == 2 and data["events"][-1]["type"] == "queued"


# ---------------------------------------------------------------- completion and documentation


def test_shell_completion_with_the_executable() -> None:
    env = {**os.environ, "_GPUBOSS_COMPLETE": "bash_source"}
    source = subprocess.run([str(GPUBOSS)], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert source.returncode == 0 and "_gpuboss_completion()" in source.stdout
    env = {
        **os.environ,
        "_GPUBOSS_COMPLETE": "bash_complete",
        "COMP_WORDS": "gpuboss watch --type re",
        "COMP_CWORD": "3",
    }
    done = subprocess.run([str(GPUBOSS)], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.stdout.split() == [f"plain,{t}" for t in EVENT_TYPES if t.startswith("re")]
    assert {"plain,released", "plain,revoked", "plain,resumed"} <= set(done.stdout.split())


def test_completion_of_subcommands_and_the_global_plain_option() -> None:
    def complete(words: str) -> list[str]:
        env = {
            **os.environ,
            "_GPUBOSS_COMPLETE": "bash_complete",
            "COMP_WORDS": words,
            "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1)),
        }
        done = subprocess.run([str(GPUBOSS)], env=env, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert complete("gpuboss gpus ") == ["plain,discover", "plain,register", "plain,remove"]
    assert complete("gpuboss pro") == ["plain,profile"]
    assert complete("gpuboss --pl") == ["plain,--plain"]


def test_every_command_and_exit_code_is_documented() -> None:
    from gpuboss.cli import EXIT_CHECK_FAILED, EXIT_INTERRUPTED, EXIT_NO_GPU, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE

    doc = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    assert isinstance(cli, click.Group)
    for name in cli.commands:
        assert f"gpuboss {name}" in doc, name
    for code in (EXIT_OK, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_CHECK_FAILED, EXIT_NO_GPU, EXIT_INTERRUPTED):
        assert f"| {code} |" in doc, code


# ---------------------------------------------------------------- inventory: observed, offline, holds; lease state


@pytest.fixture
def inventory(real_url: str, namespace: str) -> Iterator[dict[str, Any]]:
    """No live boss (so no script runs while a test reads): gpu0 (23 GB leasable) has a 10 GB lease and a
    fresh NVML reading of 12 GB, and 2 GB held for a queued 20 GB request; gpu1 has a 4 GB lease, a stale
    reading, and is offline."""
    core = Core(BossConfig(namespace=namespace, gpus=GPUS2))
    client = raw_client(real_url)
    register = core.register_call()
    assert register is not None
    call_script_sync(client, register)
    call_script_sync(client, core.acquire_call("lease0001aaaa", core.make_request(10, ttl=600), "gpu0", "chat"))
    call_script_sync(client, core.acquire_call("lease0002bbbb", core.make_request(4, ttl=600), "gpu1", "batch"))
    want = core.make_request(20, priority="high", ttl=600)
    call_script_sync(client, core.acquire_call("want0001cccc", want, "gpu0", "big"))
    assert client.zcard(f"{namespace}:queue") == 1
    keys = Keys(namespace)
    before = {"gpus": gpuboss(real_url, namespace, "gpus").stdout}
    now = int(client.time()[0]) * 1000
    client.hset(keys.observed, mapping={"gpu0": f"12288,{now},60000", "gpu1": f"1024,{now - 120_000},10000"})
    client.hset(keys.offline, "gpu1", json.dumps({"host": "box2", "since": now - 5000, "reason": "host silent"}))
    hold = {"id": "want0001cccc", "vram_mib": 2048, "victims": ["lease0001aaaa"], "deadline": now + 600_000}
    client.hset(keys.holds, "gpu0", json.dumps({**hold, "on_grace": "wait"}))
    try:
        yield before
    finally:
        client.close()


def test_gpus_show_observed_held_offline_and_effective_free(
    real_url: str, namespace: str, inventory: dict[str, Any]
) -> None:
    assert "OBSERVED" not in inventory["gpus"] and "HELD" not in inventory["gpus"]  # before any inventory data
    text = gpuboss(real_url, namespace, "gpus")
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    header = "GPU DEVICE NAME CAPACITY RESERVE LEASED OBSERVED HELD FREE LEASES"
    assert lines[1].split() == header.split()
    gpu0 = next(x for x in lines if x.strip().startswith("gpu0"))
    # capacity 24, reserve 1, leased 10, observed 12, held 2: free = 23 - max(10, 12) - 2 = 9
    assert gpu0.split()[4:] == ["24.0", "GB", "1.0", "GB", "10.0", "GB", "12.0", "GB", "2.0", "GB", "9.0", "GB", "1"]
    gpu1 = next(x for x in lines if x.strip().startswith("gpu1"))
    assert "stale (2 min 0" in gpu1 and gpu1.split()[-2:] == ["offline", "1"]
    assert "  gpu1: offline since " in text.stdout and "(host box2): host silent" in text.stdout
    assert "  gpu0: held for want0001 of big, high (2048 MiB, evicting 1 lease: lease000)" in text.stdout

    data = {g["id"]: g for g in json.loads(gpuboss(real_url, namespace, "--json", "gpus").stdout)}
    assert (data["gpu0"]["observed_mib"], data["gpu0"]["free_mib"], data["gpu0"]["offline"]) == (12288, 9216, None)
    assert data["gpu0"]["observed"]["fresh"] is True and data["gpu0"]["hold"]["id"] == "want0001cccc"
    assert data["gpu0"]["hold"]["victims"] == ["lease0001aaaa"] and data["gpu0"]["hold"]["deadline_in_s"] > 500
    assert data["gpu1"]["observed_mib"] is None and data["gpu1"]["observed"]["fresh"] is False
    assert data["gpu1"]["observed"]["age_s"] >= 120 and data["gpu1"]["offline"]["host"] == "box2"
    assert data["gpu1"]["free_mib"] == 0 and data["gpu1"]["hold"] is None


def test_status_says_what_is_held_offline_and_why_the_head_waits(
    real_url: str, namespace: str, inventory: dict[str, Any]
) -> None:
    result = gpuboss(real_url, namespace, "status")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Offline (1: no new grants there)" in out
    assert "Held for queued requests (1: VRAM being freed by eviction)" in out
    assert "  gpu0: held for want0001 of big, high (2048 MiB, evicting 1 lease: lease000); deadline in " in out
    head = next(x for x in out.splitlines() if "want0001" in x and x.split()[0] == "1")
    assert head.endswith("gpu0 is being freed for it: 2.0 GB held, evicting 1 lease")
    health = gpuboss(real_url, namespace, "health")
    assert json.loads(health.stdout) == {"gpu_available": True, "vram_total": 40960, "vram_free": 9216}
    assert gpuboss(real_url, namespace, "health", "--min-free-gb", "10").exit_code == 3  # gpu1 is offline


def test_lease_state_and_evictions_of_records_with_and_without_them() -> None:
    from gpuboss.cli import lease_table
    from gpuboss.fmt import plain_table

    base = {"service": "s", "priority": "low", "gpu": "gpu0", "vram_mib": 1024, "age_s": 1.0, "expires_in_s": 9.0}
    old = {**base, "id": "0123456789"}  # written before eviction existed: no state, evict, evictions
    evicting = {
        **base,
        "id": "abcdef0123",
        "state": "evicting",
        "evictions": 2,
        "evict": {"by": "feedbeef99", "need_mib": 512, "deadline_in_s": 12.5},
    }
    late = {**evicting, "id": "9999999999", "evict": {"by": "feedbeef99", "deadline_in_s": -3.0}}
    lines = plain_table(lease_table([old, evicting, late])).splitlines()
    header = lines[0].split()
    assert header[5:7] == ["STATE", "AGE"] and "EVICTIONS" in header
    assert lines[1].split()[6:7] == ["active"] and lines[1].split()[-3] == "0"
    assert "evicting (for feedbeef, 12.5 s left)" in lines[2] and lines[2].split()[-3] == "2"
    assert "evicting (for feedbeef, 3.0 s overdue)" in lines[3]


def test_a_real_eviction_shows_in_leases_and_status(real_url: str, namespace: str) -> None:
    """A preemptible low lease asked to checkpoint for a high request: STATE evicting, the hold in status."""
    one = [{"id": "gpu0", "name": "RTX 4090", "vram_gb": 24, "index": 0, "reserve_gb": 1}]
    low = GPUBoss(real_url, namespace=namespace, service="batch", gpus=one)
    high = GPUBoss(real_url, namespace=namespace, service="chat", gpus=one)
    checkpointing = threading.Event()  # the holder "checkpoints" until the CLI has looked
    lease = low.acquire(20, priority="low", preemptible=True, on_evict=lambda _notice: checkpointing.wait(30), ttl=60)
    granted: list[Lease] = []
    waiter = threading.Thread(target=lambda: granted.append(high.acquire(8, priority="high", timeout=60)))
    waiter.start()
    client = raw_client(real_url)
    try:
        wait_until(lambda: client.hlen(Keys(namespace).holds) == 1, timeout=20)
        request = str(json.loads(gpuboss(real_url, namespace, "--json", "queue").stdout)[0]["id"])
        rows = gpuboss(real_url, namespace, "leases").stdout.splitlines()
        row = next(x for x in rows if x.startswith(f"  {lease.id[:8]}"))
        assert f"evicting (for {request[:8]}, " in row and " left)" in row
        (rec,) = json.loads(gpuboss(real_url, namespace, "--json", "leases").stdout)
        assert rec["state"] == "evicting" and rec["evict"]["by"] == request and rec["evictions"] == 0
        out = gpuboss(real_url, namespace, "status").stdout
        assert f"gpu0: held for {request[:8]} of chat, high (8192 MiB, evicting 1 lease: {lease.id[:8]})" in out
    finally:
        checkpointing.set()
        low.release(lease)
        waiter.join(timeout=30)
        for got in granted:
            high.release(got)
        low.close()
        high.close()
        client.close()
    assert granted and granted[0].gpu == "gpu0"


# ---------------------------------------------------------------- gpus discover / register, profile


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Puts a fake NVML where gpuboss imports pynvml; returns a setter for the fake host."""
    import gpuboss.nvml

    def use(fake: Any) -> None:
        monkeypatch.setattr(gpuboss.nvml, "import_nvml", lambda: fake)

    return use


def test_gpus_discover(nvml: Any) -> None:
    import socket

    from tests import fake_nvml as fk

    nvml(fk.mig_host())
    text = CliRunner().invoke(cli, ["gpus", "discover"])
    assert text.exit_code == 0, text.output
    assert text.stdout.startswith("GPUs on this host (3; NVML: driver 550.54.15, nothing written)")
    rtx = next(x for x in text.stdout.splitlines() if x.startswith(f"  {fk.RTX4090}"))
    assert rtx.split()[-5:] == ["0", "00000000:01:00.0", "8.9", "-", socket.gethostname()]
    mig = next(x for x in text.stdout.splitlines() if x.startswith(f"  {fk.MIG_A}"))
    assert fk.A100 in mig and "00000000:41:00.0" in mig and "39.2 GB" in mig

    data = json.loads(CliRunner().invoke(cli, ["--json", "gpus", "discover", "--reserve-gb", "0.5"]).stdout)
    assert [g["id"] for g in data] == [fk.RTX4090, fk.MIG_A, fk.MIG_B]
    assert [g["parent_uuid"] for g in data] == [None, fk.A100, fk.A100]
    assert data[1]["capacity_mib"] == 40192 and {g["reserve_gb"] for g in data} == {0.5}
    assert "reserves" not in text.stdout  # no driver reservation on this host (v1 answers, or none)

    nvml(fk.h200_host())
    text = CliRunner().invoke(cli, ["gpus", "discover"])
    assert text.exit_code == 0, text.output
    assert f"  {fk.H200}  NVIDIA H200  139.8 GB" in text.stdout  # 143155 MiB: what CUDA can allocate
    assert f"the total less what the driver reserves (616 MiB on {fk.H200[:12]})" in text.stdout
    (h200,) = json.loads(CliRunner().invoke(cli, ["--json", "gpus", "discover"]).stdout)
    assert (h200["capacity_mib"], h200["driver_reserved_mib"]) == (143155, 616)


@pytest.mark.parametrize("command", [["gpus", "discover"], ["gpus", "register"]])
def test_without_nvml_gpus_discover_and_register_exit_4(nvml: Any, command: list[str], tmp_path: Path) -> None:
    from tests import fake_nvml as fk

    nvml(fk.FakeNvml([], init_error=fk.LIBRARY_NOT_FOUND))
    result = CliRunner().invoke(cli, ["--redis-url", "redis://127.0.0.1:1/0", *command])
    assert result.exit_code == 4, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("gpuboss: error: no GPU discovered: NVML unavailable: the NVML library")
    assert "Traceback" not in result.output and result.stdout == ""
    nvml(fk.FakeNvml([]))
    empty = CliRunner().invoke(cli, ["--redis-url", "redis://127.0.0.1:1/0", *command])
    assert empty.exit_code == 4 and "NVML found no usable GPU on this host" in empty.stderr


def test_gpus_register_discovered_and_declared(nvml: Any, real_url: str, namespace: str, tmp_path: Path) -> None:
    from tests import fake_nvml as fk

    nvml(fk.mixed_host())
    result = gpuboss(real_url, namespace, "gpus", "register", "--reserve-gb", "1")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"registered 3 GPUs: {fk.RTX3090}, {fk.T4}, {fk.RTX4090}")
    data = json.loads(gpuboss(real_url, namespace, "--json", "gpus").stdout)
    assert sorted(g["id"] for g in data) == sorted([fk.RTX3090, fk.T4, fk.RTX4090])
    assert {g["reserve_mib"] for g in data} == {1024}
    listed = gpuboss(real_url, namespace, "gpus").stdout
    assert "T4" in listed and "15.0 GB" in listed
    conflict = gpuboss(real_url, namespace, "gpus", "register", "--reserve-gb", "2")
    assert conflict.exit_code == 1 and "auto_reserve_gb" in conflict.stderr and "--update" in conflict.stderr
    updated = gpuboss(real_url, namespace, "gpus", "register", "--reserve-gb", "2", "--update")
    assert updated.exit_code == 0, updated.output
    assert sum(line.startswith("resized ") for line in updated.stdout.splitlines()) == 3
    assert {g["reserve_mib"] for g in json.loads(gpuboss(real_url, namespace, "--json", "gpus").stdout)} == {2048}

    config = tmp_path / "config.yaml"
    config.write_text(f"namespace: {namespace}-decl\ngpus: [{{id: gpu7, name: L4, vram_gb: 24, index: 0}}]\n")
    declared = CliRunner().invoke(cli, ["--redis-url", real_url, "--config", str(config), "gpus", "register"])
    assert declared.exit_code == 0, declared.output
    assert declared.stdout.startswith("registered 1 GPU: gpu7")
    assert [g["id"] for g in json.loads(gpuboss(real_url, f"{namespace}-decl", "--json", "gpus").stdout)] == ["gpu7"]
    both = CliRunner().invoke(cli, ["--config", str(config), "gpus", "register", "--reserve-gb", "1"])
    assert both.exit_code == 1 and "--reserve-gb applies to discovered GPUs" in both.stderr

    off = tmp_path / "off.yaml"
    off.write_text("gpu_discovery: 'off'\n")
    refused = CliRunner().invoke(cli, ["--redis-url", real_url, "--config", str(off), "gpus", "register"])
    assert refused.exit_code == 1 and "nothing to register" in refused.stderr


def test_profile(tmp_path: Path) -> None:
    from gpuboss.profiles import default_profiles

    one = CliRunner().invoke(cli, ["profile", "NVIDIA GeForce RTX 4090"])
    assert one.exit_code == 0, one.output
    lines = one.stdout.splitlines()
    assert lines[0].split() == ["name", "RTX", "4090"] and lines[3].split() == ["compute", "capability", "8.9"]
    assert "24.0 GB (24576 MiB)" in one.stdout and "fp8" in one.stdout
    data = json.loads(CliRunner().invoke(cli, ["--json", "profile", "RTX 4090"]).stdout)
    assert (data["name"], data["compute_capability"], data["vram_gb"]) == ("RTX 4090", "8.9", 24)

    unknown = CliRunner().invoke(cli, ["profile", "RTX 4091"])
    assert unknown.exit_code == 1 and unknown.stdout == ""
    (line,) = unknown.stderr.strip().splitlines()
    assert line.startswith("gpuboss: error: invalid gpu='RTX 4091': unknown GPU model; did you mean 'RTX 4090'")

    listed = json.loads(CliRunner().invoke(cli, ["--json", "profile", "--list"]).stdout)
    assert [p["name"] for p in listed] == default_profiles().names()
    text = CliRunner().invoke(cli, ["profile", "--list"]).stdout
    assert text.startswith(f"GPU profiles ({len(listed)})") and "RTX 4090" in text

    mine = tmp_path / "mine.yaml"
    mine.write_text(
        'profiles:\n  - {name: Bolt 9, architecture: ada, compute_capability: "8.9", vram_gb: 48, max_batch_hint: 32}\n'
    )
    found = json.loads(CliRunner().invoke(cli, ["--json", "profile", "bolt 9", "--file", str(mine)]).stdout)
    assert (found["name"], found["vram_gb"], found["fp8"]) == ("Bolt 9", 48, True)
    for args in (["profile"], ["profile", "RTX 4090", "--list"]):
        bad = CliRunner().invoke(cli, args)
        assert bad.exit_code == 1 and "NAME" in bad.stderr


# ---------------------------------------------------------------- a lease over several GPUs; operator output


def test_a_lease_over_two_gpus_counts_on_each_gpu(real_url: str, namespace: str) -> None:
    from gpuboss.metrics import gpu_metrics
    from gpuboss.snapshot import read_namespace

    boss = GPUBoss(real_url, namespace=namespace, gpus=GPUS2, service="tp")
    lease = boss.acquire(vram_gb=4, gpus=2, ttl=60)
    try:
        data = {g["id"]: g for g in json.loads(gpuboss(real_url, namespace, "--json", "gpus").stdout)}
        assert (data["gpu0"]["leases"], data["gpu1"]["leases"]) == (1, 1)
        assert (data["gpu0"]["used_mib"], data["gpu1"]["used_mib"]) == (2048, 2048)  # the total, split
        text = gpuboss(real_url, namespace, "gpus").stdout
        for gpu in ("gpu0", "gpu1"):
            row = next(x for x in text.splitlines() if x.strip().startswith(gpu))
            assert row.split()[-1] == "1", row
        for gpu in ("gpu0", "gpu1", "cuda:1"):
            found = json.loads(gpuboss(real_url, namespace, "--json", "leases", "--gpu", gpu).stdout)
            assert [r["id"] for r in found] == [lease.id], gpu
        row = next(x for x in gpuboss(real_url, namespace, "leases").stdout.splitlines() if lease.id[:8] in x)
        shown = "+".join(lease.gpus)  # its GPUs in the lease's order (the first is its `gpu`)
        assert sorted(lease.gpus) == ["gpu0", "gpu1"] and row.split()[1:4] == ["tp", "normal", shown]
        status = gpuboss(real_url, namespace, "status").stdout
        assert shown in status
        client = raw_client(real_url)
        snap = read_namespace(client, Keys(namespace), real_url, 5.0)
        client.close()
        counts = {
            s.labels["gpu"]: s.value
            for family in gpu_metrics(snap)
            for s in family.samples
            if s.name == "gpuboss_gpu_leases"
        }
        assert counts == {"gpu0": 1, "gpu1": 1}
        # watch --gpu: the lease's events name its first GPU only; the lease's record names the rest
        watched = gpuboss(real_url, namespace, "--json", "watch", "--since", "10m", "--gpu", "gpu1", "--timeout", "0.5")
        seen = [json.loads(x) for x in watched.stdout.splitlines()]
        assert [e["type"] for e in seen if e.get("lease") == lease.id] == ["granted"]
    finally:
        boss.release(lease)
        boss.close()


def _expired_leases(real_url: str, namespace: str, ids: list[str]) -> Any:
    """Leases past their expiry whose holder is gone (a script call with no boss to renew them)."""
    core = Core(BossConfig(namespace=namespace, gpus=GPUS2))
    client = raw_client(real_url)
    register = core.register_call()
    assert register is not None
    call_script_sync(client, register)
    for n, lease_id in enumerate(ids):
        call_script_sync(client, core.acquire_call(lease_id, core.make_request(1 + n, ttl=0.1), "gpu0", f"ghost{n}"))
    time.sleep(0.2)
    return client


def test_release_expired_reports_every_lease_it_collected(real_url: str, namespace: str) -> None:
    ids = ["stale0001", "stale0002", "stale0003"]
    client = _expired_leases(real_url, namespace, ids)
    result = gpuboss(real_url, namespace, "release", "--expired", "--yes")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and all("had expired: collected" in x for x in lines), lines
    assert "already gone" not in result.stdout
    assert client.hlen(f"{namespace}:leases") == 0

    ids2 = ["stale0004", "stale0005"]
    _expired_leases(real_url, namespace, ids2).close()
    data = json.loads(gpuboss(real_url, namespace, "--json", "release", *ids2).stdout)
    assert [(r["id"], r["result"]) for r in data] == [(i, "expired") for i in ids2]
    client.close()


@pytest.mark.parametrize("args", [[], ["server"], ["config"]])
def test_a_bare_group_prints_its_help(args: list[str]) -> None:
    result = CliRunner().invoke(cli, args, prog_name="gpuboss")
    assert result.exit_code == (2 if hasattr(click.exceptions, "NoArgsIsHelpError") else 0)
    assert result.stdout.startswith(" ".join(["Usage: gpuboss", *args, "[OPTIONS] COMMAND"]))
    assert "\n\nCommands:\n" in result.stdout  # whole, on its lines
    assert "error" not in result.stderr
    if not args:
        done = subprocess.run([str(GPUBOSS)], capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == result.exit_code and done.stdout.startswith("Usage: gpuboss [OPTIONS]")
        assert done.stderr == ""


def test_config_check_of_discovered_gpus(tmp_path: Path) -> None:
    auto = tmp_path / "auto.yaml"
    auto.write_text("gpus: auto\nauto_reserve_gb: 1\n")
    result = CliRunner().invoke(cli, ["config", "check", str(auto)])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stdout.splitlines() if x.startswith("GPUs:"))
    assert "discovered through NVML at first use" in line and "reserve 1.0 GB" in line
    assert "others registered" not in line
    off = tmp_path / "off.yaml"
    off.write_text("gpu_discovery: off\n")  # unquoted: YAML's false
    result = CliRunner().invoke(cli, ["config", "check", str(off)])
    assert result.exit_code == 0, result.output
    assert "GPUs: none declared, discovery off" in result.stdout
    default = CliRunner().invoke(cli, ["config", "check", str(tmp_path / "none.yaml")], catch_exceptions=False)
    assert default.exit_code == 1
    (tmp_path / "none.yaml").write_text("namespace: x\n")
    default = CliRunner().invoke(cli, ["config", "check", str(tmp_path / "none.yaml")])
    assert "discovered through NVML at first use where NVML works" in default.stdout


def test_event_lines_say_who_and_leave_out_a_gpu_they_have_none_of() -> None:
    from gpuboss.cli import format_event
    from gpuboss.events import Event

    def line(**fields: Any) -> str:
        base = {"time": 1_700_000_000_000, "lease": None, "gpu": None, "service": None, "priority": None}
        return format_event(Event.from_json(json.dumps({**base, **fields})))

    paused = line(type="paused", priority="low", by="alice@box")
    assert paused.endswith("low -  by alice@box") and "GPU" not in paused
    assert line(type="unpaused", priority="low", by="bob@box").endswith("by bob@box")
    lost = line(type="lost", lease="abcdef0123")
    assert "GPU" not in lost and lost.split()[2] == "abcdef01"
    assert "GPU" not in line(type="policy_changed")
    queued = line(type="queued", lease="abcdef0123", service="api", priority="normal", vram_mib=1024, ahead=0)
    assert "on any GPU" in queued  # a request pinned to no GPU
    revoked = line(type="revoked", lease="abcdef0123", gpu="gpu0", by="carol@box", reason="stuck")
    assert "on gpu0" in revoked and revoked.endswith("by carol@box, reason: stuck")
    evict = line(type="evict_requested", lease="abcdef0123", gpu="gpu0", by="feedbeef99")
    assert "for feedbeef" in evict and "by feedbeef" not in evict


def test_priority_filters_take_custom_classes(real_url: str, namespace: str, tmp_path: Path) -> None:
    classes = {"batch": 0, "normal": 1, "interactive": 2}
    boss = GPUBoss(real_url, namespace=namespace, gpus=GPUS2, service="chat", priorities=classes, preemptible=["batch"])
    lease = boss.acquire(2, priority="interactive", ttl=60)
    try:
        found = json.loads(gpuboss(real_url, namespace, "--json", "leases", "--priority", "interactive").stdout)
        assert [r["id"] for r in found] == [lease.id]  # known from the lease itself
        unknown = gpuboss(real_url, namespace, "leases", "--priority", "batch")  # no config says so here
        assert unknown.exit_code == 1 and "--priority 'batch': no such priority class" in unknown.stderr
        assert "interactive" in unknown.stderr
        config = tmp_path / "config.yaml"
        config.write_text(
            f"namespace: {namespace}\npriorities: {{batch: 0, normal: 1, interactive: 2}}\npreemptible: [batch]\n"
        )
        for command in ("leases", "queue"):
            args = ["--redis-url", real_url, "--config", str(config), "--json", command, "--priority", "batch"]
            result = CliRunner().invoke(cli, args)
            assert result.exit_code == 0, result.output
            assert json.loads(result.stdout) == []
        wrong = gpuboss(real_url, namespace, "queue", "--priority", "urgent")
        assert wrong.exit_code == 1 and "urgent" in wrong.stderr
    finally:
        boss.release(lease)
        boss.close()
