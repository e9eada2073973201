"""The notice listener: one thread per boss, subscribed to the boss's own channel (``Keys.holder_channel``),
on which the scripts publish eviction notices for its leases (``evict``: checkpoint, please; ``continue``:
called off).

Pub/sub is the fast path (a notice reaches the holder within a round trip of the request); it is not the
only one: the heartbeat's renew reply carries the same notice for every lease being evicted, so a holder
that was reconnecting when the message went out learns it at its next renewal.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from gpuboss.redis_io import TRANSIENT, connect_sync

log = logging.getLogger("gpuboss")

#: How long one wait for a message lasts before the thread checks whether it should stop.
POLL_S = 1.0
RECONNECT_S = 0.5

Dispatch = Callable[[dict[str, Any]], None]


class NoticeListener:
    def __init__(self, url: str, channel: str, dispatch: Dispatch, connect_timeout: float) -> None:
        self._url = url
        self._channel = channel
        self._dispatch = dispatch
        self._timeout = connect_timeout
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._ready = threading.Event()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, wait: float = 2.0) -> None:
        """Subscribe (once) and wait up to ``wait`` seconds for the subscription to be live, so a notice
        published right after the next grant is heard."""
        with self._lock:
            if self._stopped.is_set() or self.running:
                return
            self._thread = threading.Thread(target=self._run, name="gpuboss-notices", daemon=True)
            self._thread.start()
        self._ready.wait(wait)

    def after_fork(self, channel: str) -> None:
        """In a forked child (base.py): listen on the child's own channel, with a thread and locks of its own."""
        stopped = self._stopped.is_set()
        self._channel = channel
        self._lock = threading.Lock()
        self._thread = None
        self._stopped = threading.Event()
        self._ready = threading.Event()
        if stopped:
            self._stopped.set()

    def close(self) -> None:
        self._stopped.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=POLL_S + 1)

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                self._listen()
            except TRANSIENT as err:
                log.warning("gpuboss: eviction notices: connection lost (%s); reconnecting", err)
                self._stopped.wait(RECONNECT_S)
            except RedisError:
                log.exception("gpuboss: eviction notices: listener failed; restarting it")
                self._stopped.wait(RECONNECT_S)

    def _listen(self) -> None:
        client = connect_sync(self._url, self._timeout)
        pubsub = client.pubsub()  # type: ignore[no-untyped-call, unused-ignore]
        try:
            pubsub.subscribe(self._channel)
            while not self._stopped.is_set():
                msg = pubsub.get_message(timeout=POLL_S)
                if msg is None:
                    continue
                if msg.get("type") == "subscribe":
                    self._ready.set()  # the subscription is live: start() may return
                elif msg.get("type") == "message":
                    self._handle(msg.get("data"))
        finally:
            pubsub.close()
            client.close()

    def _handle(self, data: Any) -> None:
        try:
            notice = json.loads(data)
        except (TypeError, ValueError):
            log.warning("gpuboss: ignoring a malformed notice on %s: %r", self._channel, data)
            return
        if isinstance(notice, dict):
            self._dispatch(notice)
