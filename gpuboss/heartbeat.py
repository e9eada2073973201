"""The heartbeat: one background thread per boss that keeps its leases and queue entries alive.

It is a thread for both front ends, on purpose: an asyncio task cannot run while the caller blocks its
event loop with synchronous GPU work (``model.generate()`` inside ``async with``), and a lease must
survive that. Each tick renews every lease and queued request of the boss in one script call, at about a
third of the shortest TTL it holds. A lease found gone is marked lost and its ``on_lost`` is dispatched.
Releases that could not be delivered (Redis down, a cancelled release) are retried here until they
land or their TTL makes them moot. At interpreter exit every live heartbeat releases what it holds, and so
it does at the end of a ``multiprocessing`` worker, which skips the interpreter's exit (:func:`_watch_worker_exit`).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
from redis.exceptions import RedisError

from gpuboss.core import Core, RenewStatus
from gpuboss.lease import Lease, LeaseState
from gpuboss.redis_io import Rounds, call_script_sync, connect_sync
from gpuboss.snapshot import eviction_risk, read_memory
from gpuboss.topology import redact_url

if TYPE_CHECKING:
    from gpuboss.fallback import Fallback

log = logging.getLogger("gpuboss")

MIN_INTERVAL_S = 0.05
RETRY_INTERVAL_S = 0.5

Dispatch = Callable[[Lease], None]
Notice = Callable[[dict[str, Any]], None]


@dataclass
class _Entry:
    ttl_ms: int
    lease: Lease | None  # None while the request is queued


class Heartbeat:
    """Renews the leases and queue entries of one boss from a daemon thread."""

    def __init__(
        self,
        core: Core,
        url: str,
        dispatch_lost: Dispatch,
        dispatch_notice: Notice | None = None,
        fallback: Fallback | None = None,
    ) -> None:
        self._core = core
        self._url = url
        self._dispatch_lost = dispatch_lost
        self._dispatch_notice = dispatch_notice
        self._entries: dict[str, _Entry] = {}
        self._pending: dict[str, float] = {}  # id -> monotonic time after which it expired anyway
        #: on_redis_down: local: what is in the local store is renewed there; requests that moved there are
        #: withdrawn from Redis (``_withdraw``, like ``_pending``) once it answers again.
        self._fallback = fallback
        self._local_client: redis.Redis | None = None
        self._withdraw: dict[str, float] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._client: redis.Redis | None = None
        self._rounds = Rounds("heartbeat")
        self._sleep_for: float | None = None
        #: The shortest TTL (ms) of what was added since the thread last planned its sleep (see :meth:`_interval`).
        self._added_ms: int | None = None
        _LIVE.add(self)

    # -- what the front ends call

    def watch(self, request_id: str, ttl_ms: int) -> None:
        """Keep a queued request alive."""
        self._add(request_id, _Entry(ttl_ms, None), replace=False)

    def hold(self, lease: Lease) -> None:
        """Keep a granted lease alive until :meth:`forget`."""
        self._add(lease.id, _Entry(int(lease.ttl * 1000), lease), replace=True)

    def _add(self, item_id: str, entry: _Entry, replace: bool) -> None:
        with self._lock:
            if replace or item_id not in self._entries:
                self._entries[item_id] = entry
            if self._added_ms is None or entry.ttl_ms < self._added_ms:
                self._added_ms = entry.ttl_ms
            # Wake the thread only when this entry needs renewing sooner than it planned: a wake-up on
            # every grant would compete for the CPU with the caller at the moment of the handoff.
            sooner = self._sleep_for is None or entry.ttl_ms / 3000 < self._sleep_for
            self._start_locked(wake=sooner)

    def forget(self, item_id: str) -> None:
        with self._lock:
            self._entries.pop(item_id, None)

    def release_later(self, item_id: str, ttl_ms: int) -> None:
        """Stop renewing ``item_id`` and release it from the thread (a release that did not land)."""
        with self._lock:
            self._entries.pop(item_id, None)
            self._pending[item_id] = time.monotonic() + ttl_ms / 1000
        self._start(wake=True)

    def withdraw(self, item_id: str, ttl_ms: int) -> None:
        """Withdraw ``item_id`` from Redis (a request that moved to the local store; see fallback.py), from the
        thread, while it is renewed where it now lives."""
        with self._lock:
            self._withdraw[item_id] = time.monotonic() + ttl_ms / 1000
        self._start(wake=True)

    def held(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def after_fork(self) -> None:
        """In a forked child (base.py): what the parent holds or waits for is not this process's. Forget it, so
        that it is never renewed from here (a lease outliving a dead parent) nor released (at the child's exit,
        under the parent still using the GPU); drop the parent's thread, locks (one may have been held at the
        fork) and connections (their sockets are the parent's: left to it, never used or shut down here)."""
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._entries = {}
        self._pending = {}
        self._withdraw = {}
        self._thread = None
        self._client = None
        self._local_client = None
        self._sleep_for = None
        self._added_ms = None

    def close(self, release: bool = True) -> None:
        """Stop the thread; with ``release``, give back everything still held or queued (best effort)."""
        with self._lock:
            self._stopped = True
            ids = list(self._entries) + list(self._pending)
            withdraw = list(self._withdraw)
            self._entries.clear()
            self._pending.clear()
            self._withdraw.clear()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            # RuntimeError: Ctrl-C landed inside its start(); it sees _stopped and ends by itself.
            with contextlib.suppress(RuntimeError):
                thread.join(timeout=5)
        if release and (ids or withdraw):
            places = [(i, self._is_local(i)) for i in ids] + [(i, False) for i in withdraw]
            for item_id, local in places:
                try:
                    client = self._local_connection() if local else self._connection()
                    call_script_sync(client, self._core.release_call(item_id, "close"))
                except (RedisError, OSError) as err:
                    log.warning("gpuboss: could not release %s on close (%s); its TTL will reclaim it", item_id, err)
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._local_client is not None:
            self._local_client.close()
            self._local_client = None
        _LIVE.discard(self)

    # -- the thread

    def _connection(self) -> redis.Redis:
        if self._client is None:
            timeout = self._core.config.connect_timeout
            self._client = connect_sync(self._url, timeout, socket_timeout=timeout)
        return self._client

    def _is_local(self, item_id: str) -> bool:
        return self._fallback is not None and self._fallback.is_local(item_id)

    def _local_connection(self) -> redis.Redis:
        if self._local_client is None:
            assert self._fallback is not None
            self._local_client = connect_sync(self._fallback.local_url, self._core.config.connect_timeout)
        return self._local_client

    def _start(self, wake: bool) -> None:
        with self._lock:
            self._start_locked(wake)

    def _start_locked(self, wake: bool) -> None:
        """Start the thread unless it runs (or the heartbeat is closed); with ``wake``, wake it. Holds the lock."""
        if self._stopped or (self._thread is not None and self._thread.is_alive()):
            if wake:
                self._wake.set()
            return
        _watch_worker_exit()
        self._thread = threading.Thread(target=self._run, name="gpuboss-heartbeat", daemon=True)
        self._thread.start()

    def _interval(self) -> tuple[float | None, bool]:
        """The time between renewals now (None: nothing to do), remembered for :meth:`_add`; and whether there
        is anything to renew or release now.

        With nothing to renew right after leases came and went (a boss that acquires and releases in a loop),
        the thread keeps its pace for one more round instead of sleeping until woken: a lease added meanwhile
        is renewed in time without waking the thread at every grant. Once a round passes with nothing added,
        it sleeps until something is."""
        with self._lock:
            work = True
            if self._entries:
                shortest = min(e.ttl_ms for e in self._entries.values())
                self._sleep_for = max(MIN_INTERVAL_S, shortest / 3000)
                if self._pending or self._withdraw:  # (a release that did not land goes at the retry pace)
                    self._sleep_for = min(self._sleep_for, RETRY_INTERVAL_S)
            elif self._pending or self._withdraw:
                self._sleep_for = RETRY_INTERVAL_S
            else:
                work = False
                added = self._added_ms
                self._sleep_for = None if added is None else max(MIN_INTERVAL_S, added / 3000)
            self._added_ms = None
            return self._sleep_for, work

    def _has_work(self) -> bool:
        with self._lock:
            return bool(self._entries or self._pending or self._withdraw)

    def _run(self) -> None:
        last = time.monotonic()
        while True:
            interval, work = self._interval()
            if interval is None:  # nothing to renew: sleep until something is added
                self._wake.wait()
                self._wake.clear()
                last = time.monotonic()
            else:
                left = last + interval - time.monotonic()
                if left > 0:  # not due yet; an added entry with a shorter TTL wakes us to reschedule
                    self._wake.wait(timeout=left)
                    self._wake.clear()
            if self._stopped:
                return
            if interval is None or last + interval > time.monotonic():
                continue
            last = time.monotonic()
            if not work and not self._has_work():
                continue  # a round kept only for what may be added (see _interval): nothing came
            self._rounds.run(self.tick)

    def tick(self) -> None:
        """One renewal round (the thread calls it; tests may too)."""
        with self._lock:
            batch = {i: e.ttl_ms for i, e in self._entries.items()}
            pending = list(self._pending.items())
            withdraw = list(self._withdraw.items())
        fallback = self._fallback
        if fallback is not None and (fallback.has_local() or fallback.has_shadows()):
            # The local store first: it always answers, and must not wait for a Redis that does not.
            local = {i: t for i, t in batch.items() if fallback.is_local(i)}
            local_pending = [(i, t) for i, t in pending if fallback.is_local(i)]
            batch = {i: t for i, t in batch.items() if i not in local}
            pending = [(i, t) for i, t in pending if not fallback.is_local(i)]
            local.update(fallback.shadows_of(batch))  # stand-ins of Redis leases, renewed with them
            self._release(self._local_connection(), local_pending, self._pending)
            self._renew(self._local_connection(), local)
        if fallback is not None and fallback.local_active and not (batch or pending or withdraw):
            fallback.probe()  # nothing of Redis's to renew: just check whether it is back
            return
        client = self._connection()
        if self._url not in _MEMORY_CHECKED:  # once per process and server, at a boss's first round
            _MEMORY_CHECKED.add(self._url)
            risk = eviction_risk(read_memory(client))
            if risk is not None:
                log.warning("gpuboss: %s: %s", redact_url(self._url), risk)
        self._release(client, pending, self._pending)
        self._release(client, withdraw, self._withdraw)
        self._renew(client, batch)
        if fallback is not None and (batch or pending or withdraw):
            fallback.ok()  # Redis answered: an outage, if any, is over

    def _release(self, client: redis.Redis, items: list[tuple[str, float]], book: dict[str, float]) -> None:
        """Send releases that did not land before, unless their TTL made them moot."""
        now = time.monotonic()
        for item_id, moot_at in items:
            if now < moot_at:
                call_script_sync(client, self._core.release_call(item_id))
            with self._lock:
                book.pop(item_id, None)

    def _renew(self, client: redis.Redis, batch: dict[str, int]) -> None:
        """Renew a batch in one script call; report what was lost and the notices that came back."""
        if not batch:
            return
        reply = call_script_sync(client, self._core.renew_call(batch))
        now_ms = int(reply[1])
        statuses = reply[2 : 2 + len(batch)]
        notices = [json.loads(str(n)) for n in reply[2 + len(batch) :]]
        lost: list[Lease] = []
        called_off: list[dict[str, Any]] = []
        with self._lock:
            for (item_id, ttl_ms), status in zip(batch.items(), statuses, strict=True):
                entry = self._entries.get(item_id)
                if entry is None:
                    continue  # released meanwhile
                if RenewStatus(int(status)) is RenewStatus.GONE:
                    # A queued request found gone is queued again by its waiter's next look; a lease is lost.
                    if entry.lease is not None:
                        del self._entries[item_id]
                        if entry.lease._move("lost"):
                            lost.append(entry.lease)
                elif entry.lease is not None:
                    entry.lease.expires_at = (now_ms + ttl_ms) / 1000
                    notice = entry.lease.notice
                    if (
                        RenewStatus(int(status)) is RenewStatus.LEASE
                        and entry.lease.state is LeaseState.EVICTING
                        and notice is not None
                        and notice.requested_at * 1000 < now_ms
                    ):
                        # Renewed after the eviction was asked, and no longer evicting: it was called off.
                        called_off.append({"type": "continue", "lease": item_id, "reason": "heartbeat"})
        for lease in lost:
            log.warning("gpuboss: lease %s on %s was lost (expired or revoked)", lease.id, lease.gpu)
            self._dispatch_lost(lease)  # always: the boss drops it from held(), then calls on_lost if any
        if self._dispatch_notice is not None:
            for notice in [*notices, *called_off]:
                self._dispatch_notice(notice)


_LIVE: weakref.WeakSet[Heartbeat] = weakref.WeakSet()
#: The Redis URLs whose memory policy this process has looked at (``INFO memory``: a warning where it may evict).
_MEMORY_CHECKED: set[str] = set()


#: The pid of the process that registered :func:`_release_at_exit` with multiprocessing (see below).
_WORKER_EXIT_PID: int | None = None
#: Where the worker's release runs among multiprocessing's exit finalizers: a negative priority runs in their
#: last round, after the worker's own daemonic children were terminated and its other children joined (they
#: may use the GPU under its lease), as the interpreter's exit would.
_WORKER_EXIT_PRIORITY = -100


@atexit.register
def _release_at_exit() -> None:
    for heartbeat in list(_LIVE):
        heartbeat.close(release=True)


def _watch_worker_exit() -> None:
    """In a ``multiprocessing`` child, have :func:`_release_at_exit` run at its end too (once per process).

    A worker started by the fork or forkserver start method (every ``Pool`` and ``ProcessPoolExecutor`` worker
    on Linux; forkserver is the default from Python 3.14) ends with ``os._exit``, which skips ``atexit``: a
    lease it still held (one acquired in a pool's initializer for the worker's life, say) would wait for its
    TTL. Its process runs multiprocessing's exit finalizers first, when it returns normally; the release is
    registered there. A child killed (``Pool.terminate()``, SIGTERM, SIGKILL) runs neither: its TTL serves.
    Not a multiprocessing child (``multiprocessing`` not even imported, or this is its main process): nothing
    to do, ``atexit`` serves. Called where a heartbeat thread starts, so a forked child registers its own (the
    child's multiprocessing clears what its parent registered)."""
    global _WORKER_EXIT_PID
    pid = os.getpid()
    if pid == _WORKER_EXIT_PID:
        return
    mp = sys.modules.get("multiprocessing")
    if mp is None or mp.parent_process() is None:
        return
    from multiprocessing.util import Finalize  # only in a multiprocessing child

    Finalize(None, _release_at_exit, exitpriority=_WORKER_EXIT_PRIORITY)
    _WORKER_EXIT_PID = pid
