"""The pieces that make a lease call cheap must behave exactly like what they replace: the hiredis packing of
asyncio commands, the lazily made Signal (threading.Event), request ids (UUID4)."""

from __future__ import annotations

import threading
import uuid

import pytest
from gpuboss.core import new_request_id
from gpuboss.lease import Signal
from gpuboss.redis_io import HiredisPacking, connect_async
from redis.asyncio.connection import Connection

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
