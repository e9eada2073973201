"""A lease belongs to the process that acquired it: a forked child neither renews nor releases it, and a
worker handed its Device (pickled) gets a copy to read.

A lease belongs to the process that acquired it (its pid is in the record, and only its holder's secret
releases it). A process that forks (``os.fork``, ``multiprocessing`` with the fork start method, a pre-forking
server) hands its children a copy of its boss; before this was handled, a child that exited the normal way
released every lease of its parent from its atexit handler, while the parent went on using the GPU: the
memory went to the next waiter and the GPU was over-committed. A child's heartbeat also renewed the parent's
leases, so a parent that died kept its lease for as long as the child lived.

Each test runs ``tests/workers.py forker``, which acquires, forks, lets the child do one thing and exit the
normal way (atexit handlers run), and waits for ``GO`` before it releases, while the test reads Redis.

A Device could not be handed to a worker process (``executor.submit(fn, device)``, ``Process(args=(device,))``
with the spawn start method): pickling it raised ``TypeError: cannot pickle '_thread.lock' object``, and
``copy.deepcopy`` of anything holding one raised ``AttributeError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import multiprocessing
import os
import pickle
import signal
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from gpuboss import AsyncGPUBoss, Device, GPUBoss, Keys, LeaseState
from gpuboss.config import gb_to_mib
from gpuboss.events import replay

from tests.conftest import GPUS, raw_client
from tests.workers import (
    Worker,
    lease_and_return,
    lease_for_the_worker,
    live_in_redis,
    use_device,
    worker_lease,
    worker_lease_of,
)

pytestmark = pytest.mark.slow

VRAM_GB = 4.0


def leased(url: str, namespace: str) -> tuple[set[str], int]:
    """The lease ids in Redis, and the MiB counted in use over all GPUs."""
    client = raw_client(url)
    keys = Keys(namespace)
    pipe = client.pipeline(transaction=True)  # (one consistent read: a lease granted between two would not count)
    pipe.hgetall(keys.used)
    pipe.hkeys(keys.leases)
    used, ids = pipe.execute()
    client.close()
    return {str(k) for k in ids}, sum(int(v) for v in used.values())


class Forker(Worker):
    """A ``forker`` worker; :meth:`close` also kills its child (by the PID it printed) if that still runs: a
    child stuck (say, on a lock held at the fork) would keep the pipes open."""

    child_pid: int | None = None

    def child(self) -> dict[str, Any]:
        """The child's report (``CHILD``), after its ``CHILD_PID``."""
        self.child_pid = int(self.expect("CHILD_PID"))
        return dict(json.loads(self.expect("CHILD", timeout=30)))

    def close(self) -> None:
        if self.child_pid is not None:
            with contextlib.suppress(ProcessLookupError, FileNotFoundError):
                if "workers.py" in Path(f"/proc/{self.child_pid}/cmdline").read_text(errors="replace"):
                    os.kill(self.child_pid, signal.SIGKILL)
        super().close()


def run_forker(url: str, namespace: str, *extra: str) -> tuple[Forker, list[dict[str, Any]], dict[str, Any]]:
    """Start a forker; its HELD leases and the child's report, once the child has exited (status 0)."""
    worker = Forker("forker", url, namespace, GPUS, "--vram", str(VRAM_GB), *extra)
    try:
        held = [json.loads(worker.expect("HELD"))]
        if "--block" in extra:
            held.append(json.loads(worker.expect("HELD")))
        child = worker.child()
        assert worker.expect("CHILD_EXITED") == "0", worker.err()
    except BaseException:
        worker.close()
        raise
    return worker, held, child


def finish(worker: Forker) -> None:
    """Let the parent release its lease: Redis must still have taken it as the parent's."""
    try:
        worker.send("GO")
        assert worker.expect("RELEASED") == "True", worker.err()
        assert worker.wait(20) == 0, worker.err()
    finally:
        worker.close()


@pytest.mark.parametrize("front", ["sync", "async"])
@pytest.mark.parametrize("child", ["exit", "close"])
def test_a_forked_child_that_exits_leaves_its_parents_lease_alone(
    real_url: str, namespace: str, front: str, child: str
) -> None:
    worker, held, report = run_forker(real_url, namespace, "--child", child, "--front", front)
    try:
        assert report["held"] == [], "a forked child holds none of its parent's leases"
        ids, used = leased(real_url, namespace)
        assert ids == {held[0]["id"]}, "the child's exit (or close()) released its parent's lease"
        assert used == gb_to_mib(VRAM_GB)
    finally:
        finish(worker)
    assert leased(real_url, namespace) == (set(), 0)


