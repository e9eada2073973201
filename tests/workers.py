"""Worker processes for the multi-process and crash-recovery tests.

Run as a script (``python tests/workers.py <command> ...``); the tests start it with :func:`spawn`. It talks
to the test over a line protocol: it prints ``READY`` once its boss exists, ``HELD <lease json>`` once it
holds a lease, ``QUEUING`` just before it asks for one, and waits for ``GO`` on stdin where the command says
so. Each command connects to the private redis-server whose URL the test passes; never to a default one.

Commands:

``stress``  run ``--count`` random requests (random size, priority, timeout, hold time) and append one JSON
            line per request to ``--out``; used by the no-over-commit test.
``hold``    acquire one lease, print ``HELD``, then sleep until killed (the SIGKILL-a-holder test); with
            ``--report-lost`` its ``on_lost`` prints ``LOST <lease id>`` (the force-release test); with
            ``--exit-on-sigterm`` SIGTERM makes it exit the normal way (``sys.exit(143)``).
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
``agent``   a scripted client for the scheduling-policy tests (``test_scheduling_processes.py``): one boss of
            ``--service`` with the extra settings ``--settings`` (JSON: ``priorities``, ``aging``, ``caps``,
            ``on_redis_down`` ...); prints ``READY``, then obeys one command per stdin line, each
            ``VERB <tag> [json]``, and answers with lines ``KIND <tag> <json>`` (see :class:`Agent`). Requests
            run on threads of their own, so one agent can hold a lease and wait for another.
``forker``  the fork tests (``test_fork.py``): acquires a lease of ``--vram`` GB (``--ttl``), prints ``HELD``,
            and forks (``--block``: inside a ``with boss.lease()`` block, whose lease it printed). The child
            prints ``CHILD_PID <pid>``, does what ``--child`` says (see :func:`forked_child`), prints ``CHILD <json>`` and exits the normal
            way (its atexit handlers run); the parent prints ``CHILD_EXITED <status>``, waits for ``GO``,
            releases and exits. ``--parent-dies``: the parent ends at once without releasing (``os._exit``),
            the child keeps a lease of its own and reports whether the parent's outlived its TTL.
            ``--front async`` does the same with an AsyncGPUBoss (each side in an ``asyncio.run`` of its own).
"""

from __future__ import annotations

import argparse
import asyncio
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

from gpuboss import AsyncGPUBoss, GPUBoss, GPUBossError, Keys, Lease, LeaseTimeout  # noqa: E402
from gpuboss.redis_io import connect_sync  # noqa: E402

SIZES_GB = (1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12)
PRIORITIES = ("low", "normal", "high")
#: Timeouts of the stress requests: 0 (try once), short ones that often expire, and longer ones.
TIMEOUTS = (0, 0, 0.02, 0.1, 0.3, 1.0, 2.0)
#: Lease TTLs of the stress requests: far above the hold times, short enough that the heartbeat renews
#: leases and queue entries during the run.
TTLS = (2.0, 5.0, 10.0)


_EMITTING = threading.Lock()  # the agent's threads print whole lines, one at a time


def emit(line: str) -> None:
    with _EMITTING:
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
            "priority": lease.priority,
            "service": lease.service,
            "local": lease.local,
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
    if args.exit_on_sigterm:  # the recipe of docs/concepts.md: SIGTERM becomes a normal exit
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
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


