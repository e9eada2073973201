"""The pieces that make a lease call cheap must behave exactly like what they replace: the hiredis packing of
asyncio commands, the direct FCALL of sync clients, the lazily made Signal (threading.Event), request ids
(UUID4)."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import fakeredis
import pytest
import redis
from gpuboss import scripts
from gpuboss.config import config_from_arguments
from gpuboss.core import Call, Core, new_request_id
from gpuboss.lease import Signal
from gpuboss.redis_io import HiredisPacking, _direct_fcall, call_script_sync, connect_async, connect_sync
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


def test_direct_fcall_answers_like_redis_py(real_url: str) -> None:
    client = connect_sync(real_url, 5.0, 5.0)
    client.function_load(scripts.library().source, replace=True)
    call, function = _ping_call()
    direct = _direct_fcall(client, function, call)
    assert direct is not NotImplemented, "a plain client of a plain URL takes the direct path"
    assert direct == client.fcall(function, len(call.keys), *call.keys, *call.args)
    with pytest.raises(ResponseError, match=r"(?i)function not found"):  # as redis-py raises the server's errors
        _direct_fcall(client, "gpuboss_no_such_function", call)
    assert client.ping(), "the connection is still usable after an error reply"


def test_direct_fcall_is_skipped_where_it_does_not_apply(real_url: str) -> None:
    call, function = _ping_call()
    single = redis.Redis.from_url(real_url, decode_responses=True, single_connection_client=True)
    fake = fakeredis.FakeRedis(decode_responses=True)
    for client in (single, fake):
        assert _direct_fcall(client, function, call) is NotImplemented
    single.close()


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
