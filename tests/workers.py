"""Worker processes for the multi-process and crash-recovery tests.

Run as a script (``python tests/workers.py <command> ...``); the tests start it with :func:`spawn`. It talks
to the test over a line protocol: it prints ``READY`` once its boss exists, ``HELD <lease json>`` once it
holds a lease, ``QUEUING`` just before it asks for one, and waits for ``GO`` on stdin where the command says
so. Each command connects to the private redis-server whose URL the test passes; never to a default one.

Commands:

``stress``  run ``--count`` random requests (random size, priority, timeout, hold time) and append one JSON
            line per request to ``--out``; used by the no-over-commit test.
``hold``    acquire one lease, print ``HELD``, then sleep until killed (the SIGKILL-a-holder test); with
            ``--report-lost`` its ``on_lost`` prints ``LOST <lease id>`` (the force-release test).
``wait``    print ``QUEUING``, acquire one lease (queued behind others), print ``HELD``, then sleep until
            killed; on KeyboardInterrupt (SIGINT) while waiting print ``INTERRUPTED`` and exit 3.
``checkpointer``  the low-priority job of the eviction scenario (``test_eviction_processes.py``): holds a
            preemptible ``low`` lease of ``--vram`` GB with ``resume=True`` and counts ``--steps`` steps of
            ``--step-s`` seconds, calling ``lease.yield_if_requested()`` before each (its safe point). Its
            ``on_evict`` saves the last finished step to the file ``--checkpoint`` (after sleeping
            ``--checkpoint-s``: the crash test kills it there); after a resume the job reloads its step from
            that file. If it reaches step ``--hold-at`` without having been asked to checkpoint, it waits
            there for the request (so a slow machine cannot let it finish first). Prints, with
            ``time.monotonic()`` (CLOCK_MONOTONIC: one clock for every process on the host): ``HELD <lease
            json>``, ``STEP <n> <t>`` after each step, ``CHECKPOINT <t>`` when ``on_evict`` starts,
            ``SAVED <step> <t>`` when it has written the file, ``RESUMED <step from file> <step in memory> <t>
            <evictions>`` after the safe point returns from a resume, ``DONE <step> <evictions> <t>``.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: the checkout's gpuboss wins
    sys.path.insert(0, str(ROOT))

from gpuboss import GPUBoss, Lease, LeaseTimeout  # noqa: E402

SIZES_GB = (1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12)
PRIORITIES = ("low", "normal", "high")
#: Timeouts of the stress requests: 0 (try once), short ones that often expire, and longer ones.
TIMEOUTS = (0, 0, 0.02, 0.1, 0.3, 1.0, 2.0)
#: Lease TTLs of the stress requests: far above the hold times, short enough that the heartbeat renews
#: leases and queue entries during the run.
TTLS = (2.0, 5.0, 10.0)


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def lease_json(lease: Lease) -> str:
    return json.dumps(
        {
            "id": lease.id,
            "gpu": lease.gpu,
            "device": lease.device,
            "vram_mib": lease.vram_mib,
            "token": lease.token,
            "pid": lease.pid,
            "ttl": lease.ttl,
            "expires_at": lease.expires_at,
        }
    )


def make_boss(args: argparse.Namespace) -> GPUBoss:
    return GPUBoss(args.url, namespace=args.ns, gpus=json.loads(args.gpus), service=f"worker-{os.getpid()}")


def wait_for_go() -> None:
    line = sys.stdin.readline()
    if line.strip() != "GO":
        raise SystemExit(f"expected GO on stdin, got {line!r}")


def stress(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    boss = make_boss(args)
    emit("READY")
    wait_for_go()
    with open(args.out, "a", encoding="utf-8") as out:
        for n in range(args.count):
            vram_gb = rng.choice(SIZES_GB)
            priority = rng.choice(PRIORITIES)
            timeout = rng.choice(TIMEOUTS)
            ttl = rng.choice(TTLS)
            hold = rng.uniform(0, args.max_hold)
            rec: dict[str, Any] = {
                "worker": args.seed,
                "n": n,
                "pid": os.getpid(),
                "vram_gb": vram_gb,
                "priority": priority,
                "timeout": timeout,
                "ttl": ttl,
            }
            rec["t_request"] = time.monotonic()
            try:
                lease = boss.acquire(vram_gb, priority=priority, timeout=timeout, ttl=ttl)
            except LeaseTimeout:
                rec["t_done"] = time.monotonic()
                rec["outcome"] = "timeout"
            except BaseException as err:  # recorded, so the test can name it; then the worker fails
                rec["t_done"] = time.monotonic()
                rec["outcome"] = "error"
                rec["error"] = f"{type(err).__name__}: {err}"
                out.write(json.dumps(rec) + "\n")
                out.flush()
                raise
            else:
                rec["t_grant"] = time.monotonic()
                rec["outcome"] = "granted"
                rec.update(
                    id=lease.id,
                    gpu=lease.gpu,
                    device=lease.device,
                    vram_mib=lease.vram_mib,
                    lease_priority=lease.priority,
                    token=lease.token,
                )
                time.sleep(hold)
                rec["lost_before_release"] = lease.lost
                rec["t_release"] = time.monotonic()  # taken before the release call: a sound upper bound
                rec["released"] = boss.release(lease)
            out.write(json.dumps(rec) + "\n")
            out.flush()
    boss.close()
    emit("DONE")
    return 0


def hold(args: argparse.Namespace) -> int:
    boss = make_boss(args)
    emit("READY")
    on_lost = (lambda lost: emit("LOST " + lost.id)) if args.report_lost else None
    lease = boss.acquire(args.vram, ttl=args.ttl, device=args.device, timeout=args.timeout, on_lost=on_lost)
    emit("HELD " + lease_json(lease))
    while True:  # until the test kills this process
        time.sleep(3600)


def wait(args: argparse.Namespace) -> int:
    boss = make_boss(args)
    emit("READY")
    emit("QUEUING")
    try:
        lease = boss.acquire(args.vram, ttl=args.ttl, device=args.device, timeout=args.timeout)
    except KeyboardInterrupt:
        emit("INTERRUPTED")
        boss.close()
        return 3
    emit("HELD " + lease_json(lease))
    while True:
        time.sleep(3600)


def checkpointer(args: argparse.Namespace) -> int:
    from gpuboss import LeaseState

    boss = make_boss(args)
    emit("READY")
    checkpoint = Path(args.checkpoint)
    progress = {"step": 0}  # the last finished step
    working = threading.Lock()  # held while a step runs: a checkpoint never sees half a step

    def on_evict() -> None:
        emit(f"CHECKPOINT {time.monotonic()!r}")
        with working:
            saved = progress["step"]
            time.sleep(args.checkpoint_s)
            tmp = checkpoint.with_suffix(".tmp")
            tmp.write_text(str(saved), encoding="utf-8")
            os.replace(tmp, checkpoint)
        emit(f"SAVED {saved} {time.monotonic()!r}")

    lease = boss.acquire(args.vram, priority="low", ttl=args.ttl, timeout=args.timeout, on_evict=on_evict)
    emit("HELD " + lease_json(lease))
    while progress["step"] < args.steps:
        if progress["step"] == args.hold_at and lease.evictions == 0:
            lease.evict_requested.wait()  # the test's request has not come yet: wait for it here
        if lease.yield_if_requested():  # handed back after the checkpoint, and granted again
            restored = int(checkpoint.read_text(encoding="utf-8"))
            emit(f"RESUMED {restored} {progress['step']} {time.monotonic()!r} {lease.evictions}")
            progress["step"] = restored
            continue
        with working:
            if lease.state is not LeaseState.GRANTED:
                continue  # asked to checkpoint while waiting for the lock: back to the safe point
            time.sleep(args.step_s)  # the work of one step, on the GPU
            progress["step"] += 1
            emit(f"STEP {progress['step']} {time.monotonic()!r}")
    evictions = lease.evictions
    boss.release(lease)
    boss.close()
    emit(f"DONE {progress['step']} {evictions} {time.monotonic()!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="workers")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("stress", "hold", "wait", "checkpointer"):
        p = sub.add_parser(name)
        p.add_argument("--url", required=True)
        p.add_argument("--ns", required=True)
        p.add_argument("--gpus", required=True, help="JSON list of GPU declarations")
        if name == "stress":
            p.add_argument("--seed", type=int, required=True)
            p.add_argument("--count", type=int, required=True)
            p.add_argument("--out", required=True)
            p.add_argument("--max-hold", type=float, default=0.03)
        elif name == "checkpointer":
            p.add_argument("--vram", type=float, required=True)
            p.add_argument("--ttl", type=float, default=10.0)
            p.add_argument("--timeout", type=float, default=60.0)
            p.add_argument("--checkpoint", required=True, help="the checkpoint file")
            p.add_argument("--steps", type=int, default=200)
            p.add_argument("--step-s", type=float, default=0.01)
            p.add_argument("--hold-at", type=int, default=100)
            p.add_argument("--checkpoint-s", type=float, default=0.0)
        else:
            p.add_argument("--ttl", type=float, default=10.0)
            p.add_argument("--vram", type=float, required=True)
            p.add_argument("--device", default=None)
            p.add_argument("--timeout", type=float, default=60.0)
            p.add_argument("--report-lost", action="store_true")
    args = parser.parse_args(argv)
    command = {"stress": stress, "hold": hold, "wait": wait, "checkpointer": checkpointer}[args.command]
    return command(args)


# ---------------------------------------------------------------- what the tests import


class Worker:
    """A worker process with its stdout read line by line on a thread (so waiting for a line can time out).

    It is stopped by its own PID only (``kill`` sends SIGKILL to it; ``interrupt`` sends SIGINT).
    """

    def __init__(self, command: str, url: str, namespace: str, gpus: list[dict[str, Any]], *extra: str) -> None:
        argv = [sys.executable, str(HERE / "workers.py"), command]
        argv += ["--url", url, "--ns", namespace, "--gpus", json.dumps(gpus), *extra]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=str(ROOT),
        )
        self.pid = self.proc.pid
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        self._pumps = [
            threading.Thread(target=self._pump_stdout, daemon=True),
            threading.Thread(target=self._pump_stderr, daemon=True),
        ]
        for pump in self._pumps:
            pump.start()

    def _pump_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _pump_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def expect(self, prefix: str, timeout: float = 20.0) -> str:
        """The next stdout line, which must start with ``prefix``; the rest of it is returned."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"worker {self.pid}: no {prefix!r} line within {timeout} s; stderr: {self.err()}"
            ) from None
        if line is None or not line.startswith(prefix):
            raise AssertionError(f"worker {self.pid}: expected {prefix!r}, got {line!r}; stderr: {self.err()}")
        return line[len(prefix) :].strip()

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def err(self) -> str:
        return "".join(self.stderr)[-3000:]

    def kill(self) -> None:
        """SIGKILL this worker by its PID (if it still runs) and reap it."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def interrupt(self) -> None:
        os.kill(self.pid, signal.SIGINT)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        """Kill (by PID) if still running, reap, and close the pipes."""
        self.kill()
        for pump in self._pumps:
            pump.join(timeout=5)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


if __name__ == "__main__":
    sys.exit(main())
