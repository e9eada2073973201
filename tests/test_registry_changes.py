"""Changing a namespace's registry: registering GPUs again with the sizes declared now
(``register_gpus(update=True)``, ``gpuboss gpus register --update``, lua/reregister-21.lua) and taking GPUs that
are gone out of it (``unregister_gpus``, ``gpuboss gpus remove``, lua/unregister-21.lua), on every backend. A GPU
keeps its leases, hands what it gains to the queue at once, and never shrinks or goes while that would take
memory from a lease or leave a waiting request with no GPU that could hold it (then nothing changes)."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from gpuboss import ConfigError, GPUBoss, InsufficientCapacity, InvalidRequest, Keys, Lease, LeaseTimeout, events
from gpuboss.aio import AsyncGPUBoss
from gpuboss.cli import cli
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from tests.conftest import raw_client, snapshot
from tests.test_inventory_wiring import wait_until

pytestmark = pytest.mark.valkey  # (a script of its own: on valkey and by EVALSHA too)

GB = 1024
#: A TTL long enough that no heartbeat renews a waiter between two snapshots of a test.
LONG_TTL = 300


def decl(vram_gb: float = 24, reserve_gb: float = 0, gpu: str = "gpu0", index: int = 0) -> dict[str, Any]:
    return {"id": gpu, "name": "L4", "vram_gb": vram_gb, "index": index, "reserve_gb": reserve_gb}


#: Two 24 GB GPUs, gpu0 and gpu1.
TWO = (decl(gpu="gpu0"), decl(gpu="gpu1", index=1))


@pytest.fixture
def made(backend_url: str, namespace: str) -> Iterator[list[GPUBoss]]:
    bosses: list[GPUBoss] = []
    yield bosses
    for b in bosses:
        b.close()


def boss_of(made: list[GPUBoss], url: str, namespace: str, *gpus: dict[str, Any], **settings: Any) -> GPUBoss:
    settings.setdefault("service", f"svc{len(made)}")
    b = GPUBoss(url, namespace=namespace, gpus=list(gpus) or [decl()], **settings)
    made.append(b)
    return b


def bare_boss(made: list[GPUBoss], url: str, namespace: str, service: str) -> GPUBoss:
    """A boss that declares and discovers no GPU: it uses the namespace's registry as it finds it."""
    b = GPUBoss(url, namespace=namespace, service=service, gpu_discovery="off")
    made.append(b)
    return b


def in_thread(call: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(call()), daemon=True)
    thread.start()
    return thread, out


def queued(url: str, namespace: str, n: int = 1) -> None:
    client = raw_client(url)
    wait_until(lambda: client.zcard(Keys(namespace).queue) == n, f"{n} request(s) queued")


def resized_events(url: str, namespace: str) -> list[events.Event]:
    return [e for e in events.replay(url, namespace) if e.type == "gpu_resized"]


def test_a_gpu_takes_the_sizes_declared_now_and_keeps_its_leases(
    backend_url: str, namespace: str, made: list[GPUBoss]
) -> None:
    old = boss_of(made, backend_url, namespace)
    held = old.acquire(8, timeout=0)
    new = boss_of(made, backend_url, namespace, decl(reserve_gb=2))
    with pytest.raises(ConfigError, match=r"reserve 2048 MiB.*`gpuboss gpus register --update`"):
        new.acquire(1, timeout=0)  # without update: a conflict that says what to do

    gpus = new.register_gpus(update=True)
    assert [(g.id, g.capacity_mib, g.reserve_mib, g.leasable_mib) for g in gpus] == [("gpu0", 24576, 2048, 22528)]
    client, keys = raw_client(backend_url), Keys(namespace)
    assert client.hget(keys.capacity, "gpu0") == "22528"
    assert client.hget(keys.used, "gpu0") == "8192" and client.hexists(keys.leases, held.id)
    assert client.zscore(keys.free, "gpu0") == 22528 - 8192, "the placement index has the new size"
    rest = new.acquire((22528 - 8192) / GB, timeout=0)  # exactly what is left
    with pytest.raises(LeaseTimeout):
        new.acquire(1, timeout=0)
    (ev,) = resized_events(backend_url, namespace)
    assert (ev.gpu, ev["capacity_mib"], ev["reserve_mib"]) == ("gpu0", 24576, 2048)
    assert (ev["old_capacity_mib"], ev["old_reserve_mib"], ev["leased_mib"]) == (24576, 0, 8192)

    new.register_gpus(update=True)  # the same sizes again: left alone
    assert len(resized_events(backend_url, namespace)) == 1
    assert old.release(held) and new.release(rest)


