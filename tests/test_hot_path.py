"""The pieces that make a lease call cheap must behave exactly like what they replace: the hiredis packing of
asyncio commands, the direct FCALL of sync clients, the lazily made Signal (threading.Event), request ids
(UUID4)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from typing import Any

import fakeredis
import pytest
import redis
from gpuboss import AsyncGPUBoss, GPUBoss, scripts
from gpuboss.config import config_from_arguments
from gpuboss.core import Call, Core, new_request_id
from gpuboss.lease import Signal
from gpuboss.redis_io import (
    HiredisPacking,
    call_script_sync,
    connect_async,
    connect_sync,
    direct_command,
    direct_command_async,
)
from redis.asyncio.connection import Connection
from redis.exceptions import ResponseError

ARGS: list[tuple[object, ...]] = [
    ("FCALL", "gpuboss_0123_acquire", 2, "ns:gpus", "ns:{tag}:capacity", "x" * 1000),
    ("SET", "k", "snowman ☃ and 𝄞", 0, -1, 2**63 - 1, -(2**63)),
    ("ZADD", "z", 1.5, "a", 1e-300, "b", 12345678901234567890.0, "c", float("inf"), "d", -0.0, "e"),
    ("HSET", b"raw\x00bytes", b"\xff\xfe", "v"),
    ("EVALSHA", "0" * 40, 0),
]


class Packing(HiredisPacking, Connection):
    pass


@pytest.mark.parametrize("args", ARGS)
def test_hiredis_packing_is_byte_identical_to_redis_py(args: tuple[object, ...]) -> None:
    ours, theirs = Packing(), Connection()
    assert b"".join(ours.pack_command(*args)) == b"".join(theirs.pack_command(*args))


def test_hiredis_packing_leaves_what_it_cannot_pack_to_redis_py() -> None:
    ours, theirs = Packing(), Connection()
    for args in [("SET", "k", bytearray(b"ab")), ("CLIENT SETINFO", "LIB-NAME", "x"), ("SET", "k", memoryview(b"m"))]:
        assert b"".join(ours.pack_command(*args)) == b"".join(theirs.pack_command(*args))


def test_async_clients_of_a_plain_url_pack_with_hiredis() -> None:
    client = connect_async("redis://127.0.0.1:1/0", 1.0)
    assert issubclass(client.connection_pool.connection_class, HiredisPacking)


def test_signal_behaves_like_an_event() -> None:
    s = Signal()
    assert not s.is_set() and s.wait(0.01) is False
    s.set()
    assert s.is_set() and s.wait(0) is True and s.wait() is True
    s.clear()
    assert not s.is_set()
    threading.Timer(0.05, s.set).start()
    assert s.wait(30) is True  # woken by another thread (a timeout would answer False)
    assert Signal(True).is_set()


def test_request_ids_are_uuid4_hex() -> None:
    for _ in range(2000):
        rid = new_request_id()
        parsed = uuid.UUID(hex=rid)
        assert parsed.hex == rid and parsed.version == 4 and parsed.variant == uuid.RFC_4122


def _ping_call() -> tuple[Call, str]:
    """A cheap real script call (collect, on an empty namespace) and its FCALL function name."""
    core = Core(config_from_arguments(namespace=f"hot{uuid.uuid4().hex[:8]}", gpus=[], service="svc"))
    call = core.collect_call()
    return call, scripts.library().functions[call.script]


def _fcall(function: str, call: Call) -> tuple[Any, ...]:
    return ("FCALL", function, len(call.keys), *call.keys, *call.args)


def test_direct_fcall_answers_like_redis_py(real_url: str) -> None:
    client = connect_sync(real_url, 5.0, 5.0)
    client.function_load(scripts.library().source, replace=True)
    call, function = _ping_call()
    direct = direct_command(client, _fcall(function, call))
    assert direct is not NotImplemented, "a plain client of a plain URL takes the direct path"
    assert direct == client.fcall(function, len(call.keys), *call.keys, *call.args)
    with pytest.raises(ResponseError, match=r"(?i)function not found"):  # as redis-py raises the server's errors
        direct_command(client, _fcall("gpuboss_no_such_function", call))
    assert client.ping(), "the connection is still usable after an error reply"
    assert direct_command(client, _fcall(function, call)) == direct, "the kept connection is usable after it"
    client.close()


def test_direct_fcall_is_skipped_where_it_does_not_apply(real_url: str) -> None:
    call, function = _ping_call()
    single = redis.Redis.from_url(real_url, decode_responses=True, single_connection_client=True)
    fake = fakeredis.FakeRedis(decode_responses=True)
    for client in (single, fake):
        assert direct_command(client, _fcall(function, call)) is NotImplemented
    single.close()


def _client_ids(client: redis.Redis, calls: int) -> set[int]:
    return {direct_command(client, ("CLIENT", "ID")) for _ in range(calls)}


def test_the_direct_path_keeps_one_connection_out_of_the_pool(real_url: str) -> None:
    """Taking a connection from redis-py 8's pool and giving it back costs ~15 us a command (a lock, a poll of the
    socket, connection-count hooks): the direct path keeps one connection instead. Every call of one thread goes
    on that connection, and it stays out of the pool: redis-py's own commands take another."""
    client = connect_sync(real_url, 5.0)
    try:
        ids = _client_ids(client, 20)
        assert len(ids) == 1, f"direct calls went over {len(ids)} connections"
        assert client.client_id() not in ids, "the kept connection was handed out by the pool meanwhile"
        assert len(client.connection_pool._in_use_connections) == 1  # (the kept one: the pool still counts it)
        kept_id = ids.pop()
    finally:
        client.close()
    assert all(not c._sock for c in client.connection_pool._in_use_connections), "close() left it connected"
    again = _client_ids(client, 3)
    assert len(again) == 1 and again != {kept_id}, "close() left the kept connection open, or it did not connect again"
    client.close()


