"""The ``gpuboss`` command: inspect a namespace, control the embedded Redis, run the demo.

Exit codes: 0 success, 1 a usage or configuration error, 2 Redis unreachable, 3 a demo check failed,
130 interrupted. Errors are one line on stderr; ``--debug`` adds the traceback and debug logs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import click
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gpuboss import embedded
from gpuboss.config import ENV_CONFIG, ENV_REDIS_URL, BossConfig, config_from_arguments, load_config
from gpuboss.core import redact_url
from gpuboss.errors import ConfigError, GPUBossError, RedisUnavailable
from gpuboss.fmt import gb, seconds, table
from gpuboss.keys import Keys

log = logging.getLogger("gpuboss")

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_UNREACHABLE = 2
EXIT_CHECK_FAILED = 3
EXIT_INTERRUPTED = 130

#: The queue's score layout (see lua/includes/state.lua): (RANK_BASE - rank) * SEQ_SPAN + seq.
RANK_BASE = 1000
SEQ_SPAN = 2**40
RANK_NAMES = {0: "low", 1: "normal", 2: "high"}


class CliError(Exception):
    """An error the command reports as one line, with its exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class CliState:
    """The global options, shared by every command."""

    redis_url: str | None = None
    namespace: str | None = None
    config_path: str | None = None
    connect_timeout: float | None = None
    json: bool = False
    debug: bool = False

    def config(self) -> BossConfig:
        """The configuration: ``--config`` (or ``GPUBOSS_CONFIG``) if any, with the options on top."""
        overrides: dict[str, Any] = {
            "redis_url": self.redis_url,
            "namespace": self.namespace,
            "connect_timeout": self.connect_timeout,
        }
        if self.config_path or os.environ.get(ENV_CONFIG):
            return load_config(self.config_path, **overrides)
        return config_from_arguments(**overrides)


@dataclass(frozen=True)
class Target:
    """The Redis a command talks to."""

    url: str
    embedded: bool
    pid: int | None = None

    @property
    def shown(self) -> str:
        return redact_url(self.url)

    def describe(self) -> str:
        if self.embedded:
            return f"{self.shown} (embedded, pid {self.pid if self.pid is not None else '?'})"
        return self.shown


def find_target(config: BossConfig, start: bool, namespace: str | None = None) -> Target:
    """The configured Redis, else the embedded one (started now if ``start``; else it must be running)."""
    if config.redis_url:
        target = Target(config.redis_url, embedded=False)
    elif start:
        st = embedded.ensure_embedded()
        target = Target(st.url, embedded=True, pid=st.pid)
    else:
        st = embedded.status()
        if not st.running:
            raise RedisUnavailable(
                f"the embedded Redis is not running (nothing answers on {st.socket}): start it with "
                f"`gpuboss server start`, or give --redis-url / {ENV_REDIS_URL}"
            )
        target = Target(st.url, embedded=True, pid=st.pid)
    log.info("gpuboss: using Redis %s, namespace %r", target.describe(), namespace or config.namespace)
    return target


def connect(target: Target, config: BossConfig) -> redis.Redis:
    from gpuboss.redis_io import connect_sync

    return connect_sync(target.url, config.connect_timeout, socket_timeout=config.connect_timeout)


# ---------------------------------------------------------------- reading a namespace (read-only)


