"""One process of the weighted-throughput benchmark: ``python -m bench.weighted_worker '<spec as JSON>'``.

Every worker takes leases of random sizes (whole GB, ``min_gb`` to ``max_gb``, from its own seeded random
sequence) on one GPU of ``capacity_gb``, holds each for ``hold_ms`` and gives it back, again and again, for
``max_s`` seconds per phase. Phases run in order with a barrier around each (RPUSH ``ready_key``, BLPOP
``go_key``, run, RPUSH ``done_key``), so one set of processes measures several hold times. At the end it
writes its samples to ``out`` as JSON and RPUSHes ``final_key``.

A sample is ``[size_gb, t_request, t_granted, t_release, t_released, calls]`` on ``time.monotonic()``
(CLOCK_MONOTONIC, the clock of every process on the machine, the Node worker's included); ``calls`` is the
number of EVALSHA attempts an acquire made (the busy-retry counter only; None for the others).

Kinds:

``gpuboss``
    ``GPUBoss.acquire(size)`` / ``release``: queued by arrival, woken by the pushed grant.
``counter``
    the trivial EVALSHA counter: a script INCRBYs ``used`` if the size fits under the capacity, else
    answers 0, and the client retries at once (busy retry); release is a DECRBY script.
``reslock``
    reslock's ``ResourcePool.acquire(vram_mb=...)`` on a JSON state file under a file lock, polled every
    0.25 s (its default); not Redis.
"""

from __future__ import annotations

import faulthandler
import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.worker import connect

START_TIMEOUT_S = 60

COUNTER_ACQUIRE = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local need = tonumber(ARGV[1])
if used + need <= tonumber(ARGV[2]) then
  redis.call('INCRBY', KEYS[1], need)
  return 1
end
return 0
"""
COUNTER_RELEASE = "return redis.call('DECRBY', KEYS[1], ARGV[1])"

Take = Callable[[int], tuple[Any, int | None]]  # size in GB -> (handle, EVALSHA attempts or None)
Give = Callable[[Any], None]


def gpuboss_pair(spec: dict[str, Any]) -> tuple[Take, Give, Callable[[], None]]:
    from gpuboss import GPUBoss

    settings = spec.get("settings") or {}  # scheduling rules of a variant (overtake)
    boss = GPUBoss(
        spec["url"], namespace=spec["namespace"], gpus=spec["gpus"], service=f"bench-w{os.getpid()}", **settings
    )
    timeout = float(spec["acquire_timeout_s"])
    boss.release(boss.acquire(1, timeout=timeout))  # register, load the scripts

    def take(size: int) -> tuple[Any, int | None]:
        return boss.acquire(size, timeout=timeout), None

    return take, boss.release, boss.close


def counter_pair(spec: dict[str, Any]) -> tuple[Take, Give, Callable[[], None]]:
    client = connect(spec["url"])
    acquire_sha = client.script_load(COUNTER_ACQUIRE)
    release_sha = client.script_load(COUNTER_RELEASE)
    key, capacity = spec["counter_key"], int(spec["capacity_gb"]) * 1024
    timeout = float(spec["acquire_timeout_s"])
    mono = time.monotonic

    def take(size: int) -> tuple[Any, int | None]:
        mib, calls, give_up = size * 1024, 0, mono() + timeout
        while True:
            calls += 1
            if client.evalsha(acquire_sha, 1, key, mib, capacity) == 1:
                return mib, calls
            if calls % 256 == 0 and mono() > give_up:
                raise TimeoutError(f"counter: {size} GB did not fit within {timeout:g} s")

    def give(mib: Any) -> None:
        client.evalsha(release_sha, 1, key, mib)

    return take, give, client.close


def reslock_pair(spec: dict[str, Any]) -> tuple[Take, Give, Callable[[], None]]:
    from reslock import ResourcePool  # type: ignore[import-not-found,unused-ignore]

    pool = ResourcePool(spec["reslock_state"])
    pool.set_resources({"vram_mb": int(spec["capacity_gb"]) * 1024})

    def take(size: int) -> tuple[Any, int | None]:
        block = pool.acquire(vram_mb=size * 1024, label="bench")
        block.__enter__()
        return block, None

    def give(block: Any) -> None:
        block.__exit__(None, None, None)

    return take, give, lambda: None


PAIRS: dict[str, Callable[[dict[str, Any]], tuple[Take, Give, Callable[[], None]]]] = {
    "gpuboss": gpuboss_pair,
    "counter": counter_pair,
    "reslock": reslock_pair,
}


def run_phase(
    take: Take, give: Give, phase: dict[str, Any], rng: random.Random, spec: dict[str, Any]
) -> tuple[list[Any], list[str]]:
    """Take and give back until the phase's deadline. With ``spec["tolerate"]`` (a peer), an acquire that
    raises is counted (its error kept) and the process goes on with a new size, as a caller would retry."""
    samples: list[Any] = []
    failures: list[str] = []
    mono, sleep = time.monotonic, time.sleep
    hold = float(phase["hold_ms"]) / 1000
    lo, hi = int(spec["min_gb"]), int(spec["max_gb"])
    deadline = mono() + float(phase["max_s"])
    while mono() < deadline and len(samples) < int(spec["max_count"]):
        size = rng.randint(lo, hi)
        t_req = mono()
        try:
            handle, calls = take(size)
        except Exception as err:  # a peer's failure is counted; ours propagate
            if not spec.get("tolerate"):
                raise
            failures.append(f"{type(err).__name__}: {err}")
            continue
        t_granted = mono()
        if hold > 0:
            sleep(hold)
        t_release = mono()
        give(handle)
        samples.append([size, t_req, t_granted, t_release, mono(), calls])
    return samples, failures


def main(argv: list[str]) -> int:
    faulthandler.register(signal.SIGUSR1)  # the parent asks for the stacks of a worker that hangs
    spec: dict[str, Any] = json.loads(argv[1])
    control = connect(spec["url"])
    control.ping()
    rng = random.Random(int(spec["seed"]))
    error = ""
    phases: list[dict[str, Any]] = []
    take: Take | None = None
    give: Give | None = None
    close: Callable[[], None] = lambda: None  # noqa: E731
    try:
        take, give, close = PAIRS[spec["kind"]](spec)
    except Exception as err:  # noqa: BLE001 - reported to the parent, which fails the run
        error = f"setup: {type(err).__name__}: {err}"
    for phase in spec["phases"]:
        control.rpush(phase["ready_key"], os.getpid())
        if control.blpop([phase["go_key"]], timeout=START_TIMEOUT_S) is None:
            error = error or "no start signal"
            break
        start, cpu = time.monotonic(), time.process_time()
        samples: list[Any] = []
        failures: list[str] = []
        if not error and take is not None and give is not None:
            try:
                samples, failures = run_phase(take, give, phase, rng, spec)
            except Exception as err:  # noqa: BLE001
                error = f"hold {phase['hold_ms']} ms: {type(err).__name__}: {err}"
        phases.append(
            {
                "start": start,
                "end": time.monotonic(),
                "cpu_s": time.process_time() - cpu,
                "samples": samples,
                "failures": len(failures),
                "failure": failures[0] if failures else "",
            }
        )
        control.rpush(phase["done_key"], os.getpid())
    try:
        close()
    except Exception as err:  # noqa: BLE001
        error = error or f"close: {type(err).__name__}: {err}"
    Path(spec["out"]).write_text(json.dumps({"pid": os.getpid(), "error": error, "phases": phases}))
    control.rpush(spec["final_key"], os.getpid())
    control.close()
    return 1 if error else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
