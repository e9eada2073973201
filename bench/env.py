"""The private redis-server the benchmarks run against, and a description of the machine."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis
import redis.utils
from gpuboss.server import RedisProcess, start_redis

#: Never used: an unrelated Redis may listen there.
RESERVED_PORT = 6379
#: No reply within this long means Redis hangs (longer than any BLPOP the benchmarks block in).
SOCKET_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class Server:
    """A private redis-server on a unix socket and a loopback TCP port."""

    process: RedisProcess
    unix_url: str
    tcp_url: str | None
    workdir: Path


def free_port() -> int:
    """A free loopback TCP port (never 6379)."""
    for _ in range(20):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port != RESERVED_PORT:
            return port
    raise RuntimeError("no free loopback port found")


@contextlib.contextmanager
def private_server(tcp: bool = True) -> Iterator[Server]:
    """Start redis-server in a temporary folder; stop it by its PID and remove the folder at the end."""
    workdir = Path(tempfile.mkdtemp(prefix="gpuboss-bench-"))
    try:
        sock = workdir / "redis.sock"
        port = free_port() if tcp else 0
        process = start_redis(workdir, socket=sock, port=port)
        try:
            yield Server(
                process=process,
                unix_url=f"unix://{sock}",
                tcp_url=f"redis://127.0.0.1:{port}/0" if tcp else None,
                workdir=workdir,
            )
        finally:
            process.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def connect(url: str) -> redis.Redis:
    """A sync client configured as gpuboss configures its own (hiredis when installed, decoded replies)."""
    return redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=5.0, socket_timeout=SOCKET_TIMEOUT_S)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def load_average() -> str:
    """The 1-minute load average (runnable processes, any owner), or "?" where unknown."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "?"


def code_version(root: Path) -> str:
    """The gpuboss under test: its version, and the git commit of the checkout (``-dirty``: with changes)."""
    from gpuboss import __version__

    try:
        found = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=root, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return __version__
    commit = found.stdout.strip()
    return f"{__version__}, commit {commit}" if found.returncode == 0 and commit else __version__


def describe_machine(url: str) -> list[tuple[str, str]]:
    """(label, value) pairs naming the machine, the Redis server and the Python side."""
    client = connect(url)
    try:
        info = client.info("server")
    finally:
        client.close()
    uname = platform.uname()
    return [
        ("machine", f"{uname.machine}, {os.cpu_count()} CPUs ({cpu_model()})"),
        ("kernel", f"{uname.system} {uname.release}"),
        ("redis-server", f"{info.get('redis_version', '?')} (private, unix socket, no persistence)"),
        ("python", f"{platform.python_implementation()} {platform.python_version()}"),
        (
            "redis-py",
            f"{redis.__version__}, parser {'hiredis' if redis.utils.HIREDIS_AVAILABLE else 'pure Python'}",
        ),
    ]