def _json(raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        return {"unparsed": raw}
    return value if isinstance(value, dict) else {"unparsed": raw}


def _int(value: object, default: int = 0) -> int:
    try:
        return int(float(str(value)))
    except ValueError:
        return default


def read_namespace(client: redis.Redis, keys: Keys, shown_url: str, within: float) -> dict[str, Any]:
    """A consistent snapshot (one MULTI/EXEC of reads) of a namespace: GPUs, leases and the queue."""
    from gpuboss.redis_io import retry_sync

    def fetch() -> list[Any]:
        pipe = client.pipeline(transaction=True)
        pipe.time()
        pipe.hgetall(keys.gpus)
        pipe.hgetall(keys.capacity)
        pipe.hgetall(keys.used)
        pipe.hgetall(keys.leases)
        pipe.zrange(keys.queue, 0, -1, withscores=True)
        pipe.hgetall(keys.tickets)
        return pipe.execute()

    now_t, gpus_raw, capacity, used, leases_raw, queue, tickets = retry_sync(fetch, shown_url, within)
    now_ms = int(now_t[0]) * 1000 + int(now_t[1]) // 1000

    gpus = []
    for gpu_id in sorted(set(gpus_raw) | set(capacity) | set(used)):
        decl = _json(gpus_raw.get(gpu_id, "{}"))
        leasable = _int(capacity.get(gpu_id, 0))
        reserve = _int(decl.get("reserve_mib", 0))
        in_use = _int(used.get(gpu_id, 0))
        gpus.append(
            {
                "id": gpu_id,
                "name": str(decl.get("name", "")),
                "index": _int(decl.get("index", 0)),
                "device": f"cuda:{_int(decl.get('index', 0))}",
                "capacity_mib": _int(decl.get("capacity_mib", leasable + reserve)),
                "reserve_mib": reserve,
                "leasable_mib": leasable,
                "used_mib": in_use,
                "free_mib": leasable - in_use,
                "leases": 0,
            }
        )
    by_id = {g["id"]: g for g in gpus}

    leases = []
    for lease_id, raw in leases_raw.items():
        rec = _json(raw)
        rec.setdefault("id", lease_id)
        acquired = _int(rec.get("acquired_at", now_ms), now_ms)
        expires = _int(rec.get("expires_at", now_ms), now_ms)
        rec["age_s"] = round((now_ms - acquired) / 1000, 3)
        rec["expires_in_s"] = round((expires - now_ms) / 1000, 3)
        leases.append(rec)
        if rec.get("gpu") in by_id:
            by_id[rec["gpu"]]["leases"] += 1
    leases.sort(key=lambda r: (str(r.get("gpu", "")), _int(r.get("token", 0))))

    waiting = []
    for position, (ticket_id, score) in enumerate(queue, start=1):
        rec = _json(tickets.get(ticket_id, "{}"))
        rec.setdefault("id", ticket_id)
        rank = RANK_BASE - math.floor(float(score) / SEQ_SPAN)
        rec.setdefault("priority", RANK_NAMES.get(rank, str(rank)))
        rec["position"] = position
        rec["waiting_s"] = round((now_ms - _int(rec.get("requested_at", now_ms), now_ms)) / 1000, 3)
        if "expires_at" in rec:
            rec["expires_in_s"] = round((_int(rec["expires_at"]) - now_ms) / 1000, 3)
        waiting.append(rec)

    return {
        "namespace": keys.namespace,
        "time": now_ms / 1000,
        "gpus": gpus,
        "leases": leases,
        "queue": waiting,
    }


def _holder(rec: dict[str, Any]) -> str:
    return f"{rec.get('host', '?')}:{rec.get('pid', '?')}"


def _expires(value: object) -> str:
    if not isinstance(value, int | float):
        return "-"
    return seconds(float(value)) if value >= 0 else f"expired {seconds(-float(value))} ago"


def render_status(snap: dict[str, Any], target: Target) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap["time"]))
    out = [f"Redis {target.describe()}, namespace {snap['namespace']!r}, at {stamp} (Redis clock)", ""]
    gpus = snap["gpus"]
    if gpus:
        rows = [
            [
                g["id"],
                g["device"],
                g["name"] or "-",
                gb(g["capacity_mib"]),
                gb(g["reserve_mib"]),
                gb(g["used_mib"]),
                gb(g["free_mib"]),
                g["leases"],
            ]
            for g in gpus
        ]
        out.append(f"GPUs ({len(gpus)})")
        out.append(
            table(
                ["GPU", "DEVICE", "NAME", "CAPACITY", "RESERVE", "LEASED", "FREE", "LEASES"],
                rows,
                right={3, 4, 5, 6, 7},
            )
        )
    else:
        out.append(f"GPUs: none registered in namespace {snap['namespace']!r} (no boss has used it yet)")
    out.append("")
    leases = snap["leases"]
    out.append(f"Leases ({len(leases)})")
    if leases:
        rows = [
            [
                str(r.get("id", ""))[:8],
                r.get("service", "-"),
                r.get("priority", "-"),
                r.get("gpu", "-"),
                gb(_int(r.get("vram_mib", 0))),
                seconds(float(r["age_s"])),
                _expires(r["expires_in_s"]),
                r.get("token", "-"),
                _holder(r),
            ]
            for r in leases
        ]
        out.append(
            table(
                ["LEASE", "SERVICE", "PRIORITY", "GPU", "SIZE", "AGE", "EXPIRES IN", "TOKEN", "HOLDER"],
                rows,
                right={4, 5, 7},
            )
        )
    else:
        out.append("  (none)")
    out.append("")
    queue = snap["queue"]
    out.append(f"Queue ({len(queue)} waiting, in the order they will be served)")
    if queue:
        rows = [
            [
                r["position"],
                str(r.get("id", ""))[:8],
                r.get("service", "-"),
                r.get("priority", "-"),
                gb(_int(r.get("vram_mib", 0))),
                r.get("pin") or "any",
                seconds(float(r["waiting_s"])),
                _expires(r.get("expires_in_s")),
                _holder(r),
            ]
            for r in queue
        ]
        out.append(
            table(
                ["#", "REQUEST", "SERVICE", "PRIORITY", "SIZE", "GPU", "WAITING", "EXPIRES IN", "HOLDER"],
                rows,
                right={0, 4, 6},
            )
        )
    else:
        out.append("  (none)")
    return "\n".join(out)


