"""The ``gpuboss`` command: ``status`` (text and JSON), errors and exit codes, the installed executable, the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from gpuboss import GPUBoss, Lease, embedded
from gpuboss.cli import cli

from tests.conftest import raw_client

GPU24 = [{"id": "gpu0", "name": "RTX 4090", "vram_gb": 24, "index": 0, "reserve_gb": 1}]
GPUBOSS = Path(sys.executable).parent / "gpuboss"


@pytest.fixture(autouse=True)
def no_outside_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPUBOSS_REDIS_URL", raising=False)
    monkeypatch.delenv("GPUBOSS_CONFIG", raising=False)


@pytest.fixture
def busy_namespace(real_url: str, namespace: str) -> Iterator[dict[str, Any]]:
    """A namespace where "holder" leases 20 GB of a 24 GB GPU (1 GB reserve) and "waiter" queues for 8 GB."""
    holder = GPUBoss(real_url, namespace=namespace, service="holder", gpus=GPU24)
    waiter = GPUBoss(real_url, namespace=namespace, service="waiter", gpus=GPU24)
    lease = holder.acquire(20, priority="normal", ttl=30)
    granted: list[Lease] = []
    thread = threading.Thread(target=lambda: granted.append(waiter.acquire(8, priority="high", timeout=30)))
    thread.start()
    client = raw_client(real_url)
    deadline = time.monotonic() + 10
    while client.zcard(f"{namespace}:queue") < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield {"lease": lease}
    finally:
        holder.release(lease)
        thread.join(timeout=30)
        for got in granted:
            waiter.release(got)
        holder.close()
        waiter.close()
        client.close()


def test_status_text(real_url: str, namespace: str, busy_namespace: dict[str, Any]) -> None:
    result = CliRunner().invoke(cli, ["--redis-url", real_url, "--namespace", namespace, "status"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"namespace {namespace!r}" in out
    gpu_line = next(line for line in out.splitlines() if line.strip().startswith("gpu0"))
    # capacity, reserve, leased, free
    assert gpu_line.split()[:4] == ["gpu0", "cuda:0", "RTX", "4090"]
    assert "24.0 GB" in gpu_line and "1.0 GB" in gpu_line and "20.0 GB" in gpu_line and "3.0 GB" in gpu_line
    lease_line = next(line for line in out.splitlines() if "holder" in line)
    assert busy_namespace["lease"].id[:8] in lease_line
    assert "normal" in lease_line and "20.0 GB" in lease_line
    assert "Queue (1 waiting" in out
    queue_line = next(line for line in out.splitlines() if "waiter" in line)
    assert queue_line.split()[0] == "1"
    assert "high" in queue_line and "8.0 GB" in queue_line
    assert f"using Redis {real_url}" in result.stderr  # the log says which Redis


def test_status_json(real_url: str, namespace: str, busy_namespace: dict[str, Any]) -> None:
    result = CliRunner().invoke(cli, ["--redis-url", real_url, "--namespace", namespace, "--json", "status"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["namespace"] == namespace
    assert data["redis"] == {"url": real_url, "embedded": False, "pid": None}
    (gpu,) = data["gpus"]
    assert gpu["id"] == "gpu0"
    assert gpu["capacity_mib"] == 24576
    assert gpu["reserve_mib"] == 1024
    assert gpu["used_mib"] == 20480
    assert gpu["free_mib"] == 24576 - 1024 - 20480
    assert gpu["leases"] == 1
    (lease,) = data["leases"]
    assert lease["id"] == busy_namespace["lease"].id
    assert lease["service"] == "holder"
    assert lease["vram_mib"] == 20480
    assert lease["pid"] == os.getpid()
    assert 0 <= lease["age_s"] < 30
    assert 0 < lease["expires_in_s"] <= 30
    (waiting,) = data["queue"]
    assert waiting["position"] == 1
    assert waiting["service"] == "waiter"
    assert waiting["priority"] == "high"
    assert waiting["vram_mib"] == 8192
    assert waiting["waiting_s"] >= 0


def test_status_of_an_empty_namespace(real_url: str, namespace: str) -> None:
    result = CliRunner().invoke(cli, ["--redis-url", real_url, "--namespace", namespace, "status"])
    assert result.exit_code == 0, result.output
    assert "none registered" in result.stdout
    assert "Leases (0)" in result.stdout


def test_status_is_read_only(real_url: str, namespace: str, busy_namespace: dict[str, Any]) -> None:
    from tests.conftest import snapshot

    client = raw_client(real_url)
    before = snapshot(client, namespace)
    CliRunner().invoke(cli, ["--redis-url", real_url, "--namespace", namespace, "--json", "status"])
    after = snapshot(client, namespace)
    client.close()
    before.pop(f"{namespace}:queue_exp", None)  # the waiter's heartbeat may renew its entry meanwhile
    after.pop(f"{namespace}:queue_exp", None)
    before.pop(f"{namespace}:lease_exp", None)
    after.pop(f"{namespace}:lease_exp", None)
    before.pop(f"{namespace}:head", None)  # the scripts of those renewals keep the state header too
    after.pop(f"{namespace}:head", None)
    strip = {f"{namespace}:leases", f"{namespace}:tickets"}  # records carry renewed expiry times
    assert {k: v for k, v in before.items() if k not in strip} == {k: v for k, v in after.items() if k not in strip}
    assert set(before[f"{namespace}:leases"]) == set(after[f"{namespace}:leases"])


def test_unreachable_redis_exits_2_without_the_password() -> None:
    url = "redis://:hunter2@127.0.0.1:1/0"  # port 1: nothing listens there
    started = time.monotonic()
    result = CliRunner().invoke(cli, ["--redis-url", url, "--connect-timeout", "0.3", "status"])
    assert time.monotonic() - started < 10
    assert result.exit_code == 2
    assert "hunter2" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("gpuboss: error:")]
    assert len(errors) == 1
    assert "redis://:***@127.0.0.1:1/0 is unreachable" in errors[0]
    assert "Traceback" not in result.output


def test_debug_shows_the_traceback() -> None:
    args = ["--debug", "--redis-url", "redis://127.0.0.1:1/0", "--connect-timeout", "0.2", "status"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert "Traceback" in result.stderr


@pytest.mark.parametrize(
    "args",
    [["no-such-command"], ["status", "--no-such-option"], ["--connect-timeout", "-1", "status"]],
)
def test_usage_errors_exit_1(args: list[str]) -> None:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert result.stderr.startswith("gpuboss: error:")
    assert len(result.stderr.strip().splitlines()) == 1


def test_config_errors_exit_1(tmp_path: Path) -> None:
    missing = CliRunner().invoke(cli, ["--config", str(tmp_path / "missing.yaml"), "status"])
    assert missing.exit_code == 1
    assert "cannot read configuration" in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("namespace: 'has spaces'\n")
    wrong = CliRunner().invoke(cli, ["--config", str(bad), "status"])
    assert wrong.exit_code == 1
    assert "namespace" in wrong.stderr


def test_config_file_is_read(tmp_path: Path, real_url: str, namespace: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"redis_url: {real_url}\nnamespace: {namespace}\n")
    result = CliRunner().invoke(cli, ["--config", str(config), "--json", "status"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["namespace"] == namespace


def test_installed_executable(real_url: str, namespace: str, busy_namespace: dict[str, Any]) -> None:
    assert GPUBOSS.exists(), f"{GPUBOSS} is missing: pip install -e ."
    done = subprocess.run(
        [str(GPUBOSS), "--redis-url", real_url, "--namespace", namespace, "--json", "status"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert [lease["service"] for lease in data["leases"]] == ["holder"]
    assert [entry["service"] for entry in data["queue"]] == ["waiter"]
    assert f"using Redis {real_url}" in done.stderr

    down = subprocess.run(
        [str(GPUBOSS), "--redis-url", "redis://127.0.0.1:1/0", "--connect-timeout", "0.2", "status"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert down.returncode == 2
    assert down.stderr.strip().splitlines()[-1].startswith("gpuboss: error: Redis at redis://127.0.0.1:1/0")


def test_demo_short_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = tmp_path / "rt"
    monkeypatch.setenv("GPUBOSS_RUNTIME_DIR", str(runtime))
    env = {k: v for k, v in os.environ.items() if k not in ("GPUBOSS_REDIS_URL", "GPUBOSS_CONFIG")}
    try:
        done = subprocess.run(
            [str(GPUBOSS), "demo", "--duration", "4", "--seed", "7"],
            capture_output=True,
            text=True,
            timeout=90,
            env=env,
            check=False,
        )
        assert embedded.status().running  # the demo started the embedded Redis, which stays up
    finally:
        embedded.stop_embedded()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert f"Redis      unix://{runtime}/redis.sock (embedded" in out
    for header in ("PRIORITY", "REQUESTS", "GRANTS", "TIMEOUTS", "WAIT P50 ms", "WAIT P99 ms"):
        assert header in out
    rows = {
        line.split()[0]: line.split()
        for line in out.splitlines()
        if line.startswith(("  high ", "  normal ", "  low "))
    }
    assert set(rows) == {"high", "normal", "low"}
    assert rows["high"][1] == "chat" and rows["normal"][1] == "api" and rows["low"][1] == "batch"
    assert all(int(row[2]) > 0 for row in rows.values())  # every service made requests
    assert "peak VRAM in use:" in out and "of 24.0 GB" in out
    assert "FAIL" not in out
    assert "All checks held." in out
    assert "asks " in out and "released " in out  # the live timeline
    assert "embed   high    holds 4 GB on gpu0: killed now with SIGKILL" in out
    assert "ok   a killed holder's VRAM came back before its TTL ran out: embed (pid " in out


def test_demo_kills_no_holder_where_no_process_can_be_judged(real_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Off Linux gpuboss cannot tell a dead holder (procs.py): the demo leaves the crash out, and still passes."""
    from gpuboss import procs
    from gpuboss.demo import run_demo

    monkeypatch.setattr(procs, "identity", lambda: None)
    printed: list[str] = []
    assert run_demo(real_url, "test", False, duration=2, timeline=False, as_json=True, echo=printed.append)
    summary = json.loads(printed[-1])
    assert summary["ok"] and summary["crash"] == {}
    assert not [c for c in summary["checks"] if "killed" in c["name"]]
    assert len(summary["checks"]) == 8


