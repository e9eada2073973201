"""gpuboss through Redis Sentinel (``redis+sentinel://``): a real primary, one replica and three Sentinels,
started once for this module; the primary is killed (SIGKILL) while services lease, and they carry on on
the promoted replica without ever over-committing a GPU.

Replication is asynchronous, so a failover can lose the last writes the old primary acknowledged: a lease
granted there is then gone on the new primary, and its holder's heartbeat reports it through ``on_lost``
(``docs/topologies.md``). The failover test makes that happen on purpose, to one lease.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from click.testing import CliRunner
from gpuboss import AsyncGPUBoss, ConfigError, GPUBoss, Keys, Lease, events
from gpuboss.cli import cli
from gpuboss.errors import RedisUnavailable
from gpuboss.redis_io import TRANSIENT, _sentinel_kwargs, connect_sync
from gpuboss.topology import parse_url

from tests.conftest import GPUS
from tests.topologies import SentinelSetup, check_invariants, client, start_sentinel_setup, wait_until

#: Longer than a failover takes here (about 2-3 s): calls retry through it instead of failing.
FAILOVER_TIMEOUT = 15.0
#: The workers' requests wait for the new primary (the default, "error", answers RedisUnavailable at once).
ON_REDIS_DOWN = "wait"


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSetup]:
    setup = start_sentinel_setup(tmp_path_factory.mktemp("sentinel"))
    yield setup
    setup.stop()


# ---------------------------------------------------------------- URLs


def test_sentinel_url_forms() -> None:
    target = parse_url("redis+sentinel://:s3cret@10.0.0.1:26379,10.0.0.2,[::1]:26380/mymaster/2")
    assert target.kind == "sentinel" and not target.tls
    assert target.endpoints == (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("::1", 26380))
    assert (target.service, target.db, target.password) == ("mymaster", 2, "s3cret")
    assert "s3cret" not in repr(target)
    assert parse_url("rediss+sentinel://h:1/m?ssl_cert_reqs=none").tls_kwargs() == {
        "ssl": True,
        "ssl_cert_reqs": "none",
    }


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+sentinel://:pw@h:26379", "service name"),
        ("redis+sentinel://:pw@h:26379/m/x", "service name"),
        ("redis+sentinel://:pw@h:99999/m", "port"),
        ("redis+sentinel://:pw@h:1/m?ssl_cert_reqs=none", "needs TLS: use rediss\\+sentinel://"),
        ("redis+sentinel://:pw@h:1/m?sentinel_password=pw", "unknown option 'sentinel_password'"),
        ("redis+sentinal://:pw@h:1/m", "unknown scheme"),
    ],
)
def test_bad_sentinel_urls_are_config_errors_without_the_password(url: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as err:
        GPUBoss(url, gpus=GPUS)
    assert "redis_url" in str(err.value) and "pw" not in str(err.value).replace("password", "")


def test_sentinels_get_the_credentials_only_when_asked() -> None:
    plain = _sentinel_kwargs(parse_url("redis+sentinel://user:pw@h:1/m"), 5.0)
    asked = _sentinel_kwargs(parse_url("redis+sentinel://user:pw@h:1/m?sentinel_auth=yes"), 5.0)
    assert "password" not in plain and "username" not in plain
    assert (asked["username"], asked["password"]) == ("user", "pw")


# ---------------------------------------------------------------- leases through the Sentinels


def test_sync_async_cli_and_events_through_sentinel(sentinel: SentinelSetup) -> None:
    ns = f"s{uuid.uuid4().hex[:8]}"
    url = sentinel.url()
    boss = GPUBoss(url, namespace=ns, gpus=GPUS, service="sync")
    with events.subscribe(url, ns) as sub:
        with boss.lease(vram_gb=4) as device:
            assert device.startswith("cuda:")
            status = CliRunner().invoke(cli, ["--redis-url", url, "--namespace", ns, "--json", "status"])
            assert status.exit_code == 0, status.output
            assert [x["id"] for x in json.loads(status.stdout)["leases"]] == [device.lease.id]

        async def async_side() -> None:
            aboss = AsyncGPUBoss(url, namespace=ns, gpus=GPUS, service="async")
            async with aboss.lease(vram_gb=2):
                pass
            await aboss.close()

        asyncio.run(async_side())
        types = []
        while types.count("released") < 2 and (event := sub.get(timeout=5)) is not None:
            types.append(event.type)
    assert types.count("granted") == 2 and types.count("released") == 2, types
    boss.close()


class Worker(threading.Thread):
    """Leases and releases random sizes at random priorities until told to stop; remembers every grant."""

    def __init__(self, url: str, ns: str, name: str) -> None:
        super().__init__(daemon=True, name=name)
        self.boss = GPUBoss(
            url, namespace=ns, gpus=GPUS, service=name, connect_timeout=FAILOVER_TIMEOUT, on_redis_down=ON_REDIS_DOWN
        )
        self.grants: list[tuple[float, Lease]] = []
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.rng = random.Random(name)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                lease = self.boss.acquire(
                    self.rng.randint(1, 12), priority=self.rng.choice(["low", "normal", "high"]), ttl=4, timeout=30
                )
                self.grants.append((time.monotonic(), lease))
                time.sleep(self.rng.uniform(0, 0.03))
                self.boss.release(lease)
            except RedisUnavailable as err:
                self.errors.append(err)


class AsyncWorker(Worker):
    def run(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        boss = AsyncGPUBoss(
            self.boss.url,
            namespace=self.boss.namespace,
            gpus=GPUS,
            connect_timeout=FAILOVER_TIMEOUT,
            on_redis_down=ON_REDIS_DOWN,
        )
        while not self.stop.is_set():
            try:
                lease = await boss.acquire(self.rng.randint(1, 12), ttl=4, timeout=30)
                self.grants.append((time.monotonic(), lease))
                await asyncio.sleep(self.rng.uniform(0, 0.03))
                await boss.release(lease)
            except RedisUnavailable as err:
                self.errors.append(err)
        await boss.close()


class Observer(threading.Thread):
    """Checks the books through the Sentinels every few milliseconds; keeps whatever is wrong."""

    def __init__(self, url: str, ns: str) -> None:
        super().__init__(daemon=True, name="observer")
        self.url, self.ns = url, ns
        self.problems: list[str] = []
        self.checks = 0
        self.stop = threading.Event()

    def run(self) -> None:
        c = connect_sync(self.url, 2.0, socket_timeout=2.0)
        while not self.stop.wait(0.02):
            try:
                self.problems += check_invariants(c, self.ns)
                self.checks += 1
            except TRANSIENT:
                continue  # no primary right now
        c.close()


class Listener(threading.Thread):
    """Subscribes through the Sentinels and notes when each event arrived."""

    def __init__(self, url: str, ns: str) -> None:
        super().__init__(daemon=True, name="listener")
        self.sub = events.subscribe(url, ns, connect_timeout=FAILOVER_TIMEOUT)
        self.seen: list[tuple[float, str]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            event = self.sub.get(timeout=0.2)
            if event is not None:
                self.seen.append((time.monotonic(), event.type))
        self.sub.close()


def test_clients_carry_on_through_a_failover(sentinel: SentinelSetup) -> None:
    ns = f"f{uuid.uuid4().hex[:8]}"
    url = sentinel.url()
    workers: list[Worker] = [Worker(url, ns, f"sync{i}") for i in range(3)]
    workers.append(AsyncWorker(url, ns, "async0"))
    observer, listener = Observer(url, ns), Listener(url, ns)
    lost = threading.Event()
    doomed_boss = GPUBoss(url, namespace=ns, gpus=GPUS, service="doomed", connect_timeout=FAILOVER_TIMEOUT)
    for thread in (*workers, observer, listener):
        thread.start()
    try:
        wait_until(lambda: all(len(w.grants) >= 5 for w in workers), 30, "grants before the failover")
        old_primary, replica = sentinel.primary, sentinel.replica

        # Cut the replica off, so that what the primary writes from now on is lost in the failover ...
        os.kill(replica.pid, signal.SIGSTOP)
        try:
            client(old_primary.port).client_kill_filter(_type="replica")
            doomed = doomed_boss.acquire(1, ttl=3, on_lost=lambda _lease: lost.set())
            assert doomed.id in client(old_primary.port).hgetall(Keys(ns).leases)
            sentinel.kill_primary()  # SIGKILL by PID
            killed_at = time.monotonic()
        finally:
            os.kill(replica.pid, signal.SIGCONT)
        wait_until(lambda: sentinel.master_port() == replica.port, 30, "the Sentinels to promote the replica")
        promoted_at = time.monotonic()
        sentinel.primary, sentinel.replica = replica, old_primary

        # ... and the services carry on there: new leases for everyone, sync and async.
        wait_until(lambda: all(sum(t > promoted_at for t, _ in w.grants) >= 5 for w in workers), 60, "grants after it")
        # The lease whose grant the failover lost: its holder learns it through on_lost.
        assert lost.wait(30), "on_lost was not called for the lease the failover lost"
        assert doomed.lost and doomed.id not in client(replica.port).hgetall(Keys(ns).leases)
        wait_until(lambda: any(t > promoted_at and kind == "granted" for t, kind in listener.seen), 30, "live events")
        status = CliRunner().invoke(cli, ["--redis-url", url, "--namespace", ns, "--json", "status"])
        assert status.exit_code == 0, status.output
    finally:
        for thread in (*workers, observer, listener):
            thread.stop.set()
        for thread in (*workers, observer, listener):
            thread.join(timeout=30)
        for w in workers:
            w.boss.close()
        doomed_boss.close()

    assert [e for w in workers for e in w.errors] == []
    assert observer.problems == [] and observer.checks > 0
    assert killed_at < promoted_at
    # Every lease ends: released by its holder, or (a release the failover lost) expired after its TTL.
    final, collector = connect_sync(url, 5.0), GPUBoss(url, namespace=ns, gpus=GPUS)
    keys = Keys(ns)

    def settled() -> bool:
        collector.collect()
        return not final.hgetall(keys.leases) and all(v == "0" for v in final.hgetall(keys.used).values())

    wait_until(settled, 15, "every lease to be released or expired")
    collector.close()
    final.close()


def test_sentinel_pointing_nowhere_is_unavailable_with_a_clear_message() -> None:
    boss = GPUBoss("redis+sentinel://127.0.0.1:1/nobody", gpus=GPUS, connect_timeout=0.3)
    with pytest.raises(RedisUnavailable, match="unreachable") as err:
        boss.acquire(1, timeout=0)
    assert "redis+sentinel://127.0.0.1:1/nobody" in str(err.value)
    boss.close()
