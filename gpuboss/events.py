"""Events: every state change, announced by the script that made it, live and replayable.

Each script that changes lease state publishes a JSON event (``docs/events.md`` has the schema) on the
namespace's channel (:attr:`Keys.events`) and appends it to a capped stream, the event log
(:attr:`Keys.event_log`, about ``events_maxlen`` entries), in the same atomic step as the change itself.

>>> from gpuboss import events
>>> for event in events.replay(url, "gpuboss", since=timedelta(minutes=10)):    # what happened
...     print(event.type, event.lease, event.service)
>>> with events.subscribe(url, "gpuboss", since=timedelta(minutes=1)) as sub:   # and what happens now
...     for event in sub:
...         print(event)

:func:`subscribe` (and :func:`asubscribe` for asyncio) first subscribes, then replays the log from
``since``, and drops live events it has already replayed, so a watcher misses nothing in between and sees
nothing twice. After a dropped connection it subscribes again and replays from the last event it
delivered.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Self

import redis
import redis.asyncio

from gpuboss.config import config_from_arguments
from gpuboss.errors import InvalidRequest, RedisUnavailable
from gpuboss.keys import Keys
from gpuboss.redis_io import DENIED, TRANSIENT, connect_async, connect_sync, denied, pubsub_async, reply_within
from gpuboss.topology import redact_url
from gpuboss.urls import resolve_redis_url

#: The schema version every event carries as ``v``.
SCHEMA_VERSION = 1
#: Every type the scripts emit today.
EVENT_TYPES = (
    "queued",
    "granted",
    "released",
    "expired",
    "timed_out",
    "withdrawn",
    "revoked",
    "lost",
    "evict_requested",
    "checkpoint_started",
    "evicted",
    "resumed",
    "evict_cancelled",
    "evict_overdue",
    "resized",
    "policy_changed",
    "aged",
    "paused",
    "unpaused",
    "gpu_registered",
    "gpu_resized",
    "gpu_unregistered",
    "gpu_offline",
    "gpu_online",
    "vram_alert",
    "model_loaded",
    "model_unloaded",
    "model_reloaded",
)
#: The field of an event log entry that holds the event's JSON.
LOG_FIELD = "event"
#: Events read per XRANGE page when replaying.
PAGE = 1000

Since = timedelta | datetime | str | None


@dataclass(frozen=True)
class Event:
    """One event. The common fields are attributes; ``data`` is the whole event (``event["waited_ms"]``)."""

    type: str
    time_ms: int
    lease: str | None
    gpu: str | None
    service: str | None
    priority: str | None
    vram_mib: int | None
    #: The event log entry's id (``"<ms>-<n>"``); None when the namespace keeps no log (``events_maxlen: 0``).
    id: str | None
    data: Mapping[str, Any] = field(repr=False, compare=False)

    @property
    def time(self) -> float:
        """Unix time in seconds (Redis clock)."""
        return self.time_ms / 1000

    @property
    def version(self) -> int:
        return int(self.data.get("v", 0))

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def to_dict(self) -> dict[str, Any]:
        """The event as its JSON object, with ``id`` when it has one."""
        out = dict(self.data)
        if self.id is not None:
            out["id"] = self.id
        return out

    @classmethod
    def from_json(cls, raw: str | bytes, log_id: str | None = None) -> Event:
        """Decode one event; ``log_id`` is the log entry's id (the published JSON carries its own).

        Raises ValueError for something that is not an event object.
        """
        data = json.loads(raw)
        if not isinstance(data, dict) or not isinstance(data.get("type"), str):
            raise ValueError(f"not a gpuboss event: {raw!r:.200}")
        event_id = log_id if log_id is not None else data.pop("id", None)
        data.pop("id", None)

        def text(key: str) -> str | None:
            value = data.get(key)
            return None if value is None else str(value)

        vram = data.get("vram_mib")
        return cls(
            type=str(data["type"]),
            time_ms=int(data.get("time", 0)),
            lease=text("lease"),
            gpu=text("gpu"),
            service=text("service"),
            priority=text("priority"),
            vram_mib=None if vram is None else int(vram),
            id=None if event_id is None else str(event_id),
            data=data,
        )


# ---------------------------------------------------------------- log ids


def parse_id(entry_id: str) -> tuple[int, int]:
    """A stream entry id ``"<ms>-<n>"`` as a tuple that sorts like the ids do."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def after(entry_id: str) -> str:
    """The smallest id after ``entry_id`` (XRANGE's exclusive start, spelled for Redis 6.2 and fakeredis)."""
    ms, seq = parse_id(entry_id)
    return f"{ms}-{seq + 1}"