def _grant(req: str, priority: str, requested: int, acquired: int, token: int, mib: int = 1024) -> dict[str, Any]:
    return {
        "req": req,
        "priority": priority,
        "requested_ms": requested,
        "acquired_ms": acquired,
        "token": token,
        "gpu": "gpu0",
        "vram_mib": mib,
    }


def test_demo_checks_catch_violations() -> None:
    """The demo's own checks are not vacuous: each one fails on a history that breaks it."""
    from gpuboss.demo import LEASE_TTL_S, _crash_check, interval_peak, order_violations, token_violations

    # A low request granted (at once, at 150) while a high one waited from 100 to 200 jumped the queue.
    assert order_violations([_grant("h", "high", 100, 200, 2), _grant("l", "low", 150, 150, 1)])
    assert not order_violations([_grant("h", "high", 100, 150, 1), _grant("l", "low", 90, 200, 2)])
    # Same priority: first come, first served.
    assert order_violations([_grant("a", "normal", 100, 300, 2), _grant("b", "normal", 120, 200, 1)])
    assert not order_violations([_grant("a", "normal", 100, 200, 1), _grant("b", "normal", 120, 300, 2)])
    # Fencing tokens must grow with grant time.
    assert token_violations([_grant("a", "high", 0, 100, 5), _grant("b", "high", 0, 200, 4)])
    assert not token_violations([_grant("a", "high", 0, 100, 4), _grant("b", "high", 0, 200, 5)])
    # Intervals are half-open: a release and a grant in the same millisecond do not overlap.
    grants = {"a": _grant("a", "low", 0, 0, 1, 16384), "b": _grant("b", "low", 0, 100, 2, 16384)}
    assert interval_peak(grants, {"a": {"released_ms": 100}, "b": {"released_ms": 200}}) == {"gpu0": 16384}
    assert interval_peak(grants, {"a": {"released_ms": 101}, "b": {"released_ms": 200}}) == {"gpu0": 32768}
    # The killed holder's lease must be revoked as its process is gone, before its TTL would have freed it.
    killed = {"pid": 42, "vram_mib": 4096, "killed_ms": 10_000}
    gone = {"end": "revoked", "by": "api@box", "reason": "holder process gone (pid 42 on box)"}
    assert _crash_check({**killed, **gone, "ended_ms": 10_500}).ok
    assert not _crash_check({}).ok  # never granted
    assert not _crash_check({**killed, **gone, "ended_ms": 10_000 + int(LEASE_TTL_S * 1000) + 1}).ok
    assert not _crash_check({**killed, **gone, "reason": "stuck", "ended_ms": 10_500}).ok  # an operator's revoke
    assert not _crash_check({**killed, "end": "expired", "ended_ms": 20_000}).ok
    assert not _crash_check(killed).ok  # never taken back