class Agent:
    """The ``agent`` command: a boss driven line by line from stdin (the test) with answers on stdout.

    Commands (``<tag>`` names a request, a stream or a class; ``<json>`` is one JSON object, no newline):

    ``ACQUIRE <tag> <json>``  ``boss.acquire(**json)`` on a thread of its own (``"checkpoint": true`` adds an
        ``on_evict`` that prints ``EVICT``). Answers ``HELD <tag> <lease>``, ``TIMEOUT <tag> {elapsed}`` or
        ``ERROR <tag> {type, message, elapsed}``; later ``LOST <tag> {}`` (``on_lost``), ``EVICT <tag> {}`` and
        ``STATE <tag> {state, evictions}`` whenever the held lease's state or eviction count changes.
    ``RELEASE <tag>``         ``boss.release(lease)``; answers ``RELEASED <tag> {released}``.
    ``STREAM <tag> <json>``   on a thread: ``acquire(**json["acquire"])``, hold ``json["hold_s"]``, release, again,
        ``json["count"]`` times (none: until ``STOP <tag>``). Answers ``GRANT <tag> {n, lease}`` per grant
        and ``STREAMED <tag> {count}`` at the end (``ERROR`` if a request failed).
    ``STOP <tag>``            end the stream after its current lease.
    ``PAUSE <class>``, ``RESUME <class>``  ``boss.pause`` / ``boss.resume``; answer ``PAUSED`` / ``UNPAUSED
        <class> {changed}`` (or ``ERROR``).
    ``QUIT``                  close the boss and exit 0 (end of stdin does the same).
    """

    def __init__(self, args: argparse.Namespace) -> None:
        settings = json.loads(args.settings)
        self.boss = GPUBoss(args.url, namespace=args.ns, gpus=json.loads(args.gpus), service=args.service, **settings)
        self.leases: dict[str, Lease] = {}
        self.stops: dict[str, threading.Event] = {}
        self.lock = threading.Lock()

    def run(self) -> int:
        threading.Thread(target=self._watch_states, daemon=True).start()
        emit("READY")
        for raw in sys.stdin:
            verb, _, rest = raw.strip().partition(" ")
            tag, _, payload = rest.partition(" ")
            body: dict[str, Any] = json.loads(payload) if payload else {}
            if verb == "QUIT":
                break
            if verb == "ACQUIRE":
                threading.Thread(target=self._acquire, args=(tag, body), daemon=True).start()
            elif verb == "RELEASE":
                with self.lock:
                    lease = self.leases.pop(tag)
                started = time.monotonic()
                try:
                    released = self.boss.release(lease)
                except GPUBossError as err:
                    self._error(tag, err, started)
                else:
                    emit(f"RELEASED {tag} " + json.dumps({"released": released}))
            elif verb == "STREAM":
                self.stops[tag] = threading.Event()
                threading.Thread(target=self._stream, args=(tag, body), daemon=True).start()
            elif verb == "STOP":
                self.stops[tag].set()
            elif verb in ("PAUSE", "RESUME"):
                started = time.monotonic()
                try:
                    changed = self.boss.pause(tag) if verb == "PAUSE" else self.boss.resume(tag)
                except GPUBossError as err:
                    self._error(tag, err, started)
                else:
                    kind = "PAUSED" if verb == "PAUSE" else "UNPAUSED"
                    emit(f"{kind} {tag} " + json.dumps({"changed": changed}))
            else:
                raise SystemExit(f"agent: unknown command {raw!r}")
        self.boss.close()
        emit("BYE")
        return 0

    @staticmethod
    def _error(tag: str, err: BaseException, started: float) -> None:
        info = {"type": type(err).__name__, "message": str(err), "elapsed": time.monotonic() - started}
        emit(f"ERROR {tag} " + json.dumps(info))

    def _acquire(self, tag: str, body: dict[str, Any]) -> None:
        kwargs = dict(body)
        if kwargs.pop("checkpoint", False):
            kwargs["on_evict"] = lambda: emit(f"EVICT {tag} {{}}")
        started = time.monotonic()
        try:
            lease = self.boss.acquire(**kwargs, on_lost=lambda _lease: emit(f"LOST {tag} {{}}"))
        except LeaseTimeout:
            emit(f"TIMEOUT {tag} " + json.dumps({"elapsed": time.monotonic() - started}))
            return
        except GPUBossError as err:
            self._error(tag, err, started)
            return
        with self.lock:
            self.leases[tag] = lease
        emit(f"HELD {tag} " + lease_json(lease))

    def _stream(self, tag: str, body: dict[str, Any]) -> None:
        count, stop, n = body.get("count"), self.stops[tag], 0
        started = time.monotonic()
        try:
            while not stop.is_set() and (count is None or n < count):
                lease = self.boss.acquire(**body["acquire"])
                n += 1
                emit(f"GRANT {tag} " + json.dumps({"n": n, "lease": json.loads(lease_json(lease))}))
                time.sleep(body["hold_s"])
                self.boss.release(lease)
        except GPUBossError as err:
            self._error(tag, err, started)
        emit(f"STREAMED {tag} " + json.dumps({"count": n}))

    def _watch_states(self) -> None:
        """Print ``STATE`` when a held lease changes state or eviction count (an eviction, a resume, a loss)."""
        last: dict[str, tuple[str, int]] = {}
        while True:
            with self.lock:
                held = list(self.leases.items())
            last = {tag: seen for tag, seen in last.items() if tag in self.leases}  # a released tag starts anew
            for tag, lease in held:
                now = (lease.state.value, lease.evictions)
                if last.setdefault(tag, now) != now:
                    last[tag] = now
                    emit(f"STATE {tag} " + json.dumps({"state": now[0], "evictions": now[1]}))
            time.sleep(0.01)


