"""The embedded Redis: one private ``redis-server`` per user and host, started on first use.

It listens on a unix socket in a per-user runtime directory (mode 0700): ``$GPUBOSS_RUNTIME_DIR``, else
``$XDG_RUNTIME_DIR/gpuboss``, else ``/tmp/gpuboss-<uid>``. The first process to need it starts it under an
exclusive ``flock`` on ``<dir>/lock``, so processes starting at once end up with one server; a socket or pid
file left by a crash is noticed (nothing answers PING) and replaced. The server's data directory is the
same folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from gpuboss.errors import ConfigError
from gpuboss.server import RedisProcess, start_redis

log = logging.getLogger("gpuboss")

ENV_RUNTIME_DIR = "GPUBOSS_RUNTIME_DIR"


@dataclass(frozen=True)
class EmbeddedStatus:
    directory: Path
    socket: Path
    pid: int | None
    running: bool

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"


def runtime_dir() -> Path:
    explicit = os.environ.get(ENV_RUNTIME_DIR)
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and Path(xdg).is_dir():
        return Path(xdg) / "gpuboss"
    return Path(tempfile.gettempdir()) / f"gpuboss-{os.getuid()}"


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid():
        raise ConfigError(f"embedded Redis directory {path} belongs to another user; set {ENV_RUNTIME_DIR}")
    if stat.S_IMODE(info.st_mode) != 0o700:
        path.chmod(0o700)
    return path


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    with (directory / "lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _answers(socket: Path) -> bool:
    if not socket.exists():
        return False
    # No retries: redis-py's default (3 retries with exponential backoff) makes a stale socket cost ~4 s.
    client = redis.Redis(
        unix_socket_path=str(socket), socket_connect_timeout=1, socket_timeout=2, retry=Retry(NoBackoff(), 0)
    )
    try:
        return bool(client.ping())
    except (RedisError, OSError):
        return False
    finally:
        client.close()


def _pid(directory: Path) -> int | None:
    try:
        return int((directory / "redis.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def status() -> EmbeddedStatus:
    directory = runtime_dir()
    socket = directory / "redis.sock"
    return EmbeddedStatus(directory, socket, _pid(directory), _answers(socket))


def ensure_embedded() -> EmbeddedStatus:
    """The embedded Redis of this user, started now if nothing answers on its socket."""
    directory = _private_dir(runtime_dir())
    socket = directory / "redis.sock"
    if _answers(socket):
        return EmbeddedStatus(directory, socket, _pid(directory), True)
    with _locked(directory):
        if not _answers(socket):  # someone may have started it while we waited for the lock
            stale = _pid(directory)
            if socket.exists() or stale is not None:
                log.warning("gpuboss: replacing a stale embedded Redis socket/pid file in %s", directory)
            with contextlib.suppress(FileNotFoundError):
                socket.unlink()
            with contextlib.suppress(FileNotFoundError):
                (directory / "redis.pid").unlink()
            proc = start_redis(directory, socket=socket, daemonize=True)
            log.info("gpuboss: started embedded Redis (pid %d) on %s", proc.pid, socket)
    result = EmbeddedStatus(directory, socket, _pid(directory), True)
    log.info("gpuboss: using embedded Redis at %s", result.url)
    return result


def stop_embedded() -> bool:
    """Stop this user's embedded Redis by its PID; False if it was not running."""
    directory = runtime_dir()
    if not directory.is_dir():
        return False
    with _locked(directory):
        pid = _pid(directory)
        socket = directory / "redis.sock"
        if pid is None or not _answers(socket):
            return False
        RedisProcess(pid, socket, 0, directory).stop()
        with contextlib.suppress(FileNotFoundError):
            socket.unlink()
        return True