def redis_now_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def start_id(since: Since, now_ms: int) -> str:
    """Where a replay starts: ``since`` ago (timedelta, on the Redis clock), at a time, or after a log id."""
    if since is None:
        return "-"
    if isinstance(since, timedelta):
        if since < timedelta(0):
            raise InvalidRequest("since", since, "must be a duration of 0 or more")
        return f"{max(0, now_ms - int(since.total_seconds() * 1000))}-0"
    if isinstance(since, datetime):
        return f"{max(0, int(since.timestamp() * 1000))}-0"
    if isinstance(since, str):
        if since in ("-", "0"):
            return "-"
        try:
            parse_id(since)
        except ValueError:
            raise InvalidRequest("since", since, "must be an event log id like '1700000000000-0'") from None
        return after(since)
    raise InvalidRequest("since", since, "must be a timedelta, a datetime, an event log id, or None")


def decode_entries(entries: list[Any]) -> list[Event]:
    out = []
    for entry_id, fields in entries:
        raw = fields.get(LOG_FIELD) if isinstance(fields, dict) else None
        if raw is None:
            continue
        try:
            out.append(Event.from_json(raw, log_id=str(entry_id)))
        except ValueError:
            continue  # not ours: skip rather than stop a replay
    return out


def read_log(client: redis.Redis, keys: Keys, start: str = "-", count: int | None = None) -> list[Event]:
    """Events in the log from ``start`` (an XRANGE id) on, oldest first, at most ``count``."""
    events: list[Event] = []
    while count is None or len(events) < count:
        page = PAGE if count is None else min(PAGE, count - len(events))
        entries = client.xrange(keys.event_log, min=start, max="+", count=page)
        if not entries:
            break
        events += decode_entries(entries)
        start = after(str(entries[-1][0]))
        if len(entries) < page:
            break
    return events


def _resolve(redis_url: str | None, namespace: str, connect_timeout: float) -> tuple[str, Keys, float]:
    config = config_from_arguments(redis_url=redis_url, namespace=namespace, connect_timeout=connect_timeout)
    return resolve_redis_url(config), Keys(config.namespace), config.connect_timeout


def replay(
    redis_url: str | None = None,
    namespace: str = "gpuboss",
    since: Since = None,
    *,
    count: int | None = None,
    connect_timeout: float = 5.0,
) -> list[Event]:
    """The events kept in the namespace's log, oldest first: all of them, or those from ``since`` on.

    ``since`` is a :class:`~datetime.timedelta` (that long ago, on the Redis clock), a
    :class:`~datetime.datetime`, or an event id (the events after it).
    """
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise InvalidRequest("count", count, "must be an integer of 1 or more, or None")
    url, keys, within = _resolve(redis_url, namespace, connect_timeout)
    client = connect_sync(url, within, socket_timeout=within)
    try:
        return read_log(client, keys, start_id(since, redis_now_ms(client)), count)
    except TRANSIENT as err:
        raise RedisUnavailable(f"Redis at {redact_url(url)} is unreachable: {err}") from None
    finally:
        client.close()


# ---------------------------------------------------------------- live: sync


class _Dedupe:
    """Remembers the newest log id delivered, and drops anything not newer (replayed, then seen live)."""

    def __init__(self) -> None:
        self.last: tuple[int, int] | None = None
        self.last_id: str | None = None

    def fresh(self, event: Event) -> bool:
        if event.id is None:
            return True
        key = parse_id(event.id)
        if self.last is not None and key <= self.last:
            return False
        self.last, self.last_id = key, event.id
        return True


