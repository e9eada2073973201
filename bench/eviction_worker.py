"""The victim of the eviction benchmark: ``python -m bench.eviction_worker '<spec as JSON>'``.

It holds one preemptible ``low`` lease of the whole GPU (``vram_gb``, ``ttl``) with ``resume=True`` and an
``on_evict`` that only notes the time and returns. Its main thread waits for each eviction request, then
waits at its safe point (``yield_if_requested()``) until the lease is granted again; after ``rounds``
evictions it releases the lease and exits. A boss runs ``on_evict`` and the hand-back on its own eviction
thread as soon as the request arrives, so on a busy machine the whole round can end before the main thread
reaches its safe point (which then has nothing left to do, and answers True for that round): the round
is counted by ``lease.evictions`` and reported then, a little late, rather than missed. With ``notices`` false the boss's notice listener is never started,
so the eviction requests reach it only through the heartbeat's renew reply (every ``ttl``/3).

Line protocol on stdout, times on ``time.monotonic()`` (CLOCK_MONOTONIC: the same clock in every process on
the host): ``HELD <lease id>``, then per eviction ``CALLBACK <t>`` when ``on_evict`` starts and ``RESUMED <t>
<evictions>`` when the safe point returns, and ``DONE <evictions>`` at the end.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import time
from typing import Any


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(spec: dict[str, Any]) -> int:
    from gpuboss import GPUBoss

    boss = GPUBoss(spec["url"], namespace=spec["namespace"], gpus=spec["gpus"], service=f"victim-{os.getpid()}")
    if not spec["notices"]:
        boss._notices.start = lambda wait=2.0: None  # type: ignore[method-assign]  # heartbeat delivery only

    def on_evict() -> None:
        emit(f"CALLBACK {time.monotonic()!r}")

    lease = boss.acquire(spec["vram_gb"], priority="low", ttl=spec["ttl"], timeout=60, on_evict=on_evict)
    emit(f"HELD {lease.id}")
    try:
        done = lease.evictions
        while done < spec["rounds"]:
            lease.evict_requested.wait(0.05)
            lease.yield_if_requested()
            if lease.evictions > done:  # handed back and granted again: here, or on the eviction thread
                done = lease.evictions
                emit(f"RESUMED {time.monotonic()!r} {lease.evictions}")
        emit(f"DONE {lease.evictions}")
    finally:
        boss.release(lease)
        boss.close()
    return 0


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # stacks into stderr when the bench gives up on it
    sys.exit(main(json.loads(sys.argv[1])))
