#!/usr/bin/env python3
"""Two services share one GPU so that only one of them has its model loaded at any time.

Each service (a process of its own) leases the GPU's whole leasable memory while its model is loaded, and
releases it when done, so the other service's lease is granted right after: one model at a time, with no
out-of-memory errors and no polling. The parent process checks that the loaded intervals never overlap.

    python examples/one_model_at_a_time.py             # embedded Redis
    python examples/one_model_at_a_time.py --quick --redis-url redis://localhost:6379/0
"""

from __future__ import annotations

import argparse
import itertools
import logging
import multiprocessing
import sys
import time
from typing import Any

from gpuboss import GPUBoss

GPUS = [{"id": "gpu0", "name": "demo GPU", "vram_gb": 24, "index": 0}]


def service(name: str, redis_url: str | None, namespace: str, rounds: int, work_s: float, events: Any) -> None:
    """One service: load the model, serve a batch of work, unload; `rounds` times."""
    with GPUBoss(redis_url, namespace=namespace, service=name, gpus=GPUS) as boss:
        gpu = next(g for g in boss.gpus() if g.id == "gpu0")
        whole_gb = gpu.leasable_mib / 1024  # capacity minus reserve: the whole GPU
        for n in range(rounds):
            events.put((time.time(), name, "asks for the whole GPU", None))
            with boss.lease(vram_gb=whole_gb, device="gpu0", timeout=60) as device:
                loaded = time.time()
                events.put((loaded, name, f"model loaded on {device} ({whole_gb:g} GB), round {n + 1}", None))
                time.sleep(work_s)  # serve requests with the model
                unloaded = time.time()  # unload before the lease goes back
                events.put((unloaded, name, "model unloaded, GPU released", (loaded, unloaded)))
            time.sleep(0.01)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", help="default: GPUBOSS_REDIS_URL, else the embedded Redis")
    parser.add_argument("--namespace", default="gpuboss")
    parser.add_argument("--quick", action="store_true", help="two short rounds each")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rounds, work_s = (2, 0.2) if args.quick else (3, 1.0)

    ctx = multiprocessing.get_context("spawn")
    events = ctx.Queue()
    procs = [
        ctx.Process(target=service, args=(name, args.redis_url, args.namespace, rounds, work_s, events))
        for name in ("vision", "speech")
    ]
    for p in procs:
        p.start()
    t0 = time.time()
    intervals: list[tuple[float, float, str]] = []
    ended = 0
    while ended < 2 * rounds:  # every round ends with an "unloaded" event
        t, name, what, interval = events.get(timeout=120)
        print(f"{t - t0:6.2f}s  {name:<6}  {what}", flush=True)
        if interval is not None:
            intervals.append((interval[0], interval[1], name))
            ended += 1
    for p in procs:
        p.join(timeout=30)

    # The check: sorted by load time, each model was unloaded before the next one was loaded.
    intervals.sort()
    overlaps = [(a, b) for a, b in itertools.pairwise(intervals) if b[0] < a[1]]
    failed = [p.name for p in procs if p.exitcode != 0]
    if overlaps or failed:
        print(f"FAIL: {len(overlaps)} overlapping loads, failed processes: {failed}")
        return 1
    print(f"OK: {len(intervals)} model loads, never two on the GPU at the same time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
