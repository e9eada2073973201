"""Weighted throughput: P processes take leases of random sizes (1 to 8 GB) on one 24 GB GPU.

Each library runs in one set of P processes (``bench/weighted_worker.py``, or ``bench/semaphore_worker.js`` for
the npm MultiSemaphore) through several phases, one per hold time, behind a barrier. For every phase it gives:

* grants per second, counted over the window in which every process was running;
* wait (acquire called -> acquire returned) p50/p99, and the p99 of the largest requests (7 and 8 GB)
  apart, which shows whether large requests starve behind a stream of small ones;
* utilisation: the VRAM held by clients (from each acquire returning to its release being called), integrated
  over the window and divided by capacity x window;
* redis-server CPU per grant (INFO cpu over the phase) and Redis calls per grant.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.env import connect
from bench.handoff import ROOT, redis_cpu, stop_workers, worker_env
from bench.peers import NODE_WORKER, node_env
from bench.scriptcalls import SCRIPT_COMMANDS
from bench.stats import Summary, summarize

CAPACITY_GB = 24
MIN_GB, MAX_GB = 1, 8
LARGE_GB = 7  # requests of this size and more are "large"
GPU: dict[str, Any] = {"id": "gpu0", "name": "bench-weighted", "vram_gb": CAPACITY_GB, "index": 0}
STARTUP_S = 60.0
ACQUIRE_TIMEOUT_S = 60.0
MAX_COUNT = 1_000_000
#: Kinds that are other libraries: an acquire of theirs that raises is counted and retried, not a failure.
PEERS = ("semaphore", "reslock")
#: The GPUBoss variant measured besides the default (strict order): a blocked request may be passed this often.
OVERTAKE = 4


@dataclass
class Phase:
    """What one phase (one hold time) of one library measured."""

    hold_ms: float
    grants: int = 0
    window_s: float = 0.0
    rate: float | None = None  # grants per second in the window
    wait: Summary | None = None
    wait_large: Summary | None = None
    utilisation: float | None = None
    #: what makes up the utilisation: the mean size of the grants in the window, and how long they were held
    #: (acquire returned -> release called: the hold time asked for, plus the holder's wake-up from its sleep)
    size_mean_gb: float | None = None
    held_mean_ms: float | None = None
    redis_us_per_grant: float | None = None
    calls_per_grant: float | None = None  # script calls (FCALL/EVALSHA/EVAL) per grant, all clients
    failures: int = 0  # a peer's acquire calls that raised (and were retried)
    failure: str = ""  # the first of them

    @property
    def asked_utilisation(self) -> float | None:
        """The utilisation had every grant been held for exactly the hold time asked: grants/s x mean GB x hold /
        capacity. Unlike :attr:`utilisation` it does not grow when the holders wake late from their sleep (as
        they do while a busy-retry loop keeps the CPUs busy): it counts only the work the grants allowed."""
        if self.rate is None or self.size_mean_gb is None or not self.hold_ms:
            return None
        return self.rate * self.size_mean_gb * (self.hold_ms / 1000) / CAPACITY_GB


@dataclass
class Weighted:
    kind: str
    label: str
    procs: int
    phases: list[Phase] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    namespace: str = ""


def command(kind: str, spec: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    if kind == "semaphore":
        return ["node", str(NODE_WORKER), json.dumps(spec)], node_env()
    return [sys.executable, "-m", "bench.weighted_worker", json.dumps(spec)], worker_env()


def run_weighted(
    kind: str,
    label: str,
    url: str,
    socket: str,
    workdir: Path,
    procs: int,
    holds_ms: tuple[float, ...],
    phase_s: float,
    seed: int = 1,
    settings: dict[str, Any] | None = None,
    variant: str = "",
) -> Weighted:
    """Run ``procs`` workers of ``kind`` through one phase per hold time, ``phase_s`` seconds each; GPUBoss
    workers take ``settings`` (a scheduling rule), and the result's kind is ``kind`` + ``variant``."""
    run_id = uuid.uuid4().hex[:10]
    folder = workdir / f"weighted-{kind}-{run_id}"
    folder.mkdir(parents=True)
    prefix = f"bench:{run_id}:"
    phases = [
        {
            "hold_ms": hold,
            "max_s": phase_s,
            "ready_key": f"{prefix}ready{i}",
            "go_key": f"{prefix}go{i}",
            "done_key": f"{prefix}done{i}",
        }
        for i, hold in enumerate(holds_ms)
    ]
    base: dict[str, Any] = {
        "kind": kind,
        "url": url,
        "socket": socket,
        "phases": phases,
        "final_key": f"{prefix}final",
        "namespace": f"benchw{run_id}",
        "gpus": [GPU],
        "capacity_gb": CAPACITY_GB,
        "min_gb": MIN_GB,
        "max_gb": MAX_GB,
        "counter_key": f"{prefix}used",
        "semaphore_key": f"{prefix}vram",
        "reslock_state": str(folder / "reslock-state.json"),
        "acquire_timeout_s": ACQUIRE_TIMEOUT_S,
        "max_count": MAX_COUNT,
        "tolerate": kind in PEERS,
        "settings": settings or {},
    }
    result = Weighted(kind + variant, label, procs, namespace=base["namespace"] if kind == "gpuboss" else "")
    control = connect(url)
    running: list[tuple[subprocess.Popen[bytes], Path, Path]] = []
    cpu: list[tuple[float, float, dict[str, int], dict[str, int]]] = []  # per phase: Redis CPU and commands
    try:
        for i in range(procs):
            out, err = folder / f"worker{i}.json", folder / f"worker{i}.stderr"
            cmd, env = command(kind, {**base, "out": str(out), "seed": seed * 1000 + i})
            with err.open("wb") as stderr:
                proc = subprocess.Popen(
                    cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
                )
            running.append((proc, out, err))
        for phase in phases:
            gather(control, running, phase["ready_key"], procs, STARTUP_S, f"{label}: workers not ready")
            before = redis_cpu(control)
            control.rpush(phase["go_key"], *range(procs))
            gather(control, running, phase["done_key"], procs, phase_s + ACQUIRE_TIMEOUT_S, f"{label}: not done")
            after = redis_cpu(control)
            cpu.append((before[0], after[0], before[1], after[1]))
        gather(control, running, base["final_key"], procs, 30.0, f"{label}: no results")
        for proc, _, _ in running:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                result.errors.append(f"{label}: worker {proc.pid} did not exit; killed")
    except RuntimeError as err:
        result.errors.append(str(err))
    finally:
        stop_workers([proc for proc, _, _ in running])
        leftover = list(control.scan_iter(match=f"*{prefix}*", count=1000))  # barriers, counter, semaphore
        if leftover:
            control.delete(*leftover)
        control.close()

    workers: list[dict[str, Any]] = []
    for proc, out, err in running:
        if not out.exists():
            tail = err.read_text(errors="replace").strip().splitlines()[-6:]
            result.errors.append(
                f"{label}: worker {proc.pid} exited {proc.returncode} without results: {' | '.join(tail)}"
            )
            continue
        data = json.loads(out.read_text())
        if data["error"]:
            result.errors.append(f"{label}: worker {data['pid']}: {data['error']}")
        workers.append(data)
    for i, hold in enumerate(holds_ms):
        per = [w["phases"][i] for w in workers if len(w["phases"]) > i]
        phase = analyze_phase(hold, per)
        if i < len(cpu) and phase.grants:
            cpu_before, cpu_after, calls_before, calls_after = cpu[i]
            total = sum(len(p["samples"]) for p in per)
            phase.redis_us_per_grant = (cpu_after - cpu_before) * 1e6 / max(1, total)
            sent = sum(calls_after.get(k, 0) - calls_before.get(k, 0) for k in SCRIPT_COMMANDS)
            phase.calls_per_grant = sent / max(1, total)
        result.phases.append(phase)
    return result


