"""Redis instructions per lease operation: a repeatable measure of what the scripts cost, for A/B comparisons.

The timings of ``make bench`` move by 10-20% from run to run on a shared 2-core VM, more than most changes to
a script are worth. This runs a private ``redis-server`` under valgrind's callgrind, which counts the
instructions the server executes (nearly the same count for the same binary and calls, whatever else the
machine is doing), and prints them per cycle of the scaling bench's samples (:mod:`bench.scaling`):

* ``fit``: an acquire that is granted at once, then its release (nobody to grant), with W requests waiting
  behind a full GPU (the head of the queue does not fit);
* ``handoff``: a holder's acquire, a waiter's acquire (queued at the head), the holder's release granting
  the waiter, the waiter's BLPOP of its grant and its release;

and, for scale, two references that are not gpuboss: ``minimal``, the acquire and release of
:mod:`bench.minimal` (the least a correct Lua lease does), and ``floor``, two ``EVALSHA`` of ``return 1``
(floor A's call).

Each figure includes the server's own work for the calls (reading the command, the reply), not only the
scripts. Run it in two worktrees (or before and after a change) to compare; the figures of one tree differ
by less than 0.5% between runs (a slower run makes a few more of the scripts' once-a-second full checks:
lua/includes/state.lua). It needs ``valgrind`` on PATH; ``--server`` picks the binary (a build with
symbols lets ``callgrind_annotate`` name the functions in the profiles it keeps with ``--keep``).

With ``--leases L``, a third GPU holds L live preemptible leases (of the waiter's own priority: not
candidates for it) while a lower preemptible lease holds the second: the waiter's eviction check must not
read them (the counts stay flat as L grows).

    python -m bench.instructions                 # W=10, 200 cycles of each
    python -m bench.instructions --waiting 1000 --cycles 100 --keep /tmp/profiles
    python -m bench.instructions --leases 1000
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gpuboss.core import Reply
from gpuboss.server import find_redis_server

from bench.floor import SyncFloor
from bench.minimal import MinimalLease
from bench.scaling import GPU_GB, PARK_TTL_S, Level, gpu, new_id

TOTALS_RE = re.compile(r"^(?:summary|totals): (\d+)", re.MULTILINE)


class Callgrind:
    """A redis-server under callgrind on a unix socket; ``measure`` counts the instructions of one step."""

    def __init__(self, server: str, folder: Path) -> None:
        self.folder = folder
        self.socket = folder / "redis.sock"
        self.out = folder / "callgrind.out"
        args = [
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={self.out}",
            server, "--port", "0", "--unixsocket", str(self.socket), "--save", "", "--appendonly", "no",
            "--dir", str(folder),
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not self.socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start under valgrind ({server})")
            time.sleep(0.1)
        self.url = f"unix://{self.socket}"

    def control(self, option: str) -> None:
        subprocess.run(["callgrind_control", option, str(self.process.pid)], check=True, capture_output=True)

    def measure(self, step: Callable[[], None], name: str) -> int:
        """Instructions executed by the server while ``step()`` ran (its profile kept as ``<name>.callgrind``)."""
        self.control("-z")
        step()
        before = set(self.folder.glob("callgrind.out*"))
        self.control("-d")
        deadline = time.monotonic() + 30
        while True:
            new = set(self.folder.glob("callgrind.out*")) - before
            if new:
                dump = max(new, key=lambda p: p.stat().st_mtime)
                match = TOTALS_RE.search(dump.read_text(errors="replace"))
                if match:
                    dump.rename(self.folder / f"{name}.callgrind")
                    return int(match.group(1))
            if time.monotonic() > deadline:
                raise RuntimeError("callgrind wrote no profile")
            time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def add_leases(level: Level, count: int) -> None:
    """``count`` preemptible leases of normal priority (the waiter's: not candidates for it) filling gpu2."""
    if count <= 0:
        return
    core = level.core
    req = core.make_request(
        (GPU_GB - 1) / count, priority="normal", timeout=0, ttl=PARK_TTL_S, device="gpu2", preemptible=True
    )
    calls = [core.acquire_call(new_id(), req, "gpu2", "bench-leases") for _ in range(count)]
    granted = sum(1 for r in level.s.pipelined(calls) if int(r[0]) == Reply.GRANTED)
    if granted != count:
        raise RuntimeError(f"granted {granted} of {count} leases on gpu2")


@dataclass(frozen=True)
class Counts:
    """redis-server instructions per cycle of each kind (see the module's docstring)."""

    waiting: int
    leases: int
    cycles: int
    fit: float
    handoff: float
    minimal: float
    floor: float


def have_callgrind() -> bool:
    return shutil.which("valgrind") is not None and shutil.which("callgrind_control") is not None


def count(
    server_binary: str | None = None, waiting: int = 10, cycles: int = 200, leases: int = 0, keep: Path | None = None
) -> Counts:
    """Count the instructions of each kind of cycle on a private redis-server under callgrind (its profiles
    ``fit.callgrind`` and ``handoff.callgrind`` copied into ``keep``)."""
    folder = Path(tempfile.mkdtemp(prefix="gpuboss-ir-"))
    server = Callgrind(server_binary or find_redis_server(), folder)
    try:
        gpus = [gpu(0), gpu(1), gpu(2)] if leases else [gpu(0), gpu(1)]
        level = Level(f"{waiting} waiting", waiting, gpus, server.url, pin="gpu0")
        try:
            level.boss.close()  # (its heartbeats would run script calls in between; closing twice is safe)
            add_leases(level, leases)
            level.sample_fit(10)
            level.sample_handoff(10)
            fit = server.measure(lambda: level.sample_fit(cycles), "fit")
            handoff = server.measure(lambda: level.sample_handoff(cycles), "handoff")
        finally:
            level.close()
        least, trivial = MinimalLease(server.url), SyncFloor(server.url)
        try:
            least_ir = server.measure(lambda: least.sample(cycles), "minimal")
            floor_ir = server.measure(lambda: trivial.sample(2 * cycles), "floor")
        finally:
            least.close()
            trivial.close()
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            for name in ("fit", "handoff"):
                shutil.copy(folder / f"{name}.callgrind", keep / f"{name}.callgrind")
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return Counts(waiting, leases, cycles, fit / cycles, handoff / cycles, least_ir / cycles, floor_ir / cycles)


#: What each kind of cycle is, for the printed table and docs/performance.md.
KINDS = (
    ("fit", "acquire granted at once, its release"),
    (
        "handoff",
        "holder's acquire, waiter's (queued), release granting it, the waiter's BLPOP of its grant and its release",
    ),
    ("minimal", "reference, not gpuboss: bench/minimal.py's acquire + release"),
    ("floor", "reference: two EVALSHA of `return 1` (floor A's call)"),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", help="redis-server binary (default: the one gpuboss finds)")
    parser.add_argument("--waiting", type=int, default=10, metavar="W", help="requests queued behind a full GPU")
    parser.add_argument("--cycles", type=int, default=200, metavar="N", help="cycles of each kind")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep the callgrind profiles in DIR")
    parser.add_argument("--leases", type=int, default=0, metavar="L", help="live leases on a third GPU")
    args = parser.parse_args(argv)
    if not have_callgrind():
        print("valgrind (with callgrind_control) is not on PATH: nothing measured", file=sys.stderr)
        return 2
    counts = count(args.server, args.waiting, args.cycles, args.leases, args.keep)
    leases = f", {args.leases:,} leases on gpu2" if args.leases else ""
    print(
        f"redis-server instructions per cycle, {args.waiting:,} waiting{leases}, {args.cycles} cycles each "
        f"({os.getcwd()}):"
    )
    for name, what in KINDS:
        print(f"  {name:8s} {getattr(counts, name) / 1000:9.1f} k   {what}")
    if args.keep:
        print(
            f"profiles: {args.keep}/fit.callgrind, {args.keep}/handoff.callgrind (callgrind_annotate --inclusive=yes)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
