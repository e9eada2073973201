"""Where the time of one uncontended acquire() + release() goes on the Python side, sync and asyncio.

Issue 9 asks that a missed target be explained by profiling the scripts (SLOWLOG and INFO commandstats: the
uncontended and scaling sections) and the Python side with py-spy or pyinstrument. This is the Python side:
py-spy samples a worker process from outside (``--nonblocking``: the worker is never stopped, so it runs at
nearly its own speed; an in-process profiler such as pyinstrument runs at every call and return, which
doubles the cost of a cycle this short and skews the split, and py-spy's default of stopping the process for
each sample lets Redis work on while the worker waits, which hides part of the waiting), and every sample of
the worker's thread that runs the cycles is filed by its innermost Python frame:

- waiting for Redis: in redis-py's socket read (sync), or in the event loop's ``select`` (asyncio): the script
  runs in Redis, and the request and its reply travel;
- gpuboss's own Python; redis-py and hiredis; json (lease records); the asyncio event loop; anything else
  (the worker's loop, the standard library).

A C function counts for the Python line that called it. The worker runs the same cycles as the section above
(GPUBoss / AsyncGPUBoss, the whole GPU, fresh namespace, after a warm-up) for a fixed time, once alone and once
under py-spy, and reports its cycles, wall time and that thread's CPU time; the split in microseconds is the sampled shares
applied to the wall time per cycle of the run without py-spy.

py-spy needs to read another process's memory (ptrace): where that is not allowed, or py-spy is not
installed, the section is left out with a note saying why.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.handoff import EXCLUSIVE_GB, worker_env
from bench.report import Table
from bench.uncontended import TIMEOUT_S, AsyncLeases, SyncLeases

#: Samples per second py-spy takes.
RATE = 2000

WAIT = "waiting for Redis"
GPUBOSS = "gpuboss"
REDIS_PY = "redis-py, hiredis"
JSON = "json"
LOOP = "asyncio loop"
OTHER = "other"
CATEGORIES = (WAIT, GPUBOSS, REDIS_PY, JSON, LOOP, OTHER)

#: Innermost frames (function, file ending) that block until Redis answers.
WAIT_FRAMES = (
    ("read_from_socket", "redis/_parsers/hiredis.py"),  # sync: the socket read
    ("select", "selectors.py"),  # asyncio: the event loop's epoll wait
)

FRONT_ENDS = {"sync": "GPUBoss", "async": "AsyncGPUBoss"}


def parse_frame(text: str) -> tuple[str, str]:
    """``"Class.func (path/file.py:12)"`` -> (``"func"``, ``"path/file.py"``)."""
    name, _, where = text.rpartition(" (")
    if not name:
        return text, ""
    return name.rsplit(".", 1)[-1], where.rsplit(":", 1)[0]


def in_file(path: str, name: str) -> bool:
    """Whether ``path`` (as py-spy shows it: relative to its entry of sys.path where it can) is the file
    ``name`` (``"redis/_parsers/hiredis.py"``; a bare ``"selectors.py"`` is the standard library's)."""
    if path == name:
        return True
    if not path.endswith("/" + name):
        return False
    return "/" in name or path[: -len(name) - 1].rsplit("/", 1)[-1].startswith("python")


def categorize(frame: str) -> str:
    """What a sample whose innermost frame is ``frame`` (py-spy's text) was spent on."""
    function, path = parse_frame(frame)
    path = path.replace("\\", "/")
    for name, file in WAIT_FRAMES:
        if function == name and in_file(path, file):
            return WAIT
    if "gpuboss/" in path:
        return GPUBOSS
    if "redis/" in path or "hiredis" in path:
        return REDIS_PY
    if "json/" in path:
        return JSON
    if "asyncio/" in path or in_file(path, "selectors.py"):
        return LOOP
    return OTHER


def split(raw: str, thread: str) -> Counter[str]:
    """Samples per category of one thread (by name), from py-spy's ``--format raw --threads`` output: lines of
    ``thread (id): name;outer frame;...;inner frame count``."""
    out: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not count.isdigit() or len(frames) < 2 or not frames[0].endswith(f": {thread}"):
            continue
        out[categorize(frames[-1])] += int(count)
    return out


# -- the worker: python -m bench.pyside worker sync|async URL SECONDS OUT

#: The worker's thread that runs the cycles (its warm-up, the timed loop, the close): only its samples count,
#: not the imports in the main thread nor the heartbeat's thread. (py-spy names each sample's thread even when
#: it read the stack while it changed and got only its inner frames.)
TIMED_THREAD = "bench-timed"


def timed_sync(url: str, seconds: float) -> dict[str, float]:
    leases = SyncLeases(url)
    boss = leases.boss
    try:
        wall, cpu, n = time.perf_counter(), time.thread_time(), 0
        while time.perf_counter() - wall < seconds:
            boss.release(boss.acquire(EXCLUSIVE_GB, timeout=TIMEOUT_S))
            n += 1
        return {"cycles": n, "wall_s": time.perf_counter() - wall, "cpu_s": time.thread_time() - cpu}
    finally:
        leases.close()


def timed_async(url: str, seconds: float) -> dict[str, float]:
    async def loop(boss: Any) -> dict[str, float]:
        wall, cpu, n = time.perf_counter(), time.thread_time(), 0
        while time.perf_counter() - wall < seconds:
            await boss.release(await boss.acquire(EXCLUSIVE_GB, timeout=TIMEOUT_S))
            n += 1
        return {"cycles": n, "wall_s": time.perf_counter() - wall, "cpu_s": time.thread_time() - cpu}

    with asyncio.Runner() as runner:
        leases = AsyncLeases(url, runner)
        try:
            return runner.run(loop(leases.boss))
        finally:
            leases.close()


def run_worker(kind: str, url: str, seconds: float, out: Path) -> None:
    """Acquire and release the whole GPU for ``seconds`` after a warm-up, in the thread TIMED_THREAD; write its
    cycles, wall seconds and CPU seconds (that thread's)."""
    outcome: list[dict[str, float] | BaseException] = []
    timed = timed_sync if kind == "sync" else timed_async

    def run() -> None:
        try:
            outcome.append(timed(url, seconds))
        except BaseException as err:  # noqa: BLE001 - handed to the main thread, which raises it
            outcome.append(err)

    thread = threading.Thread(target=run, name=TIMED_THREAD)
    thread.start()
    thread.join()
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    out.write_text(json.dumps(result))


# -- the bench side


@dataclass
class Profiled:
    """One front end: the worker's run alone and under py-spy, and the samples of the latter by category."""

    label: str
    alone: dict[str, float]
    sampled: dict[str, float]
    samples: Counter[str] = field(default_factory=Counter)

    def per_cycle(self, run: dict[str, float], key: str) -> float:
        return run[key] / max(1.0, run["cycles"])


def find_py_spy() -> str | None:
    """The py-spy next to this Python (a virtualenv's bin), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


def worker_command(kind: str, url: str, seconds: float, out: Path) -> list[str]:
    return [sys.executable, "-m", "bench.pyside", "worker", kind, url, f"{seconds:g}", str(out)]


class ProfileFailed(Exception):
    """The worker failed, or py-spy's record of it has no sample of the thread that runs the cycles: an error of
    the run, never a reason to leave the section out (only py-spy being unable to sample is: RuntimeError)."""


def last_lines(text: str, n: int = 3) -> str:
    return " | ".join(text.strip().splitlines()[-n:]) or "no output"


def run_alone(kind: str, url: str, seconds: float, folder: Path) -> dict[str, float]:
    out = folder / f"pyside-{kind}-alone.json"
    command = worker_command(kind, url, seconds, out)
    done = subprocess.run(command, env=worker_env(), capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or not out.exists():
        raise ProfileFailed(f"the {kind} worker exited {done.returncode}: {last_lines(done.stderr)}")
    result: dict[str, float] = json.loads(out.read_text())
    return result


def run_sampled(py_spy: str, kind: str, url: str, seconds: float, folder: Path) -> tuple[dict[str, float], str]:
    """The worker under py-spy. RuntimeError when py-spy recorded nothing (it may not read the worker here);
    ProfileFailed when it did but the worker failed."""
    out, raw = folder / f"pyside-{kind}-sampled.json", folder / f"pyside-{kind}.txt"
    command = [
        py_spy, "record", "--rate", str(RATE), "--idle", "--threads", "--nonblocking", "--format", "raw",
        "--output", str(raw), "--", *worker_command(kind, url, seconds, out),
    ]  # fmt: skip
    done = subprocess.run(command, env=worker_env(), capture_output=True, text=True, timeout=120)
    if not raw.exists():
        raise RuntimeError(f"py-spy could not sample the worker (exit {done.returncode}): {last_lines(done.stderr, 1)}")
    if not out.exists():
        raise ProfileFailed(f"the {kind} worker under py-spy wrote no result: {last_lines(done.stderr)}")
    result: dict[str, float] = json.loads(out.read_text())
    return result, raw.read_text()


def profile(url: str, seconds: float, folder: Path) -> list[Profiled]:
    """Both front ends, alone and under py-spy. Raises RuntimeError when py-spy is missing or cannot sample,
    ProfileFailed when a worker fails or its thread was never sampled."""
    py_spy = find_py_spy()
    if py_spy is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    out = []
    for kind, label in FRONT_ENDS.items():
        alone = run_alone(kind, url, seconds, folder)
        sampled, raw = run_sampled(py_spy, kind, url, seconds, folder)
        samples = split(raw, TIMED_THREAD)
        if not samples:
            raise ProfileFailed(f"py-spy recorded no sample of the {label} worker's thread {TIMED_THREAD!r}")
        out.append(Profiled(label, alone, sampled, samples))
    return out


def table(results: list[Profiled]) -> Table:
    """Per front end, from the run alone: cycles, wall and CPU us per cycle, the wall time off the CPU (waiting
    for Redis: wall - CPU), and the CPU time split by the shares of the samples that were not waiting (us, and the share of
    the CPU time in brackets); then the run under py-spy: its wall us per cycle and its samples, and the share
    of those that were waiting (a cross-check of wall minus CPU)."""
    headers = [
        "front end", "cycles", "wall us", "CPU us", "off the CPU (waiting for Redis) us",
        *(f"CPU: {name}" for name in CATEGORIES if name != WAIT),
        "under py-spy: wall us", "samples", "sampled waiting",
    ]  # fmt: skip
    rows = []
    for r in results:
        wall = r.per_cycle(r.alone, "wall_s") * 1e6
        cpu = min(r.per_cycle(r.alone, "cpu_s") * 1e6, wall)
        total = sum(r.samples.values())
        running = total - r.samples[WAIT]
        cells = [r.label, f"{r.alone['cycles']:.0f}", f"{wall:.1f}", f"{cpu:.1f}", f"{wall - cpu:.1f}"]
        for name in CATEGORIES:
            if name != WAIT:
                share = r.samples[name] / running if running else 0.0
                cells.append(f"{share * cpu:.1f} ({share:.0%})")
        cells += [f"{r.per_cycle(r.sampled, 'wall_s') * 1e6:.1f}", f"{total}", f"{r.samples[WAIT] / total:.0%}"]
        rows.append(cells)
    return Table(headers, rows, numeric=set(range(1, len(headers))))


def main(argv: list[str]) -> int:
    if len(argv) != 5 or argv[0] != "worker" or argv[1] not in FRONT_ENDS:
        print("usage: python -m bench.pyside worker sync|async URL SECONDS OUT", file=sys.stderr)
        return 2
    run_worker(argv[1], argv[2], float(argv[3]), Path(argv[4]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
