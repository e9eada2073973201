"""The thin I/O layer under both front ends: connections, EVALSHA with NOSCRIPT recovery, retries, and
the two drivers that run a core flow (:func:`run_flow_sync`, :func:`run_flow_async`)."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Generator
from typing import Any, TypeVar, cast

import redis
import redis.asyncio
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    AuthenticationError,
    MovedError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from redis.utils import HIREDIS_AVAILABLE
from tenacity import (
    AsyncRetrying,
    RetryError,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    stop_never,
    wait_exponential,
    wait_random,
)

if HIREDIS_AVAILABLE:  # a dependency (redis[hiredis]); without it redis-py packs every command itself
    import hiredis

from gpuboss import scripts
from gpuboss.core import Call, Op, Read, ReadHash
from gpuboss.deadlines import deadlines
from gpuboss.errors import ConfigError, RedisOutOfMemory, RedisUnavailable
from gpuboss.topology import SCHEMES, Target, parse_url, redact_url

log = logging.getLogger("gpuboss")

T = TypeVar("T")
R = TypeVar("R", redis.Redis, redis.asyncio.Redis)
#: Errors after which the same call may simply be sent again (every gpuboss script is idempotent).
TRANSIENT = (RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError)
#: Errors that no retry mends: wrong credentials, a missing ACL permission, a cluster node behind a plain URL.
#: (AuthenticationError is a ConnectionError to redis-py: these are checked first.) See :func:`is_denied`.
DENIED = (AuthenticationError, NoPermissionError, MovedError, AskError)
#: How Redis, then Valkey, say that a script ran a command, or touched a key or channel, that its caller's ACL
#: does not allow.
SCRIPT_DENIED = ("the user executing the script can't", "acl failure in script")
MIN_POP_S = 0.01
#: Whether redis-py's blocking connections take a timeout for one reply (redis-py 8 does). Without it a BLPOP is
#: read with the socket's own timeout, so it blocks for shorter spells (:func:`pop_sync`).
_READ_TIMEOUT_ARG = "timeout" in inspect.signature(redis.connection.Connection.read_response).parameters
#: Where a BLPOP must block within the socket timeout (old redis-py, Sentinel, Cluster): this share of it.
_POP_SHARE = 0.8


FAKE_SCHEME = "fakeredis://"
_fake_servers: dict[str, Any] = {}
_fake_lock = threading.Lock()  # two threads making the first client of a name must get one server


def _fake_server(url: str) -> Any:
    """An in-process Redis (fakeredis with Lua), shared by every client of the same ``fakeredis://NAME``."""
    try:
        import fakeredis
    except ImportError:
        raise ConfigError(f"{url} needs fakeredis[lua]: pip install 'fakeredis[lua]'") from None
    name = url[len(FAKE_SCHEME) :] or "default"
    with _fake_lock:
        if name not in _fake_servers:
            _fake_servers[name] = fakeredis.FakeServer()
        return _fake_servers[name]


URL_SCHEMES = (*(f"{scheme}://" for scheme in SCHEMES), FAKE_SCHEME)


def _check_scheme(url: str) -> Target:
    if not url.startswith(URL_SCHEMES):
        raise ConfigError(f"redis_url {redact_url(url)!r} must start with one of {', '.join(URL_SCHEMES)}")
    return parse_url(url)


#: The connections one client may open; redis-py 8 caps a pool at 100 by default. Each request that waits blocks
#: on a connection of its own (the BLPOP of its grant), so a boss with more requests in line than the cap would
#: get "Too many connections" for the rest, raised as RedisUnavailable (tests/test_many_waiters.py). The limit
#: that counts is the server's (``maxclients``, 10,000 by default), as it was with redis-py's own default
#: before 5.x.
MAX_CONNECTIONS = 2**31 - 1


def connect_sync(url: str, connect_timeout: float, socket_timeout: float | None = None) -> redis.Redis:
    """A client for ``url`` (any form of ``topology.py``).

    For ``redis+sentinel://`` it is a :class:`redis.Redis` on the primary that the Sentinels name, found
    again after a failover; for ``redis+cluster://`` a :class:`redis.cluster.RedisCluster`, which routes each
    command by its first key and answers the commands gpuboss uses like a :class:`redis.Redis`.
    """
    if url.startswith(FAKE_SCHEME):
        import fakeredis

        client: redis.Redis = fakeredis.FakeRedis(server=_fake_server(url), decode_responses=True)
        return client
    target = _check_scheme(url)
    if target.kind == "sentinel":
        from redis.sentinel import Sentinel

        sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
            list(target.endpoints),
            sentinel_kwargs={**_sentinel_kwargs(target, connect_timeout), "retry": Retry(NoBackoff(), 0)},
            retry=Retry(NoBackoff(), 0),
            **_node_kwargs(target, connect_timeout),
        )
        primary: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call, unused-ignore]
            target.service, redis_class=SentinelPrimary, socket_timeout=socket_timeout, db=target.db
        )
        return _replica_aware(primary)
    if target.kind == "cluster":
        from redis.cluster import ClusterNode, RedisCluster

        def make() -> Any:
            return RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in target.endpoints],  # type: ignore[no-untyped-call, unused-ignore]
                socket_timeout=socket_timeout,
                **_node_kwargs(target, connect_timeout),
            )

        return cast(redis.Redis, LazyCluster(make, url))
    return _replica_aware(
        redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=connect_timeout,
            socket_timeout=socket_timeout,
            max_connections=MAX_CONNECTIONS,
        )
    )


