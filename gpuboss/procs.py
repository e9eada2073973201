"""Which process holds a lease, and whether it is still running: the early reclaim of a dead holder's leases.

A lease outlives a holder that is killed (SIGKILL, the OOM killer, SIGTERM without a handler) until its TTL
runs out. A process on the same machine can tell sooner: the holder's identity names its process in a way
that a check of ``/proc`` settles, and a waiter that finds the holder of a lease gone revokes it at once
(``core.Core.reap_flow``) instead of waiting for the TTL.

An identity is ``<boot id>.<pid namespace>.<pid>.<start time>`` (Linux only):

- the boot id (``/proc/sys/kernel/random/boot_id``, without dashes) names one boot of one kernel: two
  processes with the same boot id run on the same machine, whatever their host names say;
- the pid namespace (the inode of ``/proc/self/ns/pid``): a pid means something only there, so a process in
  another container with the same host name is never judged by a pid it cannot see;
- the pid and its start time (clock ticks after boot, field 22 of ``/proc/<pid>/stat``): a pid reused by a
  new process has another start time.

A process is gone when it runs in the checker's boot and pid namespace and it no longer exists (no
``/proc/<pid>``, and signal 0 finds no such process), is a zombie (it has exited and only waits for its
parent to read its status), or has another start time. Anything else (another machine, another namespace, an identity this code cannot read, ``/proc``
unreadable) is never judged gone: reclaiming the VRAM of a live holder would over-commit the GPU.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Process states of ``/proc/<pid>/stat`` that mean the process has exited (zombie, dead).
_EXITED = frozenset("ZX")


@dataclass(frozen=True)
class ProcessIdentity:
    """One process, as :func:`identity` reads it; :meth:`text` is the form carried by the holder id."""

    boot: str
    pidns: str
    pid: int
    start: str

    def text(self) -> str:
        return f"{self.boot}.{self.pidns}.{self.pid}.{self.start}"

    def beside(self, other: ProcessIdentity) -> bool:
        """Whether the two run on one machine (one boot) in one pid namespace: where a pid names one process."""
        return self.boot == other.boot and self.pidns == other.pidns

    @classmethod
    def parse(cls, text: str) -> ProcessIdentity | None:
        """The identity in ``text`` (as :meth:`text` writes it), or None where it is not one."""
        parts = text.split(".")
        if len(parts) != 4 or not all(parts) or not all(p.isalnum() for p in parts):
            return None
        boot, pidns, pid, start = parts
        if not (pid.isdigit() and pidns.isdigit() and start.isdigit()):
            return None
        return cls(boot, pidns, int(pid), start)


def _stat_fields(text: str) -> tuple[str, str]:
    """(state, start time) from the text of a ``/proc/<pid>/stat``."""
    # The name (field 2) is in parentheses and may hold spaces and ')': the fields after it follow the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], fields[19]  # fields 3 (state) and 22 (start time)


def _stat(pid: int, proc: Path) -> tuple[str, str] | None:
    """(state, start time) of a process from ``/proc/<pid>/stat``; None when it has no entry there."""
    try:
        text = (proc / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return _stat_fields(text)


def identity(proc: Path = Path("/proc")) -> ProcessIdentity | None:
    """This process's identity, or None where it cannot be read (not Linux, ``/proc`` of another namespace)."""
    try:
        boot = (proc / "sys/kernel/random/boot_id").read_text().strip().replace("-", "")
        pidns = os.readlink(proc / "self/ns/pid")  # "pid:[4026531836]"
        stat = (proc / "self/stat").read_text()
        pid, (_, start) = int(stat.split(" ", 1)[0]), _stat_fields(stat)
    except (OSError, ValueError, IndexError):
        return None
    if pid != os.getpid() or not pidns.startswith("pid:[") or not boot.isalnum():
        return None  # a /proc mounted from another pid namespace: its pids are not ours
    return ProcessIdentity(boot, pidns[5:-1], pid, start)


def is_gone(holder: ProcessIdentity, me: ProcessIdentity | None, proc: Path = Path("/proc")) -> bool:
    """True only when ``holder`` is a process of ``me``'s machine and pid namespace that no longer runs."""
    if me is None or not holder.beside(me):
        return False
    try:
        stat = _stat(holder.pid, proc)
    except (OSError, ValueError, IndexError):
        return False  # unreadable (permissions, a /proc being torn down): never a reason to reclaim
    if stat is None:
        return not _exists(holder.pid)  # (/proc mounted with hidepid hides other users' processes)
    return stat[0] in _EXITED or stat[1] != holder.start


def _exists(pid: int) -> bool:
    """Whether the kernel has a process ``pid`` in this pid namespace (signal 0 checks, sends nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: it exists and belongs to another user
    return True


def holder_id(me: ProcessIdentity | None) -> str:
    """A new holder id: random, followed by ``me``'s identity where it is known (``<hex>.<identity>``)."""
    random = uuid.uuid4().hex
    return random if me is None else f"{random}.{me.text()}"


def holder_of(record: Mapping[str, Any]) -> ProcessIdentity | None:
    """The identity of the process holding a lease, from its record's notice channel (``...:holder:<id>``);
    None for a holder id without one (another platform, or a release of gpuboss that did not name it)."""
    channel = record.get("notify")
    if not isinstance(channel, str):
        return None
    _, _, identity_text = channel.rpartition(":")[2].partition(".")
    return ProcessIdentity.parse(identity_text)


def judge(
    record: Mapping[str, Any], me: ProcessIdentity | None, proc: Path = Path("/proc")
) -> tuple[ProcessIdentity, bool] | None:
    """The process holding a lease or request record, and whether it is gone (:func:`is_gone`), where it runs in
    ``me``'s machine and pid namespace; None where this machine cannot tell (another machine or namespace, or
    no identity): the one check behind the reaper (``core.Core.reap_flow``, ``collect_flow``) and the CLI's mark."""
    holder = holder_of(record)
    if me is None or holder is None or not holder.beside(me):
        return None
    return holder, is_gone(holder, me, proc)


def holder_process(record: Mapping[str, Any], me: ProcessIdentity | None, proc: Path = Path("/proc")) -> str | None:
    """What this machine can tell of the process holding a record: ``"running"`` or ``"gone"`` where it runs
    in ``me``'s machine and pid namespace, else None (another machine or namespace, or no identity)."""
    judged = judge(record, me, proc)
    return None if judged is None else ("gone" if judged[1] else "running")
