"""Uncontended acquire and release of the whole GPU, one process, each in a fresh namespace.

Three ways: :class:`~gpuboss.GPUBoss`, :class:`~gpuboss.AsyncGPUBoss`, and the bare scripts (the same
script calls gpuboss makes, built by its core, sent from a plain client the way gpuboss sends them: FCALL of
its library's functions where the server has functions, else EVALSHA) which separates the cost of the
scripts in Redis from the cost of the client library around them.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from gpuboss import AsyncGPUBoss, GPUBoss
from gpuboss.config import config_from_arguments
from gpuboss.core import Core, ReleaseReply, Reply

from bench.env import connect
from bench.handoff import EXCLUSIVE_GB, GPUS
from bench.scriptcalls import Scripts

WARMUP = 50
TIMEOUT_S = 10.0


@dataclass
class Cycles:
    """Seconds per acquire, per release, and per acquire + release."""

    acquire: list[float] = field(default_factory=list)
    release: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)

    def add(self, t0: float, t1: float, t2: float) -> None:
        self.acquire.append(t1 - t0)
        self.release.append(t2 - t1)
        self.total.append(t2 - t0)


def namespace() -> str:
    return f"bench{uuid.uuid4().hex[:10]}"


class SyncLeases:
    def __init__(self, url: str) -> None:
        self.boss = GPUBoss(url, namespace=namespace(), gpus=GPUS, service="bench-sync")
        self.cycles = Cycles()
        for _ in range(WARMUP):
            self.boss.release(self.boss.acquire(EXCLUSIVE_GB, timeout=TIMEOUT_S))

    def sample(self, n: int) -> None:
        boss, mono = self.boss, time.monotonic
        for _ in range(n):
            t0 = mono()
            lease = boss.acquire(EXCLUSIVE_GB, timeout=TIMEOUT_S)
            t1 = mono()
            boss.release(lease)
            self.cycles.add(t0, t1, mono())

    def close(self) -> None:
        self.boss.close()


class AsyncLeases:
    def __init__(self, url: str, runner: asyncio.Runner) -> None:
        self.runner = runner
        self.boss = AsyncGPUBoss(url, namespace=namespace(), gpus=GPUS, service="bench-async")
        self.cycles = Cycles()
        runner.run(self._loop(WARMUP, Cycles()))

    async def _loop(self, n: int, cycles: Cycles) -> None:
        boss, mono = self.boss, time.monotonic
        for _ in range(n):
            t0 = mono()
            lease = await boss.acquire(EXCLUSIVE_GB, timeout=TIMEOUT_S)
            t1 = mono()
            await boss.release(lease)
            cycles.add(t0, t1, mono())

    def sample(self, n: int) -> None:
        self.runner.run(self._loop(n, self.cycles))

    def close(self) -> None:
        self.runner.run(self.boss.close())


class BareScripts:
    """The acquire and release scripts sent as gpuboss sends them (FCALL, or EVALSHA where the server has no
    functions), from a plain client: no validation, retries, lease objects or heartbeat."""

    def __init__(self, url: str) -> None:
        self.core = Core(config_from_arguments(namespace=namespace(), gpus=GPUS, service="bench-bare"))
        self.client = connect(url)
        self.request = self.core.make_request(EXCLUSIVE_GB, timeout=0)
        self.scripts = Scripts(self.client)
        register = self.core.register_call()
        assert register is not None
        self.core.check_register_reply(self.scripts.call(register))
        self.cycles = Cycles()
        self._loop(WARMUP, Cycles())

    @property
    def command(self) -> str:
        """What the bare scripts are sent by: FCALL or EVALSHA."""
        return self.scripts.command

    def _loop(self, n: int, cycles: Cycles) -> None:
        core, req, s = self.core, self.request, self.scripts
        calls = [
            (s.args(core.acquire_call(rid, req, "", "bench-bare")), s.args(core.release_call(rid))) for rid in ids(n)
        ]
        send, mono = s.sender(self.client), time.monotonic  # client.fcall, or client.evalsha
        for acquire, release in calls:
            t0 = mono()
            granted = send(*acquire)
            t1 = mono()
            released = send(*release)
            t2 = mono()
            if int(granted[0]) != Reply.GRANTED or int(released[0]) != ReleaseReply.RELEASED:
                raise RuntimeError(f"bare scripts: unexpected replies {granted[0]!r}, {released[0]!r}")
            cycles.add(t0, t1, t2)

    def sample(self, n: int) -> None:
        self._loop(n, self.cycles)

    def close(self) -> None:
        self.client.close()


def ids(n: int) -> list[str]:
    return [uuid.uuid4().hex for _ in range(n)]
