"""Handoff under contention: N worker processes (``bench/worker.py``) take turns on one exclusive resource.

The handoff time is from the moment ``release()`` (or the RPUSH of the token) returns in the holder to the
moment ``acquire()`` (or the BLPOP) returns in the next holder, both on ``time.monotonic()``; it is also
measured from the moment the holder called ``release()`` (sent the RPUSH). Grants are
put in order by the time they were received; since only one process holds the resource at a time, that
is their true order, and a grant received before the previous holder even started its release is a
broken exclusion (a failure). Only changes of holder count as handoffs; the share of consecutive grants
that went to the same process measures fairness.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from bench.env import connect
from bench.stats import Summary, summarize

ROOT = Path(__file__).resolve().parent.parent
GPUS: list[dict[str, Any]] = [{"id": "gpu0", "name": "bench", "vram_gb": 24, "index": 0}]
EXCLUSIVE_GB = 24.0
STARTUP_S = 60.0
#: What the workers send (gpuboss: FCALL, or EVALSHA where the server has no functions, and BLPOP; floor B:
#: BLPOP and RPUSH; redis-py Lock: SET, EVALSHA).
CLIENT_COMMANDS = ("fcall", "evalsha", "blpop", "rpush", "set")


@dataclass(frozen=True)
class Grant:
    pid: int
    seq: int | None
    t_request: float
    t_granted: float
    t_release: float
    t_released: float
    t_woken: float | None
    t_pop: float | None = None  # gpuboss: when the BLPOP that returned the grant was sent


@dataclass(frozen=True)
class CpuUse:
    """Where the CPU went during a contention run (its measured phase)."""

    wall_s: float  # first worker started -> last worker finished
    workers_s: float  # CPU seconds of every worker, all threads
    redis_s: float  # CPU seconds of redis-server (INFO cpu)
    machine_busy: float | None  # share of all CPUs busy machine-wide (/proc/stat), any process
    cpus: int
    commands: dict[str, int]  # Redis commands run (INFO commandstats), by name, scripts' inner calls included

    def command_line(self, grants: int) -> str:
        """The commands clients send in these runs, per grant (a script's own RPUSH counts too)."""
        shown = [
            f"{name.upper()} {self.commands[name] / max(1, grants):.2f}"
            for name in CLIENT_COMMANDS
            if self.commands.get(name, 0) > 0
        ]
        return ", ".join(shown) or "-"

    def line(self, grants: int) -> str:
        per = 1e6 / max(1, grants)
        busy = "" if self.machine_busy is None else f"; machine-wide {self.machine_busy:.0%} of all CPUs busy"
        return (
            f"{(self.workers_s + self.redis_s) / self.wall_s:.2f} of {self.cpus} CPUs busy with this run "
            f"(workers {self.workers_s / self.wall_s:.2f}, redis-server {self.redis_s / self.wall_s:.2f}){busy}; "
            f"per grant {self.wall_s * per:.0f} us of wall time, {self.workers_s * per:.0f} us of worker CPU "
            f"and {self.redis_s * per:.0f} us of redis-server CPU; Redis commands per grant: "
            f"{self.command_line(grants)}"
        )


def redis_cpu(client: Any) -> tuple[float, dict[str, int]]:
    """CPU seconds redis-server has used, and its command counts by name."""
    info = client.info("cpu")
    stats = client.info("commandstats")
    calls = {k.removeprefix("cmdstat_"): int(v.get("calls", 0)) for k, v in stats.items()}
    return float(info.get("used_cpu_sys", 0)) + float(info.get("used_cpu_user", 0)), calls


def proc_stat() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs, from /proc/stat; None where there is none."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]) - idle, sum(fields[:8])


@dataclass
class Contention:
    """What one contention run measured."""

    label: str
    procs: int
    grants: int
    handoff: Summary | None  # release returned -> the next holder's acquire returned
    from_call: Summary | None  # release called -> the next holder's acquire returned
    wait: Summary | None  # acquire called -> acquire returned, every grant
    same_holder: float | None
    retakes: float | None = None  # share of grants the releaser retook while another process already waited
    # gpuboss, the handoffs where the waiter was woken by the pushed grant:
    woken: Summary | None = None  # release returned -> the next holder's acquire returned
    wake: Summary | None = None  # release returned -> the waiter's BLPOP returned
    client: Summary | None = None  # the waiter's BLPOP returned -> acquire() returned
    blocked: Summary | None = None  # woken handoffs whose waiter sent its BLPOP before release() was called
    late: float | None = None  # share of woken handoffs whose waiter sent its BLPOP after release() returned
    capped: bool = False
    namespace: str = ""  # gpuboss: the namespace the run used (its keys are checked at the end)
    cpu: CpuUse | None = None
    errors: list[str] = field(default_factory=list)


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def run_contention(
    kind: str,
    label: str,
    url: str,
    workdir: Path,
    procs: int,
    total: int,
    max_s: float,
    **extra: Any,
) -> Contention:
    """Run ``procs`` workers of ``kind`` for about ``total`` grants in all (at most ``max_s`` seconds)."""
    run_id = uuid.uuid4().hex[:10]
    folder = workdir / f"{kind}-{procs}-{run_id}"
    folder.mkdir(parents=True)
    ready_key, go_key, done_key = (f"bench:{run_id}:{k}" for k in ("ready", "go", "done"))
    per_proc = max(1, math.ceil(total / procs))
    base: dict[str, Any] = {
        "kind": kind,
        "url": url,
        "ready_key": ready_key,
        "go_key": go_key,
        "done_key": done_key,
        "count": per_proc,
        "max_s": max_s,
        "token_key": f"bench:{run_id}:token",
        "namespace": f"bench{run_id}",
        "gpus": GPUS,
        "vram_gb": EXCLUSIVE_GB,
        "lock_name": f"bench:{run_id}:lock",
        "locks_prefix": f"bench:{run_id}:",
        **extra,
    }
    control = connect(url)
    running: list[tuple[subprocess.Popen[bytes], Path, Path]] = []
    errors: list[str] = []
    try:
        for i in range(procs):
            out, err = folder / f"worker{i}.json", folder / f"worker{i}.stderr"
            with err.open("wb") as stderr:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "bench.worker", json.dumps({**base, "out": str(out)})],
                    cwd=ROOT,
                    env=worker_env(),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                )
            running.append((proc, out, err))
        startup = time.monotonic() + STARTUP_S
        ready = 0
        while ready < procs:
            left = startup - time.monotonic()
            if left <= 0 or any(p.poll() is not None for p, _, _ in running):
                raise RuntimeError(f"{label}: only {ready} of {procs} workers started")
            if control.blpop([ready_key], timeout=min(1.0, left)) is not None:
                ready += 1
        if kind == "token":
            control.rpush(base["token_key"], 0)
        redis_before, stat_before = redis_cpu(control), proc_stat()
        control.rpush(go_key, *range(procs))
        finish = time.monotonic() + max_s + 20
        done = 0
        while done < procs and time.monotonic() < finish:
            if control.blpop([done_key], timeout=0.5) is not None:
                done += 1
            elif all(p.poll() is not None for p, _, _ in running):
                break  # they all exited: some without saying done
        redis_after, stat_after = redis_cpu(control), proc_stat()
        for proc, _, _ in running:
            try:
                proc.wait(timeout=max(0.1, finish - time.monotonic()))
            except subprocess.TimeoutExpired:
                errors.append(f"worker {proc.pid} did not finish in time; killed")
    finally:
        stop_workers([proc for proc, _, _ in running])
        control.delete(ready_key, go_key, done_key, base["token_key"], base["lock_name"])
        leftover = list(control.scan_iter(match=f"*bench:{run_id}:*", count=1000))  # peers' own keys (signals, locks)
        if leftover:
            control.delete(*leftover)
        control.close()

    grants: list[Grant] = []
    starts: list[float] = []
    ends: list[float] = []
    worker_cpu = 0.0
    for proc, out, err in running:
        if not out.exists():
            tail = err.read_text(errors="replace").strip().splitlines()[-3:]
            errors.append(f"worker {proc.pid} exited {proc.returncode} without results: {' | '.join(tail)}")
            continue
        data = json.loads(out.read_text())
        if data["error"]:
            errors.append(f"worker {data['pid']}: {data['error']}")
        starts.append(data["start"])
        ends.append(data["end"])
        worker_cpu += data["cpu_s"]
        for seq, t_request, t_granted, t_release, t_released, t_woken, *rest in data["samples"]:
            t_pop = rest[0] if rest else None
            grants.append(Grant(data["pid"], seq, t_request, t_granted, t_release, t_released, t_woken, t_pop))
    result = analyze(label, procs, grants, errors)
    result.capped = len(grants) < per_proc * procs
    result.namespace = base["namespace"] if kind == "gpuboss" else ""
    if starts and max(ends) > min(starts):
        busy = None
        if stat_before is not None and stat_after is not None and stat_after[1] > stat_before[1]:
            busy = (stat_after[0] - stat_before[0]) / (stat_after[1] - stat_before[1])
        commands = {
            name: calls - redis_before[1].get(name, 0) for name, calls in redis_after[1].items() if name != "info"
        }
        result.cpu = CpuUse(
            wall_s=max(ends) - min(starts),
            workers_s=worker_cpu,
            redis_s=redis_after[0] - redis_before[0],
            machine_busy=busy,
            cpus=os.cpu_count() or 1,
            commands=commands,
        )
    return result


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    """Kill the workers still running (by PID: only those started here), after asking each for its Python
    stacks (faulthandler on SIGUSR1, into its stderr file) so that a hang can be read afterwards."""
    alive = [p for p in procs if p.poll() is None]
    for proc in alive:
        with contextlib.suppress(OSError):
            os.kill(proc.pid, signal.SIGUSR1)
    if alive:
        time.sleep(0.3)
    for proc in alive:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def analyze(label: str, procs: int, grants: list[Grant], errors: list[str]) -> Contention:
    """Order the grants, check exclusion, and measure handoffs and fairness."""
    grants = sorted(grants, key=lambda g: g.t_granted)
    handoffs: list[float] = []
    from_call: list[float] = []
    woken: list[float] = []
    wake: list[float] = []
    client: list[float] = []
    blocked: list[float] = []
    late = popped = 0
    same = 0
    for prev, nxt in pairwise(grants):
        if nxt.t_granted < prev.t_release:
            errors.append(
                f"{label}: exclusion broken: pid {nxt.pid} got the grant before pid {prev.pid} began to release"
            )
        if prev.seq is not None and nxt.seq is not None and nxt.seq <= prev.seq:
            # Tokens grow with every grant (by one, or to Redis time x 10 when that is higher: grant.lua).
            errors.append(f"{label}: grant {nxt.seq} followed grant {prev.seq} (tokens must grow in grant order)")
        if nxt.pid == prev.pid:
            same += 1
            continue
        handoffs.append(nxt.t_granted - prev.t_released)
        from_call.append(nxt.t_granted - prev.t_release)
        if nxt.t_woken is not None:
            woken.append(nxt.t_granted - prev.t_released)
            wake.append(nxt.t_woken - prev.t_released)
            client.append(nxt.t_granted - nxt.t_woken)
            if nxt.t_pop is not None:
                popped += 1
                if nxt.t_pop < prev.t_release:
                    blocked.append(nxt.t_granted - prev.t_released)
                elif nxt.t_pop > prev.t_released:
                    late += 1
    pairs = len(grants) - 1
    retakes = count_retakes(grants)
    if not handoffs:
        errors.append(f"{label}: no handoff between processes was observed")
    return Contention(
        label=label,
        procs=procs,
        grants=len(grants),
        handoff=summarize(handoffs),
        from_call=summarize(from_call),
        wait=summarize([g.t_granted - g.t_request for g in grants]),
        same_holder=same / pairs if pairs > 0 else None,
        retakes=retakes / pairs if pairs > 0 else None,
        woken=summarize(woken),
        wake=summarize(wake),
        client=summarize(client),
        blocked=summarize(blocked),
        late=late / popped if popped else None,
        errors=errors,
    )


def count_retakes(grants: list[Grant]) -> int:
    """Grants (in order) that went back to the process that had just released although another process was
    already waiting when the release began (it had called acquire() before the releaser called release(), and
    was served only later): the lease taken back ahead of a waiter. A same-holder grant with nobody waiting
    is not one: the others were between their turns."""
    by_pid: dict[int, list[Grant]] = {}
    for g in grants:
        by_pid.setdefault(g.pid, []).append(g)
    granted_at = {pid: [g.t_granted for g in own] for pid, own in by_pid.items()}
    count = 0
    for prev, nxt in pairwise(grants):
        if nxt.pid != prev.pid:
            continue
        for pid, own in by_pid.items():
            if pid == nxt.pid:
                continue
            i = bisect.bisect_right(granted_at[pid], nxt.t_granted)  # its first grant after the retake
            if i < len(own) and own[i].t_request < prev.t_release:
                count += 1
                break
    return count