def test_an_inherited_with_block_ending_in_the_child_releases_nothing(real_url: str, namespace: str) -> None:
    worker, held, report = run_forker(real_url, namespace, "--block")
    try:
        assert report["held"] == []
        ids, used = leased(real_url, namespace)
        assert ids == {held[0]["id"], held[1]["id"]}, "the block's end in the child released the parent's lease"
        assert used == 2 * gb_to_mib(VRAM_GB)
    finally:
        finish(worker)  # (the parent's block ends after GO too: both released)
    assert leased(real_url, namespace) == (set(), 0)


@pytest.mark.parametrize("front", ["sync", "async"])
def test_a_forked_child_cannot_release_its_parents_lease(real_url: str, namespace: str, front: str) -> None:
    worker, held, report = run_forker(real_url, namespace, "--child", "release", "--front", front)
    try:
        assert report["release_lease"] is False, "an inherited Lease is the parent's: nothing to release"
        assert report["release_id"] == "InvalidRequest", "Redis must tell the child from its parent"
        assert leased(real_url, namespace)[0] == {held[0]["id"]}
    finally:
        finish(worker)


@pytest.mark.parametrize("front", ["sync", "async"])
def test_a_forked_child_holds_renews_and_releases_its_own_leases(real_url: str, namespace: str, front: str) -> None:
    worker, held, report = run_forker(real_url, namespace, "--child", "own", "--front", front)
    try:
        own = report["own"]
        assert own["pid"] == report["pid"] != held[0]["pid"], "the child's lease is recorded as the child's"
        assert own["live"] and own["state"] == "granted", "the child's heartbeat kept its 1 s lease over 3 s"
        assert report["held_after"] == [own["id"]]
        ids, used = leased(real_url, namespace)
        assert ids == {held[0]["id"]}, "the child's own lease is released at its exit, its parent's is not"
        assert used == gb_to_mib(VRAM_GB)
    finally:
        finish(worker)


def test_a_forked_child_does_not_keep_its_dead_parents_lease_alive(real_url: str, namespace: str) -> None:
    worker = Forker("forker", real_url, namespace, GPUS, "--ttl", "1", "--parent-dies")
    try:
        parent_lease = json.loads(worker.expect("HELD"))
        report = worker.child()  # (the child writes to the same pipe)
        assert report["pid"] != parent_lease["pid"]
        assert report["own_left"] is True, "the child's own lease is renewed"
        assert report["parent_lease_left"] is False, "the child's heartbeat kept its dead parent's lease alive"
    finally:
        worker.close()


@contextlib.contextmanager
def holding(url: str, namespace: str) -> Iterator[Device]:
    """A lease of VRAM_GB for the block (``with boss.lease()``), from a boss closed after it."""
    boss = GPUBoss(url, namespace=namespace, gpus=GPUS, service="test")
    try:
        with boss.lease(vram_gb=VRAM_GB) as device:
            yield device
    finally:
        boss.close()


def test_a_device_handed_to_a_spawned_worker_is_a_copy_it_can_read_not_release(real_url: str, namespace: str) -> None:
    with holding(real_url, namespace) as device:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            seen = pool.submit(use_device, device, real_url, namespace, GPUS).result(timeout=60)
        assert seen["pid"] != os.getpid() and seen["holder_pid"] == os.getpid()
        assert (seen["device"], seen["type"], seen["id"]) == (device, "Device", device.lease.id)
        assert seen["state"] == "granted"
        assert seen["release"] == "InvalidRequest", "only the holder releases its lease"
        assert leased(real_url, namespace)[0] == {device.lease.id}
    assert device.lease.state is LeaseState.RELEASED
    assert leased(real_url, namespace) == (set(), 0)


def test_a_device_copies_as_itself_and_pickles_as_a_detached_copy(backend_url: str, namespace: str) -> None:
    with holding(backend_url, namespace) as device:
        settings = {"device": device, "batch": [1, 2]}
        copied = copy.deepcopy(settings)
        assert copied["device"] is device and copy.copy(device) is device
        assert copy.deepcopy(device.lease) is device.lease
        back = pickle.loads(pickle.dumps(device))
        assert isinstance(back, Device) and back == device and back.startswith("cuda:")
        assert back.lease is not device.lease and back.lease.record == device.lease.record
        assert back.lease.state is LeaseState.GRANTED and not back.lease.evict_requested
        with pytest.raises(RuntimeError, match="not held by a boss"):
            back.lease.resize(1)
    assert pickle.loads(pickle.dumps(device.lease)).state is LeaseState.RELEASED


