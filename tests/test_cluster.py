"""gpuboss on a real three-primary Redis Cluster (``redis+cluster://``), started once for this module.

Every key of a namespace must live in one hash slot, so a namespace on a cluster carries a hash tag
(``{gpuboss}``): the scripts' declared keys, the wake lists they build from a prefix and the event channel
then all hash alike, and redis-py routes each EVALSHA by its first key. The core API tests of
``test_api.py`` run here again, on the cluster, through this module's ``backend_url`` and ``namespace``.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from gpuboss import AsyncGPUBoss, ConfigError, GPUBoss, Keys, events, redis_io
from gpuboss.cli import cli
from gpuboss.redis_io import connect_sync
from gpuboss.topology import check_cluster_namespace, hash_tag, parse_url

from tests.conftest import GPUS, namespace_keys
from tests.test_api import (  # noqa: F401 - collected here again: the core tests, on the cluster
    test_async_cancel_inside_block_releases,
    test_async_lease_and_handoff,
    test_async_on_lost_coroutine_runs_on_the_loop,
    test_async_timeout_and_cancel_leave_nothing,
    test_best_fit_and_pins,
    test_cancelled_release_still_lands,
    test_close_releases_held_leases,
    test_conflicting_gpu_declaration_is_an_error,
    test_expired_lease_goes_to_waiters,
    test_fencing_tokens_strictly_increase,
    test_grant_that_races_the_timeout_is_released,
    test_inspection_record_and_no_key_leak,
    test_keyboard_interrupt_in_block_releases,
    test_lease_block_yields_device_string_and_releases,
    test_lost_lease_is_reported_and_raises_at_block_end,
    test_never_over_commit_queues_when_full,
    test_priority_then_fifo_order,
    test_request_that_never_fits_fails_at_once,
    test_reserve_is_never_leased,
    test_timeout_leaves_no_queue_entry,
    test_timeout_zero_tries_once_without_queueing,
    test_times_come_from_redis,
    test_vram_is_integer_mib_rounded_up,
    test_waiter_is_handed_capacity_by_the_release,
)
from tests.topologies import ClusterSetup, check_invariants, client, redis_62, start_cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSetup]:
    setup = start_cluster(tmp_path_factory.mktemp("cluster"))
    yield setup
    setup.stop()


@pytest.fixture
def backend_url(cluster: ClusterSetup) -> str:
    """Overrides the conftest's: every boss of this module talks to the cluster."""
    return cluster.url


@pytest.fixture
def namespace() -> str:
    """Overrides the conftest's: a namespace with a hash tag, as a cluster needs."""
    return f"{{t{uuid.uuid4().hex[:10]}}}"


@pytest.fixture
def rc(cluster: ClusterSetup) -> Iterator[redis.Redis]:
    c = connect_sync(cluster.url, 5.0)
    yield c
    c.close()


def tag_on(cluster: ClusterSetup, rc: redis.Redis, port: int) -> str:
    """A namespace whose slot the node on ``port`` serves."""
    for _ in range(1000):
        ns = f"{{n{uuid.uuid4().hex[:8]}}}"
        if cluster.owner(rc.keyslot(Keys(ns).gpus)) == port:
            return ns
    raise AssertionError(f"no namespace found for the node on port {port}")


# ---------------------------------------------------------------- URLs and namespaces


def test_cluster_url_forms() -> None:
    target = parse_url("redis+cluster://:pw@10.0.0.1:7000,10.0.0.2:7001")
    assert (target.kind, target.tls, target.endpoints, target.password) == (
        "cluster",
        False,
        (("10.0.0.1", 7000), ("10.0.0.2", 7001)),
        "pw",
    )
    assert parse_url("rediss+cluster://node:7000?ssl_cert_reqs=none").tls_kwargs() == {
        "ssl": True,
        "ssl_cert_reqs": "none",
    }
    with pytest.raises(ConfigError, match="only database 0"):
        parse_url("redis+cluster://node:7000/3")


