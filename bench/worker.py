"""One competing process of a contention benchmark: ``python -m bench.worker '<spec as JSON>'``.

Every worker connects, warms up, says it is ready (RPUSH ``ready_key``), waits for the start signal
(BLPOP ``go_key``), then takes and gives back the exclusive resource ``count`` times at most, and for at
most ``max_s`` seconds. It writes its samples, on ``time.monotonic()`` (one clock for every process on the
machine), as JSON to ``out``; the parent orders the grants of all workers and matches each release with
the grant that follows it.

Kinds:

``token``
    the push-based floor: BLPOP a token from a list, RPUSH it back (with its number plus one).
``gpuboss``
    ``GPUBoss.acquire`` of the whole GPU, then ``release``.
``redis-lock``
    redis-py's ``Lock`` (a SET NX polled every ``sleep`` seconds), then its release.
``python-redis-lock``
    python-redis-lock's ``Lock`` (SET NX; a waiter BLPOPs a signal list the release script pushes to).
``pottery``
    pottery's ``Redlock`` with one master (SET NX through a thread pool, retried after a random sleep of
    up to 0.2 s).

A sample is ``[seq, t_request, t_granted, t_release, t_released, t_woken, t_pop]``: ``seq`` the token number
or fencing token (None for the lock), ``t_woken`` when gpuboss's BLPOP returned the grant and ``t_pop`` when
that BLPOP was sent (both None if the grant came without waiting, and for the other kinds; ``t_pop`` may be
left out).
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

Sample = list[float | int | None]

START_TIMEOUT_S = 60
STALL_S = 10.0
SOCKET_TIMEOUT_S = 90.0  # longer than any BLPOP here


def connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=5.0, socket_timeout=SOCKET_TIMEOUT_S)


#: The measured phase of this process: monotonic start and CPU seconds (every thread) at the start.
PHASE: dict[str, float] = {}


def wait_for_start(control: redis.Redis, spec: dict[str, Any]) -> float:
    """Say ready, wait for the go; return the deadline of the measured phase."""
    control.rpush(spec["ready_key"], os.getpid())
    if control.blpop([spec["go_key"]], timeout=START_TIMEOUT_S) is None:
        raise RuntimeError("no start signal")
    PHASE["start"], PHASE["cpu"] = time.monotonic(), time.process_time()
    return PHASE["start"] + float(spec["max_s"])


def run_token(spec: dict[str, Any]) -> tuple[list[Sample], str]:
    from gpuboss.redis_io import direct_command

    client = connect(spec["url"])
    key = spec["token_key"]
    client.ping()
    deadline = wait_for_start(client, spec)
    samples: list[Sample] = []
    mono = time.monotonic
    take = ("BLPOP", key, STALL_S)
    while len(samples) < spec["count"] and mono() < deadline:
        t_req = mono()
        got = direct_command(client, take)  # (sent as gpuboss sends its own BLPOPs)
        t_granted = mono()
        if got is NotImplemented:
            raise RuntimeError("the direct path does not apply to this client, or its connection failed")
        if got is None:
            return samples, f"no token within {STALL_S:g} s"
        seq = int(got[1])
        t_release = mono()
        if direct_command(client, ("RPUSH", key, seq + 1)) is NotImplemented:
            raise RuntimeError("the direct path does not apply to this client")
        t_released = mono()
        samples.append([seq, t_req, t_granted, t_release, t_released, None])
    client.close()
    return samples, ""


def run_gpuboss(spec: dict[str, Any]) -> tuple[list[Sample], str]:
    from gpuboss import GPUBoss, LeaseTimeout
    from gpuboss.core import Pop

    control = connect(spec["url"])
    boss = GPUBoss(spec["url"], namespace=spec["namespace"], gpus=spec["gpus"], service=f"bench-{os.getpid()}")
    vram = float(spec["vram_gb"])
    boss.release(boss.acquire(vram, timeout=STALL_S * 3))  # register, load the scripts
    if spec.get("quiet_heartbeat"):  # diagnostic: never wake the heartbeat thread (leases of 30 s need none here)
        heartbeat = getattr(boss, "_heartbeat", None)
        if not (hasattr(heartbeat, "watch") and hasattr(heartbeat, "hold")):
            boss.close()
            return [], "diagnostic unavailable: GPUBoss has no _heartbeat with watch() and hold()"
        heartbeat.watch = lambda request_id, ttl_ms: None  # type: ignore[union-attr]
        heartbeat.hold = lambda lease: None  # type: ignore[union-attr]
    woken: list[float | None] = [None]
    popping: list[float | None] = [None]  # when the last BLPOP for the grant was sent
    mono = time.monotonic
    perform: Callable[[Any], Any] | None = getattr(boss, "_perform", None)
    if perform is not None:  # timestamp the BLPOP that returns the grant (diagnostic only)
        inner = perform

        def timed(op: Any) -> Any:
            if isinstance(op, Pop):
                popping[0] = mono()
            result = inner(op)
            if isinstance(op, Pop) and result is not None:
                woken[0] = mono()
            return result

        boss._perform = timed  # type: ignore[method-assign]
    deadline = wait_for_start(control, spec)
    samples: list[Sample] = []
    error = ""
    try:
        while len(samples) < spec["count"] and mono() < deadline:
            woken[0] = popping[0] = None
            t_req = mono()
            try:
                lease = boss.acquire(vram, timeout=STALL_S)
            except LeaseTimeout:
                error = f"no lease within {STALL_S:g} s"
                break
            t_granted = mono()
            t_woken = woken[0]
            t_release = mono()
            boss.release(lease)
            t_released = mono()
            samples.append([lease.token, t_req, t_granted, t_release, t_released, t_woken, popping[0]])
    finally:
        boss.close()
        control.close()
    return samples, error


def run_lock(spec: dict[str, Any]) -> tuple[list[Sample], str]:
    client = connect(spec["url"])
    lock = client.lock(spec["lock_name"], sleep=float(spec["sleep"]), blocking_timeout=STALL_S)
    lock.acquire()  # load the scripts
    lock.release()
    deadline = wait_for_start(client, spec)
    samples: list[Sample] = []
    mono = time.monotonic
    while len(samples) < spec["count"] and mono() < deadline:
        t_req = mono()
        if not lock.acquire():
            return samples, f"no lock within {STALL_S:g} s"
        t_granted = mono()
        t_release = mono()
        lock.release()
        t_released = mono()
        samples.append([None, t_req, t_granted, t_release, t_released, None])
    client.close()
    return samples, ""


def run_polled(spec: dict[str, Any], take: Callable[[], bool], give: Callable[[], None]) -> tuple[list[Sample], str]:
    """The loop of the lock peers: ``take()`` blocks until the lock is held (False: it gave up)."""
    control = connect(spec["url"])
    if not take():  # warm up: load the scripts
        return [], "could not take the lock once to warm up"
    give()
    deadline = wait_for_start(control, spec)
    samples: list[Sample] = []
    mono = time.monotonic
    while len(samples) < spec["count"] and mono() < deadline:
        t_req = mono()
        if not take():
            return samples, f"no lock within {STALL_S:g} s"
        t_granted = mono()
        t_release = mono()
        give()
        t_released = mono()
        samples.append([None, t_req, t_granted, t_release, t_released, None])
    control.close()
    return samples, ""


def run_python_redis_lock(spec: dict[str, Any]) -> tuple[list[Sample], str]:
    import redis_lock  # type: ignore[import-not-found,unused-ignore]

    client = connect(spec["url"])
    lock = redis_lock.Lock(client, spec["lock_name"], expire=60)
    return run_polled(spec, lambda: bool(lock.acquire(timeout=int(STALL_S))), lock.release)


def run_pottery(spec: dict[str, Any]) -> tuple[list[Sample], str]:
    from pottery import Redlock  # type: ignore[import-not-found,unused-ignore]

    client = connect(spec["url"])
    lock = Redlock(key=spec["lock_name"], masters={client}, auto_release_time=60)
    return run_polled(spec, lambda: bool(lock.acquire(timeout=STALL_S)), lock.release)


RUNNERS: dict[str, Callable[[dict[str, Any]], tuple[list[Sample], str]]] = {
    "token": run_token,
    "gpuboss": run_gpuboss,
    "redis-lock": run_lock,
    "python-redis-lock": run_python_redis_lock,
    "pottery": run_pottery,
}


def main(argv: list[str]) -> int:
    faulthandler.register(signal.SIGUSR1)  # the parent asks for the stacks of a worker that hangs
    spec: dict[str, Any] = json.loads(argv[1])
    done = connect(spec["url"])
    done.ping()
    try:
        samples, error = RUNNERS[spec["kind"]](spec)
    except Exception as err:  # noqa: BLE001 - reported to the parent, which fails the run
        samples, error = [], f"{type(err).__name__}: {err}"
    end, cpu = time.monotonic(), time.process_time()
    result = {
        "pid": os.getpid(),
        "samples": samples,
        "error": error,
        "start": PHASE.get("start", end),
        "end": end,
        "cpu_s": cpu - PHASE.get("cpu", cpu),
    }
    Path(spec["out"]).write_text(json.dumps(result))
    done.rpush(spec["done_key"], os.getpid())  # after the file: the parent reads it once all are done
    done.close()
    return 1 if error else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