def test_a_gpu_does_not_shrink_below_what_is_leased_on_it(
    backend_url: str, namespace: str, made: list[GPUBoss]
) -> None:
    holder = boss_of(made, backend_url, namespace)
    holder.acquire(20, timeout=0)
    client = raw_client(backend_url)
    before = snapshot(client, namespace)
    smaller = boss_of(made, backend_url, namespace, decl(reserve_gb=6))
    with pytest.raises(ConfigError, match=r"'gpu0' would lease out 18432 MiB, but 20480 MiB is leased on it now"):
        smaller.register_gpus(update=True)
    assert snapshot(client, namespace) == before, "nothing written"
    smaller_still = boss_of(made, backend_url, namespace, decl(reserve_gb=4))  # 20 GB leasable: enough
    assert [g.leasable_mib for g in smaller_still.register_gpus(update=True)] == [20480]


def test_a_gpu_does_not_shrink_so_far_that_a_waiting_request_could_never_be_served(
    backend_url: str, namespace: str, made: list[GPUBoss]
) -> None:
    holder = boss_of(made, backend_url, namespace)
    held = holder.acquire(16, timeout=0)
    waiter = boss_of(made, backend_url, namespace)
    thread, got = in_thread(lambda: waiter.acquire(20, timeout=30, ttl=LONG_TTL))
    queued(backend_url, namespace)
    client = raw_client(backend_url)
    before = snapshot(client, namespace)
    smaller = boss_of(made, backend_url, namespace, decl(reserve_gb=5))  # 19 GB: holds the 16 leased, not the 20 asked
    with pytest.raises(ConfigError, match=r"shrinking 'gpu0' would leave waiting request [0-9a-f]{32} \(20480 MiB"):
        smaller.register_gpus(update=True)
    assert snapshot(client, namespace) == before, "nothing written"
    assert holder.release(held)
    thread.join(timeout=30)
    assert got and isinstance(got[0], Lease) and got[0].vram_mib == 20 * GB, "the waiter was not stranded"
    waiter.release(got[0])


def test_a_shrink_is_allowed_while_another_gpu_can_still_serve_the_waiting_request(
    backend_url: str, namespace: str, made: list[GPUBoss]
) -> None:
    holder = boss_of(made, backend_url, namespace, *TWO)
    held = [holder.acquire(16, timeout=0, device=g) for g in ("gpu0", "gpu1")]
    waiter = boss_of(made, backend_url, namespace, *TWO)
    thread, got = in_thread(lambda: waiter.acquire(20, timeout=30, ttl=LONG_TTL))
    queued(backend_url, namespace)
    first = boss_of(made, backend_url, namespace, decl(gpu="gpu0", reserve_gb=5), TWO[1])
    assert {g.id: g.leasable_mib for g in first.register_gpus(update=True)} == {"gpu0": 19 * GB, "gpu1": 24 * GB}
    both = boss_of(
        made, backend_url, namespace, decl(gpu="gpu0", reserve_gb=5), decl(gpu="gpu1", index=1, reserve_gb=5)
    )
    with pytest.raises(ConfigError, match=r"shrinking 'gpu1' would leave waiting request"):
        both.register_gpus(update=True)
    assert holder.release(held[1])
    thread.join(timeout=30)
    assert got and isinstance(got[0], Lease) and got[0].gpu == "gpu1"
    waiter.release(got[0])