def _live_event(message: Mapping[str, Any] | None) -> Event | None:
    if message is None or message.get("type") != "message":
        return None
    try:
        return Event.from_json(message["data"])
    except ValueError:
        return None


class Subscription:
    """Live events of one namespace (see :func:`subscribe`). Iterate it, or call :meth:`get`."""

    def __init__(self, url: str, keys: Keys, since: Since, connect_timeout: float) -> None:
        self.url = url
        self.keys = keys
        self._since = since
        self._within = connect_timeout
        self._client: redis.Redis | None = None
        self._pubsub: Any = None
        self._buffer: collections.deque[Event] = collections.deque()
        self._seen = _Dedupe()
        self._closed = False
        self._connect(first=True)

    def _connect(self, first: bool) -> None:
        deadline = time.monotonic() + self._within
        while True:
            try:
                self._open(first)
                return
            except DENIED as err:  # wrong password, or an ACL without the channel: no retry helps
                self._drop()
                raise denied(self.url, err) from None
            except TRANSIENT as err:
                self._drop()
                if time.monotonic() >= deadline:
                    raise RedisUnavailable(f"Redis at {redact_url(self.url)} is unreachable: {err}") from None
                time.sleep(0.1)

    def _open(self, first: bool) -> None:
        self._client = connect_sync(self.url, self._within, socket_timeout=self._within)
        self._pubsub = self._client.pubsub()  # type: ignore[no-untyped-call, unused-ignore]
        self._pubsub.subscribe(self.keys.events)
        deadline = time.monotonic() + self._within
        while True:  # wait for the confirmation: from here on, nothing published is missed
            message = self._pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
            if message is not None and message.get("type") == "subscribe":
                break
            if message is None and time.monotonic() >= deadline:
                raise TimeoutError("no confirmation of SUBSCRIBE")
        if first and self._since is not None:
            start = start_id(self._since, redis_now_ms(self._client))
        elif not first and self._seen.last_id is not None:
            start = after(self._seen.last_id)  # catch up on what passed while disconnected
        else:
            return
        for event in read_log(self._client, self.keys, start):
            if self._seen.fresh(event):
                self._buffer.append(event)

    def _drop(self) -> None:
        for closer in (self._pubsub, self._client):
            if closer is not None:
                try:
                    closer.close()
                except (OSError, *TRANSIENT):
                    pass
        self._pubsub = self._client = None

    def get(self, timeout: float | None = None) -> Event | None:
        """The next event, waiting at most ``timeout`` seconds (None: until one comes); None on timeout."""
        if self._closed:
            raise RuntimeError("the subscription is closed")
        if self._buffer:
            return self._buffer.popleft()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                message = self._pubsub.get_message(ignore_subscribe_messages=True, timeout=min(left, 1.0))
            except TRANSIENT:
                self._drop()
                self._connect(first=False)
                if self._buffer:
                    return self._buffer.popleft()
                continue
            event = _live_event(message)
            if event is not None and self._seen.fresh(event):
                return event
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def __iter__(self) -> Iterator[Event]:
        while not self._closed:
            event = self.get()
            if event is not None:
                yield event

    def close(self) -> None:
        self._closed = True
        self._drop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def subscribe(
    redis_url: str | None = None,
    namespace: str = "gpuboss",
    *,
    since: Since = None,
    connect_timeout: float = 5.0,
) -> Subscription:
    """Subscribe to a namespace's events; with ``since``, the logged events from then on come first.

    ``redis_url`` None means ``GPUBOSS_REDIS_URL``, else the embedded Redis (as for a boss).
    """
    url, keys, within = _resolve(redis_url, namespace, connect_timeout)
    if since is not None:
        start_id(since, 0)  # bad input fails before anything connects
    return Subscription(url, keys, since, within)


# ---------------------------------------------------------------- live: asyncio


