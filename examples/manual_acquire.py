#!/usr/bin/env python3
"""Manual acquire/release with try/finally, and the blocking API from a thread pool.

``with boss.lease(...)`` is the easy way; ``acquire()``/``release()`` are for when the lease must outlive
one block (handed to another object, released from a callback). Always release in ``finally``.

    python examples/manual_acquire.py                  # embedded Redis
    python examples/manual_acquire.py --quick --redis-url redis://localhost:6379/0
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from gpuboss import GPUBoss, LeaseTimeout

GPUS = [{"id": "gpu0", "name": "demo GPU", "vram_gb": 24, "index": 0}]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", help="default: GPUBOSS_REDIS_URL, else the embedded Redis")
    parser.add_argument("--namespace", default="gpuboss")
    parser.add_argument("--quick", action="store_true", help="fewer and shorter jobs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    jobs, work_s = (8, 0.1) if args.quick else (16, 0.5)

    boss = GPUBoss(args.redis_url, namespace=args.namespace, service="manual", gpus=GPUS)
    try:
        # 1. Manual acquire and release.
        try:
            lease = boss.acquire(vram_gb=8, priority="normal", timeout=30)
        except LeaseTimeout:
            print("no GPU memory within 30 s; try later")
            return 1
        try:
            print(f"acquired {lease.vram_gb:g} GB on {lease.gpu} ({lease.device}), token {lease.token}")
            time.sleep(work_s)  # ... use lease.device ...
        finally:
            boss.release(lease)  # always, even if the work raised
        print(f"released; releasing again is harmless: {boss.release(lease)}")

        # 2. The same boss from a thread pool: 6 GB jobs on a 24 GB GPU, so at most 4 run at once and the
        #    others wait in the queue; each is granted as soon as a running job releases.
        lock = threading.Lock()
        running = {"now": 0, "peak": 0}

        def job(i: int) -> str:
            with boss.lease(vram_gb=6, timeout=60) as device:
                with lock:
                    running["now"] += 1
                    running["peak"] = max(running["peak"], running["now"])
                time.sleep(work_s)  # ... the job's GPU work on `device` ...
                with lock:
                    running["now"] -= 1
                return f"job {i} ran on {device} (token {device.lease.token})"

        with ThreadPoolExecutor(max_workers=8) as pool:
            for line in pool.map(job, range(jobs)):
                print(line)
        print(f"{jobs} jobs done; at most {running['peak']} ran at once (24 GB / 6 GB = 4)")
        return 0 if running["peak"] <= 4 else 1
    finally:
        boss.close()  # releases anything still held and stops the heartbeat


if __name__ == "__main__":
    sys.exit(main())