#: The refusals of a call that ran nothing, by their error code: a full server (OOM), a replica (READONLY), and
#: a primary with fewer replicas in reach than its ``min-replicas-to-write`` (NOREPLICAS). redis-py raises the
#: first two as ``OutOfMemoryError`` and ``ReadOnlyError`` (their text without the code); Redis 6.2 puts a
#: script's refusal inside the script's error ("Error running script ...: @user_script: 9: -OOM command ...").
_REFUSAL = re.compile(r"(?:^|-)((OOM|READONLY|NOREPLICAS) [^\n]*)")
#: Why a server refuses a write for its role, and what to look at.
_ROLE_REASONS = {
    "READONLY": (
        "Redis answered READONLY, as a read-only replica ({text}): the primary moved (a failover behind the URL's "
        "host name), or the URL names a replica"
    ),
    "NOREPLICAS": (
        "Redis refused the write with NOREPLICAS ({text}): the primary has fewer replicas in reach than its "
        "min-replicas-to-write"
    ),
}


def refusal(err: BaseException) -> tuple[str, str] | None:
    """The code (``OOM``, ``READONLY``, ``NOREPLICAS``) and text of a refusal that ran nothing, else None."""
    if isinstance(err, OutOfMemoryError):
        return "OOM", str(err)
    if isinstance(err, ReadOnlyError):
        return "READONLY", str(err)
    found = _REFUSAL.search(str(err)) if isinstance(err, ResponseError) else None
    return (found[2], found[1]) if found else None


class ReplicaAware:
    """A connection that drops itself when its server refuses a write for its role (READONLY, NOREPLICAS:
    :func:`refusal`), and raises a connection error instead: the call is retried like one whose connection
    dropped, on a new one.

    A managed Redis fails over by moving its host name to the promoted replica (or a proxy sends new
    connections there), while the connections already open still reach the old primary, which now refuses
    every write with ``READONLY``: with redis-py's plain connections, a process would keep those connections,
    and every call, its heartbeat's renewals included, would fail until it restarted. A primary configured
    with ``min-replicas-to-write`` refuses writes with ``NOREPLICAS`` while cut off from its replicas, until
    they are back or a failover replaces it: a call retried within its time goes through then. What is refused
    this way did not run (refused before it runs; a script, at its first write), so sending it again is safe.
    (redis-py's Sentinel connections turn ``READONLY`` from the primary into a connection error themselves.)"""

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)  # type: ignore[misc]
        except ResponseError as err:
            refused = _for_role(err)
            if refused is None:
                raise
            self.disconnect()  # type: ignore[attr-defined]
            raise refused from err


class AsyncReplicaAware:
    """:class:`ReplicaAware` for asyncio connections."""

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)  # type: ignore[misc]
        except ResponseError as err:
            refused = _for_role(err)
            if refused is None:
                raise
            await self.disconnect()  # type: ignore[attr-defined]
            raise refused from err


def _for_role(err: ResponseError) -> RedisConnectionError | None:
    """The connection error that stands for ``err`` when it is a refusal for the server's role, else None."""
    found = refusal(err)
    if found is None or found[0] not in _ROLE_REASONS:
        return None
    return RedisConnectionError(_ROLE_REASONS[found[0]].format(text=found[1]))


#: The connection classes made by :func:`_mixed`, by (mixin, class).
_mixed_classes: dict[tuple[type[Any], type[Any]], type[Any]] = {}


def _mixed(mixin: type[Any], cls: type[Any]) -> type[Any]:
    """``cls`` with ``mixin`` in front of it, made once per pair."""
    if (mixin, cls) not in _mixed_classes:
        _mixed_classes[mixin, cls] = type(f"{mixin.__name__}{cls.__name__}", (mixin, cls), {})
    return _mixed_classes[mixin, cls]


def _replica_aware(client: R) -> R:
    """``client``, its pool's connections :class:`ReplicaAware` (or :class:`AsyncReplicaAware`)."""
    pool: Any = client.connection_pool
    mixin = AsyncReplicaAware if isinstance(client, redis.asyncio.Redis) else ReplicaAware
    if not issubclass(pool.connection_class, mixin):
        pool.connection_class = _mixed(mixin, pool.connection_class)
    return client


#: The argument types hiredis packs exactly as redis-py's encoder does (bool, bytearray... are the encoder's).
_HIREDIS_TYPES = frozenset((str, bytes, int, float))


def _hiredis_packs(args: Any) -> bool:
    """True when hiredis packs every one of ``args`` exactly as redis-py's encoder does."""
    return _HIREDIS_TYPES.issuperset(map(type, args))


