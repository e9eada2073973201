"""One worker process of the chaos run: ``python -m bench.chaos_worker '<spec as JSON>'``.

It takes leases of random sizes, priorities, TTLs, timeouts and (sometimes) pinned GPUs, holds each for a
random while and gives it back, again and again, until SIGTERM. ``kind`` picks the front end: ``sync``
(``GPUBoss.acquire``/``release`` in the main thread), ``async`` (``AsyncGPUBoss.acquire``/``release`` in
``tasks`` concurrent tasks), or ``registry`` (like ``sync``, but its boss declares no GPU: it leases the GPUs
the others registered, as a client on another host would). It connects through the chaos proxy (``url``), so its connections can be cut.

It writes what happened as JSON lines to ``log`` (one object per line, times on ``time.monotonic()``, the
clock every process of the machine shares); the driver reads them after the run:

``start``     ``{pid, kind}``: the boss exists (the driver waits for this line from every worker)
``grant``     ``{t0, t, id, tok, gpu, mib}``: ``acquire()`` called at ``t0`` returned a lease at ``t``
``rel``       ``{r0, t, id, ok, lost}``: ``release()``, called at ``r0``, returned ``ok`` (False: the lease was
              already gone);
              ``lost``: the lease had been reported lost before
``lost``      ``{t, id, tok}``: ``on_lost`` ran for the lease
``pause``     ``{t, id, tok, gap, verdict}``: a sleep of the hold overshot by ``gap`` s (SIGSTOP); the worker
              then waited for the heartbeat's verdict before going on: ``lost`` or ``renewed``
``timeout``   ``{t}``: ``LeaseTimeout``; ``unavailable`` ``{t, op[, id]}``: ``RedisUnavailable`` (``id``: the lease
              a release was for)
``error``     ``{t, what}``: anything else raised (a heartbeat thread that died included): a failure
``c``         ``{a, b}``: one script call (FCALL or EVALSHA attempt, the heartbeat's included) sent at ``a``,
              answered at ``b`` (a diagnostic tap on gpuboss's call_script functions, for the proxy-drop
              and flush recovery times)
``exit``      ``{t}``: the boss is closed

On SIGTERM a sync worker interrupts an ``acquire()`` in progress (as Ctrl-C would: the request is withdrawn),
ends its hold early, releases, closes the boss and exits 0; an async worker cancels its tasks, which does the
same. SIGUSR1 dumps the Python stacks to stderr (faulthandler), for a worker that hangs.
"""

from __future__ import annotations

import asyncio
import faulthandler
import io
import json
import os
import random
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

SIZES_GB = (0.5, 1, 2, 3, 4, 6, 8, 12)
PRIORITIES = ("low", "normal", "normal", "high")
#: acquire() timeouts: 0 (try once), short ones, and long ones that ride over most faults.
TIMEOUTS = (0, 0.5, 2.0, 4.0, 6.0)
PIN_SHARE = 0.1
PINS: tuple[str | int, ...] = ("gpu0", "gpu1", "cuda:0", 1)
#: A sleep of the hold that overshoots by this much means the process was stopped.
PAUSE_S = 0.6
SLICE_S = 0.05
#: After a pause, wait at most this long for the heartbeat to say whether the lease survived.
VERDICT_S = 6.0
#: How long cancelled tasks get to finish (a release each) before they count as having ignored cancel().
CANCEL_WAIT_S = 5.0
#: After an unexpected error, wait this long before the next round (no busy loop on a persistent failure).
ERROR_PAUSE_S = 0.2
#: How long a worker that declares no GPU waits for the others to register theirs, at its start.
REGISTRY_WAIT_S = 30.0

mono = time.monotonic


class Stop(BaseException):
    """Raised in the main thread by SIGTERM while a sync acquire() blocks (like KeyboardInterrupt)."""


class EventLog:
    """JSON lines to a file, from any thread; flushed after every round."""

    def __init__(self, path: str) -> None:
        self._file: TextIO = open(path, "a", buffering=1 << 16)  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()

    def event(self, name: str, /, **fields: Any) -> None:
        fields["e"] = name
        fields.setdefault("t", mono())
        line = json.dumps(fields, separators=(",", ":"))
        with self._lock:
            self._file.write(line + "\n")

    def call(self, sent: float, answered: float) -> None:
        with self._lock:
            self._file.write(f'{{"e":"c","a":{sent:.6f},"b":{answered:.6f}}}\n')

    def flush(self) -> None:
        with self._lock:
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.flush()
            self._file.close()


