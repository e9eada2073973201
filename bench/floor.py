"""Floor A: one round trip of a trivial EVALSHA (``return 1``), the least any script call can cost: sent the way
gpuboss sends its own calls (:func:`gpuboss.redis_io.direct_command`: packed by hiredis, on a connection the client
keeps out of its pool, without redis-py's per-command layers). With ``direct=False`` the same call goes through
redis-py's own ``evalsha``: what a plain redis-py program pays, for reference (not a floor).

Floor B (the push-based exclusive floor: a token handed over by BLPOP/RPUSH between processes, sent the same
direct way) runs through :func:`bench.handoff.run_contention` with the ``token`` worker.
"""

from __future__ import annotations

import asyncio
import time

import redis.asyncio
from gpuboss.redis_io import direct_command, direct_command_async

from bench.env import SOCKET_TIMEOUT_S, connect

TRIVIAL = "return 1"
WARMUP = 200


class SyncFloor:
    """``EVALSHA <return 1> 0`` from a sync client (hiredis, decoded replies), as gpuboss connects and sends its
    calls; with ``direct=False``, by redis-py's own ``evalsha``."""

    def __init__(self, url: str, direct: bool = True) -> None:
        self.client = connect(url)
        self.sha: str = self.client.script_load(TRIVIAL)
        self.direct = direct
        self.samples: list[float] = []
        self.sample(WARMUP)
        self.samples.clear()

    def sample(self, n: int) -> None:
        client, sha, out, mono = self.client, self.sha, self.samples, time.monotonic
        if self.direct:
            command = ("EVALSHA", sha, 0)
            for _ in range(n):
                t0 = mono()
                reply = direct_command(client, command)
                out.append(mono() - t0)
                if reply != 1:
                    raise RuntimeError(f"the direct path did not answer the call: {reply!r}")
            return
        for _ in range(n):
            t0 = mono()
            client.evalsha(sha, 0)
            out.append(mono() - t0)

    def close(self) -> None:
        self.client.close()


class AsyncFloor:
    """The same from an asyncio client, for comparison with :class:`~gpuboss.AsyncGPUBoss` (sent as it sends its
    calls: :func:`gpuboss.redis_io.direct_command_async`)."""

    def __init__(self, url: str, runner: asyncio.Runner) -> None:
        self.runner = runner
        self.client = redis.asyncio.Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=5.0, socket_timeout=SOCKET_TIMEOUT_S
        )
        self.sha: str = runner.run(self._load())
        self.samples: list[float] = []
        runner.run(self._loop(WARMUP, []))

    async def _load(self) -> str:
        return str(await self.client.script_load(TRIVIAL))

    async def _loop(self, n: int, out: list[float]) -> None:
        client, command, mono = self.client, ("EVALSHA", self.sha, 0), time.monotonic
        for _ in range(n):
            t0 = mono()
            reply = await direct_command_async(client, command)
            out.append(mono() - t0)
            if reply != 1:
                raise RuntimeError(f"the direct path did not answer the call: {reply!r}")

    def sample(self, n: int) -> None:
        self.runner.run(self._loop(n, self.samples))

    def close(self) -> None:
        self.runner.run(self.client.aclose())
