"""The embedded Redis: one per runtime directory, race-free start, stale files replaced, mode 0700, CLI.

Every test points ``GPUBOSS_RUNTIME_DIR`` at a temporary directory of its own and stops the server it
started by PID at the end; nothing here touches the user's embedded Redis or port 6379.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from gpuboss import embedded
from gpuboss.cli import cli
from gpuboss.server import RedisProcess

# Each child waits for the go file, so they all call ensure_embedded() at the same moment.
START_AT_ONCE = """
import pathlib, sys, time
from gpuboss.embedded import ensure_embedded
ready, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
ready.touch()
while not go.exists():
    time.sleep(0.001)
print(ensure_embedded().pid, flush=True)
"""


def servers_in(directory: Path) -> list[int]:
    """PIDs of the processes working in ``directory`` (redis-server chdirs to its --dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if Path(os.readlink(entry / "cwd")) == directory and "redis" in (entry / "cmdline").read_text():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private runtime directory (not created yet); every server started in it is stopped by PID after."""
    directory = tmp_path / "rt"
    monkeypatch.setenv("GPUBOSS_RUNTIME_DIR", str(directory))
    monkeypatch.delenv("GPUBOSS_REDIS_URL", raising=False)
    monkeypatch.delenv("GPUBOSS_CONFIG", raising=False)
    yield directory
    embedded.stop_embedded()
    if Path("/proc").is_dir():  # a failed test may have left more than one: stop each by its PID
        for pid in servers_in(directory.resolve()):
            RedisProcess(pid, None, 0, directory).stop()


def answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    finally:
        client.close()


def test_start_status_stop(runtime: Path) -> None:
    assert embedded.status().running is False
    first = embedded.ensure_embedded()
    assert first.running and first.pid is not None
    assert first.socket == runtime / "redis.sock"
    assert first.url == f"unix://{runtime}/redis.sock"
    assert answers(first.url)
    again = embedded.ensure_embedded()  # the second caller reuses it
    assert again.pid == first.pid
    assert embedded.status() == again
    assert embedded.stop_embedded() is True
    assert embedded.status().running is False
    assert not (runtime / "redis.sock").exists()
    assert embedded.stop_embedded() is False  # twice is harmless


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="counts servers through /proc")
def test_processes_starting_at_once_share_one_server(runtime: Path, tmp_path: Path) -> None:
    n = 4
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", START_AT_ONCE, str(tmp_path / f"ready{i}"), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"ready{i}").exists() for i in range(n)) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    pids = set()
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        pids.add(int(out.strip()))
    assert len(pids) == 1, f"more than one server: {pids}"
    (pid,) = pids
    assert embedded.status().pid == pid
    assert embedded.status().running
    assert servers_in(runtime.resolve()) == [pid]


def test_stale_pid_and_socket_files_are_replaced(runtime: Path) -> None:
    runtime.mkdir(mode=0o700)
    gone = subprocess.Popen(["true"])
    gone.wait()
    (runtime / "redis.pid").write_text(f"{gone.pid}\n")  # a pid file naming a dead process
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(str(runtime / "redis.sock"))  # a socket file nobody listens on, as after a crash
    leftover.close()
    assert (runtime / "redis.sock").exists()
    stale = embedded.status()
    assert stale.pid == gone.pid and stale.running is False

    fresh = embedded.ensure_embedded()
    assert fresh.running
    assert fresh.pid is not None and fresh.pid != gone.pid
    assert RedisProcess(fresh.pid, None, 0, runtime).alive()
    assert answers(fresh.url)
    assert embedded.status().pid == fresh.pid


def test_runtime_dir_is_private(runtime: Path) -> None:
    embedded.ensure_embedded()
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o700
    assert (runtime / "redis.log").exists()  # the server's files live in the same folder


def test_existing_runtime_dir_is_made_private(runtime: Path) -> None:
    runtime.mkdir()
    runtime.chmod(0o755)
    embedded.ensure_embedded()
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o700


def test_server_commands(runtime: Path) -> None:
    runner = CliRunner()
    before = runner.invoke(cli, ["server", "status"])
    assert before.exit_code == 0, before.output
    assert "embedded Redis: not running" in before.stdout
    assert f"socket        {runtime}/redis.sock" in before.stdout
    assert "running       no" in before.stdout

    started = runner.invoke(cli, ["server", "start"])
    assert started.exit_code == 0, started.output
    pid = embedded.status().pid
    assert pid is not None
    assert f"embedded Redis: started (pid {pid})" in started.stdout
    assert "running       yes" in started.stdout

    again = runner.invoke(cli, ["server", "start"])
    assert f"embedded Redis: already running (pid {pid})" in again.stdout

    shown = runner.invoke(cli, ["--json", "server", "status"])
    assert shown.exit_code == 0, shown.output
    info = json.loads(shown.stdout)
    assert info["running"] is True
    assert info["pid"] == pid
    assert info["directory"] == str(runtime)
    assert info["socket"] == str(runtime / "redis.sock")
    assert info["url"] == f"unix://{runtime}/redis.sock"

    stopped = runner.invoke(cli, ["server", "stop"])
    assert stopped.exit_code == 0, stopped.output
    assert f"embedded Redis: stopped (pid {pid})" in stopped.stdout
    assert not RedisProcess(pid, None, 0, runtime).alive()
    assert "embedded Redis: was not running" in runner.invoke(cli, ["server", "stop"]).stdout


def test_status_without_a_running_embedded_redis_exits_2(runtime: Path) -> None:
    result = CliRunner().invoke(cli, ["status"])
    assert result.exit_code == 2
    assert "the embedded Redis is not running" in result.stderr
    assert "gpuboss server start" in result.stderr
    assert not (runtime / "redis.sock").exists()  # status is read-only: it starts nothing