def test_a_thread_that_finds_the_kept_connection_busy_takes_one_from_the_pool(real_url: str) -> None:
    """A waiter's BLPOP holds the kept connection for up to 30 s: another thread's calls meanwhile go on pool
    connections (given back after each), neither waiting for it nor sharing its socket."""
    client = connect_sync(real_url, 5.0)
    key = f"hot:{uuid.uuid4().hex}"
    popped: list[Any] = []
    blocker = threading.Thread(target=lambda: popped.append(direct_command(client, ("BLPOP", key, 10))))
    blocker.start()
    try:
        deadline = time.monotonic() + 10
        while client.info("clients")["blocked_clients"] < 1:  # (redis-py's own command: a pool connection)
            assert time.monotonic() < deadline, "the BLPOP never blocked"
            time.sleep(0.01)
        started = time.monotonic()
        ids = _client_ids(client, 5)
        assert time.monotonic() - started < 5, "a call waited for the busy kept connection"
        assert len(ids) == 1, "the pool's connection was not given back after each call"
        assert direct_command(client, ("RPUSH", key, "grant")) == 1
        blocker.join(10)
        assert popped == [[key, "grant"]], "the BLPOP on the kept connection did not get its value"
        assert len(_client_ids(client, 5) | ids) == 2, "calls after it went over neither connection"
    finally:
        client.close()


def test_a_forked_child_takes_its_own_connection(real_url: str) -> None:
    """A child process must not speak on its parent's socket (their replies would interleave): it takes its own
    connection, and the parent's keeps working."""
    client = connect_sync(real_url, 5.0)
    try:
        parent_id = direct_command(client, ("CLIENT", "ID"))
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report its connection's id, and whether the parent's is still the kept one
            try:
                child_id = direct_command(client, ("CLIENT", "ID"))
                os.write(write, str(child_id).encode())
            finally:
                os._exit(0)
        os.close(write)
        _, status = os.waitpid(pid, 0)
        child = os.read(read, 64).decode()
        os.close(read)
        assert os.waitstatus_to_exitcode(status) == 0 and child.isdigit(), f"the child failed: {child!r}"
        assert int(child) != parent_id, "the child sent its command on its parent's connection"
        assert direct_command(client, ("CLIENT", "ID")) == parent_id, "the parent lost its kept connection"
    finally:
        client.close()


