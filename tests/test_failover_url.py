"""Writes a server refuses for its role: a failover behind a plain URL's host name, and ``min-replicas-to-write``.

A managed Redis (and a proxy or load balancer in front of one) fails over by sending new connections to the
promoted replica, while the connections already open stay with the old primary, which the failover made a
replica of the new one: it refuses every write with ``READONLY``. Before gpuboss dropped such connections
(``gpuboss/redis_io.py`` ``ReplicaAware``), a process kept them: every acquire failed with redis-py's
``ReadOnlyError``, and its heartbeat's renewals failed round after round (a trace each), so its leases
expired on the new primary while it still used the GPU, until the process restarted.

Here a TCP proxy (``bench/proxy.py``) stands for the host name: the failover points it at the replica, promotes
the replica and makes the old primary a replica of it, as a managed Redis does.

A primary configured with ``min-replicas-to-write`` refuses writes with ``NOREPLICAS`` while its replicas are out
of reach (docs/topologies.md advises it against lost writes). gpuboss raised that as a raw ``ResponseError``;
now a call is retried through it like any outage, and raises ``RedisUnavailable`` saying why once its time is up.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from bench.proxy import Proxy
from gpuboss import AsyncGPUBoss, GPUBoss, Keys, Lease, RedisUnavailable
from gpuboss.server import RedisProcess

from tests.conftest import GPUS
from tests.topologies import client, free_port, start_node, stop_all, wait_until
from tests.workers import live_in_redis

pytestmark = pytest.mark.slow


@dataclass
class Pair:
    """A primary and its replica, and a proxy whose new connections go to whichever ``url`` names."""

    old: RedisProcess
    new: RedisProcess
    proxy: Proxy

    @property
    def url(self) -> str:
        return self.proxy.url

    def replicated(self) -> None:
        """Wait until the replica has every write the primary acknowledged so far."""
        assert client(self.old.port).wait(1, 5000) == 1

    def fail_over(self) -> None:
        """New connections to the replica, promoted; the old primary made its replica (READONLY from now on)."""
        self.replicated()
        self.proxy.target_port = self.new.port
        client(self.new.port).replicaof("NO", "ONE")
        client(self.old.port).replicaof("127.0.0.1", self.new.port)
        with pytest.raises(redis.exceptions.ReadOnlyError):
            client(self.old.port).set("gpuboss-test:probe", "1")


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    fast_sync = ["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
    old_port, new_port = free_port(), free_port()
    nodes = [start_node(tmp_path / "old", old_port, fast_sync)]
    try:
        nodes.append(start_node(tmp_path / "new", new_port, [*fast_sync, "--replicaof", "127.0.0.1", str(old_port)]))
        wait_until(
            lambda: client(new_port).info("replication").get("master_link_status") == "up", 20, "the replica in sync"
        )
        proxy = Proxy("127.0.0.1", old_port).start()
        try:
            yield Pair(nodes[0], nodes[1], proxy)
        finally:
            proxy.stop()
    finally:
        stop_all(nodes)


def test_a_boss_carries_on_through_a_failover_behind_its_url(
    pair: Pair, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    boss = GPUBoss(pair.url, namespace=namespace, gpus=GPUS, service="dns")
    try:
        held = boss.acquire(vram_gb=4, ttl=1.5)
        pair.fail_over()
        caplog.clear()
        time.sleep(3.5)  # over twice its TTL: renewed on the new primary, through new connections
        assert not held.lost
        assert live_in_redis(boss, held)
        assert "round failed" not in caplog.text  # (no trace per heartbeat round)
        more = boss.acquire(vram_gb=2, timeout=5)
        assert live_in_redis(boss, more)
        assert boss.release(more) and boss.release(held)
        assert client(pair.new.port).hlen(Keys(namespace).leases) == 0
    finally:
        boss.close()


def test_an_async_boss_carries_on_through_a_failover_behind_its_url(pair: Pair, namespace: str) -> None:
    async def main() -> None:
        boss = AsyncGPUBoss(pair.url, namespace=namespace, gpus=GPUS, service="dns-async")
        try:
            held = await boss.acquire(vram_gb=4, ttl=1.5)
            pair.fail_over()
            more = await asyncio.wait_for(boss.acquire(vram_gb=2, timeout=5), 10)
            await asyncio.sleep(2.5)
            assert not held.lost and live_in_redis(boss, held) and live_in_redis(boss, more)
            assert await boss.release(more) and await boss.release(held)
            assert client(pair.new.port).hlen(Keys(namespace).leases) == 0
        finally:
            await boss.close()

    asyncio.run(main())


def test_a_url_that_names_a_replica_is_unavailable_with_the_reason(pair: Pair, namespace: str) -> None:
    """A URL left pointing at a replica: the call is retried for ``connect_timeout`` and then says why."""
    pair.replicated()
    replica_url = f"redis://127.0.0.1:{pair.new.port}/0"
    boss = GPUBoss(replica_url, namespace=namespace, gpus=GPUS, connect_timeout=1)
    try:
        t0 = time.monotonic()
        with pytest.raises(RedisUnavailable, match="Redis answered READONLY, as a read-only replica") as err:
            boss.acquire(vram_gb=1, timeout=0)
        assert 0.5 < time.monotonic() - t0 < 10
        assert "the primary moved (a failover behind the URL's host name), or the URL names a replica" in str(err.value)
    finally:
        boss.close()


def refuses_writes(node: RedisProcess) -> bool:
    try:
        client(node.port).set("gpuboss-test:probe", "1")
    except redis.exceptions.ResponseError as err:
        return str(err).startswith("NOREPLICAS ")
    return False


def test_a_request_waits_while_the_primary_has_too_few_replicas(pair: Pair, namespace: str) -> None:
    """The replica stopped (SIGSTOP) past ``min-replicas-max-lag``: the primary refuses writes; a request with
    ``on_redis_down: wait`` waits through it and is granted once the replica is back; the lease held meanwhile
    is kept (its TTL is longer than the outage)."""
    primary = client(pair.old.port)
    primary.config_set("min-replicas-max-lag", 1)
    primary.config_set("min-replicas-to-write", 1)
    boss = GPUBoss(pair.url, namespace=namespace, gpus=GPUS, on_redis_down="wait", connect_timeout=20)
    got: list[Lease | BaseException] = []

    def request() -> None:
        try:
            got.append(boss.acquire(vram_gb=2, timeout=20))
        except BaseException as err:  # noqa: BLE001  # handed to the test, which fails with it
            got.append(err)

    try:
        held = boss.acquire(vram_gb=4, ttl=10)
        waiter = threading.Thread(target=request)
        os.kill(pair.new.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: refuses_writes(pair.old), 15, "the primary refusing writes (NOREPLICAS)")
            waiter.start()
            time.sleep(1.5)
            assert waiter.is_alive() and not got, got  # waiting through it, not failed
        finally:
            os.kill(pair.new.pid, signal.SIGCONT)
        waiter.join(25)
        assert len(got) == 1 and isinstance(got[0], Lease), got
        assert not held.lost and boss.release(got[0]) and boss.release(held)
        assert primary.hlen(Keys(namespace).leases) == 0
    finally:
        os.kill(pair.new.pid, signal.SIGCONT)
        boss.close()


def test_a_primary_that_refuses_writes_is_unavailable_with_the_reason(pair: Pair, namespace: str) -> None:
    """Two replicas asked for, one there: every write refused; ``connect_timeout`` bounds the retries."""
    client(pair.old.port).config_set("min-replicas-to-write", 2)
    boss = GPUBoss(pair.url, namespace=namespace, gpus=GPUS, connect_timeout=1)
    try:
        with pytest.raises(RedisUnavailable, match="Redis refused the write with NOREPLICAS") as err:
            boss.acquire(vram_gb=1, timeout=0)
        assert "fewer replicas in reach than its min-replicas-to-write" in str(err.value)
    finally:
        boss.close()