@pytest.mark.parametrize("ns", ["{gpuboss}", "prod{gpus}", "{a}{b}", "x{y}z"])
def test_namespace_with_a_hash_tag_is_accepted(ns: str) -> None:
    check_cluster_namespace(ns)
    assert hash_tag(ns)


@pytest.mark.parametrize("ns", ["gpuboss", "{}gpuboss", "gpuboss{", "gpu}boss{"])
def test_namespace_without_a_hash_tag_is_rejected_on_a_cluster(cluster: ClusterSetup, rc: redis.Redis, ns: str) -> None:
    with pytest.raises(ConfigError, match=r"namespace.*hash tag.*e\.g\. namespace: '\{") as err:
        GPUBoss(cluster.url, namespace=ns, gpus=GPUS)
    assert "namespace" in str(err.value)
    with pytest.raises(ConfigError, match="hash tag"):
        events.subscribe(cluster.url, ns)
    result = CliRunner().invoke(cli, ["--redis-url", cluster.url, "--namespace", ns, "status"])
    assert result.exit_code == 1 and "hash tag" in result.output
    assert namespace_keys(rc, ns.replace("{", "?").replace("}", "?")) == set()  # nothing written anywhere


def test_the_same_namespace_is_fine_on_one_server(real_url: str) -> None:
    boss = GPUBoss(real_url, namespace=f"plain{uuid.uuid4().hex[:6]}", gpus=GPUS)  # no tag needed off a cluster
    boss.release(boss.acquire(1))
    boss.close()


# ---------------------------------------------------------------- routing


def test_namespaces_spread_over_the_shards(cluster: ClusterSetup, rc: redis.Redis) -> None:
    """Two namespaces whose tags hash to different nodes: each lives whole on its own node, and both work."""
    first, second = cluster.nodes[0].port, cluster.nodes[2].port
    spaces = {first: tag_on(cluster, rc, first), second: tag_on(cluster, rc, second)}
    bosses = {port: GPUBoss(cluster.url, namespace=ns, gpus=GPUS, service=f"s{port}") for port, ns in spaces.items()}
    held = {port: boss.acquire(20, timeout=5) for port, boss in bosses.items()}
    for port, ns in spaces.items():
        keys = Keys(ns)
        assert len({rc.keyslot(k) for k in [*keys.state(), *keys.event_keys(), keys.wake("x")]}) == 1
        on_node = set(client(port).keys(f"{ns}:*"))
        assert {keys.gpus, keys.used, keys.leases, keys.lease_exp} <= on_node
        for other in cluster.nodes:
            if other.port != port:
                assert client(other.port).keys(f"{ns}:*") == [], f"{ns} has keys on node {other.port}"
        assert check_invariants(rc, ns) == []
        assert json.loads(rc.hget(keys.leases, held[port].id) or "{}")["vram_mib"] == 20 * 1024
    for port, boss in bosses.items():
        assert boss.release(held[port]) is True
        boss.close()
        assert rc.hget(Keys(spaces[port]).used, "gpu0") in ("0", None)


@pytest.mark.parametrize("calls", ["auto", "evalsha"], ids=["function-flush", "script-flush"])
def test_scripts_reload_after_a_flush_on_every_node(
    cluster: ClusterSetup, rc: redis.Redis, namespace: str, calls: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_io, "SCRIPT_CALLS", calls)
    boss = GPUBoss(cluster.url, namespace=namespace, gpus=GPUS)
    boss.release(boss.acquire(1))
    if calls == "auto":
        assert all(client(n.port).function_list() for n in cluster.nodes)
        rc.function_flush()  # on every primary
        assert not any(client(n.port).function_list() for n in cluster.nodes)
    else:
        rc.script_flush()  # on every primary
        assert all(client(n.port).script_exists("0" * 40) == [False] for n in cluster.nodes)
    # Function not found -> FUNCTION LOAD / NOSCRIPT -> SCRIPT LOAD (all primaries) -> FCALL / EVALSHA
    lease = boss.acquire(2, timeout=5)
    assert boss.release(lease) is True
    if calls == "auto":
        assert all(client(n.port).function_list() for n in cluster.nodes)
    boss.close()