def test_a_connection_lost_mid_call_falls_back_to_redis_py(real_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The direct path gives a failed connection back (dropped) and the call goes the usual way, which
    reconnects: the caller sees the reply, not the error."""
    client = connect_sync(real_url, 5.0, 5.0)
    call, _ = _ping_call()
    first = call_script_sync(client, call)
    original, usual = redis.connection.AbstractConnection.read_response, client.fcall
    steps: list[str] = []

    def lose_once(self: Any, *args: Any, **kwargs: Any) -> Any:
        if "lost" not in steps:
            steps.append("lost")
            raise redis.exceptions.ConnectionError("connection lost (test)")
        return original(self, *args, **kwargs)

    def counted(function: str, *args: Any) -> Any:
        steps.append("usual path")
        return usual(function, *args)

    monkeypatch.setattr(redis.connection.AbstractConnection, "read_response", lose_once)
    monkeypatch.setattr(client, "fcall", counted)
    assert call_script_sync(client, call) == first
    assert steps == ["lost", "usual path"], "the direct path was not taken, or did not hand over to the usual one"


async def test_async_connections_have_no_socket_timeout_unless_asked(real_url: str) -> None:
    """redis-py 8's asyncio connections time reads out after 5 s by default: a waiter's BLPOP (up to 30 s) was
    cut short and its connection dropped, and every send was wrapped in a task to time it. gpuboss's asyncio
    clients have none, as its sync clients, unless one is asked for (the event subscriber's)."""
    for timeout, expected in ((None, None), (2.5, 2.5)):
        client = connect_async(real_url, 5.0, socket_timeout=timeout) if timeout else connect_async(real_url, 5.0)
        try:
            assert await client.ping()
            conn = await client.connection_pool.get_connection()
            try:
                assert conn.socket_timeout == expected, f"socket timeout {conn.socket_timeout!r}"
            finally:
                await client.connection_pool.release(conn)
        finally:
            await client.aclose()


async def test_direct_async_commands_answer_like_redis_py_on_one_kept_connection(real_url: str) -> None:
    client = connect_async(real_url, 5.0)
    try:
        await client.function_load(scripts.library().source, replace=True)
        call, function = _ping_call()
        direct = await direct_command_async(client, _fcall(function, call))
        assert direct is not NotImplemented, "a plain asyncio client of a plain URL takes the direct path"
        assert direct == await client.fcall(function, len(call.keys), *call.keys, *call.args)
        with pytest.raises(ResponseError, match=r"(?i)function not found"):
            await direct_command_async(client, _fcall("gpuboss_no_such_function", call))
        ids = {await direct_command_async(client, ("CLIENT", "ID")) for _ in range(20)}
        assert len(ids) == 1, f"direct calls went over {len(ids)} connections"
        assert await client.client_id() not in ids, "the kept connection was handed out by the pool meanwhile"
        fake = fakeredis.FakeAsyncRedis(decode_responses=True)
        assert await direct_command_async(fake, ("PING",)) is NotImplemented
    finally:
        await client.aclose()


async def test_a_task_cancelled_in_a_direct_blpop_leaves_no_reply_behind(real_url: str) -> None:
    """A waiter cancelled in its BLPOP (a timeout around acquire) must not leave the grant that later arrives
    for the next command on that connection to read: the connection is dropped, and meanwhile another task's
    commands go over a pool connection, not waiting for the BLPOP."""
    client = connect_async(real_url, 5.0)
    key = f"hot:{uuid.uuid4().hex}"
    try:
        waiter = asyncio.ensure_future(direct_command_async(client, ("BLPOP", key, 10)))
        deadline = time.monotonic() + 10
        while (await client.info("clients"))["blocked_clients"] < 1:
            assert time.monotonic() < deadline, "the BLPOP never blocked"
            await asyncio.sleep(0.01)
        started = time.monotonic()
        assert await direct_command_async(client, ("ECHO", "meanwhile")) == "meanwhile"
        assert time.monotonic() - started < 5, "a task waited for the busy kept connection"
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await direct_command_async(client, ("RPUSH", key, "grant"))  # what a late grant would push
        for word in ("one", "two", "three"):
            assert await direct_command_async(client, ("ECHO", word)) == word, "a command read another's reply"
        assert await client.lpop(key) == "grant", "the cancelled BLPOP still took the value"
    finally:
        await client.aclose()


def test_a_waiter_blocks_on_the_direct_path(real_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A queued acquire waits for its grant with a BLPOP on the direct path (redis-py's blpop adds ~45 us to
    every wake-up, on the handoff's critical path), and gets it when the holder releases."""
    calls: list[str] = []
    original = redis.Redis.blpop

    def counted(self: redis.Redis, *args: Any, **kwargs: Any) -> Any:
        calls.append("blpop")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(redis.Redis, "blpop", counted)
    with GPUBoss(real_url, namespace=namespace, gpus=[{"id": "gpu0", "vram_gb": 24}], service="hot") as boss:
        held = boss.acquire(vram_gb=24)
        got: list[Any] = []
        waiter = threading.Thread(target=lambda: got.append(boss.acquire(vram_gb=24, timeout=30)))
        waiter.start()
        deadline = time.monotonic() + 10
        while boss._redis.info("clients")["blocked_clients"] < 1:
            assert time.monotonic() < deadline, "the waiter never blocked"
            time.sleep(0.01)
        boss.release(held)
        waiter.join(30)
        assert got and got[0].vram_mib == 24 * 1024, "the waiter was not granted the lease"
        boss.release(got[0])
    assert calls == [], "the waiter's BLPOP went through redis-py's blpop"


async def test_an_async_waiter_blocks_on_the_direct_path(
    real_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    original = redis.asyncio.Redis.blpop

    async def counted(self: redis.asyncio.Redis, *args: Any, **kwargs: Any) -> Any:
        calls.append("blpop")
        return await original(self, *args, **kwargs)  # type: ignore[misc]

    monkeypatch.setattr(redis.asyncio.Redis, "blpop", counted)
    boss = AsyncGPUBoss(real_url, namespace=namespace, gpus=[{"id": "gpu0", "vram_gb": 24}], service="ahot")
    try:
        held = await boss.acquire(vram_gb=24)
        waiter = asyncio.ensure_future(boss.acquire(vram_gb=24, timeout=30))
        control = connect_sync(real_url, 5.0)
        deadline = time.monotonic() + 10
        while control.info("clients")["blocked_clients"] < 1:
            assert time.monotonic() < deadline, "the waiter never blocked"
            await asyncio.sleep(0.01)
        control.close()
        await boss.release(held)
        lease = await asyncio.wait_for(waiter, 30)
        assert lease.vram_mib == 24 * 1024
        await boss.release(lease)
    finally:
        await boss.close()
    assert calls == [], "the waiter's BLPOP went through redis-py's blpop"
