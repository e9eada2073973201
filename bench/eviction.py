"""Cooperative eviction latency (issue 4): how fast a high-priority request gets a GPU a low lease holds.

A victim process (``bench/eviction_worker.py``) holds a preemptible ``low`` lease of the whole GPU with an
``on_evict`` that returns at once and ``resume=True``. Each round, this process asks for the whole GPU at
``high`` priority, which makes the acquire script ask the victim to checkpoint; the victim's callback runs,
the lease is handed back, and the high request is granted. This process then releases its lease and waits
for the victim to be granted again (resumed) before the next round. Per round it measures, on
``time.monotonic()`` (CLOCK_MONOTONIC, one clock for both processes):

* request -> callback: from just before ``acquire()`` is called to the victim's ``on_evict`` starting;
* request -> grant: from the same moment to ``acquire()`` returning;
* release -> resumed: from just before ``release()`` is called to the victim's safe point returning.

Each round starts after a random pause (uniform in 0 to TTL/3, seeded), so that the request falls at a random
point of the victim's heartbeat period rather than right after its resume (when the next renewal is a whole
period away). It runs twice: with the victim's notice listener (pub/sub, the fast path) and without it, so that the
request only reaches the victim in its heartbeat's renew reply (every TTL/3): the fallback that covers a
holder that missed the message, and what eviction would cost without pub/sub.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from bench.env import connect
from bench.handoff import ROOT, stop_workers, worker_env
from bench.stats import Summary, summarize

GPU: dict[str, Any] = {"id": "gpu0", "name": "bench-eviction", "vram_gb": 24, "index": 0}
WHOLE_GB = 24.0
#: The victim's lease TTL, the same in both modes: the heartbeat renews (and can deliver) every TTL/3.
VICTIM_TTL_S = 0.6
#: Rounds run first and not counted (thread and connection start-up in the victim).
WARMUP = 1
LINE_TIMEOUT_S = 30.0
ACQUIRE_TIMEOUT_S = 30.0


@dataclass
class EvictionRun:
    """What one mode (pub/sub or heartbeat only) measured."""

    label: str
    notices: bool
    namespace: str
    to_callback: Summary | None = None
    to_grant: Summary | None = None
    to_resume: Summary | None = None
    rounds: int = 0
    errors: list[str] = field(default_factory=list)


def namespace_state(url: str, namespace: str) -> str:
    """The namespace's leases, queue and header as one line: what a stalled round left in Redis."""
    from gpuboss import Keys

    keys, client = Keys(namespace), connect(url)
    try:
        leases = {k: json.loads(v).get("state") for k, v in client.hgetall(keys.leases).items()}
        return (
            f"namespace state: leases {leases}, used {client.hgetall(keys.used)}, queue {client.zrange(keys.queue, 0, -1)}, "
            f"holds {client.hgetall(keys.holds)}, head {client.hgetall(keys.head)}, time {client.time()}"
        )
    except (redis.RedisError, ValueError) as err:  # a diagnostic only
        return f"namespace state: unreadable ({err})"
    finally:
        client.close()


class Victim:
    """The victim process, its stdout read line by line on a thread; stopped by its own PID only."""

    def __init__(self, spec: dict[str, Any], stderr_path: Path) -> None:
        self._stderr_path = stderr_path
        with stderr_path.open("wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.eviction_worker", json.dumps(spec)],
                cwd=ROOT,
                env=worker_env(),
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, prefix: str) -> str:
        """The next line, which must start with ``prefix``: its rest."""
        try:
            line = self.lines.get(timeout=LINE_TIMEOUT_S)
        except queue.Empty:
            with contextlib.suppress(OSError):  # its Python stacks into its stderr (faulthandler): where it hangs
                os.kill(self.proc.pid, signal.SIGUSR1)
            time.sleep(0.5)
            raise RuntimeError(f"victim: no {prefix!r} line within {LINE_TIMEOUT_S:g} s{self.stderr(6000)}") from None
        if line is None or not line.startswith(prefix + " "):
            raise RuntimeError(f"victim: expected {prefix!r}, got {line!r}{self.stderr()}")
        return line[len(prefix) + 1 :]

    def stderr(self, tail: int = 1500) -> str:
        with contextlib.suppress(OSError):
            text = self._stderr_path.read_text(errors="replace").strip()
            if text:
                return "; its stderr: " + text[-tail:]
        return ""

    def close(self) -> None:
        stop_workers([self.proc])  # a victim still running is killed by its PID
        self._pump.join(timeout=5)
        if self.proc.stdout is not None:
            with contextlib.suppress(OSError):
                self.proc.stdout.close()


def run_eviction(url: str, workdir: Path, rounds: int, notices: bool, label: str) -> EvictionRun:
    """``rounds`` measured evictions (after ``WARMUP``) of one victim process, in a namespace of their own."""
    from gpuboss import GPUBoss

    run_id = uuid.uuid4().hex[:10]
    result = EvictionRun(label, notices, namespace=f"benche{run_id}")
    folder = workdir / f"eviction-{run_id}"
    folder.mkdir(parents=True)
    boss = GPUBoss(url, namespace=result.namespace, gpus=[GPU], service="bench-high")
    boss.release(boss.acquire(1, priority="high", timeout=0))  # GPU registered and scripts loaded first
    total = WARMUP + rounds
    spec = {
        "url": url,
        "namespace": result.namespace,
        "gpus": [GPU],
        "vram_gb": WHOLE_GB,
        "ttl": VICTIM_TTL_S,
        "notices": notices,
        "rounds": total,
    }
    victim = Victim(spec, folder / "victim.stderr")
    rng = random.Random(1)
    callback: list[float] = []
    grant: list[float] = []
    resume: list[float] = []
    try:
        victim.expect("HELD")
        for i in range(total):
            time.sleep(rng.uniform(0, VICTIM_TTL_S / 3))  # a random point of the victim's heartbeat period
            t_request = time.monotonic()
            high = boss.acquire(WHOLE_GB, priority="high", timeout=ACQUIRE_TIMEOUT_S)
            t_granted = time.monotonic()
            t_callback = float(victim.expect("CALLBACK"))
            t_release = time.monotonic()
            boss.release(high)
            t_resumed = float(victim.expect("RESUMED").split()[0])
            if i >= WARMUP:
                callback.append(t_callback - t_request)
                grant.append(t_granted - t_request)
                resume.append(t_resumed - t_release)
        victim.expect("DONE")
        if victim.proc.wait(timeout=LINE_TIMEOUT_S) != 0:
            result.errors.append(f"eviction, {label}: the victim exited with {victim.proc.returncode}")
    except Exception as err:  # noqa: BLE001 - reported as a failure of this measurement, with what was measured
        result.errors.append(
            f"eviction, {label}: {type(err).__name__}: {err}; {namespace_state(url, result.namespace)}"
        )
    finally:
        victim.close()
        boss.close()
    result.rounds = len(callback)
    result.to_callback, result.to_grant, result.to_resume = summarize(callback), summarize(grant), summarize(resume)
    if result.rounds < rounds and not result.errors:
        result.errors.append(f"eviction, {label}: {result.rounds} of {rounds} rounds measured")
    return result