class HiredisPacking:
    """Packs commands with hiredis (C), as redis-py's blocking connections do; its asyncio connections pack in
    Python, argument by argument: ~25 us for a script call's forty KEYS and ARGV, against ~3 us. Commands
    hiredis cannot pack the same way (another encoding, a bool, a multi-word command name) go to redis-py's
    own packer."""

    encoder: Any

    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0] if args else None
        encoder = self.encoder
        if (
            type(first) is str
            and " " not in first
            and encoder.encoding == "utf-8"
            and encoder.encoding_errors == "strict"
            and _hiredis_packs(args)
        ):
            return [hiredis.pack_command(args)]
        packed: list[bytes] = super().pack_command(*args)  # type: ignore[misc]
        return packed


def _with_hiredis_packing(client: redis.asyncio.Redis) -> redis.asyncio.Redis:
    """``client``, its pool's connections packing commands with hiredis (:class:`HiredisPacking`) when it is
    installed (``redis[hiredis]``) and the pool's connection class packs like redis-py's own."""
    pool = client.connection_pool
    cls = pool.connection_class
    if not HIREDIS_AVAILABLE or getattr(cls, "pack_command", None) is not AbstractConnection.pack_command:
        return client
    pool.connection_class = _mixed(HiredisPacking, cls)
    return client


def connect_async(url: str, connect_timeout: float, socket_timeout: float | None = None) -> redis.asyncio.Redis:
    """The asyncio twin of :func:`connect_sync`: no socket timeout unless one is given (a BLPOP may block for
    long). It is always passed: redis-py 8's asyncio connections default to 5 s, which cut every longer BLPOP
    short (and dropped its connection), and wrap every send in a task to time it (on Python 3.11 such a task can
    swallow a cancel). The link bounds each reply itself instead (:func:`reply_within`)."""
    if url.startswith(FAKE_SCHEME):
        import fakeredis

        client: redis.asyncio.Redis = fakeredis.FakeAsyncRedis(server=_fake_server(url), decode_responses=True)
        return client
    target = _check_scheme(url)
    if target.kind == "sentinel":
        from redis.asyncio.sentinel import Sentinel

        sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
            list(target.endpoints),
            sentinel_kwargs={**_sentinel_kwargs(target, connect_timeout), "retry": AsyncRetry(NoBackoff(), 0)},
            retry=AsyncRetry(NoBackoff(), 0),
            **_node_kwargs(target, connect_timeout),
        )
        primary: redis.asyncio.Redis = sentinel.master_for(
            target.service, redis_class=AsyncSentinelPrimary, socket_timeout=socket_timeout, db=target.db
        )
        return _replica_aware(primary)
    if target.kind == "cluster":
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.endpoints],
            socket_timeout=socket_timeout,
            **_node_kwargs(target, connect_timeout),
        )
        return cast(redis.asyncio.Redis, cluster)
    return _with_hiredis_packing(
        _replica_aware(
            redis.asyncio.Redis.from_url(
                url,
                decode_responses=True,
                socket_connect_timeout=connect_timeout,
                socket_timeout=socket_timeout,
                max_connections=MAX_CONNECTIONS,
            )
        )
    )


def _sentinel_clients(client: redis.Redis | redis.asyncio.Redis) -> list[Any]:
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    return list(getattr(manager, "sentinels", []))


class SentinelPrimary(redis.Redis):
    """The primary that the Sentinels name (found again after a failover); closing it also closes the
    connections to the Sentinels."""

    def close(self) -> None:
        super().close()
        for sentinel in _sentinel_clients(self):
            sentinel.close()


