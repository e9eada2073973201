"""Prometheus metrics and a health endpoint for one namespace, served by ``gpuboss serve``.

Two sources:

- **State**, read from Redis at each scrape (one consistent read, as ``gpuboss status`` does): per GPU
  ``gpuboss_gpu_capacity_bytes``, ``..._reserve_bytes``, ``..._leased_bytes``, ``..._observed_bytes`` (the
  sampler's NVML reading, only while it is fresh), ``..._free_bytes`` (effective free: capacity - reserve -
  max(leased, observed) - VRAM held for an eviction; 0 offline), ``gpuboss_gpu_offline`` and
  ``gpuboss_gpu_leases``; ``gpuboss_queue_length`` and ``gpuboss_queue_oldest_wait_seconds`` by priority;
  ``gpuboss_holders_gone`` (leases and queued requests of processes gone from the exporter's machine);
  ``gpuboss_up`` (1 when Redis answered).
- **Events**, followed in the event log (``XREAD``) from the moment the exporter starts:
  ``gpuboss_events_total`` by type and priority (evictions too: ``evict_requested``, ``evicted``,
  ``resumed``, ``revoked``), ``gpuboss_wait_seconds`` (request to grant), ``gpuboss_hold_seconds`` (grant to
  release, expiry, revocation or eviction, labelled by how it ended) and ``gpuboss_checkpoint_seconds``
  (eviction request to hand-back).

Counters count from the exporter's start, as Prometheus counters do (``rate()`` handles restarts). They
need the event log, so a namespace whose bosses set ``events_maxlen: 0`` gets the state metrics only.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import redis
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpuboss.errors import GPUBossError
from gpuboss.events import Event, decode_entries
from gpuboss.keys import Keys
from gpuboss.redis_io import TRANSIENT, connect_sync
from gpuboss.snapshot import health_report, priority_classes, read_namespace
from gpuboss.topology import redact_url

log = logging.getLogger("gpuboss")

MIB = 1024 * 1024
#: Request-to-grant times: from an instant grant to an hour in the queue.
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
#: Grant-to-end times: from a quick job to a day-long service.
HOLD_BUCKETS = (0.1, 1, 5, 10, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, 24 * 3600)
#: Eviction request to hand-back: from a holder that drops a cache to one that writes a large checkpoint.
CHECKPOINT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
#: The event types that end a lease, and so observe its hold time.
LEASE_ENDS = ("released", "expired", "revoked", "evicted")

Snapshot = dict[str, Any]


class StateCollector(Collector):
    """Gauges from one read of the namespace per scrape; ``gpuboss_up`` 0 (and nothing else) when Redis
    does not answer."""

    def __init__(self, namespace: str, read: Callable[[], Snapshot], classes: Iterable[str] = ()) -> None:
        self.namespace = namespace
        self._read = read
        self.classes = list(classes)

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "gpuboss_up", "1 when the exporter could read the namespace from Redis.", labels=["namespace"]
        )
        try:
            snap = self._read()
        except (GPUBossError, redis.RedisError, OSError) as err:
            log.warning("gpuboss: metrics: cannot read namespace %r: %s", self.namespace, err)
            up.add_metric([self.namespace], 0)
            yield up
            return
        up.add_metric([self.namespace], 1)
        yield up
        full = GaugeMetricFamily(
            "gpuboss_redis_full",
            "1 when Redis is out of memory (maxmemory reached, nothing to evict): it refuses new requests.",
            labels=["namespace"],
        )
        full.add_metric([self.namespace], 1 if snap.get("redis_full") else 0)
        yield full
        yield from gpu_metrics(snap)
        yield from queue_metrics(snap, self.classes)
        yield holder_metrics(snap)


def gpu_metrics(snap: Snapshot) -> Iterable[Metric]:
    ns = snap["namespace"]
    labels = ["namespace", "gpu", "device", "name"]
    families = {
        "capacity_mib": GaugeMetricFamily("gpuboss_gpu_capacity_bytes", "Declared VRAM of the GPU.", labels=labels),
        "reserve_mib": GaugeMetricFamily(
            "gpuboss_gpu_reserve_bytes", "VRAM of the GPU kept back, never leased.", labels=labels
        ),
        "used_mib": GaugeMetricFamily("gpuboss_gpu_leased_bytes", "VRAM of the GPU leased now.", labels=labels),
        "free_mib": GaugeMetricFamily(
            "gpuboss_gpu_free_bytes",
            "VRAM of the GPU that can be leased now: capacity - reserve - max(leased, observed used) - VRAM held "
            "for an eviction; 0 while the GPU is offline.",
            labels=labels,
        ),
    }
    observed = GaugeMetricFamily(
        "gpuboss_gpu_observed_bytes",
        "VRAM of the GPU in use as NVML last read it (only while the reading is fresh).",
        labels=labels,
    )
    offline = GaugeMetricFamily(
        "gpuboss_gpu_offline", "1 when the GPU is offline (its host stopped beating: no new grants).", labels=labels
    )
    leases = GaugeMetricFamily("gpuboss_gpu_leases", "Leases held on the GPU now.", labels=labels)
    for gpu in snap["gpus"]:
        values = [ns, gpu["id"], gpu["device"], gpu["name"]]
        for field, family in families.items():
            family.add_metric(values, max(0, int(gpu[field])) * MIB)
        if gpu.get("observed_mib") is not None:
            observed.add_metric(values, max(0, int(gpu["observed_mib"])) * MIB)
        offline.add_metric(values, 0 if gpu.get("offline") is None else 1)
        leases.add_metric(values, gpu["leases"])
    yield from families.values()
    yield observed
    yield offline
    yield leases


def queue_metrics(snap: Snapshot, classes: Iterable[str] = ()) -> Iterable[Metric]:
    """Queue length and oldest wait of each priority class: the default classes, ``classes`` (the
    configuration's), the namespace's, and any class a queued request or a lease carries."""
    ns = snap["namespace"]
    length = GaugeMetricFamily(
        "gpuboss_queue_length", "Requests waiting, by priority.", labels=["namespace", "priority"]
    )
    oldest = GaugeMetricFamily(
        "gpuboss_queue_oldest_wait_seconds",
        "How long the longest-waiting request of each priority has waited (0: none waits).",
        labels=["namespace", "priority"],
    )
    for priority in priority_classes(snap, classes):
        waiting = [e for e in snap["queue"] if e.get("priority") == priority]
        length.add_metric([ns, priority], len(waiting))
        oldest.add_metric([ns, priority], max((float(e["waiting_s"]) for e in waiting), default=0.0))
    yield length
    yield oldest


def holder_metrics(snap: Snapshot) -> Metric:
    """Leases and queued requests whose process is gone from the exporter's machine (``holder_process``)."""
    gone = GaugeMetricFamily(
        "gpuboss_holders_gone",
        "Leases (kind lease) and queued requests (kind request) whose process, on this exporter's machine, is "
        "gone: revoked by the next request that waits there, or by gpuboss gc.",
        labels=["namespace", "kind"],
    )
    for kind, records in (("lease", snap["leases"]), ("request", snap["queue"])):
        gone.add_metric([snap["namespace"], kind], sum(1 for r in records if r.get("holder_process") == "gone"))
    return gone


class EventMetrics:
    """Counters and histograms fed one event at a time."""

    def __init__(self, namespace: str, registry: CollectorRegistry) -> None:
        self.namespace = namespace
        self.events = Counter(
            "gpuboss_events",
            "Events seen in the event log, by type and priority.",
            ["namespace", "type", "priority"],
            registry=registry,
        )
        self.wait = Histogram(
            "gpuboss_wait_seconds",
            "Time from request to grant, of every grant (0 for one granted at once).",
            ["namespace", "priority"],
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.hold = Histogram(
            "gpuboss_hold_seconds",
            "Time from grant to the lease's end, by how it ended (released, expired, revoked, evicted).",
            ["namespace", "priority", "end"],
            buckets=HOLD_BUCKETS,
            registry=registry,
        )
        self.checkpoint = Histogram(
            "gpuboss_checkpoint_seconds",
            "Time from an eviction request to the holder handing its VRAM back (evicted events).",
            ["namespace", "priority"],
            buckets=CHECKPOINT_BUCKETS,
            registry=registry,
        )

    def observe(self, event: Event) -> None:
        priority = event.priority or ""
        self.events.labels(self.namespace, event.type, priority).inc()
        if event.type == "granted" and isinstance(event.get("waited_ms"), int | float):
            self.wait.labels(self.namespace, priority).observe(max(0.0, event["waited_ms"] / 1000))
        if (
            event.type in LEASE_ENDS
            and event.get("entry", "lease") == "lease"
            and isinstance(event.get("held_ms"), int | float)
        ):
            self.hold.labels(self.namespace, priority, event.type).observe(max(0.0, event["held_ms"] / 1000))
        if event.type == "evicted" and isinstance(event.get("checkpoint_ms"), int | float):
            self.checkpoint.labels(self.namespace, priority).observe(max(0.0, event["checkpoint_ms"] / 1000))


class EventTail:
    """A thread following the event log with ``XREAD BLOCK`` and handing each event to ``observe``; it
    starts after the newest entry there is, and picks up where it was after Redis comes back."""

    BLOCK_MS = 1000
    BATCH = 500

    def __init__(self, url: str, keys: Keys, observe: Callable[[Event], None], connect_timeout: float) -> None:
        self.url = url
        self.keys = keys
        self._observe = observe
        self._within = connect_timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpuboss-metrics-tail", daemon=True)
        self.last_id: str | None = None
        self.seen = 0
        self.ready = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.BLOCK_MS / 1000 + self._within + 1)

    def _run(self) -> None:
        client: redis.Redis | None = None
        failing = False
        while not self._stop.is_set():
            try:
                if client is None:
                    client = connect_sync(self.url, self._within, socket_timeout=self._within + self.BLOCK_MS / 1000)
                if self.last_id is None:
                    newest = client.xrevrange(self.keys.event_log, count=1)
                    self.last_id = str(newest[0][0]) if newest else "0-0"
                    self.ready.set()
                reply: Any = client.xread({self.keys.event_log: self.last_id}, count=self.BATCH, block=self.BLOCK_MS)
                if failing:
                    log.warning("gpuboss: metrics: the event log is readable again")
                failing = False
                for _stream, entries in reply or []:
                    for event in decode_entries(entries):
                        self._observe(event)
                        self.seen += 1
                    if entries:
                        self.last_id = str(entries[-1][0])
            except (*TRANSIENT, redis.RedisError) as err:
                if not failing:
                    log.warning("gpuboss: metrics: cannot follow the event log (%s); retrying", err)
                failing = True
                if client is not None:
                    client.close()
                    client = None
                self._stop.wait(1.0)
        if client is not None:
            client.close()


class Exporter:
    """The registry (state collector, event metrics), the event tail, and the health report of a namespace."""

    def __init__(
        self,
        url: str,
        namespace: str,
        connect_timeout: float = 5.0,
        min_free_mib: int | None = None,
        classes: Iterable[str] = (),
    ) -> None:
        """``classes``: priority classes (the configuration's ``priorities``) that get queue metrics even
        while none of their requests waits, besides the default ones and the namespace's."""
        self.url = url
        self.shown_url = redact_url(url)
        self.keys = Keys(namespace)
        self.connect_timeout = connect_timeout
        self.min_free_mib = min_free_mib
        self._client = connect_sync(url, connect_timeout, socket_timeout=connect_timeout)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StateCollector(namespace, self.snapshot, classes))
        self.event_metrics = EventMetrics(namespace, self.registry)
        self.tail = EventTail(url, self.keys, self.event_metrics.observe, connect_timeout)

    def start(self) -> None:
        self.tail.start()

    def close(self) -> None:
        self.tail.stop()
        self._client.close()

    def snapshot(self) -> Snapshot:
        return read_namespace(self._client, self.keys, self.shown_url, self.connect_timeout)

    def metrics(self) -> bytes:
        return generate_latest(self.registry)

    def health(self) -> tuple[int, dict[str, Any]]:
        """The HTTP status (200 when a GPU is available, else 503) and the report."""
        try:
            report = health_report(self.snapshot(), self.min_free_mib)
        except (GPUBossError, redis.RedisError, OSError) as err:
            return 503, {"gpu_available": False, "vram_total": 0, "vram_free": 0, "error": str(err)}
        return (200 if report["gpu_available"] else 503), report


class _Handler(BaseHTTPRequestHandler):
    exporter: Exporter
    server_version = "gpuboss"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, CONTENT_TYPE_LATEST, self.exporter.metrics())
        elif path in ("/health", "/healthz"):
            status, report = self.exporter.health()
            self._send(status, "application/json", json.dumps(report).encode() + b"\n")
        elif path == "/":
            body = b"gpuboss exporter: /metrics (Prometheus), /health (JSON; 503 when no GPU is available)\n"
            self._send(200, "text/plain; charset=utf-8", body)
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found: try /metrics or /health\n")

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("gpuboss: http %s - %s", self.address_string(), format % args)


def make_server(exporter: Exporter, host: str = "127.0.0.1", port: int = 8003) -> ThreadingHTTPServer:
    """An HTTP server (not started: call ``serve_forever``) answering ``/metrics`` and ``/health``."""
    handler = type("Handler", (_Handler,), {"exporter": exporter})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def wait_ready(exporter: Exporter, timeout: float) -> bool:
    """True once the event tail has found its starting point (tests use it to avoid counting early)."""
    deadline = time.monotonic() + timeout
    return exporter.tail.ready.wait(max(0.0, deadline - time.monotonic()))