def install_tap(log: EventLog) -> None:
    """Time every script call (diagnostic): wrap the call_script functions that the front ends (through
    gpuboss.fallback) and the heartbeat call."""
    import gpuboss.fallback
    import gpuboss.heartbeat

    for module in (gpuboss.fallback, gpuboss.heartbeat):
        inner = getattr(module, "call_script_sync", None)
        if inner is None:
            continue

        def timed(*args: Any, _inner: Callable[..., Any] = inner, **kwargs: Any) -> Any:
            sent = mono()
            result = _inner(*args, **kwargs)
            log.call(sent, mono())
            return result

        module.call_script_sync = timed  # type: ignore[attr-defined]
    inner_async = getattr(gpuboss.fallback, "call_script_async", None)
    if inner_async is not None:

        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            sent = mono()
            result = await inner_async(*args, **kwargs)
            log.call(sent, mono())
            return result

        gpuboss.fallback.call_script_async = timed_async  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Draw:
    vram_gb: float
    priority: str
    ttl: float
    timeout: float
    device: str | int | None
    hold_s: float


def draw(rng: random.Random, spec: dict[str, Any]) -> Draw:
    ttl_min, ttl_max = spec.get("ttl", (1.0, 3.0))
    hold_min, hold_max = spec["hold_ms"]
    return Draw(
        vram_gb=rng.choice(SIZES_GB),
        priority=rng.choice(PRIORITIES),
        ttl=round(rng.uniform(ttl_min, ttl_max), 1),
        timeout=rng.choice(TIMEOUTS),
        device=rng.choice(PINS) if rng.random() < PIN_SHARE else None,
        hold_s=rng.uniform(hold_min, hold_max) / 1000,
    )


def describe(err: BaseException) -> str:
    return "".join(traceback.format_exception(err)).strip()[-2000:]


# ---------------------------------------------------------------- sync


class SyncWorker:
    def __init__(self, spec: dict[str, Any], log: EventLog) -> None:
        from gpuboss import GPUBoss

        self.spec = spec
        self.log = log
        self.rng = random.Random(spec["seed"])
        self.stopping = False
        self.in_acquire = False
        self.boss = GPUBoss(
            spec["url"],
            namespace=spec["namespace"],
            gpus=spec["gpus"],
            service=f"chaos-{os.getpid()}",
            **spec.get("rules", {}),
        )
        if not spec["gpus"]:  # a registry client: it leases the GPUs other processes registered
            deadline = mono() + REGISTRY_WAIT_S
            while not self.boss.gpus() and mono() < deadline:
                time.sleep(0.05)

    def on_term(self, _signum: int, _frame: object) -> None:
        self.stopping = True
        if self.in_acquire:
            self.in_acquire = False
            raise Stop

    def on_lost(self, lease: Any) -> None:
        self.log.event("lost", id=lease.id, tok=lease.token)

    def run(self) -> None:
        from gpuboss import LeaseTimeout, RedisUnavailable

        signal.signal(signal.SIGTERM, self.on_term)
        self.log.event("start", pid=os.getpid(), kind="sync" if self.spec["gpus"] else "registry")
        self.log.flush()
        while not self.stopping:
            try:
                self.round()
            except Stop:
                break
            except LeaseTimeout:
                self.log.event("timeout")
            except RedisUnavailable:
                self.log.event("unavailable", op="acquire")
                time.sleep(0.05)
            except Exception as err:  # noqa: BLE001 - anything else is a failure the driver reports
                self.log.event("error", what=describe(err))
                time.sleep(ERROR_PAUSE_S)
            self.log.flush()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.boss.close()

    def round(self) -> None:
        from gpuboss import RedisUnavailable

        d = draw(self.rng, self.spec)
        t0 = mono()
        self.in_acquire = True
        try:
            if self.stopping:
                raise Stop
            lease = self.boss.acquire(
                d.vram_gb, priority=d.priority, timeout=d.timeout, ttl=d.ttl, device=d.device, on_lost=self.on_lost
            )
        finally:
            self.in_acquire = False
        self.log.event("grant", t0=t0, id=lease.id, tok=lease.token, gpu=lease.gpu, mib=lease.vram_mib)
        self.hold(lease, d.hold_s)
        was_lost = lease.lost
        r0 = mono()
        try:
            ok = self.boss.release(lease)
        except RedisUnavailable:
            self.log.event("unavailable", op="release", id=lease.id)
            return
        self.log.event("rel", r0=r0, id=lease.id, ok=ok, lost=was_lost)

    def hold(self, lease: Any, seconds: float) -> None:
        end = mono() + seconds
        gap = 0.0
        while not self.stopping:
            now = mono()
            step = min(SLICE_S, end - now)
            if step <= 0:
                break
            time.sleep(step)
            gap = max(gap, mono() - now - step)
        if gap > PAUSE_S:
            self.log.event("pause", id=lease.id, tok=lease.token, gap=gap, verdict=self.verdict(lease))

    @staticmethod
    def verdict(lease: Any) -> str:
        """After a pause: wait for the heartbeat to renew the lease or to find it lost."""
        expires = lease.expires_at
        deadline = mono() + VERDICT_S
        while mono() < deadline:
            if lease.lost:
                return "lost"
            if lease.expires_at != expires:
                return "renewed"
            time.sleep(0.01)
        return "undecided"


