#!/usr/bin/env python3
"""A batch fanned out to worker processes that share one GPU, and a Device handed to a worker.

1. A process pool with the ``fork`` start method (Linux's default before Python 3.14) copies the parent's
   boss into every worker. Each worker is a holder of its own (docs/concepts.md, "A lease belongs to the
   process that acquired it"): it leases, renews and releases its own VRAM, queued with everybody else's,
   and leaves the parent's lease alone, also when it exits.
2. A Device pickled to a worker (``executor.submit(fn, device)``, here with the ``spawn`` start method)
   arrives with a read-only copy of its lease: the worker may use the device string; the parent keeps the
   lease, and releases it.
3. Workers that keep a model loaded for their whole life lease its VRAM in the pool's ``initializer``, with
   a boss of their own (here with the ``forkserver`` start method, Linux's default from Python 3.14), and
   never release it themselves: gpuboss releases it as each worker exits at the pool's shutdown, so the
   memory is free at once, not after the leases' TTL.
4. The same workers in a ``with Pool(...)`` block, whose end terminates them (SIGTERM): they die without
   releasing anything. The next request on this machine that finds no room sees that their processes are
   gone and revokes their leases at once (docs/concepts.md, "Heartbeats and leaks"), instead of waiting for
   their TTL.

    python examples/process_pool.py                  # embedded Redis
    python examples/process_pool.py --quick --redis-url redis://localhost:6379/0
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from gpuboss import Device, GPUBoss, Lease, LeaseTimeout

GPUS = [{"id": "gpu0", "name": "demo GPU", "vram_gb": 24, "index": 0}]
#: The parent keeps this much for itself (a model it serves, say) while the batch runs.
PARENT_GB = 4
TASK_GB = 8
#: What each model worker of part 3 keeps for its life.
MODEL_GB = 6

#: The boss of this process; a forked worker gets a copy, and is a holder of its own with it.
BOSS: GPUBoss | None = None


def task(i: int, work_s: float) -> tuple[int, int, float, float]:
    """One task of the batch, in a worker process: its pid, its lease's pid, and when it held the GPU."""
    assert BOSS is not None
    with BOSS.lease(vram_gb=TASK_GB, timeout=120) as device:
        start = time.monotonic()  # (one clock for every process of the host)
        time.sleep(work_s)  # ... the task's GPU work on `device` ...
        return os.getpid(), device.lease.pid, start, time.monotonic()


#: In a model worker (part 3): its own boss and the lease of its model, kept until the worker exits.
WORKER_LEASE: Lease | None = None
#: In a model worker of part 4: how many workers are busy with a request (shared with the parent).
BUSY: Any = None


def load_model(redis_url: str | None, namespace: str, busy: Any = None) -> None:
    """A pool initializer: lease the model's VRAM for the worker's life (no ``with`` block, no release)."""
    global WORKER_LEASE, BUSY
    BUSY = busy
    worker_boss = GPUBoss(redis_url, namespace=namespace, service="model-worker", gpus=GPUS)
    WORKER_LEASE = worker_boss.acquire(vram_gb=MODEL_GB, timeout=60)
    # ... load the model onto WORKER_LEASE.device ...


def infer(i: int) -> tuple[int, str]:
    """One request to a model worker: its pid and the device its model is on."""
    assert WORKER_LEASE is not None
    return os.getpid(), WORKER_LEASE.device


def long_request(i: int) -> None:
    """A request still being served when the pool ends (part 4): the worker is busy, so it is terminated."""
    with BUSY.get_lock():
        BUSY.value += 1
    time.sleep(600)


def look_at(device: Device) -> str:
    """In a spawned worker: what it can see of a Device it was handed."""
    lease = device.lease
    return f"worker {os.getpid()} got {device} ({lease.vram_gb:g} GB on {lease.gpu}, held by pid {lease.pid})"


