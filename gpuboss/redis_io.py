"""The thin I/O layer under both front ends: connections, EVALSHA with NOSCRIPT recovery, retries, and
the two drivers that run a core flow (:func:`run_flow_sync`, :func:`run_flow_async`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis
import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tenacity import (
    AsyncRetrying,
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from gpuboss import scripts
from gpuboss.core import Call, Flow, Op, redact_url
from gpuboss.errors import ConfigError, RedisUnavailable

log = logging.getLogger("gpuboss")

T = TypeVar("T")
#: Errors after which the same call may simply be sent again (every gpuboss script is idempotent).
TRANSIENT = (RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError)
MIN_POP_S = 0.01


FAKE_SCHEME = "fakeredis://"
_fake_servers: dict[str, Any] = {}


def _fake_server(url: str) -> Any:
    """An in-process Redis (fakeredis with Lua), shared by every client of the same ``fakeredis://NAME``."""
    try:
        import fakeredis
    except ImportError:
        raise ConfigError(f"{url} needs fakeredis[lua]: pip install 'fakeredis[lua]'") from None
    name = url[len(FAKE_SCHEME) :] or "default"
    if name not in _fake_servers:
        _fake_servers[name] = fakeredis.FakeServer()
    return _fake_servers[name]


URL_SCHEMES = ("redis://", "rediss://", "unix://", FAKE_SCHEME)


def _check_scheme(url: str) -> None:
    if not url.startswith(URL_SCHEMES):
        raise ConfigError(f"redis_url {redact_url(url)!r} must start with one of {', '.join(URL_SCHEMES)}")


def connect_sync(url: str, connect_timeout: float, socket_timeout: float | None = None) -> redis.Redis:
    if url.startswith(FAKE_SCHEME):
        import fakeredis

        client: redis.Redis = fakeredis.FakeRedis(server=_fake_server(url), decode_responses=True)
        return client
    _check_scheme(url)
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=connect_timeout,
        socket_timeout=socket_timeout,
    )


def connect_async(url: str, connect_timeout: float) -> redis.asyncio.Redis:
    if url.startswith(FAKE_SCHEME):
        import fakeredis

        client: redis.asyncio.Redis = fakeredis.FakeAsyncRedis(server=_fake_server(url), decode_responses=True)
        return client
    _check_scheme(url)
    return redis.asyncio.Redis.from_url(url, decode_responses=True, socket_connect_timeout=connect_timeout)


def _retry_args(within: float) -> dict[str, Any]:
    return {
        "stop": stop_after_delay(max(0.0, within)),
        "wait": wait_exponential(multiplier=0.05, max=1.0) + wait_random(0, 0.05),
        "retry": retry_if_exception_type(TRANSIENT),
        "reraise": False,
    }


def _unavailable(url: str, err: BaseException) -> RedisUnavailable:
    cause = err.last_attempt.exception() if isinstance(err, RetryError) else err
    return RedisUnavailable(f"Redis at {url} is unreachable: {cause}")


def evalsha_sync(client: redis.Redis, call: Call) -> Any:
    script = scripts.get(call.script)
    try:
        return client.evalsha(script.sha, len(call.keys), *call.keys, *call.args)
    except NoScriptError:
        client.script_load(script.source)
        return client.evalsha(script.sha, len(call.keys), *call.keys, *call.args)


async def evalsha_async(client: redis.asyncio.Redis, call: Call) -> Any:
    script = scripts.get(call.script)
    try:
        return await client.evalsha(script.sha, len(call.keys), *call.keys, *call.args)
    except NoScriptError:
        await client.script_load(script.source)
        return await client.evalsha(script.sha, len(call.keys), *call.keys, *call.args)


def retry_sync(fn: Callable[[], T], url: str, within: float) -> T:
    """Run ``fn``, sending it again on connection errors for up to ``within`` seconds.

    The first try is a plain call: the retry machinery costs tens of microseconds, so it only starts
    once a try has failed.
    """
    started = time.monotonic()
    try:
        return fn()
    except TRANSIENT:
        pass  # Redis is unreachable or reconnecting: retry with backoff below
    try:
        for attempt in Retrying(**_retry_args(within - (time.monotonic() - started))):
            with attempt:
                return fn()
    except RetryError as err:
        raise _unavailable(url, err) from None
    raise AssertionError("unreachable")  # pragma: no cover


async def retry_async(fn: Callable[[], Awaitable[T]], url: str, within: float) -> T:
    """The asyncio twin of :func:`retry_sync`."""
    started = time.monotonic()
    try:
        return await fn()
    except TRANSIENT:
        pass  # Redis is unreachable or reconnecting: retry with backoff below
    try:
        async for attempt in AsyncRetrying(**_retry_args(within - (time.monotonic() - started))):
            with attempt:
                return await fn()
    except RetryError as err:
        raise _unavailable(url, err) from None
    raise AssertionError("unreachable")  # pragma: no cover


def run_flow_sync(flow: Flow, perform: Callable[[Op], Any]) -> Any:
    """Drive a core flow to its end with blocking I/O; return what it returns. Errors propagate."""
    try:
        op = next(flow)
        while True:
            op = flow.send(perform(op))
    except StopIteration as stop:
        return stop.value


async def run_flow_async(flow: Flow, perform: Callable[[Op], Awaitable[Any]]) -> Any:
    """Drive a core flow to its end with asyncio I/O; return what it returns. Errors propagate."""
    try:
        op = next(flow)
        while True:
            op = flow.send(await perform(op))
    except StopIteration as stop:
        return stop.value