def test_a_gpu_does_not_shrink_below_a_lease_that_waits_to_grow(
    backend_url: str, namespace: str, made: list[GPUBoss]
) -> None:
    holder = boss_of(made, backend_url, namespace)
    growing, other = holder.acquire(8, timeout=0), holder.acquire(10, timeout=0)
    thread, got = in_thread(lambda: growing.resize(20, timeout=30))  # 12 GB more, 6 GB free: it waits
    queued(backend_url, namespace)
    smaller = boss_of(made, backend_url, namespace, decl(vram_gb=19))  # holds the 18 GB leased, not 20 + 10
    with pytest.raises(ConfigError, match=rf"waiting request {growing.id}:grow \(20480 MiB"):
        smaller.register_gpus(update=True)
    assert holder.release(other)
    thread.join(timeout=30)
    assert got and growing.vram_mib == 20 * GB


def test_the_memory_a_gpu_gains_goes_to_the_queue_at_once(
    backend_url: str, namespace: str, made: list[GPUBoss]
) -> None:
    holder = boss_of(made, backend_url, namespace, decl(vram_gb=16))
    held = holder.acquire(12, timeout=0)
    waiter = boss_of(made, backend_url, namespace, decl(vram_gb=16))
    thread, got = in_thread(lambda: waiter.acquire(8, timeout=30))
    queued(backend_url, namespace)
    boss_of(made, backend_url, namespace, decl(vram_gb=24)).register_gpus(update=True)
    thread.join(timeout=30)
    assert got and isinstance(got[0], Lease) and got[0].vram_mib == 8 * GB
    resized, granted = events.replay(backend_url, namespace)[-2:]
    assert (resized.type, granted.type, granted.lease) == ("gpu_resized", "granted", got[0].id)
    assert granted.time_ms == resized.time_ms, "served by the call that resized the GPU (one script, one time)"
    holder.release(held)
    waiter.release(got[0])


def test_a_boss_that_read_the_registry_before_sees_a_gpu_grow(
    backend_url: str, namespace: str, made: list[GPUBoss]
) -> None:
    boss_of(made, backend_url, namespace, decl(vram_gb=16)).register_gpus()
    reader = bare_boss(made, backend_url, namespace, "reader")
    reader.release(reader.acquire(4, timeout=0))  # it has read the registry: 16 GB
    with pytest.raises(InsufficientCapacity):
        reader.acquire(20, timeout=0)
    boss_of(made, backend_url, namespace, decl(vram_gb=24)).register_gpus(update=True)
    lease = reader.acquire(20, timeout=0)  # not refused by the 16 GB it read before
    assert lease.vram_mib == 20 * GB
    reader.release(lease)


def test_the_async_front_end_updates_too(backend_url: str, namespace: str, made: list[GPUBoss]) -> None:
    boss_of(made, backend_url, namespace).register_gpus()

    async def main() -> list[int]:
        b = AsyncGPUBoss(backend_url, namespace=namespace, gpus=[decl(reserve_gb=1)], service="async")
        try:
            with pytest.raises(ConfigError, match="register --update"):
                await b.register_gpus()
            return [g.leasable_mib for g in await b.register_gpus(update=True)]
        finally:
            await b.close()

    assert asyncio.run(main()) == [23 * GB]