def peak(spans: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    now = most = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def main() -> int:
    global BOSS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", help="default: GPUBOSS_REDIS_URL, else the embedded Redis")
    parser.add_argument("--namespace", default="gpuboss")
    parser.add_argument("--quick", action="store_true", help="fewer and shorter tasks")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    tasks, work_s = (6, 0.2) if args.quick else (12, 1.0)

    BOSS = GPUBoss(args.redis_url, namespace=args.namespace, service="batch", gpus=GPUS)
    try:
        own = BOSS.acquire(vram_gb=PARENT_GB, timeout=30)
        print(f"parent {os.getpid()} holds {PARENT_GB} GB on {own.device} while the batch runs")

        # 1. Forked workers: 8 GB tasks next to the parent's 4 GB on a 24 GB GPU, so at most 2 at once.
        with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("fork")) as pool:
            done = list(pool.map(task, range(tasks), [work_s] * tasks))
        workers = {pid for pid, _, _, _ in done}
        assert all(pid == holder for pid, holder, _, _ in done), "each task's lease is its own worker's"
        most = peak([(start, end) for _, _, start, end in done])
        print(f"{tasks} tasks done by {len(workers)} worker processes; at most {most} held the GPU at once")
        print(f"the parent's lease after the workers exited: held {own in BOSS.held()}")

        # 2. A Device handed to a spawned worker: it reads it; the lease stays the parent's.
        spawn = multiprocessing.get_context("spawn")
        with BOSS.lease(vram_gb=TASK_GB, timeout=30) as device, ProcessPoolExecutor(1, mp_context=spawn) as pool:
            print(pool.submit(look_at, device).result(timeout=120))
        print(f"released by the parent: {device.lease.state.value}")

        # 3. Model workers that hold their lease for life; their VRAM is back as soon as the pool shuts down.
        forkserver = multiprocessing.get_context("forkserver")
        setup = (args.redis_url, args.namespace)
        with ProcessPoolExecutor(2, mp_context=forkserver, initializer=load_model, initargs=setup) as pool:
            served = list(pool.map(infer, range(tasks)))
        print(f"{tasks} requests served by {len({pid for pid, _ in served})} model worker(s) on {served[0][1]}")
        rest_gb = GPUS[0]["vram_gb"] - PARENT_GB
        try:
            BOSS.release(BOSS.acquire(vram_gb=rest_gb, timeout=0))  # LeaseTimeout if a worker's lease were left
        except LeaseTimeout:
            print(f"the model workers' VRAM is still leased after the pool shut down ({rest_gb} GB do not fit)")
            return 1
        print(f"after the pool shut down, the other {rest_gb} GB were leased at once: the workers' leases were back")

        # 4. A `with Pool(...)` block terminates its workers at its end: nobody releases their leases, but their
        #    processes are gone, and the next request here that finds no room revokes those leases at once.
        #    (Each is still serving a long request then, so the end of the block surely terminates both: an idle
        #    worker may get the pool's stop message first, and exit the normal way, releasing its lease.)
        busy = forkserver.Value("i", 0)
        with forkserver.Pool(2, initializer=load_model, initargs=(*setup, busy)) as mp_pool:
            served = mp_pool.map(infer, range(tasks))
            mp_pool.map_async(long_request, range(2), chunksize=1)
            deadline = time.monotonic() + 60
            while busy.value < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
        killed = sorted({pid for pid, _ in served})
        try:
            BOSS.release(BOSS.acquire(vram_gb=rest_gb, timeout=0))
        except LeaseTimeout:
            print(f"the terminated workers' VRAM is still leased ({rest_gb} GB do not fit)")
            return 1
        print(
            f"the pool terminated its model workers {killed}; their leases were revoked and {rest_gb} GB leased at once"
        )
        released = BOSS.release(own)
        print(f"parent released its own {PARENT_GB} GB: {released}")
        return 0 if released and most <= 2 else 1
    finally:
        BOSS.close()


if __name__ == "__main__":
    sys.exit(main())