def agent(args: argparse.Namespace) -> int:
    return Agent(args).run()


def forked_child(args: argparse.Namespace, boss: Any, inherited: Lease) -> dict[str, Any]:
    """What a forked child of ``forker`` does with the boss and the lease it inherited (see ``--child``):
    ``exit`` nothing (it just exits); ``close`` closes the boss; ``release`` releases the inherited lease,
    then tries its id; ``own`` acquires a lease of its own and holds it over three of its TTLs. Returns
    what it saw, for its ``CHILD`` line; its own lease is left to its exit."""
    report: dict[str, Any] = {"pid": os.getpid(), "held": [lease.id for lease in boss.held()]}
    if args.child == "close":
        boss.close()
    elif args.child == "release":
        report["release_lease"] = boss.release(inherited)
        try:
            boss.release(inherited.id)
        except GPUBossError as err:
            report["release_id"] = type(err).__name__
    elif args.child == "own":
        own = boss.acquire(1, ttl=1.0, timeout=10)
        time.sleep(3.0)
        report["own"] = {"id": own.id, "pid": own.pid, "state": own.state.value, "live": live_in_redis(boss, own)}
        report["held_after"] = [lease.id for lease in boss.held()]
    return report


def live_in_redis(boss: Any, lease: Lease) -> bool:
    """Whether Redis has ``lease`` and it has not expired by Redis's clock (read with a client of its own, not
    through the boss: an expired lease stays in the hash until a script collects it)."""
    keys = Keys(boss.namespace)
    client = connect_sync(boss.url, 5.0)
    try:
        seconds, micros = client.time()
        expires_ms = client.zscore(keys.lease_exp, lease.id)
        return (
            client.hexists(keys.leases, lease.id)
            and expires_ms is not None
            and expires_ms > seconds * 1000 + micros // 1000
        )
    finally:
        client.close()


async def forked_child_async(args: argparse.Namespace, boss: Any, inherited: Lease) -> dict[str, Any]:
    """:func:`forked_child` with an AsyncGPUBoss."""
    report: dict[str, Any] = {"pid": os.getpid(), "held": [lease.id for lease in boss.held()]}
    if args.child == "close":
        await boss.close()
    elif args.child == "release":
        report["release_lease"] = await boss.release(inherited)
        try:
            await boss.release(inherited.id)
        except GPUBossError as err:
            report["release_id"] = type(err).__name__
    elif args.child == "own":
        own = await boss.acquire(1, ttl=1.0, timeout=10)
        await asyncio.sleep(3.0)
        report["own"] = {"id": own.id, "pid": own.pid, "state": own.state.value, "live": live_in_redis(boss, own)}
        report["held_after"] = [lease.id for lease in boss.held()]
    return report


def orphan(boss: GPUBoss, inherited: Lease, parent: int) -> dict[str, Any]:
    """``--parent-dies``: the child holds a lease of its own (its heartbeat runs) while the parent (pid
    ``parent``) is gone; the parent's lease must expire with its TTL, not be kept alive from here."""
    own = boss.acquire(1, ttl=1.0, timeout=10)
    deadline = time.monotonic() + 10
    while os.getppid() == parent and time.monotonic() < deadline:  # until the parent has exited
        time.sleep(0.01)
    time.sleep(3 * inherited.ttl + 1.0)
    boss.collect()  # (what any script would do by its next full check)
    return {
        "pid": os.getpid(),
        "parent_lease_left": live_in_redis(boss, inherited),
        "own_left": live_in_redis(boss, own),
    }