def test_gpus_register_update_on_the_command_line(real_url: str, namespace: str, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"

    def register(reserve_gb: int, *options: str) -> Any:
        config.write_text(
            f"namespace: {namespace}\ngpus: [{{id: gpu0, name: L4, vram_gb: 24, reserve_gb: {reserve_gb}}}]\n"
        )
        return CliRunner().invoke(cli, ["--redis-url", real_url, "--config", str(config), "gpus", "register", *options])

    assert register(0).exit_code == 0
    conflict = register(2)
    assert conflict.exit_code == 1 and "`gpuboss gpus register --update`" in conflict.stderr
    updated = register(2, "--update")
    assert updated.exit_code == 0, updated.output
    lines = updated.stdout.splitlines()
    assert lines[:2] == ["registered 1 GPU: gpu0", "resized gpu0: 24.0 GB (reserve 0.0 GB) -> 24.0 GB (reserve 2.0 GB)"]
    again = register(2, "--update")
    assert again.exit_code == 0 and "resized" not in again.stdout
    listed = CliRunner().invoke(cli, ["--redis-url", real_url, "--namespace", namespace, "--json", "gpus"])
    assert [(g["id"], g["reserve_mib"]) for g in json.loads(listed.stdout)] == [("gpu0", 2048)]
    watch = ["watch", "--since", "1h", "--type", "gpu_resized", "--count", "1", "--timeout", "10"]
    logged = CliRunner().invoke(cli, ["--redis-url", real_url, "--namespace", namespace, *watch])
    assert logged.exit_code == 0, logged.output
    assert logged.stdout.split()[1:4] == ["gpu_resized", "gpu0", "cuda:0"]
    assert "24.0 GB (reserve 2.0 GB), was 24.0 GB (reserve 0.0 GB); 0.0 GB leased" in logged.stdout


def test_discovered_gpus_keep_their_host_and_are_placed_by_it_at_their_new_size(
    backend_url: str, namespace: str, made: list[GPUBoss]
) -> None:
    from tests import fake_nvml as fk
    from tests.test_inventory_wiring import make_boss

    nvml = fk.uniform_host()  # four RTX 4090s on hostA: the by-host placement index holds them
    first = make_boss(backend_url, namespace, nvml)
    made.append(first)
    whole = {g.id: g.leasable_mib for g in first.register_gpus()}
    # A container on the same cards that names its host otherwise: the sizes change, the GPUs stay hostA's.
    later = make_boss(backend_url, namespace, nvml, host="hostB", auto_reserve_gb=1)
    made.append(later)
    assert {g.id: g.leasable_mib for g in later.register_gpus(update=True)} == {k: v - GB for k, v in whole.items()}
    client, keys = raw_client(backend_url), Keys(namespace)
    by_host = sorted(str(m) for m in client.zrange(keys.free_host, 0, -1))
    assert by_host == sorted(f"hostA {whole[g] - GB:012d} {g}" for g in whole), "one entry per GPU, at the new size"
    stored = {g: json.loads(str(client.hget(keys.gpus, g))) for g in whole}
    assert {(d["host"], d["reserve_mib"]) for d in stored.values()} == {("hostA", GB)}
    gpu = min(whole)
    lease = later.acquire((whole[gpu] - GB) / GB, device=gpu, timeout=0)  # the whole new size, and no more
    with pytest.raises(LeaseTimeout):
        later.acquire(1, device=gpu, timeout=0)
    later.release(lease)


# ---------------------------------------------------------------- unregister_gpus, gpuboss gpus remove


def test_a_gpu_gone_for_good_is_taken_out_with_everything_kept_about_it(
    backend_url: str, namespace: str, made: list[GPUBoss]
) -> None:
    boss = boss_of(made, backend_url, namespace, *TWO)
    boss.release(boss.acquire(4, device="gpu1", timeout=0))
    client, keys = raw_client(backend_url), Keys(namespace)
    client.hset(keys.offline, "gpu1", json.dumps({"host": "gone", "since": 1, "reason": "host_timeout"}))
    client.hset(keys.observed, "gpu1", "300,1,1")
    operator = bare_boss(made, backend_url, namespace, "operator")
    assert operator.unregister_gpus(["gpu1"]) == 1
    assert [g.id for g in operator.gpus()] == ["gpu0"]
    for key in (keys.gpus, keys.capacity, keys.used, keys.observed, keys.offline):
        assert not client.hexists(key, "gpu1"), key
    assert client.zscore(keys.free, "gpu1") is None and client.zscore(keys.free, "gpu0") == 24 * GB
    (ev,) = [e for e in events.replay(backend_url, namespace) if e.type == "gpu_unregistered"]
    assert (ev.gpu, ev["capacity_mib"], ev["index"]) == ("gpu1", 24 * GB, 1)
    with pytest.raises(InvalidRequest, match=r"invalid gpu='gpu1': is not registered .*registered: gpu0"):
        operator.unregister_gpus(["gpu1"])
    with pytest.raises(InvalidRequest, match="name at least one"):
        operator.unregister_gpus([])
    lease = operator.acquire(20, timeout=0)  # placement goes on without it
    assert lease.gpu == "gpu0"
    operator.release(lease)


def test_a_gpu_is_not_taken_out_while_leases_hold_memory_on_it(
    backend_url: str, namespace: str, made: list[GPUBoss]
) -> None:
    holder = boss_of(made, backend_url, namespace, *TWO)
    held = holder.acquire(20, device="gpu0", timeout=0)
    client = raw_client(backend_url)
    before = snapshot(client, namespace)
    with pytest.raises(InvalidRequest, match=r"invalid gpu='gpu0': has 20480 MiB leased on it"):
        holder.unregister_gpus(["gpu1", "gpu0"])
    assert snapshot(client, namespace) == before, "all or nothing: gpu1 stays too"
    holder.release(held)
    assert holder.unregister_gpus(["gpu1", "gpu0"]) == 2
    assert client.hlen(Keys(namespace).gpus) == 0


def test_a_gpu_is_not_taken_out_when_a_waiting_request_would_have_no_gpu_left(
    backend_url: str, namespace: str, made: list[GPUBoss]
) -> None:
    two = (decl(gpu="gpu0"), decl(gpu="gpu1", index=1, vram_gb=16))
    operator = boss_of(made, backend_url, namespace, *two)
    operator.pause("low")  # (requests of class low wait, with nothing leased anywhere)
    waiter = boss_of(made, backend_url, namespace, *two)
    pinned, got_pinned = in_thread(lambda: waiter.acquire(8, "low", device="gpu1", timeout=30, ttl=LONG_TTL))
    queued(backend_url, namespace)
    client = raw_client(backend_url)
    before = snapshot(client, namespace)
    with pytest.raises(InvalidRequest, match=r"gpu='gpu1': waiting request [0-9a-f]{32} \(8192 MiB on a GPU\) would"):
        operator.unregister_gpus(["gpu1"])  # pinned there
    assert snapshot(client, namespace) == before, "nothing written"
    unpinned, got_big = in_thread(lambda: waiter.acquire(20, "low", timeout=30, ttl=LONG_TTL))
    queued(backend_url, namespace, 2)
    before = snapshot(client, namespace)
    with pytest.raises(InvalidRequest, match=r"gpu='gpu0': waiting request [0-9a-f]{32} \(20480 MiB on a GPU\)"):
        operator.unregister_gpus(["gpu0"])  # the only GPU that can hold 20 GB
    assert snapshot(client, namespace) == before, "nothing written"
    operator.resume("low")
    pinned.join(timeout=30)
    unpinned.join(timeout=30)
    assert got_pinned and got_pinned[0].gpu == "gpu1" and got_big and got_big[0].gpu == "gpu0", "not stranded"
    waiter.release(got_pinned[0])
    waiter.release(got_big[0])


def test_gpus_remove_on_the_command_line(real_url: str, namespace: str) -> None:
    boss = GPUBoss(
        real_url, namespace=namespace, service="cli", gpus=[decl(gpu="gpu0"), decl(gpu="gpu7-gone", index=1)]
    )
    boss.register_gpus()
    boss.close()

    def run(*args: str, input: str | None = None) -> Any:
        return CliRunner().invoke(cli, ["--redis-url", real_url, "--namespace", namespace, *args], input=input)

    asked = run("gpus", "remove", "gpu7", input="n\n")
    assert asked.exit_code == 1 and "About to remove 1 GPU" in asked.stdout and "nothing removed" in asked.stderr
    unknown = run("gpus", "remove", "gpu9", "--yes")
    assert (
        unknown.exit_code == 1 and "no GPU 'gpu9'" in unknown.stderr and "registered: gpu0, gpu7-gone" in unknown.stderr
    )
    removed = run("gpus", "remove", "gpu7", "--yes")  # a unique prefix
    assert removed.exit_code == 0, removed.output
    assert removed.stdout.splitlines()[0] == "removed 1 GPU: gpu7-gone"
    assert [g["id"] for g in json.loads(run("--json", "gpus").stdout)] == ["gpu0"]
    watch = ["watch", "--since", "1h", "--type", "gpu_unregistered", "--count", "1", "--timeout", "10"]
    assert run(*watch).stdout.split()[1:3] == ["gpu_unregistered", "gpu7-gone"]


# ---------------------------------------------------------------- a property: resizing never over-commits


@hyp_settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("acquire"), st.integers(1, 24), st.sampled_from(["gpu0", "gpu1", None])),
            st.tuples(st.just("release"), st.integers(0, 99), st.none()),
            st.tuples(st.just("resize"), st.integers(0, 23), st.sampled_from(["gpu0", "gpu1"])),
        ),
        max_size=14,
    )
)
def test_resizing_between_grants_and_releases_never_over_commits_a_gpu(steps: list[tuple[str, int, Any]]) -> None:
    """Grants (try once), releases and resizes in any order, against a model: a resize is refused exactly when
    the GPU would lease out less than is leased on it; a grant lands exactly where the model's best fit says;
    and after every step the capacity, leased MiB and placement index in Redis are the model's."""
    namespace = f"p{uuid.uuid4().hex[:10]}"
    url = f"fakeredis://{namespace}"
    reserve = {"gpu0": 0, "gpu1": 0}

    def declared() -> list[dict[str, Any]]:
        return [decl(gpu="gpu0", reserve_gb=reserve["gpu0"]), decl(gpu="gpu1", index=1, reserve_gb=reserve["gpu1"])]

    first = GPUBoss(url, namespace=namespace, gpus=declared(), service="first")
    first.register_gpus()
    first.close()
    user = GPUBoss(url, namespace=namespace, service="user", gpu_discovery="off")
    client, keys = raw_client(url), Keys(namespace)
    held: list[Lease] = []
    try:
        for kind, n, gpu in steps:
            leasable = {g: 24 * GB - r * GB for g, r in reserve.items()}
            used = {g: sum(x.vram_mib for x in held if x.gpu == g) for g in reserve}
            if kind == "acquire":
                need, places = n * GB, [gpu] if gpu else sorted(reserve)
                fits = [g for g in places if leasable[g] - used[g] >= need]
                try:
                    lease = user.acquire(n, device=gpu, timeout=0)
                except InsufficientCapacity:
                    assert need > max(leasable[g] for g in places)
                except LeaseTimeout:
                    assert need <= max(leasable[g] for g in places) and not fits
                else:
                    best = min(fits, key=lambda g: (leasable[g] - used[g] - need, g))
                    assert lease.gpu == best
                    held.append(lease)
            elif kind == "release" and held:
                assert user.release(held.pop(n % len(held)))
            elif kind == "resize":
                was = reserve[gpu]
                reserve[gpu] = n
                boss = GPUBoss(url, namespace=namespace, gpus=declared(), service="operator")
                try:
                    if 24 * GB - n * GB < used[gpu]:
                        with pytest.raises(ConfigError, match="is leased on it now"):
                            boss.register_gpus(update=True)
                        reserve[gpu] = was
                    else:
                        boss.register_gpus(update=True)
                finally:
                    boss.close()
            leasable = {g: 24 * GB - r * GB for g, r in reserve.items()}
            used = {g: sum(x.vram_mib for x in held if x.gpu == g) for g in reserve}
            for g in reserve:
                assert int(client.hget(keys.capacity, g)) == leasable[g]
                assert int(client.hget(keys.used, g)) == used[g] <= leasable[g], "never over-committed"
                assert client.zscore(keys.free, g) == leasable[g] - used[g]
    finally:
        user.close()