async def test_an_async_boss_works_in_a_child_forked_from_its_running_loop(real_url: str, namespace: str) -> None:
    """``multiprocessing.Process(...).start()`` (fork) from a coroutine: the child runs a loop of its own and
    uses the inherited AsyncGPUBoss there (it raised EventLoopError: the parent's loop looked running), and
    the parent's loop and connections go on unharmed."""
    boss = AsyncGPUBoss(real_url, namespace=namespace, gpus=GPUS, service="test")
    try:
        lease = await boss.acquire(VRAM_GB)
        fork = multiprocessing.get_context("fork")
        results = fork.Queue()

        def child() -> None:
            async def use() -> dict[str, Any]:
                async with boss.lease(vram_gb=1, ttl=1) as device:
                    await asyncio.sleep(1.5)  # over its TTL: renewed by the child's heartbeat
                    held = [held.id for held in boss.held()]
                    return {
                        "pid": os.getpid(),
                        "holder": device.lease.pid,
                        "state": device.lease.state.value,
                        "held": held,
                        "live": live_in_redis(boss, device.lease),
                    }

            try:
                results.put(asyncio.run(use()))
            except BaseException as err:  # noqa: BLE001  # handed to the test, which fails with it
                results.put(repr(err))

        process = fork.Process(target=child)
        process.start()
        seen = await asyncio.to_thread(results.get, True, 60)
        await asyncio.to_thread(process.join, 30)
        assert isinstance(seen, dict), seen
        assert seen["pid"] == seen["holder"] != os.getpid() and seen["state"] == "granted" and seen["live"]
        assert lease.id not in seen["held"] and len(seen["held"]) == 1
        assert process.exitcode == 0
        extra = await asyncio.wait_for(boss.acquire(1), 10)  # the parent's loop still serves it
        assert await boss.release(extra)
        assert await boss.release(lease)
        assert leased(real_url, namespace) == (set(), 0)
    finally:
        await boss.close()


# -- a multiprocessing worker's own lease, at the worker's end
#
# A worker started by the fork or forkserver start method ends with os._exit, which skips atexit: a lease it
# still held (acquired in a pool's initializer for the worker's life, say) stayed in Redis for its TTL (30 s
# here) after the pool had shut down, and the next job waited for that memory. Now multiprocessing's own exit
# finalizers release it (heartbeat.py _watch_worker_exit). Spawned workers exit through sys.exit: atexit served
# them already, and still does.


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_a_pool_workers_lease_for_its_life_is_released_when_the_pool_shuts_down(
    real_url: str, namespace: str, method: str
) -> None:
    context = multiprocessing.get_context(method)
    setup = (real_url, namespace, GPUS, 2.0, "sync")
    with ProcessPoolExecutor(2, mp_context=context, initializer=lease_for_the_worker, initargs=setup) as pool:
        seen = [pool.submit(worker_lease).result(timeout=60) for _ in range(4)]
        ids, used = leased(real_url, namespace)
    assert all(s["live"] and s["pid"] == s["holder"] != os.getpid() for s in seen), seen
    assert {s["id"] for s in seen} <= ids and used >= len(ids) * gb_to_mib(2.0)
    assert leased(real_url, namespace) == (set(), 0), "released as the workers ended, not at their TTL"
    log = replay(real_url, namespace)
    granted = sorted(str(e.lease) for e in log if e.type == "granted")
    released = [e for e in log if e.type == "released"]
    assert sorted(str(e.lease) for e in released) == granted, "each worker's lease released once, by the worker"
    assert {e["reason"] for e in released} == {"close"} and not [e for e in log if e.type == "expired"]


@pytest.mark.parametrize("front", ["sync", "async"])
@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_a_multiprocessing_process_that_returns_holding_a_lease_releases_it(
    real_url: str, namespace: str, method: str, front: str
) -> None:
    context = multiprocessing.get_context(method)
    report = context.Queue()
    process = context.Process(target=lease_and_return, args=(report, real_url, namespace, GPUS, 2.0, front))
    process.start()
    seen = report.get(timeout=60)
    process.join(30)
    assert process.exitcode == 0
    assert seen["live"] and seen["pid"] == seen["holder"] == process.pid
    assert leased(real_url, namespace) == (set(), 0), "released as the process ended, not at its TTL"


def test_a_closed_and_joined_pools_workers_release_their_leases(real_url: str, namespace: str) -> None:
    """``multiprocessing.Pool``: ``close()`` then ``join()`` lets each worker end the normal way."""
    context = multiprocessing.get_context("fork")
    pool = context.Pool(2, initializer=lease_for_the_worker, initargs=(real_url, namespace, GPUS, 2.0, "sync"))
    try:
        seen = pool.map(worker_lease_of, range(4))
    finally:
        pool.close()
        pool.join()
    assert all(s["live"] and s["pid"] == s["holder"] != os.getpid() for s in seen), seen
    assert leased(real_url, namespace) == (set(), 0), "released as the workers ended, not at their TTL"