# ---------------------------------------------------------------- the click group


class GpuBossGroup(click.Group):
    """Turns every error into one line on stderr and the documented exit code."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(args) if args is not None else sys.argv[1:]
        debug = "--debug" in argv
        try:
            result = super().main(
                argv, prog_name, complete_var, standalone_mode=False, windows_expand_args=windows_expand_args, **extra
            )
            code = result if isinstance(result, int) else EXIT_OK
        except click.exceptions.Exit as done:  # --help, --version
            code = done.exit_code
        except click.UsageError as err:
            hint = ""
            if err.ctx is not None:
                hint = f" (see '{err.ctx.command_path} --help')"
            code = _fail(f"{err.format_message()}{hint}", EXIT_USAGE, err, debug)
        except click.ClickException as err:
            code = _fail(err.format_message(), EXIT_USAGE, err, debug)
        except click.Abort as err:
            code = _fail("interrupted", EXIT_INTERRUPTED, err, debug)  # click's name for Ctrl-C
        except CliError as err:
            code = _fail(str(err), err.code, err, debug)
        except (RedisUnavailable, RedisConnectionError, RedisTimeoutError, ConnectionError) as err:
            code = _fail(str(err), EXIT_UNREACHABLE, err, debug)
        except GPUBossError as err:
            code = _fail(str(err), EXIT_USAGE, err, debug)
        except RedisError as err:
            code = _fail(f"Redis error: {err}", EXIT_USAGE, err, debug)
        except KeyboardInterrupt as err:
            code = _fail("interrupted", EXIT_INTERRUPTED, err, debug)
        except Exception as err:  # noqa: BLE001 - anything else is a bug: one line, traceback with --debug
            code = _fail(f"unexpected {type(err).__name__}: {err}", EXIT_USAGE, err, debug, unexpected=True)
        if standalone_mode:
            sys.exit(code)
        return code


def _fail(message: str, code: int, err: BaseException, debug: bool, unexpected: bool = False) -> int:
    if debug:
        traceback.print_exception(err, file=sys.stderr)
    line = " ".join(message.split())
    if unexpected and not debug:
        line += " (run with --debug for the traceback)"
    click.echo(f"gpuboss: error: {line}", err=True)
    return code


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (click's test runner swaps it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            self.handleError(record)


def _setup_logging(ctx: click.Context, debug: bool) -> None:
    handler = _StderrHandler()
    if debug:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(message)s"))
    before = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if debug else logging.INFO)

    def restore() -> None:
        log.removeHandler(handler)
        log.setLevel(before)

    ctx.call_on_close(restore)


@click.group(cls=GpuBossGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--redis-url",
    metavar="URL",
    help=f"Redis to use (redis://, rediss://, unix://). Default: {ENV_REDIS_URL}, the config file, "
    "else the embedded Redis of this user.",
)
@click.option("--namespace", metavar="NAME", help="Key namespace (default: the config's, else 'gpuboss').")
@click.option(
    "--config",
    "config_path",
    metavar="PATH",
    help=f"A config.yaml to read ({ENV_CONFIG} wins over it when set).",
)
@click.option(
    "--connect-timeout",
    type=click.FloatRange(min=0, min_open=True, max=300),
    metavar="SECONDS",
    help="How long to try reaching Redis before giving up (default: the config's, 5 s).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--debug", is_flag=True, help="Debug logs, and tracebacks on errors.")
@click.version_option(package_name="gpuboss", prog_name="gpuboss")
@click.pass_context
def cli(
    ctx: click.Context,
    redis_url: str | None,
    namespace: str | None,
    config_path: str | None,
    connect_timeout: float | None,
    as_json: bool,
    debug: bool,
) -> None:
    """gpuboss: VRAM leases for shared GPUs, coordinated through Redis.

    \b
    gpuboss demo             run the demo on the embedded Redis
    gpuboss status           GPUs, leases and the queue of a namespace
    gpuboss server status    the embedded Redis (start, stop)
    """
    _setup_logging(ctx, debug)
    ctx.obj = CliState(redis_url, namespace, config_path, connect_timeout, as_json, debug)


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


# ---------------------------------------------------------------- gpuboss status


@cli.command(short_help="GPUs, leases and the queue of a namespace (read-only).")
@click.pass_obj
def status(state: CliState) -> None:
    """Show per GPU capacity, reserve, leased and free VRAM, the leases and the queue (read-only)."""
    config = state.config()
    target = find_target(config, start=False)
    client = connect(target, config)
    try:
        snap = read_namespace(client, Keys(config.namespace), target.shown, config.connect_timeout)
    finally:
        client.close()
    if state.json:
        _echo_json({"redis": {"url": target.shown, "embedded": target.embedded, "pid": target.pid}, **snap})
    else:
        click.echo(render_status(snap, target))


# ---------------------------------------------------------------- gpuboss server ...


@cli.group(short_help="Show, start and stop the embedded Redis.")
def server() -> None:
    """Show, start and stop the embedded Redis (one per user and host, on a unix socket)."""


def _server_info(st: embedded.EmbeddedStatus) -> dict[str, Any]:
    from gpuboss.server import find_redis_server

    try:
        binary: str | None = find_redis_server()
    except ConfigError:
        binary = None
    return {
        "directory": str(st.directory),
        "socket": str(st.socket),
        "url": st.url,
        "pid": st.pid,
        "running": st.running,
        "redis_server": binary,
    }


def _show_server(state: CliState, st: embedded.EmbeddedStatus, headline: str) -> None:
    info = _server_info(st)
    if state.json:
        _echo_json({"message": headline, **info})
        return
    click.echo(headline)
    rows = [
        ["directory", info["directory"]],
        ["socket", info["socket"]],
        ["url", info["url"]],
        ["pid", info["pid"] if info["pid"] is not None else "-"],
        ["running", "yes" if info["running"] else "no"],
        ["redis-server", info["redis_server"] or "not found (pip install 'gpuboss[embedded]')"],
    ]
    click.echo("\n".join(f"  {k:<13} {v}" for k, v in rows))
    configured = _configured_url(state)
    if configured:
        click.echo(f"note: Redis {redact_url(configured)} is configured, so gpuboss does not use this server")


def _configured_url(state: CliState) -> str | None:
    try:
        return state.config().redis_url
    except ConfigError:
        return None


@server.command("status")
@click.pass_obj
def server_status(state: CliState) -> None:
    """Directory, socket, pid and whether the embedded Redis runs."""
    st = embedded.status()
    _show_server(state, st, "embedded Redis: running" if st.running else "embedded Redis: not running")


@server.command("start")
@click.pass_obj
def server_start(state: CliState) -> None:
    """Start the embedded Redis (nothing happens if it already runs)."""
    before = embedded.status()
    st = embedded.ensure_embedded()
    headline = (
        f"embedded Redis: already running (pid {st.pid})"
        if before.running
        else f"embedded Redis: started (pid {st.pid})"
    )
    _show_server(state, st, headline)


@server.command("stop")
@click.pass_obj
def server_stop(state: CliState) -> None:
    """Stop the embedded Redis by its pid. Its leases and queue are lost (it keeps nothing on disk)."""
    before = embedded.status()
    stopped = embedded.stop_embedded()
    headline = f"embedded Redis: stopped (pid {before.pid})" if stopped else "embedded Redis: was not running"
    _show_server(state, embedded.status(), headline)


# ---------------------------------------------------------------- gpuboss demo


@cli.command(short_help="Run the demo: three services share a simulated 24 GB GPU.")
@click.option(
    "--duration",
    type=click.FloatRange(min=1, max=300),
    default=20.0,
    show_default=True,
    metavar="SECONDS",
    help="How long the services keep asking for leases.",
)
@click.option("--seed", type=int, default=None, help="Random seed, to replay the same request sizes and timings.")
@click.option("--quiet", is_flag=True, help="No live timeline, only the summary.")
@click.pass_obj
def demo(state: CliState, duration: float, seed: int | None, quiet: bool) -> None:
    """Three services (chat: high, api: normal, batch: low priority) in separate processes share a
    simulated 24 GB GPU; prints a live timeline and a summary, and checks that no GPU was over-committed.

    Uses the embedded Redis unless a Redis is configured, in a fresh namespace removed at the end.
    """
    from gpuboss.demo import DemoFailed, run_demo

    config = state.config()
    target = find_target(config, start=True, namespace="demo-*")
    try:
        ok = run_demo(
            url=target.url,
            redis_label=target.describe(),
            embedded=target.embedded,
            duration=duration,
            seed=seed,
            timeline=not quiet and not state.json,
            as_json=state.json,
            debug=state.debug,
        )
    except DemoFailed as err:
        raise CliError(str(err), EXIT_CHECK_FAILED) from err
    if not ok:
        raise CliError("a demo check failed (see the summary above)", EXIT_CHECK_FAILED)


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``gpuboss`` executable."""
    cli.main(args=args, prog_name="gpuboss")


if __name__ == "__main__":  # pragma: no cover
    main()