def forker(args: argparse.Namespace) -> int:
    if args.front == "async":
        return forker_async(args)
    boss = make_boss(args)
    lease = boss.acquire(args.vram, ttl=args.ttl, timeout=10)
    emit("HELD " + lease_json(lease))
    if args.block:
        with boss.lease(args.vram, ttl=args.ttl, timeout=10) as device:
            emit("HELD " + lease_json(device.lease))
            pid = os.fork()
            if pid != 0:
                return after_fork_in_parent(pid, lambda: boss.release(lease))
            emit(f"CHILD_PID {os.getpid()}")
        emit("CHILD " + json.dumps(forked_child(args, boss, device.lease)))
        return 0  # the normal way out: atexit runs
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        emit(f"CHILD_PID {os.getpid()}")
        report = orphan(boss, lease, parent) if args.parent_dies else forked_child(args, boss, lease)
        emit("CHILD " + json.dumps(report))
        return 0
    if args.parent_dies:
        os._exit(0)  # gone without a release: only the lease's TTL ends it
    return after_fork_in_parent(pid, lambda: boss.release(lease))


def forker_async(args: argparse.Namespace) -> int:
    boss = AsyncGPUBoss(args.url, namespace=args.ns, gpus=json.loads(args.gpus), service=f"worker-{os.getpid()}")
    lease = asyncio.run(boss.acquire(args.vram, ttl=args.ttl, timeout=10))
    emit("HELD " + lease_json(lease))
    pid = os.fork()
    if pid == 0:
        emit(f"CHILD_PID {os.getpid()}")
        emit("CHILD " + json.dumps(asyncio.run(forked_child_async(args, boss, lease))))
        return 0
    return after_fork_in_parent(pid, lambda: asyncio.run(boss.release(lease)))


def use_device(device: Any, url: str, namespace: str, gpus: list[dict[str, Any]]) -> dict[str, Any]:
    """Run in a process of ``test_fork.py``'s pool (spawned): what a worker that was handed a pickled Device
    sees of it, and what its own boss's release of that lease answers."""
    lease = device.lease
    seen = {"device": str(device), "type": type(device).__name__, "id": lease.id, "state": lease.state.value}
    boss = GPUBoss(url, namespace=namespace, gpus=gpus, service="pool")
    try:
        seen["release"] = boss.release(lease)
    except GPUBossError as err:
        seen["release"] = type(err).__name__
    boss.close()
    return {**seen, "pid": os.getpid(), "holder_pid": lease.pid}


#: The lease a pool worker of ``test_fork.py`` holds for its life, and its boss (:func:`lease_for_the_worker`).
_WORKER_HOLDS: dict[str, Any] = {}


def lease_for_the_worker(url: str, namespace: str, gpus: list[dict[str, Any]], vram_gb: float, front: str) -> None:
    """A pool initializer (or a process's whole work): acquire a lease for the rest of the worker's life, and
    never release it; with ``front`` "async", by an AsyncGPUBoss in a loop that ends at once (its heartbeat
    is a thread: it goes on renewing)."""
    if front == "async":
        boss: Any = AsyncGPUBoss(url, namespace=namespace, gpus=gpus, service="pool")
        lease = asyncio.run(boss.acquire(vram_gb))
    else:
        boss = GPUBoss(url, namespace=namespace, gpus=gpus, service="pool")
        lease = boss.acquire(vram_gb)
    _WORKER_HOLDS.update(boss=boss, lease=lease)


def worker_lease() -> dict[str, Any]:
    """A task for a worker set up by :func:`lease_for_the_worker`: its pid, and its lease as Redis has it."""
    lease = _WORKER_HOLDS["lease"]
    live = live_in_redis(_WORKER_HOLDS["boss"], lease)
    return {"pid": os.getpid(), "id": lease.id, "holder": lease.pid, "live": live}


def worker_lease_of(_item: object) -> dict[str, Any]:
    """:func:`worker_lease` as a ``Pool.map`` function (it passes each item)."""
    return worker_lease()


def lease_and_return(report: Any, *args: Any) -> None:
    """A ``multiprocessing.Process`` target: :func:`lease_for_the_worker`, put :func:`worker_lease` on the
    ``report`` queue, and return (the process ends the normal way for a multiprocessing child)."""
    lease_for_the_worker(*args)
    report.put(worker_lease())