def test_a_redis_6_cluster_runs_the_scripts_by_evalsha(tmp_path: Path, namespace: str) -> None:
    """Redis 6.2 has no functions, and redis-py's cluster client refuses FCALL there itself (a RedisError,
    "FCALL command doesn't exist in Redis commands", not the server's "unknown command"): every call failed.
    Each client now falls back to EVALSHA on it, sync and async, as on one 6.2 server."""
    setup = start_cluster(tmp_path, binary=redis_62())
    try:
        with GPUBoss(setup.url, namespace=namespace, gpus=GPUS, service="old-cluster") as boss:
            with boss.lease(vram_gb=4) as device:
                assert device.startswith("cuda:") and device.lease.state.value == "granted"
            assert boss.release(boss.acquire(2, timeout=5)) is True

        async def main() -> None:
            async with AsyncGPUBoss(setup.url, namespace=namespace, gpus=GPUS, service="old-cluster") as aboss:
                lease = await aboss.acquire(3, timeout=5)
                assert await aboss.release(lease) is True

        asyncio.run(main())
        calls = [client(n.port).info("commandstats") for n in setup.nodes]
        assert sum(stats.get("cmdstat_evalsha", {}).get("calls", 0) for stats in calls) >= 6
        assert not any(client(n.port).keys(f"{namespace}:lease*") for n in setup.nodes)
    finally:
        setup.stop()


def test_a_plain_url_to_one_cluster_node_is_a_clear_error(cluster: ClusterSetup, rc: redis.Redis) -> None:
    ns = tag_on(cluster, rc, cluster.nodes[1].port)
    boss = GPUBoss(f"redis://127.0.0.1:{cluster.nodes[0].port}/0", namespace=ns, gpus=GPUS)
    with pytest.raises(ConfigError, match=r"node of a Redis Cluster.*redis\+cluster://"):
        boss.acquire(1, timeout=0)
    boss.close()


# ---------------------------------------------------------------- events and the CLI


def test_events_subscribe_on_the_cluster(cluster: ClusterSetup, namespace: str) -> None:
    """PUBLISH inside a script reaches every node of the cluster: a subscriber on any node sees the events."""
    boss = GPUBoss(cluster.url, namespace=namespace, gpus=GPUS, service="pub")
    with events.subscribe(cluster.url, namespace) as sub:
        lease = boss.acquire(3)
        boss.release(lease)
        types = []
        while "released" not in types and (event := sub.get(timeout=5)) is not None:
            types.append(event.type)
    assert "granted" in types and "released" in types, types
    replayed = events.replay(cluster.url, namespace)
    assert [e.type for e in replayed if e.lease == lease.id] == ["granted", "released"]
    boss.close()


async def test_async_events_subscribe_on_the_cluster(cluster: ClusterSetup, namespace: str) -> None:
    boss = AsyncGPUBoss(cluster.url, namespace=namespace, gpus=GPUS, service="apub")
    async with events.asubscribe(cluster.url, namespace) as sub:
        lease = await boss.acquire(3)
        await boss.release(lease)
        types = []
        while "released" not in types and (event := await sub.get(timeout=5)) is not None:
            types.append(event.type)
    assert "granted" in types and "released" in types, types
    await boss.close()
    await asyncio.sleep(0)


def test_cli_status_and_gc_on_the_cluster(cluster: ClusterSetup, namespace: str) -> None:
    boss = GPUBoss(cluster.url, namespace=namespace, gpus=GPUS, service="cli")
    lease = boss.acquire(5)
    base = ["--redis-url", cluster.url, "--namespace", namespace]
    status = CliRunner().invoke(cli, [*base, "--json", "status"])
    assert status.exit_code == 0, status.output
    snap = json.loads(status.stdout)
    assert [x["id"] for x in snap["leases"]] == [lease.id]
    assert CliRunner().invoke(cli, [*base, "gc"]).exit_code == 0
    assert CliRunner().invoke(cli, [*base, "health"]).exit_code == 0
    boss.release(lease)
    boss.close()