# ---------------------------------------------------------------- async


class AsyncWorker:
    def __init__(self, spec: dict[str, Any], log: EventLog) -> None:
        self.spec = spec
        self.log = log
        self.rng = random.Random(spec["seed"])

    def on_lost(self, lease: Any) -> None:
        self.log.event("lost", id=lease.id, tok=lease.token)

    async def run(self) -> None:
        from gpuboss import AsyncGPUBoss

        boss = AsyncGPUBoss(
            self.spec["url"],
            namespace=self.spec["namespace"],
            gpus=self.spec["gpus"],
            service=f"achaos-{os.getpid()}",
            **self.spec.get("rules", {}),
        )
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        self.log.event("start", pid=os.getpid(), kind="async")
        self.log.flush()
        tasks = [asyncio.create_task(self.task(boss)) for _ in range(int(self.spec.get("tasks", 2)))]
        await stop.wait()
        self.log.event("stopping")
        for attempt in range(5):
            for task in tasks:
                task.cancel()
            _done, pending = await asyncio.wait(tasks, timeout=CANCEL_WAIT_S)
            if not pending:
                break
            # cancel() was swallowed somewhere below the task: a failure (the task never ends by itself)
            buffer = io.StringIO()
            next(iter(pending)).print_stack(limit=40, file=buffer)
            where = buffer.getvalue()
            self.log.event(
                "error", what=f"{len(pending)} task(s) still running after cancel() #{attempt + 1}:\n{where}"
            )
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                self.log.event("error", what=describe(task.exception()))  # type: ignore[arg-type]
        await boss.close()

    async def task(self, boss: Any) -> None:
        from gpuboss import LeaseTimeout, RedisUnavailable

        while True:
            try:
                await self.round(boss)
            except LeaseTimeout:
                self.log.event("timeout")
            except RedisUnavailable:
                self.log.event("unavailable", op="acquire")
                await asyncio.sleep(0.05)
            except Exception as err:  # noqa: BLE001 - anything else is a failure the driver reports
                self.log.event("error", what=describe(err))
                await asyncio.sleep(ERROR_PAUSE_S)
            self.log.flush()

    async def round(self, boss: Any) -> None:
        from gpuboss import RedisUnavailable

        d = draw(self.rng, self.spec)
        t0 = mono()
        lease = await boss.acquire(
            d.vram_gb, priority=d.priority, timeout=d.timeout, ttl=d.ttl, device=d.device, on_lost=self.on_lost
        )
        self.log.event("grant", t0=t0, id=lease.id, tok=lease.token, gpu=lease.gpu, mib=lease.vram_mib)
        try:
            await self.hold(lease, d.hold_s)
        finally:  # also when the task is cancelled (SIGTERM)
            was_lost = lease.lost
            r0 = mono()
            try:
                ok = await boss.release(lease)
            except RedisUnavailable:
                self.log.event("unavailable", op="release", id=lease.id)
            else:
                self.log.event("rel", r0=r0, id=lease.id, ok=ok, lost=was_lost)

    async def hold(self, lease: Any, seconds: float) -> None:
        end = mono() + seconds
        gap = 0.0
        while True:
            now = mono()
            step = min(SLICE_S, end - now)
            if step <= 0:
                break
            await asyncio.sleep(step)
            gap = max(gap, mono() - now - step)
        if gap > PAUSE_S:
            expires = lease.expires_at
            deadline = mono() + VERDICT_S
            verdict = "undecided"
            while mono() < deadline:
                if lease.lost:
                    verdict = "lost"
                    break
                if lease.expires_at != expires:
                    verdict = "renewed"
                    break
                await asyncio.sleep(0.01)
            self.log.event("pause", id=lease.id, tok=lease.token, gap=gap, verdict=verdict)


# ---------------------------------------------------------------- main


def main(argv: list[str]) -> int:
    faulthandler.register(signal.SIGUSR1)  # the driver asks for the stacks of a worker that hangs
    spec: dict[str, Any] = json.loads(argv[1])
    log = EventLog(spec["log"])

    def thread_died(args: threading.ExceptHookArgs) -> None:
        log.event("error", what=f"thread {args.thread.name if args.thread else '?'} died: {args.exc_value!r}")
        log.flush()

    threading.excepthook = thread_died
    install_tap(log)
    try:
        if spec["kind"] == "async":
            asyncio.run(AsyncWorker(spec, log).run())
        else:
            SyncWorker(spec, log).run()
    except Exception as err:  # noqa: BLE001 - reported to the driver, which fails the run
        log.event("error", what=describe(err))
        log.close()
        return 1
    log.event("exit")
    log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