def after_fork_in_parent(pid: int, release: Any) -> int:
    """The parent of ``forker``: wait for the child, say how it ended, wait for GO and release its lease."""
    _, status = os.waitpid(pid, 0)
    emit(f"CHILD_EXITED {os.waitstatus_to_exitcode(status)}")
    wait_for_go()
    emit(f"RELEASED {release()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="workers")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("stress", "hold", "wait", "checkpointer", "agent", "forker"):
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
        elif name == "forker":
            p.add_argument("--vram", type=float, default=4.0)
            p.add_argument("--ttl", type=float, default=10.0)
            p.add_argument("--child", choices=("exit", "close", "release", "own"), default="exit")
            p.add_argument("--block", action="store_true")
            p.add_argument("--parent-dies", action="store_true")
            p.add_argument("--front", choices=("sync", "async"), default="sync")
        elif name == "agent":
            p.add_argument("--service", required=True)
            p.add_argument("--settings", default="{}", help="JSON object of further GPUBoss settings")
        else:
            p.add_argument("--ttl", type=float, default=10.0)
            p.add_argument("--vram", type=float, required=True)
            p.add_argument("--device", default=None)
            p.add_argument("--timeout", type=float, default=60.0)
            p.add_argument("--report-lost", action="store_true")
            p.add_argument("--exit-on-sigterm", action="store_true")
    args = parser.parse_args(argv)
    commands = {
        "stress": stress,
        "hold": hold,
        "wait": wait,
        "checkpointer": checkpointer,
        "agent": agent,
        "forker": forker,
    }
    command = commands[args.command]
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


class AgentProcess(Worker):
    """An ``agent`` worker (see :class:`Agent`) with its answers kept, so a test can wait for any of them.

    ``answer(kind, tag)`` returns the payload of the first ``KIND tag`` line not returned before, waiting for
    it; ``answers(kind, tag)`` lists those seen so far without waiting or taking them.
    """

    def __init__(self, url: str, namespace: str, gpus: list[dict[str, Any]], service: str, **settings: Any) -> None:
        super().__init__("agent", url, namespace, gpus, "--service", service, "--settings", json.dumps(settings))
        self.service = service
        self.seen: list[tuple[str, str, Any]] = []
        self.taken: set[int] = set()
        self.ended = False

    def _pull(self, timeout: float) -> bool:
        """Move one line (waiting up to ``timeout``) from the pipe into ``seen``; False if none came."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            return False
        if line is None:
            self.ended = True
            return False
        kind, _, rest = line.partition(" ")
        tag, _, payload = rest.partition(" ")
        self.seen.append((kind, tag, json.loads(payload) if payload else None))
        return True

    def _find(self, kind: str, tag: str, where: Any) -> int | None:
        for i, (k, t, payload) in enumerate(self.seen):
            if k == kind and t == tag and i not in self.taken and (where is None or where(payload)):
                return i
        return None

    def answer(self, kind: str, tag: str = "", timeout: float = 30.0, where: Any = None) -> Any:
        """The payload of the first ``KIND tag`` line not taken before (and, with ``where``, for which
        ``where(payload)`` is true), waiting up to ``timeout`` for it."""
        deadline = time.monotonic() + timeout
        while True:
            while self._pull(0):
                pass
            i = self._find(kind, tag, where)
            if i is not None:
                self.taken.add(i)
                return self.seen[i][2]
            left = deadline - time.monotonic()
            if left <= 0 or self.ended:
                raise AssertionError(
                    f"agent {self.service} (pid {self.pid}): no {kind} {tag} within {timeout} s; "
                    f"seen {self.seen[-8:]}; stderr: {self.err()}"
                )
            self._pull(min(left, 0.1))

    def answers(self, kind: str, tag: str = "") -> list[Any]:
        while self._pull(0):
            pass
        return [p for k, t, p in self.seen if k == kind and t == tag]

    def command(self, verb: str, tag: str = "", body: dict[str, Any] | None = None) -> None:
        self.send(" ".join([verb, tag, json.dumps(body)] if body is not None else [verb, tag]))

    def acquire(self, tag: str, vram_gb: float, **kwargs: Any) -> None:
        """Start ``acquire(vram_gb, **kwargs)`` in the agent; its answer comes later (``answer("HELD", tag)``)."""
        self.command("ACQUIRE", tag, {"vram_gb": vram_gb, **kwargs})

    def release(self, tag: str, timeout: float = 30.0) -> bool:
        self.command("RELEASE", tag)
        return bool(self.answer("RELEASED", tag, timeout)["released"])


if __name__ == "__main__":
    sys.exit(main())