def gather(
    control: Any, running: list[tuple[subprocess.Popen[bytes], Path, Path]], key: str, n: int, limit: float, what: str
) -> None:
    """Wait for ``n`` pushes onto ``key``; fail when time runs out or every worker has exited."""
    deadline = time.monotonic() + limit
    got = 0
    while got < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"{what}: {got} of {n} within {limit:g} s")
        if control.blpop([key], timeout=min(0.5, left)) is not None:
            got += 1
        elif all(p.poll() is not None for p, _, _ in running):
            raise RuntimeError(f"{what}: every worker exited ({got} of {n})")


def analyze_phase(hold_ms: float, per: list[dict[str, Any]]) -> Phase:
    phase = Phase(hold_ms)
    if not per:
        return phase
    phase.failures = sum(int(p.get("failures", 0)) for p in per)
    phase.failure = next((str(p["failure"]) for p in per if p.get("failure")), "")
    t0 = max(p["start"] for p in per)
    t1 = min(p["end"] for p in per)
    samples = [s for p in per for s in p["samples"]]
    if t1 <= t0 or not samples:
        return phase
    phase.window_s = t1 - t0
    in_window = [s for s in samples if t0 <= s[2] <= t1]
    phase.grants = len(in_window)
    phase.rate = len(in_window) / phase.window_s
    asked = [s for s in samples if t0 <= s[1] <= t1]
    phase.wait = summarize([s[2] - s[1] for s in asked])
    phase.wait_large = summarize([s[2] - s[1] for s in asked if s[0] >= LARGE_GB])
    held = 0.0
    for size, _, t_granted, t_release, _, _ in samples:
        start, end = max(t0, t_granted), min(t1, t_release)
        if end > start:
            held += size * (end - start)
    phase.utilisation = held / (CAPACITY_GB * phase.window_s)
    if in_window:
        phase.size_mean_gb = sum(s[0] for s in in_window) / len(in_window)
        phase.held_mean_ms = 1000 * sum(s[3] - s[2] for s in in_window) / len(in_window)
    return phase
