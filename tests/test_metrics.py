"""Prometheus metrics and the HTTP endpoints: gauges read from Redis, counters and histograms from the
event log, /health and /metrics over HTTP, and `gpuboss serve` as a process."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gpuboss import GPUBoss, Lease
from gpuboss.config import BossConfig
from gpuboss.core import Core
from gpuboss.metrics import Exporter, make_server, wait_ready
from gpuboss.procs import ProcessIdentity
from gpuboss.redis_io import call_script_sync
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import GPUS, ProcessCore, exited_process, raw_client, this_process

GIB = 1024**3
GPUBOSS = Path(sys.executable).parent / "gpuboss"


def samples(exporter: Exporter) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = exporter.metrics().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(data: dict[tuple[str, frozenset[tuple[str, str]]], float], metric: str, **labels: str) -> float:
    return data[(metric, frozenset(labels.items()))]


def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@pytest.fixture
def exporter(real_url: str, namespace: str) -> Iterator[Exporter]:
    exp = Exporter(real_url, namespace, connect_timeout=2.0)
    exp.start()
    assert wait_ready(exp, 10)
    yield exp
    exp.close()


def test_state_gauges(backend_url: str, namespace: str) -> None:
    boss = GPUBoss(backend_url, namespace=namespace, gpus=GPUS, service="g")
    exp = Exporter(backend_url, namespace)  # not started: the gauges need no tail
    try:
        held = boss.acquire(20, device="gpu0", priority="high")
        waiting: list[Lease] = []
        thread = threading.Thread(target=lambda: waiting.append(boss.acquire(8, device="gpu0", priority="low")))
        thread.start()
        wait_until(lambda: raw_client(backend_url).zcard(f"{namespace}:queue") == 1)
        time.sleep(0.05)
        data = samples(exp)
        gpu0 = {"namespace": namespace, "gpu": "gpu0", "device": "cuda:0", "name": "RTX 4090"}
        gpu1 = {"namespace": namespace, "gpu": "gpu1", "device": "cuda:1", "name": "RTX 4080"}
        assert value(data, "gpuboss_up", namespace=namespace) == 1
        assert value(data, "gpuboss_gpu_capacity_bytes", **gpu0) == 24 * GIB
        assert value(data, "gpuboss_gpu_leased_bytes", **gpu0) == 20 * GIB
        assert value(data, "gpuboss_gpu_free_bytes", **gpu0) == 4 * GIB
        assert value(data, "gpuboss_gpu_reserve_bytes", **gpu1) == 1 * GIB
        assert value(data, "gpuboss_gpu_free_bytes", **gpu1) == 15 * GIB
        assert value(data, "gpuboss_gpu_leases", **gpu0) == 1
        assert value(data, "gpuboss_queue_length", namespace=namespace, priority="low") == 1
        assert value(data, "gpuboss_queue_length", namespace=namespace, priority="high") == 0
        assert value(data, "gpuboss_queue_oldest_wait_seconds", namespace=namespace, priority="low") >= 0.05
        boss.release(held)
        thread.join(timeout=10)
        data = samples(exp)
        assert value(data, "gpuboss_gpu_leased_bytes", **gpu0) == 8 * GIB
        assert value(data, "gpuboss_queue_length", namespace=namespace, priority="low") == 0
    finally:
        for lease in waiting:
            boss.release(lease)
        boss.close()
        exp.close()


def test_holders_gone_from_this_machine_are_counted(real_url: str, namespace: str) -> None:
    def core(service: str, process: ProcessIdentity) -> ProcessCore:
        return ProcessCore(BossConfig(namespace=namespace, gpus=GPUS, service=service), process)

    dead = exited_process()
    ghost, live = core("ghost", dead), core("live", this_process())
    client = raw_client(real_url)
    register = live.register_call()
    assert register is not None
    call_script_sync(client, register)
    for boss, request_id, gb in ((ghost, "aaaa0001", 20), (live, "cccc0001", 4), (ghost, "aaaa0002", 8)):
        request = boss.make_request(gb, ttl=60)
        call_script_sync(client, boss.acquire_call(request_id, request, "gpu0", boss.config.service))
    assert client.zcard(f"{namespace}:queue") == 1  # (the last one waits)
    exp = Exporter(real_url, namespace)  # (not started: the gauges need no tail)
    try:
        data = samples(exp)
        assert value(data, "gpuboss_holders_gone", namespace=namespace, kind="lease") == 1
        assert value(data, "gpuboss_holders_gone", namespace=namespace, kind="request") == 1
        for item_id, queued in (("aaaa0001", False), ("aaaa0002", True)):
            call_script_sync(client, live.gone_call(item_id, {}, dead, "test@here", queued))
        data = samples(exp)
        assert value(data, "gpuboss_holders_gone", namespace=namespace, kind="lease") == 0
        assert value(data, "gpuboss_holders_gone", namespace=namespace, kind="request") == 0
    finally:
        exp.close()
        call_script_sync(client, live.release_call("cccc0001"))
        client.close()


def test_event_counters_and_histograms(exporter: Exporter, real_url: str, namespace: str) -> None:
    boss = GPUBoss(real_url, namespace=namespace, gpus=GPUS, service="m")
    other = GPUBoss(real_url, namespace=namespace, gpus=GPUS, service="n")
    try:
        for _ in range(3):
            lease = boss.acquire(1, priority="high")
            time.sleep(0.02)
            boss.release(lease)
        big = boss.acquire(24, device="gpu0")
        got: list[Lease] = []
        thread = threading.Thread(target=lambda: got.append(other.acquire(4, device="gpu0", priority="low")))
        thread.start()
        wait_until(lambda: raw_client(real_url).zcard(f"{namespace}:queue") == 1)
        time.sleep(0.3)
        core = Core(BossConfig(namespace=namespace))
        call_script_sync(raw_client(real_url), core.revoke_call(big.id, "ops", "test"))  # the waiter gets gpu0
        thread.join(timeout=10)
        other.release(got[0])
        # 2 registrations, 3 x (granted, released), granted big, queued, revoked, granted, released
        wait_until(lambda: exporter.tail.seen >= 2 + 6 + 5)
    finally:
        boss.close()
        other.close()
    data = samples(exporter)
    ns = namespace

    def events(kind: str, priority: str) -> float:
        return value(data, "gpuboss_events_total", namespace=ns, type=kind, priority=priority)

    assert events("granted", "high") == 3 and events("released", "high") == 3
    assert events("granted", "normal") == 1 and events("revoked", "normal") == 1
    assert events("queued", "low") == 1 and events("granted", "low") == 1 and events("released", "low") == 1
    assert events("gpu_registered", "") == 2
    assert value(data, "gpuboss_wait_seconds_count", namespace=ns, priority="high") == 3
    assert value(data, "gpuboss_wait_seconds_sum", namespace=ns, priority="high") < 0.1  # granted at once
    assert value(data, "gpuboss_wait_seconds_count", namespace=ns, priority="low") == 1
    assert value(data, "gpuboss_wait_seconds_sum", namespace=ns, priority="low") >= 0.3
    assert value(data, "gpuboss_wait_seconds_bucket", namespace=ns, priority="low", le="0.25") == 0
    assert value(data, "gpuboss_wait_seconds_bucket", namespace=ns, priority="low", le="+Inf") == 1
    assert value(data, "gpuboss_hold_seconds_count", namespace=ns, priority="high", end="released") == 3
    assert value(data, "gpuboss_hold_seconds_sum", namespace=ns, priority="high", end="released") >= 0.06
    assert value(data, "gpuboss_hold_seconds_count", namespace=ns, priority="normal", end="revoked") == 1


def test_inventory_gauges_observed_offline_and_effective_free(real_url: str, namespace: str) -> None:
    """No live boss, so nothing runs a script between the writes below and the scrape."""
    core = Core(BossConfig(namespace=namespace, gpus=GPUS))
    client = raw_client(real_url)
    register = core.register_call()
    assert register is not None
    call_script_sync(client, register)
    call_script_sync(client, core.acquire_call("lease0001aaaa", core.make_request(10, ttl=600), "gpu0", "m"))
    call_script_sync(client, core.acquire_call("want0001bbbb", core.make_request(20, ttl=600), "gpu0", "m"))
    exp = Exporter(real_url, namespace)
    gpu0 = {"namespace": namespace, "gpu": "gpu0", "device": "cuda:0", "name": "RTX 4090"}
    gpu1 = {"namespace": namespace, "gpu": "gpu1", "device": "cuda:1", "name": "RTX 4080"}
    try:
        before = samples(exp)
        assert value(before, "gpuboss_gpu_free_bytes", **gpu0) == 14 * GIB
        assert ("gpuboss_gpu_observed_bytes", frozenset(gpu0.items())) not in before
        now = int(client.time()[0]) * 1000
        client.hset(
            f"{namespace}:observed", mapping={"gpu0": f"12288,{now},60000", "gpu1": f"4096,{now - 60_000},5000"}
        )
        client.hset(f"{namespace}:offline", "gpu1", json.dumps({"host": "box2", "since": now, "reason": "silent"}))
        hold = {"id": "want0001bbbb", "vram_mib": 2048, "victims": [], "deadline": now + 600_000, "on_grace": "wait"}
        client.hset(f"{namespace}:holds", "gpu0", json.dumps(hold))
        data = samples(exp)
    finally:
        exp.close()
        client.close()
    assert value(data, "gpuboss_gpu_observed_bytes", **gpu0) == 12 * GIB
    assert ("gpuboss_gpu_observed_bytes", frozenset(gpu1.items())) not in data  # its reading is stale
    assert value(data, "gpuboss_gpu_leased_bytes", **gpu0) == 10 * GIB
    assert value(data, "gpuboss_gpu_free_bytes", **gpu0) == (24 - 12 - 2) * GIB  # 24 - max(10, 12) - held 2
    assert value(data, "gpuboss_gpu_free_bytes", **gpu1) == 0  # offline
    assert value(data, "gpuboss_gpu_offline", **gpu1) == 1 and value(data, "gpuboss_gpu_offline", **gpu0) == 0


def test_evictions_are_counted(exporter: Exporter, real_url: str, namespace: str) -> None:
    """A preemptible low lease is asked to checkpoint for a high request and hands its VRAM back (the yield
    script, run by its holder's boss): counters by type, its hold time ending `evicted`, the checkpoint time."""
    one = [{"id": "gpu0", "name": "RTX 4090", "vram_gb": 24, "index": 0}]
    low = GPUBoss(real_url, namespace=namespace, gpus=one, service="batch")
    high = GPUBoss(real_url, namespace=namespace, gpus=one, service="chat")
    client = raw_client(real_url)
    got: list[Lease] = []
    try:
        lease = low.acquire(20, priority="low", preemptible=True, resume=False, on_evict=lambda _lease: None)
        # The low boss's on_evict returns at once and the boss hands the lease back (the yield script).
        thread = threading.Thread(target=lambda: got.append(high.acquire(8, priority="high", timeout=30)))
        thread.start()
        thread.join(timeout=30)
        wait_until(lambda: lease.evicted)
        assert got, "the high request was not granted"
        high.release(got[0])
        # registered, granted (low), queued (high), evict_requested, evicted, granted (high), released
        wait_until(lambda: exporter.tail.seen >= 7)
    finally:
        low.close()
        high.close()
        client.close()
    data = samples(exporter)
    ns = namespace
    assert value(data, "gpuboss_events_total", namespace=ns, type="evict_requested", priority="low") == 1
    assert value(data, "gpuboss_events_total", namespace=ns, type="evicted", priority="low") == 1
    assert value(data, "gpuboss_hold_seconds_count", namespace=ns, priority="low", end="evicted") == 1
    assert value(data, "gpuboss_checkpoint_seconds_count", namespace=ns, priority="low") == 1
    assert value(data, "gpuboss_checkpoint_seconds_bucket", namespace=ns, priority="low", le="+Inf") == 1


def test_counters_start_at_the_exporters_start(real_url: str, namespace: str) -> None:
    boss = GPUBoss(real_url, namespace=namespace, gpus=GPUS)
    try:
        boss.release(boss.acquire(1))  # before the exporter: not counted
        exp = Exporter(real_url, namespace)
        exp.start()
        try:
            assert wait_ready(exp, 10)
            boss.release(boss.acquire(1))
            wait_until(lambda: exp.tail.seen >= 2)
            time.sleep(0.2)
            data = samples(exp)
        finally:
            exp.close()
    finally:
        boss.close()
    assert value(data, "gpuboss_events_total", namespace=namespace, type="granted", priority="normal") == 1
    assert (
        "gpuboss_events_total",
        frozenset({("namespace", namespace), ("type", "gpu_registered"), ("priority", "")}),
    ) not in data


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


def test_http_endpoints(exporter: Exporter, real_url: str, namespace: str) -> None:
    server = make_server(exporter, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        status, ctype, body = get(f"{base}/health")
        assert (status, ctype) == (503, "application/json")  # nothing registered yet
        assert json.loads(body) == {"gpu_available": False, "vram_total": 0, "vram_free": 0}
        boss = GPUBoss(real_url, namespace=namespace, gpus=GPUS)
        lease = boss.acquire(4)
        status, _, body = get(f"{base}/health")
        assert status == 200
        assert json.loads(body) == {"gpu_available": True, "vram_total": 40 * 1024, "vram_free": 39 * 1024 - 4 * 1024}
        boss.release(lease)
        boss.close()
        status, ctype, body = get(f"{base}/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        assert re.search(
            rf'gpuboss_gpu_capacity_bytes\{{.*gpu="gpu0".*namespace="{namespace}".*\}} 2\.5769803776e\+10', body
        )
        assert get(f"{base}/nope")[0] == 404
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_unreachable_redis_is_reported() -> None:
    exp = Exporter("redis://127.0.0.1:1/0", "ns", connect_timeout=0.2)
    try:
        status, report = exp.health()
        assert status == 503 and report["gpu_available"] is False and "unreachable" in report["error"]
        data = samples(exp)
        assert value(data, "gpuboss_up", namespace="ns") == 0
        assert not [k for k in data if k[0].startswith("gpuboss_gpu_")]
    finally:
        exp.close()


@contextlib.contextmanager
def serving(real_url: str, namespace: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """`gpuboss serve --port 0` as a child process, and the port it says it listens on (its stderr line)."""
    proc = subprocess.Popen(
        [str(GPUBOSS), "--redis-url", real_url, "--namespace", namespace, "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        port = None
        deadline = time.monotonic() + 20
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            match = re.search(r"serving http://127\.0\.0\.1:(\d+)/metrics", line)
            port = int(match[1]) if match else None
        assert port, "the server did not say where it listens"
        yield proc, port
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def test_serve_with_the_executable(real_url: str, namespace: str) -> None:
    boss = GPUBoss(real_url, namespace=namespace, gpus=GPUS)
    boss.release(boss.acquire(1))
    try:
        with serving(real_url, namespace) as (proc, port):
            status, _, body = get(f"http://127.0.0.1:{port}/health")
            assert status == 200 and json.loads(body)["vram_total"] == 40 * 1024
            status, _, body = get(f"http://127.0.0.1:{port}/metrics")
            assert status == 200 and "gpuboss_queue_length" in body
            os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
    finally:
        boss.close()


def test_serve_stopped_as_soon_as_it_says_where_it_listens(real_url: str, namespace: str) -> None:
    """A supervisor may stop `serve` on the very line that says where it listens: SIGTERM then, before any
    request, still ends it cleanly (exit 0, not 143): the handler is in place before that line is written."""
    GPUBoss(real_url, namespace=namespace, gpus=GPUS).close()
    with serving(real_url, namespace) as (proc, _port):
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


def test_serve_takes_over_sigterm_before_it_says_where_it_listens(
    real_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order itself, in process (the test above cannot lose the race it guards): when `serve` writes the
    line a supervisor waits for, its SIGTERM handler is already in place."""
    from click.testing import CliRunner
    from gpuboss import cli as cli_module

    GPUBoss(real_url, namespace=namespace, gpus=GPUS).close()
    handlers: list[Any] = []
    info = cli_module.log.info

    def on_info(msg: str, *args: Any, **kwargs: Any) -> None:
        if msg.startswith("gpuboss: serving http"):
            handlers.append(signal.getsignal(signal.SIGTERM))
            raise KeyboardInterrupt  # stops it there, as SIGTERM would
        info(msg, *args, **kwargs)

    monkeypatch.setattr(cli_module.log, "info", on_info)
    result = CliRunner().invoke(
        cli_module.cli, ["--redis-url", real_url, "--namespace", namespace, "serve", "--port", "0"]
    )
    assert result.exit_code == 0, result.output
    assert len(handlers) == 1 and handlers[0] not in (signal.SIG_DFL, signal.SIG_IGN, None)
    assert signal.getsignal(signal.SIGTERM) is not handlers[0]  # given back on the way out


def test_serve_refuses_a_busy_port(real_url: str, namespace: str) -> None:
    import socket

    from click.testing import CliRunner
    from gpuboss.cli import cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(
            cli, ["--redis-url", real_url, "--namespace", namespace, "serve", "--port", str(port)]
        )
    assert result.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_queue_metrics_of_custom_priority_classes(real_url: str, namespace: str) -> None:
    """Classes the configuration defines get queue metrics even with nothing waiting; a class a queued request
    carries gets them without any configuration."""
    classes = {"batch": 0, "normal": 1, "interactive": 2}
    core = Core(BossConfig(namespace=namespace, gpus=GPUS, priorities=classes, preemptible=["batch"]))
    client = raw_client(real_url)
    register = core.register_call()
    assert register is not None
    call_script_sync(client, register)
    held = core.make_request(20, priority="interactive", ttl=600)
    call_script_sync(client, core.acquire_call("custom0001", held, "gpu0", "chat"))
    waiting = core.make_request(10, priority="batch", ttl=600)
    call_script_sync(client, core.acquire_call("custom0002", waiting, "gpu0", "etl"))
    assert client.zcard(f"{namespace}:queue") == 1
    for configured in ([], [*classes, "spare"]):
        exp = Exporter(real_url, namespace, connect_timeout=2.0, classes=configured)
        try:
            data = samples(exp)
        finally:
            exp.close()
        assert value(data, "gpuboss_queue_length", namespace=namespace, priority="batch") == 1
        assert value(data, "gpuboss_queue_oldest_wait_seconds", namespace=namespace, priority="batch") >= 0
        for other in ("low", "normal", "high"):
            assert value(data, "gpuboss_queue_length", namespace=namespace, priority=other) == 0
        got = {labels for name, labels in data if name == "gpuboss_queue_length"}
        has = {dict(labels)["priority"] for labels in got}
        assert ("spare" in has) == bool(configured) and ("interactive" in has)  # a lease carries "interactive"
    call_script_sync(client, core.release_call("custom0001"))
    client.close()