class AsyncSentinelPrimary(redis.asyncio.Redis):
    """The asyncio twin of :class:`SentinelPrimary`."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        for sentinel in _sentinel_clients(self):
            await sentinel.aclose()


class LazyCluster:
    """A :class:`redis.cluster.RedisCluster` made at its first use.

    redis-py's sync cluster client reaches the cluster in its constructor; every other client connects at its
    first command. This one does too, so a client made while the cluster is unreachable (a heartbeat's, at
    exit) fails at its first command with a connection error, like the others, and ``close()`` of a client
    never used does nothing.
    """

    def __init__(self, make: Callable[[], Any], url: str) -> None:
        self._make = make
        self._url = url
        self._client: Any = None

    def _get(self) -> Any:
        if self._client is None:
            from redis.exceptions import RedisClusterException

            try:
                self._client = self._make()
            except RedisClusterException as err:
                if "cluster mode is not enabled" in str(err).lower():
                    raise ConfigError(
                        f"redis_url {redact_url(self._url)!r}: that Redis is not a cluster node ({err}); "
                        "use redis:// for one server"
                    ) from None
                raise RedisConnectionError(str(err)) from None
        return self._client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._get(), name)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


async def pubsub_async(client: redis.asyncio.Redis) -> Any:
    """``client.pubsub()``; an asyncio Redis Cluster client learns its slots first (its pub/sub needs them)."""
    from redis.asyncio.cluster import RedisCluster

    if isinstance(client, RedisCluster):
        await client.initialize()
    return client.pubsub()


def _node_kwargs(target: Target, connect_timeout: float) -> dict[str, Any]:
    """Keyword arguments for the connections to the data nodes (a primary, replicas, cluster nodes)."""
    return {
        "decode_responses": True,
        "socket_connect_timeout": connect_timeout,
        "max_connections": MAX_CONNECTIONS,
        **target.credentials(),
        **target.connection_kwargs(),
        **target.tls_kwargs(),
    }


def _sentinel_kwargs(target: Target, connect_timeout: float) -> dict[str, Any]:
    """Keyword arguments for the connections to the Sentinels: same TLS, credentials only if asked.

    (With Sentinel, redis-py's own retries are turned off: a failed connection is retried by gpuboss within
    ``connect_timeout``, where redis-py would back off for seconds more.)
    """
    kwargs: dict[str, Any] = {
        "socket_connect_timeout": connect_timeout,
        "socket_timeout": connect_timeout,
        **target.tls_kwargs(),
    }
    if target.sentinel_auth:
        kwargs.update(target.credentials())
    return kwargs


def _retry_args(within: float | None, cap: float = 1.0) -> dict[str, Any]:
    return {
        "stop": stop_never if within is None else stop_after_delay(max(0.0, within)),
        "wait": wait_exponential(multiplier=0.05, max=cap) + wait_random(0, 0.05),
        "retry": retry_if_exception(lambda err: isinstance(err, TRANSIENT) and not is_denied(err)),
        "reraise": False,
    }


def _unavailable(url: str, err: BaseException) -> RedisUnavailable:
    cause = err.last_attempt.exception() if isinstance(err, RetryError) else err
    # redis-py's "No master found for 'name' : <the Sentinel clients' repr>": the name is what helps.
    text = str(cause).split(" : <", 1)[0]
    return RedisUnavailable(f"Redis at {redact_url(url)} is unreachable: {text}")


def is_out_of_memory(err: BaseException) -> bool:
    """A refusal by a full server (:func:`refusal`'s ``OOM``)."""
    found = refusal(err)
    return found is not None and found[0] == "OOM"


def _refusal_text(err: BaseException) -> str:
    found = refusal(err)
    return found[1] if found else str(err)


def out_of_memory(url: str, err: RedisError) -> RedisOutOfMemory:
    """The error for a call that a full Redis refused (:func:`is_out_of_memory`), naming what to do; the URL
    without its password."""
    return RedisOutOfMemory(
        f"Redis at {redact_url(url)} refused the call: it is out of memory ({_refusal_text(err)}); nothing was changed. Free "
        "memory there, raise its maxmemory, or give gpuboss a Redis of its own (leases already granted are still "
        "renewed and released)"
    )


def raise_refusal(url: str, err: RedisError) -> None:
    """Raise gpuboss's error for a refusal that no retry mends: :func:`denied`'s (credentials, ACL, a cluster
    node), or :func:`out_of_memory`'s (a full server); anything else returns."""
    if is_denied(err):
        raise denied(url, err) from None
    if is_out_of_memory(err):
        raise out_of_memory(url, err) from err


def is_denied(err: BaseException) -> bool:
    """A refusal that no retry mends: :data:`DENIED`, or a script refused a command by the caller's ACL."""
    if isinstance(err, DENIED):
        return True
    return isinstance(err, ResponseError) and any(text in str(err).lower() for text in SCRIPT_DENIED)


def denied(url: str, err: BaseException) -> ConfigError:
    """The error for a refusal (:func:`is_denied`), naming what to fix; the URL without its password."""
    shown = redact_url(url)
    if isinstance(err, AuthenticationError):
        return ConfigError(
            f"redis_url: Redis at {shown} refused the credentials ({err}): check the user and password in the URL"
        )
    if isinstance(err, MovedError | AskError):
        return ConfigError(
            f"redis_url: Redis at {shown} is a node of a Redis Cluster ({err}): use redis+cluster://host:port and "
            "a namespace with a hash tag, e.g. '{gpuboss}'"
        )
    return ConfigError(
        f"redis_url: the Redis user of {shown} lacks a permission gpuboss needs ({err}); "
        "docs/security.md lists the ACL gpuboss needs"
    )


#: How scripts are run: "auto" uses the function library (FCALL) where the server has functions and the
#: user may load them, else EVALSHA; "evalsha" always uses EVALSHA. Set by GPUBOSS_SCRIPT_CALLS.
SCRIPT_CALLS = os.environ.get("GPUBOSS_SCRIPT_CALLS", "auto")
#: Per client: True once FCALL worked, False once the server (or the user's ACL) ruled functions out.
_functions: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def _function_missing(err: RedisError) -> bool:
    return "function not found" in str(err).lower()


#: How a server without functions answers FCALL or FUNCTION (and how redis-py's cluster client, which routes a
#: command by the server's COMMAND table, refuses FCALL on Redis 6.2 before sending it).
_NO_FUNCTIONS = ("unknown command", "unknown subcommand", "command doesn't exist in redis commands")


def _functions_unavailable(err: BaseException) -> bool:
    """FCALL or FUNCTION LOAD refused for good: an older server (6.2), a server without functions, or an ACL
    without them. EVALSHA does the same work there."""
    text = str(err).lower()
    return isinstance(err, NoPermissionError) or any(words in text for words in _NO_FUNCTIONS)


def _library_loaded(err: ResponseError) -> bool:
    return "already exists" in str(err).lower()  # another process loaded the same library first


#: The servers this process has said it runs scripts by EVALSHA on: said once each, not once per client.
_told_evalsha: set[str] = set()


def _server_of(client: Any) -> str:
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", None) or {}
    return str(kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}")


def _no_functions(client: Any, err: BaseException) -> bool:
    _functions[client] = False
    server = _server_of(client)
    if server not in _told_evalsha:
        _told_evalsha.add(server)
        why = str(err).split(", with args", 1)[0]  # not the arguments of the refused call
        log.info("gpuboss: scripts run by EVALSHA on this server (no function library: %s)", why)
    return False


def _load_after(client: Any, err: RedisError) -> bool:
    """What a refused FCALL calls for: True, load the library and send it again ("Function not found");
    False, EVALSHA from now on (functions unavailable). Anything else (the script's own error) is raised."""
    if _function_missing(err):
        return True
    if not _functions_unavailable(err):
        raise err
    return _no_functions(client, err)


def _loaded_after(client: Any, err: ResponseError) -> bool:
    """What a refused FUNCTION LOAD calls for: True, send the FCALL again (another process loaded the same
    library first); False, EVALSHA from now on. Anything else is raised."""
    if _library_loaded(err):
        return True
    if not _functions_unavailable(err):
        raise err
    return _no_functions(client, err)


#: The pool classes whose connections :func:`direct_command` may take (plain ones: not Sentinel's, not a test
#: double's).
_DIRECT_POOLS = (redis.ConnectionPool, redis.BlockingConnectionPool)


class _Kept:
    """The connection :func:`direct_command` (or :func:`direct_command_async`) keeps out of a client's pool, the
    process that took it, and whether a caller is using it."""

    __slots__ = ("busy", "conn", "lock", "pid")

    def __init__(self) -> None:
        self.lock = threading.Lock()  # (sync clients; an asyncio client's callers share one thread: `busy`)
        self.busy = False
        self.conn: Any = None
        self.pid = 0


_kept: weakref.WeakKeyDictionary[Any, _Kept] = weakref.WeakKeyDictionary()


def _kept_of(client: Any) -> _Kept:
    kept = _kept.get(client)
    if kept is None:
        kept = _kept.setdefault(client, _Kept())
    return kept


def direct_command(client: redis.Redis, command: tuple[Any, ...], read_timeout: float | None = None) -> Any:
    """``command`` (a script call, a BLPOP) packed by hiredis in one step and answered by the connection itself:
    what ``client.execute_command`` does without redis-py's per-command layers (argument filtering, event
    dispatch, observability hooks, the retry wrapper) and without taking a connection from the pool and giving
    it back each time (~15 us with redis-py 8: a lock, a poll of the socket, connection-count hooks). A client
    keeps one connection out of its pool for this (gpuboss's URLs take no pool size: redis-py's default of 100
    stands); a thread that finds it in use by another takes one from the pool as before.

    Only for a plain :class:`redis.Redis` with its own pool and hiredis; anything else returns
    :data:`NotImplemented` and takes the usual path, as does a ``read_timeout`` (the longest wait for this
    reply, else the socket timeout's) where redis-py cannot apply one. A connection error drops the connection
    and returns :data:`NotImplemented` too: the usual path then sends the command again, with redis-py's
    reconnect and retry, as its own retry would have (the scripts are safe to run twice: a request id is never
    granted twice). A timeout drops the connection and raises :class:`redis.exceptions.TimeoutError`: a server
    that does not answer would not answer the same command sent again either (the caller's retry decides). The
    server's own errors are raised as redis-py raises them.

    The kept connection goes back with the pool's: ``client.close()`` disconnects it (the pool counts it in
    use), and a forked child takes a new one (the pool's are reset there; the parent's socket is left alone)."""
    if not HIREDIS_AVAILABLE or type(client) is not redis.Redis:  # (a cluster client has no pool of its own)
        return NotImplemented
    pool = client.connection_pool
    if type(pool) not in _DIRECT_POOLS or client.connection is not None or not _hiredis_packs(command):
        return NotImplemented
    if read_timeout is not None and not _READ_TIMEOUT_ARG:
        return NotImplemented
    kept = _kept_of(client)
    if kept.lock.acquire(blocking=False):
        try:
            if kept.conn is None or kept.pid != os.getpid():
                kept.conn, kept.pid = pool.get_connection(), os.getpid()
            return _send(kept.conn, command, read_timeout)
        finally:
            kept.lock.release()
    conn = pool.get_connection()
    try:
        return _send(conn, command, read_timeout)
    finally:
        pool.release(conn)


def _send(conn: Any, command: tuple[Any, ...], read_timeout: float | None) -> Any:
    try:
        conn.send_packed_command([hiredis.pack_command(command)])
        if read_timeout is None:
            return conn.read_response()
        return conn.read_response(timeout=read_timeout)
    except (RedisTimeoutError, TimeoutError) as err:
        conn.disconnect()
        raise RedisTimeoutError(f"no reply from Redis to {command[0]}: {err}") from err
    except (RedisConnectionError, OSError):
        conn.disconnect()
        return NotImplemented


def pop_sync(client: redis.Redis, key: str, timeout: float, grace: float) -> str | None:
    """BLPOP ``key`` for ``timeout`` seconds (at least :data:`MIN_POP_S`): the popped value, or None. Its reply
    may come ``grace`` seconds late (the client's socket timeout) before Redis counts as hung
    (:class:`redis.exceptions.TimeoutError`). Where the reply cannot be given its own timeout, it blocks for at
    most :data:`_POP_SHARE` of ``grace`` (the caller then looks again), so the socket timeout never cuts it."""
    timeout = max(timeout, MIN_POP_S)
    popped = direct_command(client, ("BLPOP", key, timeout), read_timeout=timeout + grace)
    if popped is NotImplemented:
        popped = client.blpop([key], timeout=max(MIN_POP_S, min(timeout, grace * _POP_SHARE)))
    return None if popped is None else cast(str, popped[1])


#: The asyncio pool classes whose connections :func:`direct_command_async` may take.
_DIRECT_ASYNC_POOLS = (redis.asyncio.ConnectionPool, redis.asyncio.BlockingConnectionPool)


async def direct_command_async(client: redis.asyncio.Redis, command: tuple[Any, ...]) -> Any:
    """:func:`direct_command` for a plain :class:`redis.asyncio.Redis` (~45 us less per command with redis-py 8:
    its pool alone takes ~20). A task that finds the kept connection in use by another takes one from the
    pool. A task cancelled while it waits for the reply leaves the connection dropped (redis-py disconnects a
    connection whose reply was not read), so no later command reads that reply."""
    if not HIREDIS_AVAILABLE or type(client) is not redis.asyncio.Redis:
        return NotImplemented
    pool: Any = client.connection_pool  # (redis-py's asyncio pool is not typed)
    if type(pool) not in _DIRECT_ASYNC_POOLS or client.connection is not None or not _hiredis_packs(command):
        return NotImplemented
    kept = _kept_of(client)
    if not kept.busy:
        kept.busy = True
        try:
            if kept.conn is None or kept.pid != os.getpid():
                kept.conn, kept.pid = await pool.get_connection(), os.getpid()
            return await _send_async(kept.conn, command)
        finally:
            kept.busy = False
    conn = await pool.get_connection()
    try:
        return await _send_async(conn, command)
    finally:
        await pool.release(conn)


async def _send_async(conn: Any, command: tuple[Any, ...]) -> Any:
    try:
        await conn.send_packed_command([hiredis.pack_command(command)])
        return await conn.read_response()
    except (RedisConnectionError, RedisTimeoutError, OSError):
        await conn.disconnect()
        return NotImplemented


class Rounds:
    """The rounds of a background thread that works against Redis (the heartbeat, the sampler): a round that
    cannot reach Redis, or that Redis refuses for lack of memory, is logged once until one works again (said
    too), and any other Redis error with its trace; the thread goes on either way."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.failing = False

    def run(self, work: Callable[[], object]) -> None:
        try:
            work()
        except TRANSIENT as err:
            if not self.failing:
                log.warning("gpuboss: %s cannot reach Redis (%s); retrying", self.what, err)
            self.failing = True
        except RedisError as err:
            if not is_out_of_memory(err):
                log.exception("gpuboss: %s round failed; retrying", self.what)
                return
            if not self.failing:
                text = _refusal_text(err)
                log.warning("gpuboss: %s: Redis refuses its calls, it is out of memory (%s); retrying", self.what, text)
            self.failing = True
        else:
            if self.failing:
                log.warning("gpuboss: %s reaches Redis again", self.what)
            self.failing = False


async def reply_within(reply: Awaitable[T], seconds: float) -> T:
    """``await reply``, for at most ``seconds``: an asyncio client has no socket timeout (see
    :func:`connect_async`), so a Redis that stopped answering (a frozen process, a dead host without a reset)
    would be awaited forever. Past ``seconds`` the wait is cancelled (redis-py drops the connection it was
    reading) and :class:`redis.exceptions.TimeoutError` is raised; the caller's retry decides what next. A
    cancel from outside stays a cancel (the deadline cancels the waiting task itself, as ``asyncio.timeout``
    does, and tells its own cancel from another's; ``asyncio.wait_for`` on Python 3.11 starts a task and could
    swallow one). The replies of one event loop share one timer (:mod:`gpuboss.deadlines`)."""
    clock = deadlines()
    wait = clock.start(seconds)
    try:
        return await reply
    except asyncio.CancelledError as err:
        if not wait.timed_out():
            raise
        raise RedisTimeoutError(f"no reply from Redis within {seconds:g} s") from err
    finally:
        clock.end(wait)


async def pop_async(client: redis.asyncio.Redis, key: str, timeout: float, grace: float) -> str | None:
    """The asyncio twin of :func:`pop_sync`: its reply may come ``grace`` seconds late (:func:`reply_within`)."""
    timeout = max(timeout, MIN_POP_S)
    popped = await reply_within(_blpop_async(client, key, timeout), timeout + grace)
    return None if popped is None else cast(str, popped[1])


async def _blpop_async(client: redis.asyncio.Redis, key: str, timeout: float) -> Any:
    popped = await direct_command_async(client, ("BLPOP", key, timeout))
    if popped is NotImplemented:
        popped = await client.blpop([key], timeout=timeout)
    return popped


def read_sync(client: redis.Redis, op: Read) -> dict[str, str]:
    """A read-only operation of a flow: a whole hash, or the queue's head with its records (by queue order)."""
    if isinstance(op, ReadHash):
        return cast(dict[str, str], client.hgetall(op.key))
    ids: Any = client.zrange(op.queue, 0, op.count - 1)
    return _records(ids, client.hmget(op.tickets, ids) if ids else [])


async def read_async(client: redis.asyncio.Redis, op: Read) -> dict[str, str]:
    """:func:`read_sync` for asyncio clients."""
    if isinstance(op, ReadHash):
        return cast(dict[str, str], await client.hgetall(op.key))
    ids: Any = await client.zrange(op.queue, 0, op.count - 1)
    return _records(ids, await client.hmget(op.tickets, ids) if ids else [])


def send_sync(client: redis.Redis, op: Call | Read) -> Any:
    """One operation of a flow that Redis answers at once: a script call, or a read."""
    return call_script_sync(client, op) if isinstance(op, Call) else read_sync(client, op)


def send_async(client: redis.asyncio.Redis, op: Call | Read) -> Awaitable[Any]:
    """:func:`send_sync` for asyncio clients: the awaitable of the call or the read itself (no coroutine of its
    own around it: this is on every asyncio call's path)."""
    return call_script_async(client, op) if isinstance(op, Call) else read_async(client, op)


def _records(ids: list[str], raws: Any) -> dict[str, str]:
    return {i: raw for i, raw in zip(ids, raws, strict=True) if raw is not None}


def call_script_sync(client: redis.Redis, call: Call) -> Any:
    """Run one script: FCALL of its function where the library is usable, else EVALSHA (see :data:`SCRIPT_CALLS`).

    A flushed or restarted server answers "Function not found" or NOSCRIPT: the library or the script is
    loaded again and the call sent once more."""
    if SCRIPT_CALLS == "auto" and _functions.get(client, True):
        lib = scripts.library()
        function = lib.functions[call.script]
        try:
            reply = direct_command(client, ("FCALL", function, len(call.keys), *call.keys, *call.args))
            if reply is not NotImplemented:
                return reply
            return client.fcall(function, len(call.keys), *call.keys, *call.args)
        except RedisError as err:  # (a cluster client refuses FCALL itself where the server has no functions)
            load = _load_after(client, err)
        if load:
            try:
                client.function_load(lib.source)
                loaded = True
            except ResponseError as err:
                loaded = _loaded_after(client, err)
            if loaded:
                return client.fcall(function, len(call.keys), *call.keys, *call.args)
    return _evalsha_sync(client, call)


async def call_script_async(client: redis.asyncio.Redis, call: Call) -> Any:
    """:func:`call_script_sync` for asyncio clients."""
    if SCRIPT_CALLS == "auto" and _functions.get(client, True):
        lib = scripts.library()
        function = lib.functions[call.script]
        try:
            reply = await direct_command_async(client, ("FCALL", function, len(call.keys), *call.keys, *call.args))
            if reply is not NotImplemented:
                return reply
            return await client.fcall(function, len(call.keys), *call.keys, *call.args)
        except RedisError as err:  # (a cluster client refuses FCALL itself where the server has no functions)
            load = _load_after(client, err)
        if load:
            try:
                await client.function_load(lib.source)
                loaded = True
            except ResponseError as err:
                loaded = _loaded_after(client, err)
            if loaded:
                return await client.fcall(function, len(call.keys), *call.keys, *call.args)
    return await _evalsha_async(client, call)


#: Per client: False once its server could not read a script's first line ``#!lua flags=...`` (Redis 6.2):
#: scripts go to it without that line from then on (scripts.py, ``Script.flagged``).
_shebang: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def _script_text(client: Any, script: scripts.Script) -> tuple[str, str]:
    """The text and SHA1 of ``script`` to send by EVALSHA: with its flags' shebang line where the server reads
    it (Redis 7, Valkey), so a full server runs the scripts that keep leases alive, as their functions run."""
    if script.flags and _shebang.get(client, True):
        return script.flagged
    return script.source, script.sha


def _shebang_unread(client: Any, script: scripts.Script, sha: str, err: ResponseError) -> bool:
    """Whether ``err`` is the server failing to compile the shebang line of ``script`` (Redis 6.2 compiles it
    as Lua; fakeredis too, at EVALSHA rather than SCRIPT LOAD): nothing ran. It is remembered for the client,
    whose calls then go without the line. Any other error is the caller's to raise."""
    if sha == script.sha or "unexpected symbol near '#'" not in str(err):
        return False
    _shebang[client] = False
    log.debug("gpuboss: this server does not read a script's flags line; scripts go without it (%s)", err)
    return True


def _evalsha_sync(client: redis.Redis, call: Call) -> Any:
    script = scripts.get(call.script)
    source, sha = _script_text(client, script)
    try:
        try:
            return client.evalsha(sha, len(call.keys), *call.keys, *call.args)
        except NoScriptError:
            client.script_load(source)
            return client.evalsha(sha, len(call.keys), *call.keys, *call.args)
    except ResponseError as err:
        if not _shebang_unread(client, script, sha, err):
            raise
    return _evalsha_sync(client, call)


async def _evalsha_async(client: redis.asyncio.Redis, call: Call) -> Any:
    script = scripts.get(call.script)
    source, sha = _script_text(client, script)
    try:
        try:
            return await client.evalsha(sha, len(call.keys), *call.keys, *call.args)
        except NoScriptError:
            await client.script_load(source)
            return await client.evalsha(sha, len(call.keys), *call.keys, *call.args)
    except ResponseError as err:
        if not _shebang_unread(client, script, sha, err):
            raise
    return await _evalsha_async(client, call)


def retry_sync(
    fn: Callable[[], T],
    url: str,
    within: float | None,
    *,
    cap: float = 1.0,
    chain: bool = False,
    failed: Callable[[BaseException], None] | None = None,
) -> T:
    """Run ``fn``, sending it again on connection errors for up to ``within`` seconds (None: until it works).

    The first try is a plain call: the retry machinery costs tens of microseconds, so it only starts
    once a try has failed; ``failed`` is told that first error. The pauses between tries grow up to ``cap``
    seconds, with jitter. A refusal (:func:`raise_refusal`: a denial, a full server) is not retried: it
    raises gpuboss's error for it.
    With ``chain`` the :class:`RedisUnavailable` is chained from the last error.
    """
    started = time.monotonic()
    try:
        return fn()
    except RedisError as err:
        raise_refusal(url, err)
        if not isinstance(err, TRANSIENT):
            raise
        if failed is not None:
            failed(err)
    except TRANSIENT as err:  # Redis is unreachable or reconnecting: retry with backoff below
        if failed is not None:
            failed(err)
    left = None if within is None else within - (time.monotonic() - started)
    try:
        for attempt in Retrying(**_retry_args(left, cap)):
            with attempt:
                return fn()
    except RetryError as err:
        raise _unavailable(url, err) from (err.last_attempt.exception() if chain else None)
    except RedisError as err:
        raise_refusal(url, err)
        raise
    raise AssertionError("unreachable")  # pragma: no cover


async def retry_async(
    fn: Callable[[], Awaitable[T]],
    url: str,
    within: float | None,
    *,
    cap: float = 1.0,
    chain: bool = False,
    failed: Callable[[BaseException], None] | None = None,
) -> T:
    """The asyncio twin of :func:`retry_sync`."""
    started = time.monotonic()
    try:
        return await fn()
    except RedisError as err:
        raise_refusal(url, err)
        if not isinstance(err, TRANSIENT):
            raise
        if failed is not None:
            failed(err)
    except TRANSIENT as err:  # Redis is unreachable or reconnecting: retry with backoff below
        if failed is not None:
            failed(err)
    left = None if within is None else within - (time.monotonic() - started)
    try:
        async for attempt in AsyncRetrying(**_retry_args(left, cap)):
            with attempt:
                return await fn()
    except RetryError as err:
        raise _unavailable(url, err) from (err.last_attempt.exception() if chain else None)
    except RedisError as err:
        raise_refusal(url, err)
        raise
    raise AssertionError("unreachable")  # pragma: no cover


def run_flow_sync(flow: Generator[Op, Any, T], perform: Callable[[Op], Any]) -> T:
    """Drive a core flow to its end with blocking I/O; return what it returns. Errors propagate."""
    try:
        op = next(flow)
        while True:
            op = flow.send(perform(op))
    except StopIteration as stop:
        return cast(T, stop.value)


async def run_flow_async(flow: Generator[Op, Any, T], perform: Callable[[Op], Awaitable[Any]]) -> T:
    """Drive a core flow to its end with asyncio I/O; return what it returns. Errors propagate."""
    try:
        op = next(flow)
        while True:
            op = flow.send(await perform(op))
    except StopIteration as stop:
        return cast(T, stop.value)
