"""How the benchmark sends gpuboss's scripts from a plain client: the way gpuboss itself sends them.

On Redis and Valkey 7 or later gpuboss loads its scripts as one function library and calls each by ``FCALL``
of its function (``gpuboss_<hash>_<operation>``); where functions are unavailable (Redis 6.2, an ACL without
``fcall`` or ``function|load``, ``GPUBOSS_SCRIPT_CALLS=evalsha``) it sends ``EVALSHA``. :class:`Scripts`
makes the same choice once, at its creation, so that the bare-script rows time what gpuboss sends; and the
commandstats helpers count both commands, so that no script call of gpuboss is missed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import redis
from gpuboss import redis_io, scripts
from gpuboss.core import Call
from redis.exceptions import NoPermissionError, ResponseError

#: The commands that run a script (INFO commandstats names), gpuboss's first.
SCRIPT_COMMANDS = ("fcall", "evalsha", "fcall_ro", "evalsha_ro", "eval", "eval_ro")


def functions_usable(client: redis.Redis) -> tuple[bool, str]:
    """Whether gpuboss's client on this server calls its scripts by FCALL (loading the library if need be),
    and why not where it does not (gpuboss.redis_io makes the same choice per client)."""
    if redis_io.SCRIPT_CALLS != "auto":
        return False, f"GPUBOSS_SCRIPT_CALLS={redis_io.SCRIPT_CALLS}"
    try:
        client.function_load(scripts.library().source)
    except ResponseError as err:
        text = str(err).lower()
        if "already exists" in text:
            return True, ""
        if isinstance(err, NoPermissionError) or "unknown command" in text or "unknown subcommand" in text:
            return False, f"no function library: {err}"
        raise
    return True, ""


@dataclass
class Scripts:
    """gpuboss's scripts sent from one plain client, by FCALL of the library's functions where the server has
    them, else by EVALSHA (loaded here either way)."""

    client: redis.Redis
    #: what is sent: "FCALL" or "EVALSHA"
    command: str = ""
    #: why EVALSHA, where it is
    why: str = ""
    #: operation -> what names it in a SLOWLOG entry (FCALL: the function name; EVALSHA: the SHA1)
    target: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        functions, self.why = functions_usable(self.client)
        if functions:
            self.command = "FCALL"
            self.target = dict(scripts.library().functions)
        else:
            self.command = "EVALSHA"
            for name, script in scripts.all_scripts().items():
                self.target[name] = str(self.client.script_load(script.source))
        self._names = {v: k for k, v in self.target.items()}

    def args(self, c: Call) -> tuple[Any, ...]:
        """What follows the command: the function name (or SHA1), the number of keys, the keys, the args."""
        return (self.target[c.script], len(c.keys), *c.keys, *c.args)

    def sender(self, client: Any) -> Callable[..., Any]:
        """``client.fcall`` or ``client.evalsha`` (a client or a pipeline), to be given :meth:`args`."""
        return cast(Callable[..., Any], client.fcall if self.command == "FCALL" else client.evalsha)

    def call(self, c: Call) -> Any:
        return self.sender(self.client)(*self.args(c))

    def pipelined(self, calls: list[Call], batch: int = 500) -> list[Any]:
        out: list[Any] = []
        for i in range(0, len(calls), batch):
            pipe = self.client.pipeline(transaction=False)
            send = self.sender(pipe)
            for c in calls[i : i + batch]:
                send(*self.args(c))
            out += pipe.execute()
        return out

    def name_of(self, command: str, target: str) -> str | None:
        """The operation a logged call ran (``FCALL <function>`` or ``EVALSHA <sha>``); None if not one of ours."""
        if command.upper() != self.command:
            return None
        return self._names.get(target if self.command == "FCALL" else target.lower())

    def describe(self, server: str) -> str:
        if self.command == "FCALL":
            return f"FCALL of library {scripts.library().name} ({server})"
        return f"EVALSHA ({server}; {self.why})" if self.why else f"EVALSHA ({server})"


def describe(client: redis.Redis) -> str:
    """The run's header line: how gpuboss calls its scripts on this server, e.g. ``FCALL of library gpuboss_…
    (Redis 7.0.15)``, or ``EVALSHA (Redis 7.0.15; GPUBOSS_SCRIPT_CALLS=evalsha)``."""
    info = client.info("server")
    valkey = info.get("valkey_version")
    server = f"Valkey {valkey}" if valkey else f"Redis {info.get('redis_version', '?')}"
    return Scripts(client).describe(server)


def script_stats(client: redis.Redis) -> dict[str, tuple[int, int]]:
    """Calls and microseconds of every script command so far (INFO commandstats), by command name."""
    stats = client.info("commandstats")
    out = {}
    for name in SCRIPT_COMMANDS:
        s = stats.get(f"cmdstat_{name}", {})
        out[name] = (int(s.get("calls", 0)), int(s.get("usec", 0)))
    return out


def stats_delta(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """What ran between two :func:`script_stats`, only the commands that ran."""
    out = {}
    for name, (calls, usec) in after.items():
        c0, u0 = before.get(name, (0, 0))
        if calls - c0:
            out[name] = (calls - c0, usec - u0)
    return out


def totals(client: redis.Redis) -> tuple[int, int]:
    """Calls and microseconds of gpuboss's script commands (FCALL and EVALSHA) so far."""
    stats = script_stats(client)
    return sum(stats[n][0] for n in ("fcall", "evalsha")), sum(stats[n][1] for n in ("fcall", "evalsha"))