class AsyncSubscription:
    """Live events for asyncio (see :func:`asubscribe`): ``async for event in sub``, or ``await sub.get()``."""

    def __init__(self, url: str, keys: Keys, since: Since, connect_timeout: float) -> None:
        self.url = url
        self.keys = keys
        self._since = since
        self._within = connect_timeout
        self._client: redis.asyncio.Redis | None = None
        self._pubsub: Any = None
        self._buffer: collections.deque[Event] = collections.deque()
        self._seen = _Dedupe()
        self._started = False
        self._closed = False

    async def _connect(self, first: bool) -> None:
        deadline = time.monotonic() + self._within
        while True:
            try:
                await self._open(first)
                return
            except DENIED as err:  # wrong password, or an ACL without the channel: no retry helps
                await self._drop()
                raise denied(self.url, err) from None
            except TRANSIENT as err:
                await self._drop()
                if time.monotonic() >= deadline:
                    raise RedisUnavailable(f"Redis at {redact_url(self.url)} is unreachable: {err}") from None
                await asyncio.sleep(0.1)

    async def _open(self, first: bool) -> None:
        # No socket timeout (redis-py would time each send in a task, which can swallow a cancel on Python
        # 3.11): each reply is bounded by reply_within instead, as the link does (redis_io.connect_async).
        self._client = client = connect_async(self.url, self._within)
        within = self._within
        self._pubsub = await reply_within(pubsub_async(client), within)
        await reply_within(self._pubsub.subscribe(self.keys.events), within)
        deadline = time.monotonic() + self._within
        while True:
            message = await self._pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
            if message is not None and message.get("type") == "subscribe":
                break
            if message is None and time.monotonic() >= deadline:
                raise TimeoutError("no confirmation of SUBSCRIBE")
        if first and self._since is not None:
            seconds, micros = await reply_within(client.time(), within)
            start = start_id(self._since, int(seconds) * 1000 + int(micros) // 1000)
        elif not first and self._seen.last_id is not None:
            start = after(self._seen.last_id)
        else:
            return
        while True:
            entries = await reply_within(client.xrange(self.keys.event_log, min=start, max="+", count=PAGE), within)
            if not entries:
                break
            for event in decode_entries(entries):
                if self._seen.fresh(event):
                    self._buffer.append(event)
            start = after(str(entries[-1][0]))
            if len(entries) < PAGE:
                break

    async def _drop(self) -> None:
        pubsub, client = self._pubsub, self._client
        self._pubsub = self._client = None
        for closer in (pubsub, client):
            if closer is not None:
                try:
                    await closer.aclose()
                except (OSError, *TRANSIENT):
                    pass

    async def get(self, timeout: float | None = None) -> Event | None:
        """The next event, waiting at most ``timeout`` seconds (None: until one comes); None on timeout."""
        if self._closed:
            raise RuntimeError("the subscription is closed")
        if not self._started:
            self._started = True
            await self._connect(first=True)
        if self._buffer:
            return self._buffer.popleft()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=min(left, 1.0))
            except TRANSIENT:
                await self._drop()
                await self._connect(first=False)
                if self._buffer:
                    return self._buffer.popleft()
                continue
            event = _live_event(message)
            if event is not None and self._seen.fresh(event):
                return event
            if deadline is not None and time.monotonic() >= deadline:
                return None

    async def start(self) -> None:
        """Subscribe now (``get`` and ``async with`` do it when needed)."""
        if not self._started:
            self._started = True
            await self._connect(first=True)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while not self._closed:
            event = await self.get()
            if event is not None:
                yield event

    async def aclose(self) -> None:
        self._closed = True
        await self._drop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def asubscribe(
    redis_url: str | None = None,
    namespace: str = "gpuboss",
    *,
    since: Since = None,
    connect_timeout: float = 5.0,
) -> AsyncSubscription:
    """The asyncio twin of :func:`subscribe`: ``async with events.asubscribe(url) as sub: async for ...``."""
    url, keys, within = _resolve(redis_url, namespace, connect_timeout)
    if since is not None:
        start_id(since, 0)
    return AsyncSubscription(url, keys, since, within)
