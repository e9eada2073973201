"""The ``gpuboss`` command: inspect a namespace, clear stuck leases, watch events, serve metrics, control
the embedded Redis, run the demo.

Exit codes (docs/cli.md): 0 success, 1 a usage or configuration error, 2 Redis unreachable, 3 a check
failed (a demo check; ``health``: no GPU available), 4 no GPU found on this host (``gpus discover`` and
``gpus register``: NVML unavailable or no GPU), 130 interrupted. Errors are one line on stderr; ``--debug``
adds the traceback and debug logs.

Tables go out through rich on a terminal; piped, with ``--plain`` or ``NO_COLOR``, they are plain, stable
text (``gpuboss.fmt``); ``--json`` is for programs.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import json
import logging
import math
import os
import re
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import click
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gpuboss import embedded
from gpuboss.config import (
    ENV_CONFIG,
    ENV_REDIS_URL,
    BossConfig,
    build_config,
    config_from_arguments,
    gb_to_mib,
    load_config,
    read_config_file,
)
from gpuboss.errors import ConfigError, GPUBossError, RedisUnavailable
from gpuboss.events import EVENT_TYPES, Event, decode_entries
from gpuboss.fmt import Block, Column, Line, Table, bar, gb, plain, seconds, table
from gpuboss.keys import Keys
from gpuboss.snapshot import (
    as_int,
    as_json_object,
    describe_rules,
    explain_queue,
    health_report,
    lease_gpus,
    priority_classes,
    read_namespace,
)
from gpuboss.topology import redact_url

log = logging.getLogger("gpuboss")

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_UNREACHABLE = 2
EXIT_CHECK_FAILED = 3
EXIT_NO_GPU = 4
EXIT_INTERRUPTED = 130


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
    plain: bool = False

    def rich(self, err: bool = False) -> bool:
        """Whether tables go out through rich: on a terminal (or with FORCE_COLOR set), unless --json,
        --plain, NO_COLOR or TERM=dumb ask for plain text."""
        if self.json or self.plain or os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
            return False
        if os.environ.get("FORCE_COLOR"):
            return True
        stream = sys.stderr if err else sys.stdout
        try:
            return stream.isatty()
        except ValueError:  # a closed stream
            return False

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


def _holder(rec: dict[str, Any]) -> str:
    """``host:pid``; ``gone (host:pid)`` where the snapshot found that process gone from this machine."""
    where = f"{rec.get('host', '?')}:{rec.get('pid', '?')}"
    return f"gone ({where})" if rec.get("holder_process") == "gone" else where


def _expires(value: object) -> str:
    if not isinstance(value, int | float):
        return "-"
    return seconds(float(value)) if value >= 0 else f"expired {seconds(-float(value))} ago"


PRIORITY_STYLES = {"high": "bold", "low": "dim"}
HOLDER_STYLES = {"gone": "bold red"}


def _gpu_free(g: dict[str, Any]) -> str:
    return "offline" if g.get("offline") is not None else gb(max(0, g["free_mib"]))


def _observed(g: dict[str, Any]) -> str:
    reading = g.get("observed")
    if not reading:
        return "-"
    if reading.get("fresh"):
        return gb(as_int(reading.get("used_mib", 0)))
    return f"stale ({seconds(float(reading.get('age_s', 0)))} old)"


def gpu_table(gpus: list[dict[str, Any]], inventory: bool = False, title: str = "", gauge: bool = False) -> Table:
    """Per GPU: capacity, reserve, leased, (with inventory data) observed used and held VRAM, and free.

    The OBSERVED column appears once a sampler has written a reading or a GPU went offline, HELD once an
    eviction holds VRAM, HOST when GPUs name their host; ``gauge`` (rich only) adds a usage bar."""
    hosts = any(g.get("host") for g in gpus)
    held = any(g.get("hold") for g in gpus)
    cols = [Column("GPU"), Column("DEVICE"), Column("NAME"), *([Column("HOST")] if hosts else [])]
    cols += [Column("CAPACITY", True), Column("RESERVE", True), Column("LEASED", True)]
    if inventory:
        cols.append(Column("OBSERVED", True, styles={"stale": "dim"}))
    if held:
        cols.append(Column("HELD", True, style="yellow"))
    cols += [Column("FREE", True, styles={"offline": "bold red"}), Column("LEASES", True)]
    if gauge:
        cols.append(Column("USE", style="green"))
    rows = []
    for g in gpus:
        row: list[object] = [g["id"], g["device"], g["name"] or "-", *([g.get("host") or "-"] if hosts else [])]
        row += [gb(g["capacity_mib"]), gb(g["reserve_mib"]), gb(g["used_mib"])]
        if inventory:
            row.append(_observed(g))
        if held:
            row.append(gb(g["hold"]["vram_mib"]) if g.get("hold") else "-")
        row += [_gpu_free(g), g["leases"]]
        if gauge:
            leasable = g["leasable_mib"]
            taken = 1.0 if g.get("offline") is not None or leasable <= 0 else 1 - max(0, g["free_mib"]) / leasable
            row.append(bar(taken))
        rows.append(row)
    return Table(title, cols, rows)


def _lease_state(r: dict[str, Any]) -> str:
    state = str(r.get("state") or "active")
    evict = r.get("evict")
    activity = "busy" if r.get("busy") is True else f"idle {seconds(float(r.get('idle_for_s', 0)))}"
    timeout = r.get("idle_timeout_ms")
    if r.get("busy") is False and isinstance(timeout, int | float) and not isinstance(timeout, bool):
        activity += f" of {seconds(timeout / 1000)}"  # unloaded once idle that long (docs/warm.md)
    if r.get("model"):
        activity += f", {r['model']}"
    if state != "evicting" or not isinstance(evict, dict):
        return f"{state} ({activity})" if "busy" in r else state
    by = str(evict.get("by", "?"))
    detail = ["idle timeout" if by == "idle_timeout" else f"for {by[:8]}"]
    left = evict.get("deadline_in_s")
    if isinstance(left, int | float):
        detail.append(f"{seconds(float(left))} left" if left >= 0 else f"{seconds(-float(left))} overdue")
    if "busy" in r:
        detail.append(activity)
    return f"evicting ({', '.join(detail)})"


def lease_table(leases: list[dict[str, Any]], title: str = "") -> Table:
    cols = [
        Column("LEASE"),
        Column("SERVICE"),
        Column("PRIORITY", styles=PRIORITY_STYLES),
        Column("GPU"),
        Column("SIZE", True),
        Column("STATE", styles={"active": "green", "evicting": "bold yellow"}),
        Column("AGE", True),
        Column("EXPIRES IN", styles={"expired": "bold red"}),
        Column("EVICTIONS", True),
        Column("TOKEN", True),
        Column("HOLDER", styles=HOLDER_STYLES),
    ]
    rows = [
        [
            str(r.get("id", ""))[:8],
            r.get("service", "-"),
            r.get("priority", "-"),
            "+".join(lease_gpus(r)) or "-",
            gb(as_int(r.get("vram_mib", 0))),
            _lease_state(r),
            seconds(float(r["age_s"])),
            _expires(r["expires_in_s"]),
            as_int(r.get("evictions", 0)),
            r.get("token", "-"),
            _holder(r),
        ]
        for r in leases
    ]
    return Table(title, cols, rows)


def queue_table(queue: list[dict[str, Any]], why: bool = False, title: str = "") -> Table:
    cols = [
        Column("#", True),
        Column("REQUEST"),
        Column("SERVICE"),
        Column("PRIORITY", styles=PRIORITY_STYLES),
        Column("SIZE", True),
        Column("GPU"),
        Column("WAITING", True),
        Column("EXPIRES IN", styles={"expired": "bold red"}),
        Column("HOLDER", styles=HOLDER_STYLES),
        *([Column("WHY", style="italic")] if why else []),
    ]
    rows = [
        [
            r["position"],
            str(r.get("id", ""))[:8],
            r.get("service", "-"),
            r.get("priority", "-"),
            gb(as_int(r.get("vram_mib", 0))),
            r.get("pin") or "any",
            seconds(float(r["waiting_s"])),
            _expires(r.get("expires_in_s")),
            _holder(r),
            *([r.get("why", "")] if why else []),
        ]
        for r in queue
    ]
    return Table(title, cols, rows)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _clock(value: object) -> str:
    """A Redis-time stamp (ms) as local time; anything else as it is."""
    if isinstance(value, int | float) and value > 0:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value / 1000))
    return str(value) if value not in (None, "") else "?"


def hold_lines(snap: dict[str, Any]) -> list[Line]:
    """One line per eviction hold: ``gpu0: held for 3f2b9c1e of chat, high (8192 MiB, evicting 2 leases: ...)``."""
    queued = {str(r.get("id")): r for r in snap["queue"]}
    out = []
    for g in snap["gpus"]:
        hold = g.get("hold")
        if not hold:
            continue
        request = str(hold.get("id", "?"))
        who = queued.get(request, {})
        victims = hold.get("victims") or []
        text = (
            f"  {g['id']}: held for {request[:8]}"
            + (f" of {who.get('service', '?')}, {who.get('priority', '?')}" if who else "")
            + f" ({hold['vram_mib']} MiB, evicting {_plural(len(victims), 'lease')}"
            + (f": {', '.join(v[:8] for v in victims)}" if victims else "")
            + ")"
        )
        left = hold.get("deadline_in_s")
        if isinstance(left, int | float):
            text += f"; deadline {'in ' + seconds(float(left)) if left >= 0 else seconds(-float(left)) + ' ago'}"
        out.append(Line(text, "yellow"))
    return out


def offline_lines(snap: dict[str, Any]) -> list[Line]:
    """One line per offline GPU: ``gpu1: offline since ... (host box2): reason``."""
    out = []
    for g in snap["gpus"]:
        off = g.get("offline")
        if off is None:
            continue
        host = f" (host {off['host']})" if off.get("host") else ""
        reason = f": {off['reason']}" if off.get("reason") else ""
        out.append(Line(f"  {g['id']}: offline since {_clock(off.get('since'))}{host}{reason}", "red"))
    return out


#: The leases and queued requests ``status`` and ``top`` list; past it, a line says how many more and which
#: command lists them all (``--json`` keeps every one).
STATUS_ROWS = 50


def _first_rows(table: Table, shown: int, total: int, listing: str) -> list[Block]:
    """``table`` (its first ``shown`` of ``total`` rows), and a line naming the command that lists them all."""
    if total <= shown:
        return [table]
    return [table, Line(f"  ... and {total - shown:,} more: `{listing}` lists them all", "dim")]


def status_view(snap: dict[str, Any], target: Target, gauge: bool = False) -> list[Block]:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap["time"]))
    out: list[Block] = [
        Line(f"Redis {target.describe()}, namespace {snap['namespace']!r}, at {stamp} (Redis clock)", "dim"),
        *(Line(f"Warning: {text}", "bold red") for text in snap.get("warnings", [])),
        Line(),
    ]
    gpus = snap["gpus"]
    if gpus:
        out.append(gpu_table(gpus, bool(snap.get("inventory")), f"GPUs ({len(gpus)})", gauge))
    else:
        out.append(Line(f"GPUs: none registered in namespace {snap['namespace']!r} (no boss has used it yet)"))
    rules = describe_rules(snap.get("policy") or {}, round(float(snap["time"]) * 1000))
    if rules:
        out += [Line(), Line(f"Rules ({len(rules)}, in force in every process)", "bold")]
        out += [Line(f"  {rule}") for rule in rules]
    else:
        out += [Line(), Line("Rules: the defaults (strict order; nothing paused, capped or limited in time)", "dim")]
    offline = offline_lines(snap)
    if offline:
        out += [Line(), Line(f"Offline ({len(offline)}: no new grants there)", "bold"), *offline]
    holds = hold_lines(snap)
    if holds:
        out += [Line(), Line(f"Held for queued requests ({len(holds)}: VRAM being freed by eviction)", "bold")]
        out += holds
    out.append(Line())
    leases = snap["leases"]
    shown = leases[:STATUS_ROWS]
    out += _first_rows(lease_table(shown, f"Leases ({len(leases)})"), len(shown), len(leases), "gpuboss leases")
    out.append(Line())
    queue = snap["queue"]
    title = f"Queue ({len(queue)} waiting, in the order they will be served)"
    shown = queue[:STATUS_ROWS]
    table = queue_table(shown, why=any("why" in r for r in shown), title=title)
    out += _first_rows(table, len(shown), len(queue), "gpuboss queue")
    return out


# ---------------------------------------------------------------- the click group


#: click >= 8.2 raises NoArgsIsHelpError (a UsageError, exit code 2) for a group called without a command;
#: click 8.1 prints the help and exits 0 itself. A bare group's help goes to stdout, whole, in both.
class _NeverRaised(click.UsageError):
    """Stands for NoArgsIsHelpError under click 8.1, which does not have it."""


_NO_ARGS_IS_HELP: type[click.UsageError] = getattr(click.exceptions, "NoArgsIsHelpError", _NeverRaised)


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
        except _NO_ARGS_IS_HELP as err:  # a bare group (`gpuboss`, `gpuboss server`): its help, as click does
            click.echo(err.ctx.get_help() if err.ctx is not None else err.format_message(), color=None)
            code = err.exit_code  # click's code for it (2), as without this group
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
    help="Redis to use (redis://, rediss://, unix://, redis+sentinel://, redis+cluster://; docs/topologies.md). "
    f"Default: {ENV_REDIS_URL}, the config file, else the embedded Redis of this user.",
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
@click.option(
    "--plain", is_flag=True, help="Plain text tables even on a terminal (as when piped, or with NO_COLOR set)."
)
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
    plain: bool,
    debug: bool,
) -> None:
    """gpuboss: VRAM leases for shared GPUs, coordinated through Redis.

    \b
    gpuboss demo                run the demo on the embedded Redis
    gpuboss status              GPUs, leases and the queue of a namespace
    gpuboss top                 the same, refreshed live
    gpuboss watch --since 10m   what happened, then live events
    gpuboss release ID          force-release a stuck lease
    gpuboss gpus discover       this host's GPUs through NVML (gpus register: register them)
    gpuboss profile 'RTX 4090'  what a GPU model is (--list: all of them)
    gpuboss serve               /health and Prometheus /metrics over HTTP
    gpuboss server status       the embedded Redis (start, stop)

    Exit codes: 0 ok, 1 usage or configuration error, 2 Redis unreachable, 3 a check failed
    (health: no GPU; a demo check), 4 no GPU found on this host (gpus discover/register),
    130 interrupted. See docs/cli.md.
    """
    _setup_logging(ctx, debug)
    ctx.obj = CliState(redis_url, namespace, config_path, connect_timeout, as_json, debug, plain)


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


def _console(err: bool = False) -> Any:
    """A rich console on the current stdout (or stderr): click's test runner swaps them."""
    from rich.console import Console

    return Console(file=sys.stderr if err else sys.stdout, highlight=False, soft_wrap=False)


def _show(state: CliState, blocks: Sequence[Block], err: bool = False) -> None:
    """Print a view: through rich on a terminal, else as plain, stable text."""
    if state.rich(err):
        from gpuboss.fmt import rich_view

        _console(err).print(rich_view(blocks))
    else:
        click.echo(plain(blocks), err=err)


# ---------------------------------------------------------------- gpuboss status


@cli.command(short_help="GPUs, leases and the queue of a namespace (read-only).")
@click.pass_obj
def status(state: CliState) -> None:
    """Show per GPU capacity, reserve, leased, observed (once a sampler reports) and free VRAM, offline GPUs
    and VRAM held for a queued request by an eviction, the leases (with their state) and the queue
    (read-only)."""
    config = state.config()
    target = find_target(config, start=False)
    client = connect(target, config)
    try:
        snap = read_namespace(client, Keys(config.namespace), target.shown, config.connect_timeout)
    finally:
        client.close()
    explain_queue(snap)
    if state.json:
        _echo_json({"redis": {"url": target.shown, "embedded": target.embedded, "pid": target.pid}, **snap})
    else:
        _show(state, status_view(snap, target, gauge=state.rich()))


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


# ---------------------------------------------------------------- shared by the commands below


def _snapshot(state: CliState, target: Target | None = None) -> tuple[BossConfig, Target, dict[str, Any]]:
    """A read-only snapshot of the namespace, with the queue explained."""
    config = state.config()
    target = target or find_target(config, start=False)
    client = connect(target, config)
    try:
        snap = read_namespace(client, Keys(config.namespace), target.shown, config.connect_timeout)
    finally:
        client.close()
    explain_queue(snap)
    return config, target, snap


def _gpu_ids(snap: dict[str, Any], wanted: Sequence[str]) -> set[str]:
    """The gpu ids that ``--gpu`` values name (a GPU id or its ``cuda:N``); an unknown one is an error."""
    ids = set()
    for value in wanted:
        match = [g["id"] for g in snap["gpus"] if value in (g["id"], g["device"])]
        if not match:
            known = ", ".join(f"{g['id']} ({g['device']})" for g in snap["gpus"]) or "none registered"
            raise CliError(f"--gpu {value!r}: no such GPU in namespace {snap['namespace']!r} (known: {known})")
        ids.update(match)
    return ids


def _select(
    records: list[dict[str, Any]],
    services: Sequence[str],
    gpus: set[str] | None,
    priorities: Sequence[str],
    gpu_field: str,
) -> list[dict[str, Any]]:
    out = []
    for rec in records:
        if services and rec.get("service") not in services:
            continue
        if priorities and rec.get("priority") not in priorities:
            continue
        if gpus is not None:
            # a lease over several GPUs matches any of them; an unpinned request may land on any GPU
            where = lease_gpus(rec) if gpu_field == "gpu" else [str(rec.get(gpu_field) or "")]
            where = [w for w in where if w]
            if where and not gpus.intersection(where):
                continue
        out.append(rec)
    return out


def _check_priorities(cfg: BossConfig, snap: dict[str, Any], wanted: Sequence[str]) -> None:
    """``--priority`` values must name a known class: a default one, the config's, the namespace's, or one
    a lease or queued request carries."""
    known = priority_classes(snap, cfg.priorities)
    for value in wanted:
        if value not in known:
            names = ", ".join(known)
            raise CliError(
                f"--priority {value!r}: no such priority class in namespace {snap['namespace']!r} (known: {names})"
            )


def filter_options(fn: Any) -> Any:
    fn = click.option(
        "--priority",
        "priorities",
        multiple=True,
        metavar="CLASS",
        help="Only this priority class: low, normal, high or one the config or namespace defines (repeatable).",
    )(fn)
    fn = click.option(
        "--gpu", "gpus", multiple=True, metavar="ID", help="Only this GPU: an id or cuda:N (repeat for several)."
    )(fn)
    fn = click.option(
        "--service", "services", multiple=True, metavar="NAME", help="Only this service (repeat for several)."
    )(fn)
    return fn


# ---------------------------------------------------------------- gpuboss leases / queue / gpus


@cli.command(short_help="The leases held now (read-only).")
@filter_options
@click.pass_obj
def leases(state: CliState, services: tuple[str, ...], gpus: tuple[str, ...], priorities: tuple[str, ...]) -> None:
    """The leases held now: service, priority, GPU, size, state (active, or evicting: asked to checkpoint
    and hand back its VRAM), age, expiry, evictions so far, fencing token and holder.

    Lease ids are shortened to 8 characters (``--json`` has them whole); ``gpuboss release`` takes a unique
    prefix.
    """
    cfg, _, snap = _snapshot(state)
    _check_priorities(cfg, snap, priorities)
    chosen = _select(snap["leases"], services, _gpu_ids(snap, gpus) if gpus else None, priorities, "gpu")
    if state.json:
        _echo_json(chosen)
        return
    held = sum(as_int(r.get("vram_mib", 0)) for r in chosen)
    _show(state, [lease_table(chosen, f"Leases ({len(chosen)} of {len(snap['leases'])}, {gb(held)} in all)")])


@cli.command(short_help="The waiting requests, in serving order (read-only).")
@filter_options
@click.pass_obj
def queue(state: CliState, services: tuple[str, ...], gpus: tuple[str, ...], priorities: tuple[str, ...]) -> None:
    """The waiting requests in the order they will be served, how long each has waited, and why.

    The queue is strict: everyone waits behind the first request that the policy does not hold back until
    it fits. A request held back (its class paused, by ``gpuboss pause``, a pause rule or a time window; a
    class or service cap reached) waits without blocking the others, and WHY names the rule and its
    figures. ``--gpu`` shows the requests pinned to that GPU and those pinned to none.
    """
    cfg, _, snap = _snapshot(state)
    _check_priorities(cfg, snap, priorities)
    chosen = _select(snap["queue"], services, _gpu_ids(snap, gpus) if gpus else None, priorities, "pin")
    if state.json:
        _echo_json(chosen)
        return
    title = f"Queue ({len(chosen)} of {len(snap['queue'])} waiting, in the order they will be served)"
    _show(state, [queue_table(chosen, why=True, title=title)])


@cli.group(invoke_without_command=True, short_help="The GPUs of the namespace; discover and register this host's.")
@click.pass_context
def gpus(ctx: click.Context) -> None:
    """The GPUs registered in the namespace: capacity, reserve, leased, observed (once a sampler reports)
    and free VRAM, number of leases, offline GPUs and VRAM held for a queued request (read-only).

    \b
    gpuboss gpus              list them
    gpuboss gpus discover     this host's GPUs as NVML reports them (nothing is written)
    gpuboss gpus register     register this host's GPUs in the namespace
    gpuboss gpus remove ID    take a GPU that is gone for good out of the namespace
    """
    if ctx.invoked_subcommand is not None:
        return
    state: CliState = ctx.obj
    _, _, snap = _snapshot(state)
    if state.json:
        _echo_json(snap["gpus"])
        return
    if not snap["gpus"]:
        click.echo(f"no GPU registered in namespace {snap['namespace']!r} (no boss has used it yet)")
        return
    view: list[Block] = [
        gpu_table(snap["gpus"], bool(snap.get("inventory")), f"GPUs ({len(snap['gpus'])})", state.rich())
    ]
    view += offline_lines(snap) + hold_lines(snap)
    _show(state, view)


def _discover(reserve_gb: float | None, state: CliState) -> tuple[Any, list[Any]]:
    """NVML's view of this host (the Discovery) and its leasable GPUs as declarations; exit code 4 (with
    NVML's reason) when NVML is unavailable or finds no GPU."""
    from gpuboss.inventory import declarations
    from gpuboss.nvml import discover

    reserve = state.config().auto_reserve_gb if reserve_gb is None else reserve_gb
    found = discover()
    if not found.available:
        raise CliError(f"no GPU discovered: {found.reason}", EXIT_NO_GPU)
    found_gpus = declarations(found, reserve_gb=reserve)
    if not found_gpus:
        extra = f" ({'; '.join(found.problems)})" if found.problems else ""
        raise CliError(f"no GPU discovered: NVML found no usable GPU on this host{extra}", EXIT_NO_GPU)
    return found, found_gpus


reserve_option = click.option(
    "--reserve-gb",
    type=click.FloatRange(min=0, max=2**20),
    default=None,
    metavar="GB",
    help="VRAM of each GPU never leased out (default: the config's auto_reserve_gb, else 0).",
)


@gpus.command("discover", short_help="This host's GPUs as NVML reports them (nothing is written).")
@reserve_option
@click.pass_obj
def gpus_discover(state: CliState, reserve_gb: float | None) -> None:
    """This host's GPUs through NVML, one per GPU (one per MIG instance of a GPU with MIG enabled): UUID,
    name, memory, PCI bus id, MIG parent, host. Reads NVML only: nothing is written. Exit 4 when NVML is
    unavailable (no NVIDIA driver) or finds no GPU."""
    found, found_gpus = _discover(reserve_gb, state)
    if state.json:
        _echo_json([{**g.model_dump(mode="json"), "capacity_mib": g.capacity_mib} for g in found_gpus])
        return
    rows = [
        [
            g.id,
            g.name,
            gb(g.capacity_mib),
            g.index,
            g.pci_bus_id or "-",
            ".".join(map(str, g.compute_capability)) if g.compute_capability else "-",
            g.parent_uuid or "-",
            g.host,
        ]
        for g in found_gpus
    ]
    cols = [
        Column("UUID"),
        Column("NAME"),
        Column("MEMORY", True),
        Column("INDEX", True),
        Column("PCI BUS ID"),
        Column("CC"),
        Column("MIG PARENT"),
        Column("HOST"),
    ]
    driver = f"driver {found.driver_version}, " if found.driver_version else ""
    view: list[Block] = [Table(f"GPUs on this host ({len(found_gpus)}; NVML: {driver}nothing written)", cols, rows)]
    reserved = [g for g in found_gpus if g.driver_reserved_mib]
    if reserved:
        view.append(
            Line(
                "MEMORY is what CUDA can allocate: the total less what the driver reserves ("
                + ", ".join(f"{g.driver_reserved_mib} MiB on {g.id[:12]}" for g in reserved)
                + ")",
                "dim",
            )
        )
    view += [Line(f"note: {problem}", "yellow") for problem in found.problems]
    _show(state, view)


@gpus.command("register", short_help="Register GPUs in the namespace now: the config's, else this host's.")
@reserve_option
@click.option(
    "--update",
    is_flag=True,
    help="Resize GPUs registered with another capacity or reserve to the sizes declared now (the memory gained "
    "goes to the queue at once; a GPU shrinks only while its leases and the waiting requests still fit).",
)
@click.pass_obj
def gpus_register(state: CliState, reserve_gb: float | None, update: bool) -> None:
    """Register GPUs in the namespace now (a script, as a boss does at its first request), then list the
    namespace's GPUs: the GPUs the config declares, else this host's GPUs discovered through NVML (as with
    `gpus: auto`). Starts the embedded Redis when none is configured. Exit 4 when NVML is needed but
    unavailable, or finds no GPU. A GPU registered with other sizes is a conflict (exit 1) unless --update."""
    from gpuboss.client import GPUBoss

    cfg = state.config()
    settings: dict[str, Any] = {}
    ids = [g.id for g in cfg.gpus]
    if not cfg.gpus:
        if cfg.gpu_discovery == "off":
            raise CliError("the config declares no GPUs and sets gpu_discovery: off: there is nothing to register")
        _, found = _discover(reserve_gb, state)  # the clear exit 4 without NVML, before any boss is built
        ids = [g.id for g in found]
        settings = {
            "gpu_discovery": "auto",
            "auto_reserve_gb": cfg.auto_reserve_gb if reserve_gb is None else reserve_gb,
        }
    elif reserve_gb is not None:
        raise click.UsageError("--reserve-gb applies to discovered GPUs; the config declares its GPUs' reserves")
    target = find_target(cfg, start=True)
    before = {g["id"]: g for g in _snapshot(state, target)[2]["gpus"]} if update else {}
    boss = GPUBoss(config=cfg.model_copy(update={**settings, "redis_url": target.url}))
    try:
        boss.register_gpus(update=update)
    finally:
        boss.close()
    _, _, snap = _snapshot(state, target)
    if state.json:
        _echo_json(snap["gpus"])
        return
    title = f"GPUs of namespace {snap['namespace']!r} ({len(snap['gpus'])})"
    view: list[Block] = [Line(f"registered {_plural(len(ids), 'GPU')}: {', '.join(ids)}")]
    for g in snap["gpus"]:
        old = before.get(g["id"])
        if old is not None and (old["capacity_mib"], old["reserve_mib"]) != (g["capacity_mib"], g["reserve_mib"]):
            view.append(
                Line(
                    f"resized {g['id']}: {gb(old['capacity_mib'])} (reserve {gb(old['reserve_mib'])}) -> "
                    f"{gb(g['capacity_mib'])} (reserve {gb(g['reserve_mib'])})"
                )
            )
    view.append(Line())
    view.append(gpu_table(snap["gpus"], bool(snap.get("inventory")), title, state.rich()))
    _show(state, view)


@gpus.command("remove", short_help="Take GPUs that are gone for good out of the namespace (asks first).")
@click.argument("gpu_ids", nargs=-1, required=True, metavar="GPU_ID...")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def gpus_remove(state: CliState, gpu_ids: tuple[str, ...], yes: bool) -> None:
    """Take GPUs out of the namespace's registry (ids, or unique prefixes of at least 4 characters): a card or a
    host that is gone for good, whose GPUs would otherwise stay, offline, with requests pinned to them waiting.
    One script (lua/unregister-21.lua), refused with nothing changed while a GPU has leases, holds memory for an
    eviction, or a waiting request would have no GPU left that can hold it. A process that declares or
    discovers the GPU registers it again: take it out of the configurations first."""
    from gpuboss.core import Core
    from gpuboss.redis_io import call_script_sync, retry_sync

    cfg, target, snap = _snapshot(state)
    chosen: dict[str, dict[str, Any]] = {}
    for value in gpu_ids:
        found = _named(snap["gpus"], value, "GPU")
        if not found:
            known = ", ".join(str(g["id"]) for g in snap["gpus"]) or "none"
            raise CliError(f"no GPU {value!r} in namespace {snap['namespace']!r} (registered: {known})")
        chosen[found[0]["id"]] = found[0]
    if not yes:
        title = f"About to remove {_plural(len(chosen), 'GPU')} from namespace {snap['namespace']!r}:"
        table = gpu_table(list(chosen.values()), False, "", state.rich())
        _confirm(state, [Line(title), table], "Remove them?", "nothing removed")
    core = Core(cfg)
    call = core.unregister_call(list(chosen))
    client = connect(target, cfg)
    try:
        reply = retry_sync(lambda: call_script_sync(client, call), target.shown, cfg.connect_timeout)
    finally:
        client.close()
    core.check_unregister_reply(reply)
    if state.json:
        _echo_json({"removed": list(chosen)})
        return
    left = _snapshot(state, target)[2]["gpus"]
    view: list[Block] = [Line(f"removed {_plural(len(chosen), 'GPU')}: {', '.join(chosen)}")]
    if left:
        view += [Line(), gpu_table(left, False, f"GPUs of namespace {snap['namespace']!r} ({len(left)})", state.rich())]
    _show(state, view)


# ---------------------------------------------------------------- gpuboss profile


_PRECISION_NAMES = ("fp16", "bf16", "fp8", "int8", "int4", "fp4")


def _precisions(profile: Any) -> str:
    return " ".join(p for p in ("fp32", "tf32", *_PRECISION_NAMES) if profile.supports(p))


@cli.command(short_help="What a GPU model is: memory, compute capability, fast precisions.")
@click.argument("name", required=False)
@click.option("--list", "list_all", is_flag=True, help="List every known GPU profile.")
@click.option(
    "--memory-gb",
    type=click.FloatRange(min=0, min_open=True, max=2**20),
    default=None,
    metavar="GB",
    help="The card's memory, to tell apart variants of one name (a 4060 Ti of 8 or 16 GB).",
)
@click.option(
    "--file",
    "files",
    multiple=True,
    type=click.Path(dir_okay=False),
    metavar="PATH",
    help="A YAML file of more profiles, read after the shipped ones (repeatable).",
)
@click.pass_obj
def profile(state: CliState, name: str | None, list_all: bool, memory_gb: float | None, files: tuple[str, ...]) -> None:
    """The profile of a GPU model, by its short name ('RTX 4090', 'A100 80GB') or the name NVML reports
    ('NVIDIA GeForce RTX 4090'); --list lists them all. An unknown name exits 1 with the near matches."""
    from gpuboss.profiles import get_gpu_profile, load_profiles

    if list_all and name is not None:
        raise click.UsageError("give a GPU model NAME or --list, not both")
    registry = load_profiles(*files)
    if list_all:
        if state.json:
            _echo_json([p.model_dump(mode="json") for p in registry.profiles])
            return
        rows = [
            [p.name, p.architecture or "-", p.compute_capability, gb(p.vram_mib), _precisions(p), p.max_batch_hint]
            for p in registry.profiles
        ]
        cols = [
            Column("NAME"),
            Column("ARCHITECTURE"),
            Column("CC", True),
            Column("VRAM", True),
            Column("PRECISIONS"),
            Column("BATCH HINT", True),
        ]
        _show(state, [Table(f"GPU profiles ({len(rows)})", cols, rows)])
        return
    if name is None:
        raise click.UsageError("give a GPU model NAME (e.g. 'RTX 4090'), or --list")
    memory_mib = None if memory_gb is None else math.ceil(memory_gb * 1024)
    found = get_gpu_profile(name, memory_mib=memory_mib, registry=registry)
    if state.json:
        _echo_json(found.model_dump(mode="json"))
        return
    shown = {
        "name": found.name,
        "aliases": ", ".join(found.aliases) or "-",
        "architecture": found.architecture or "-",
        "compute capability": found.compute_capability,
        "VRAM": f"{gb(found.vram_mib)} ({found.vram_mib} MiB)",
        "precisions": _precisions(found),
        "batch size hint": found.max_batch_hint,
        **({"MIG profile": found.mig_profile} if found.mig_profile else {}),
    }
    _show(state, [Line(f"  {k:<19} {v}") for k, v in shown.items()])


# ---------------------------------------------------------------- gpuboss health


@cli.command(short_help="Is a GPU available? JSON, and the exit code says.")
@click.option(
    "--min-free-gb",
    type=click.FloatRange(min=0, max=1e6),
    default=None,
    metavar="GB",
    help="Count a GPU as available only with at least this much VRAM free now.",
)
@click.pass_obj
def health(state: CliState, min_free_gb: float | None) -> int:
    """Print {"gpu_available": ..., "vram_total": ..., "vram_free": ...} (MiB) and exit 0 when a GPU is
    registered in the namespace and not offline (with --min-free-gb: one with that much free now), 3 when
    none is, 2 when Redis is unreachable."""
    _, _, snap = _snapshot(state)
    report = health_report(snap, None if min_free_gb is None else math.ceil(min_free_gb * 1024))
    click.echo(json.dumps(report, indent=2 if state.json else None))
    return EXIT_OK if report["gpu_available"] else EXIT_CHECK_FAILED


# ---------------------------------------------------------------- gpuboss config check


@cli.group(short_help="Check a configuration file.")
def config() -> None:
    """Configuration files."""


@config.command("check")
@click.argument("path", required=False, type=click.Path(dir_okay=False))
@click.pass_obj
def config_check(state: CliState, path: str | None) -> None:
    """Validate a config file (PATH, else --config, else $GPUBOSS_CONFIG) and print the effective settings:
    the file's, with GPUBOSS_REDIS_URL and the global options applied. Exit 1, naming the field, when it
    is invalid."""
    chosen = path or state.config_path
    values, source = read_config_file(chosen, use_env=chosen is None)
    notes = []
    env_file = os.environ.get(ENV_CONFIG)
    if chosen is not None and env_file and os.path.abspath(env_file) != os.path.abspath(chosen):
        notes.append(f"{ENV_CONFIG}={env_file} is set: from_config() reads that file instead of this one")
    if os.environ.get(ENV_REDIS_URL):
        values["redis_url"] = os.environ[ENV_REDIS_URL]
        notes.append(f"redis_url comes from {ENV_REDIS_URL}")
    overrides = {"redis_url": state.redis_url, "namespace": state.namespace, "connect_timeout": state.connect_timeout}
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = build_config(source, **values)
    settings = cfg.model_dump(mode="json")
    if cfg.redis_url:
        settings["redis_url"] = redact_url(cfg.redis_url)
    if state.json:
        _echo_json({"path": source, "valid": True, "settings": settings, "notes": notes})
        return
    click.echo(f"{source}: valid")
    shown = {
        "redis_url": settings["redis_url"] or "(none: the embedded Redis of this user)",
        "namespace": cfg.namespace,
        "service": cfg.service,
        "default_priority": cfg.default_priority,
        "default_ttl": f"{cfg.default_ttl:g} s",
        "default_timeout": "none (wait forever)" if cfg.default_timeout is None else f"{cfg.default_timeout:g} s",
        "connect_timeout": f"{cfg.connect_timeout:g} s",
        "events_maxlen": cfg.events_maxlen,
    }
    click.echo("\n".join(f"  {k:<17} {v}" for k, v in shown.items()))
    if cfg.gpus:
        rows = [
            [g.id, g.device, g.name or "-", gb(g.capacity_mib), gb(g.reserve_mib), gb(g.capacity_mib - g.reserve_mib)]
            for g in cfg.gpus
        ]
        click.echo(f"GPUs ({len(cfg.gpus)})")
        click.echo(table(["GPU", "DEVICE", "NAME", "CAPACITY", "RESERVE", "LEASABLE"], rows, right={3, 4, 5}))
    elif cfg.gpu_discovery == "auto":
        click.echo(
            "GPUs: auto (this host's GPUs, discovered through NVML at first use, "
            f"reserve {gb(gb_to_mib(cfg.auto_reserve_gb))} each; `gpuboss gpus discover` lists them)"
        )
    elif cfg.gpu_discovery == "off":
        click.echo("GPUs: none declared, discovery off (this service uses the GPUs others registered)")
    else:
        click.echo(
            "GPUs: none declared (this host's GPUs are discovered through NVML at first use where NVML works; "
            "else this service uses the GPUs others registered)"
        )
    for note in notes:
        click.echo(f"note: {note}")


# ---------------------------------------------------------------- gpuboss pause / resume


def _set_paused(state: CliState, priority: str, paused: bool) -> None:
    from gpuboss.core import Core
    from gpuboss.errors import InvalidRequest
    from gpuboss.redis_io import call_script_sync, retry_sync

    cfg = state.config()
    core = Core(cfg)
    try:
        call = core.pause_call(priority, paused, _operator())
    except InvalidRequest as err:
        raise CliError(str(err)) from None
    target = find_target(cfg, start=False)
    client = connect(target, cfg)
    try:
        reply = retry_sync(lambda: call_script_sync(client, call), target.shown, cfg.connect_timeout)
    finally:
        client.close()
    changed, granted = int(reply[0]), int(reply[1])
    if state.json:
        _echo_json({"class": priority, "paused": paused, "changed": bool(changed), "granted": granted})
        return
    word = "paused" if paused else "resumed"
    if not changed:
        click.echo(f"{priority}: already {word}")
        return
    click.echo(
        f"{priority}: {word} in namespace {cfg.namespace!r}" + (f"; granted {granted} waiting" if granted else "")
    )


@cli.command(short_help="Stop grants of a priority class, in every process, at once.")
@click.argument("priority", metavar="CLASS")
@click.pass_obj
def pause(state: CliState, priority: str) -> None:
    """No request of CLASS is granted until `gpuboss resume CLASS`: queued ones wait (they do not fail and
    do not block other classes); active leases continue. An event `paused` records who did it."""
    _set_paused(state, priority, True)


@cli.command(short_help="Restart grants of a paused priority class.")
@click.argument("priority", metavar="CLASS")
@click.pass_obj
def resume(state: CliState, priority: str) -> None:
    """Grant CLASS again; its waiting requests are served in the same step."""
    _set_paused(state, priority, False)


# ---------------------------------------------------------------- gpuboss gc


@cli.command(short_help="Collect expired leases and queue entries now.")
@click.pass_obj
def gc(state: CliState) -> None:
    """Reclaim expired leases and queue entries now (every gpuboss call does this as it goes), then revoke the
    leases and withdraw the queued requests whose process is gone from this machine (killed, or exited without
    releasing: a waiter here does this too, docs/concepts.md), hand the freed VRAM to the queue, and say what
    was collected."""
    from gpuboss.core import Call, Core, Op, ReadHash, ReadQueueHead
    from gpuboss.redis_io import retry_sync, run_flow_sync, send_sync

    cfg = state.config()
    target = find_target(cfg, start=False)
    client = connect(target, cfg)
    core = Core(cfg)

    def perform(op: Op) -> Any:
        if not isinstance(op, Call | ReadHash | ReadQueueHead):
            raise TypeError(f"unknown operation {op!r}")
        return retry_sync(functools.partial(send_sync, client, op), target.shown, cfg.connect_timeout)

    try:
        done = run_flow_sync(core.collect_flow(_operator(), announce=False), perform)
    finally:
        client.close()
    if state.json:
        _echo_json(
            {
                "leases": done.leases,
                "requests": done.requests,
                "revoked": done.revoked,
                "withdrawn": done.withdrawn,
                "granted": done.granted,
            }
        )
        return
    if not (done.leases or done.requests or done.revoked or done.withdrawn):
        click.echo("nothing had expired, and no holder's process is gone")
    for rec in done.leases:
        click.echo(f"expired lease {_lease_line(rec)}")
    for rec in done.requests:
        click.echo(f"expired queue entry {_request_line(rec)}")
    for rec in done.revoked:
        click.echo(f"revoked lease {_lease_line(rec)}: its process is gone")
    for rec in done.withdrawn:
        click.echo(f"withdrew queue entry {_request_line(rec)}: its process is gone")
    if done.granted:
        click.echo(f"granted {done.granted} waiting request(s) the freed VRAM")


def _lease_line(rec: dict[str, Any]) -> str:
    return (
        f"{str(rec.get('id', ''))[:8]}: {rec.get('service', '?')} on {'+'.join(lease_gpus(rec)) or '?'}, "
        f"{gb(as_int(rec.get('vram_mib', 0)))} {rec.get('priority', '?')}, held by {_holder(rec)}"
    )


def _request_line(rec: dict[str, Any]) -> str:
    return (
        f"{str(rec.get('id', ''))[:8]}: {rec.get('service', '?')} waiting for "
        f"{gb(as_int(rec.get('vram_mib', 0)))} {rec.get('priority', '?')}, from {_holder(rec)}"
    )


# ---------------------------------------------------------------- gpuboss release


def _operator() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def _confirm(state: CliState, shown: list[Block], question: str, nothing: str) -> None:
    """Show what is about to change and ask (on stderr); CliError (exit 1) unless confirmed."""
    _show(state, shown, err=state.json)
    try:
        confirmed = click.confirm(question, default=False, err=True)
    except click.Abort:
        confirmed = False
    if not confirmed:
        raise CliError(f"not confirmed: {nothing} (--yes skips the question)")


def _matching(rows: Sequence[dict[str, Any]], value: str) -> list[dict[str, Any]]:
    """The rows whose id is ``value``, else those it is a prefix of (at least 4 characters)."""
    exact = [r for r in rows if r["id"] == value]
    return exact or ([r for r in rows if str(r["id"]).startswith(value)] if len(value) >= 4 else [])


def _named(rows: Sequence[dict[str, Any]], value: str, what: str) -> list[dict[str, Any]]:
    """:func:`_matching`; an error when several match."""
    found = _matching(rows, value)
    if len(found) > 1:
        raise CliError(f"{what} id prefix {value!r} is ambiguous: {', '.join(sorted(str(r['id']) for r in found))}")
    return found


def _resolve_ids(snap: dict[str, Any], wanted: Sequence[str]) -> list[dict[str, Any]]:
    """The leases that ids (or unique prefixes of at least 4 characters) name; any other is an error."""
    chosen: dict[str, dict[str, Any]] = {}
    for value in wanted:
        found = _named(snap["leases"], value, "lease")
        if not found:
            if _matching(snap["queue"], value):  # (by the same rule: a short prefix names no request either)
                raise CliError(
                    f"{value!r} is a queued request, not a lease: a waiting request cannot be force-released "
                    "(its waiter would queue again); stop its process instead"
                )
            short = " (give at least 4 characters of it)" if len(value) < 4 else ""
            raise CliError(f"no lease {value!r} in namespace {snap['namespace']!r}{short}")
        chosen[found[0]["id"]] = found[0]
    return list(chosen.values())


@cli.command(short_help="Force-release leases (an operator's tool).")
@click.argument("lease_ids", nargs=-1, metavar="[LEASE_ID]...")
@click.option("--service", "service", metavar="NAME", help="Every lease of this service.")
@click.option("--expired", is_flag=True, help="Every lease past its expiry (its holder stopped renewing).")
@click.option("--all", "everything", is_flag=True, help="Every lease in the namespace.")
@click.option("--reason", default="", metavar="TEXT", help="Why, for the revoked event (watch, the event log).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def release(
    state: CliState,
    lease_ids: tuple[str, ...],
    service: str | None,
    expired: bool,
    everything: bool,
    reason: str,
    yes: bool,
) -> None:
    """Force-release leases by id (or a unique prefix of one), or select them with --service, --expired or
    --all (asks first unless --yes). Each goes in one script that also hands its VRAM to the waiters and
    logs a `revoked` event; the holder's heartbeat then reports the lease lost (its on_lost runs)."""
    from gpuboss.core import Core, RevokeReply
    from gpuboss.redis_io import call_script_sync, retry_sync

    selecting = service is not None or expired or everything
    if lease_ids and selecting:
        raise click.UsageError("give lease ids, or select with --service/--expired/--all, not both")
    if not lease_ids and not selecting:
        raise click.UsageError("name the leases to release: LEASE_ID..., --service NAME, --expired or --all")
    if everything and (service is not None or expired):
        raise click.UsageError("--all selects every lease: leave out --service and --expired")
    if len(reason) > 200:
        raise click.BadParameter("at most 200 characters", param_hint="--reason")
    cfg, target, snap = _snapshot(state)
    if lease_ids:
        chosen = _resolve_ids(snap, lease_ids)
    else:
        chosen = snap["leases"]
        if service is not None:
            chosen = [r for r in chosen if r.get("service") == service]
        if expired:
            chosen = [r for r in chosen if float(r.get("expires_in_s", 0)) <= 0]
        if not chosen:
            if state.json:
                _echo_json([])
            else:
                click.echo("no lease matches: nothing to release")
            return
        if not yes:
            blocks: list[Block] = [Line(f"About to force-release {len(chosen)} lease(s):"), lease_table(chosen)]
            _confirm(state, blocks, "Force-release them?", "nothing released")
    core = Core(cfg)
    by = _operator()
    client = connect(target, cfg)
    results = []
    try:
        for rec in chosen:
            call = core.revoke_call(str(rec["id"]), by, reason)
            reply = retry_sync(lambda call=call: call_script_sync(client, call), target.shown, cfg.connect_timeout)  # type: ignore[misc]
            code, granted, record = core.revoked(reply)
            if code is RevokeReply.NOT_FOUND and float(rec.get("expires_in_s", 1)) <= 0:
                # past its expiry in the snapshot: an earlier call of this loop (whose script collects every
                # expired lease as it goes) or another process collected it
                code = RevokeReply.EXPIRED
            results.append({"id": rec["id"], "result": code.name.lower(), "granted": granted, "lease": record or rec})
    finally:
        client.close()
    if state.json:
        _echo_json(results)
        return
    for res in results:
        lease = res["lease"]
        what = (
            f"{str(res['id'])[:8]} ({lease.get('service', '?')} on {'+'.join(lease_gpus(lease)) or '?'}, "
            f"{gb(as_int(lease.get('vram_mib', 0)))}, held by {_holder(lease)})"
        )
        if res["result"] == RevokeReply.REVOKED.name.lower():
            line = f"revoked {what}"
        elif res["result"] == RevokeReply.EXPIRED.name.lower():
            line = f"{what} had expired: collected"
        else:
            line = f"{what} was already gone"
        if res["granted"]:
            line += f"; granted {res['granted']} waiting request(s)"
        click.echo(line)


# ---------------------------------------------------------------- gpuboss watch / top


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within: SIGTERM (a supervisor stopping the command, ``kill``) ends it as Ctrl-C does, so that it cleans
    up (gives the screen back, closes its connections) and exits 0, instead of dying with status 143 and a
    terminal left in the alternate screen. Only in the main thread (where signal handlers can be set)."""
    import signal

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop) if threading.current_thread() is threading.main_thread() else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


class SinceType(click.ParamType):  # type: ignore[type-arg]
    """A duration ago (``90s``, ``10m``, ``2h``, ``1d``; a bare number is seconds) or an event id."""

    name = "since"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> timedelta | str:
        if isinstance(value, timedelta):
            return value
        text = str(value)
        if re.fullmatch(r"\d+-\d+", text):
            return text
        match = _DURATION.match(text)
        if not match:
            self.fail(f"{text!r} is not a duration like 30s, 10m, 2h, 1d, nor an event id like 1700000000000-0")
        return timedelta(seconds=float(match[1]) * _UNITS[match[2] or "s"])


#: Event types about no GPU at all (a priority class, the policy, a lease found gone): no "on GPU" part.
NO_GPU_EVENTS = frozenset({"paused", "unpaused", "lost", "policy_changed"})


def format_event(event: Event) -> str:
    """One line for a person: local time, type, lease, service, priority, size, GPU, and the type's details."""
    stamp = time.strftime("%H:%M:%S", time.localtime(event.time)) + f".{event.time_ms % 1000:03d}"
    head = [stamp, f"{event.type:<14}"]
    if event.type in ("gpu_registered", "gpu_resized", "gpu_unregistered"):
        cap, res = as_int(event.get("capacity_mib")), as_int(event.get("reserve_mib"))
        name = event.get("name") or "-"
        line = f"{event.gpu} cuda:{event.get('index', '?')} {name}, {gb(cap)} (reserve {gb(res)})"
        if event.type == "gpu_resized":
            old_cap, old_res = as_int(event.get("old_capacity_mib")), as_int(event.get("old_reserve_mib"))
            line += f", was {gb(old_cap)} (reserve {gb(old_res)}); {gb(as_int(event.get('leased_mib')))} leased"
        return " ".join([*head, line])
    parts = [
        (event.lease or "-")[:8],
        event.service or "-",
        event.priority or "-",
        gb(event.vram_mib) if event.vram_mib is not None else "-",
    ]
    if event.gpu:
        parts.append(f"on {event.gpu}")
    elif event.type not in NO_GPU_EVENTS:  # a request pinned to no GPU
        parts.append("on any GPU")
    detail = []
    if "waited_ms" in event.data and event.get("waited_ms") is not None:
        detail.append(f"waited {seconds(as_int(event.get('waited_ms')) / 1000)}")
    if "held_ms" in event.data and event.get("held_ms") is not None:
        detail.append(f"held {seconds(as_int(event.get('held_ms')) / 1000)}")
    if event.type == "queued":
        detail.append(f"{event.get('ahead', '?')} ahead")
    if event.type == "granted":
        detail.append(f"token {event.get('token', '?')}")
    if event.type == "expired":
        detail.append(f"({event.get('entry', 'lease')})")
    if event.type in ("evict_requested", "evicted", "evict_cancelled", "evict_overdue") and event.get("by"):
        detail.append(f"for {str(event.get('by'))[:8]}")  # the request it makes room for
    elif event.get("by"):  # revoked, paused, unpaused: who did it
        detail.append(f"by {event.get('by')}")
    elif event.type == "revoked":
        detail.append("by ?")
    if event.type == "evict_requested" and event.get("need_mib") is not None:
        detail.append(f"needs {gb(as_int(event.get('need_mib')))} back")
    if event.type == "evicted" and event.get("checkpoint_ms") is not None:
        detail.append(f"checkpoint {seconds(as_int(event.get('checkpoint_ms')) / 1000)}")
        detail.append("queued again" if event.get("resume") else "ended")
    if event.type == "vram_alert":
        detail.append(
            f"pid {event.get('pid', '?')} uses {gb(as_int(event.get('used_mib')))} of "
            f"{gb(as_int(event.get('leased_mib')))} leased"
        )
    if event.type in ("gpu_offline", "gpu_online") and event.get("host"):
        detail.append(f"host {event.get('host')}")
    if event.type in ("evicted", "resumed", "granted") and as_int(event.get("evictions", 0)):
        detail.append(f"evictions {as_int(event.get('evictions'))}")
    if event.get("reason") and event.type != "timed_out":
        detail.append(f"reason: {event.get('reason')}")
    return " ".join([*head, *parts]) + ("  " + ", ".join(detail) if detail else "")


def event_gpus(event: Event, lease_gpus_of: dict[str, list[str]] | None = None) -> list[str]:
    """The GPUs an event is about: its ``gpu``, its ``gpus`` when it lists several, and (``lease_gpus_of``:
    lease id -> GPUs, for the events of a lease over several GPUs, which name only the first) its lease's."""
    out = [event.gpu] if event.gpu else []
    listed = event.get("gpus")
    if isinstance(listed, list):
        out += [str(g) for g in listed]
    if lease_gpus_of and event.lease in lease_gpus_of:
        out += lease_gpus_of[event.lease]
    return list(dict.fromkeys(out))


def _event_matches(
    event: Event,
    types: Sequence[str],
    services: Sequence[str],
    gpus: Sequence[str],
    lease_gpus_of: dict[str, list[str]] | None = None,
) -> bool:
    return (
        (not types or event.type in types)
        and (not services or event.service in services)
        and (not gpus or any(g in gpus for g in event_gpus(event, lease_gpus_of)))
    )


class _LeaseGpus(dict[str, list[str]]):
    """Lease id -> its GPUs, for ``watch --gpu``: an event of a lease over several GPUs names only the first,
    so the lease's record says the rest (read once per lease, while the lease exists)."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        super().__init__()
        self._client = client
        self._keys = keys

    def learn(self, event: Event) -> None:
        if event.lease is None or event.gpu is None or event.lease in self:
            return
        try:
            raw = self._client.hget(self._keys.leases, event.lease)
        except RedisError:
            return
        if isinstance(raw, str | bytes):
            self[event.lease] = lease_gpus(as_json_object(raw.decode() if isinstance(raw, bytes) else raw))


@cli.command(short_help="Live events (--since replays the log first).")
@click.option("--since", type=SinceType(), default=None, help="Replay from the log first: 10m, 2h, 1d, or an event id.")
@click.option(
    "--type", "types", multiple=True, type=click.Choice(list(EVENT_TYPES)), help="Only this type (repeat for several)."
)
@click.option("--service", "services", multiple=True, metavar="NAME", help="Only this service (repeat for several).")
@click.option("--gpu", "gpus", multiple=True, metavar="ID", help="Only this GPU id (repeat for several).")
@click.option("--count", type=click.IntRange(min=1), default=None, help="Stop after this many events.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="SECONDS",
    help="Stop after this long.",
)
@click.pass_obj
def watch(
    state: CliState,
    since: timedelta | str | None,
    types: tuple[str, ...],
    services: tuple[str, ...],
    gpus: tuple[str, ...],
    count: int | None,
    timeout: float | None,
) -> None:
    """Print events as they happen, one line each (--json: one JSON object per line), until Ctrl-C,
    --count or --timeout. See docs/events.md for the types and fields."""
    from gpuboss.events import Subscription

    cfg = state.config()
    target = find_target(cfg, start=False)
    deadline = None if timeout is None else time.monotonic() + timeout
    shown = 0
    keys = Keys(cfg.namespace)
    sub: Subscription | None = None
    client: redis.Redis | None = None
    try:
        # (SIGTERM is taken over before subscribing: a supervisor that sees the subscription may stop it at once)
        with sigterm_as_interrupt():
            sub = Subscription(target.url, keys, since, cfg.connect_timeout)
            client = connect(target, cfg) if gpus else None
            lease_gpus_of = _LeaseGpus(client, keys) if client is not None else None
            while count is None or shown < count:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                event = sub.get(timeout=left)
                if event is None:
                    continue
                matches = _event_matches(event, types, services, gpus)
                if not matches and lease_gpus_of is not None and _event_matches(event, types, services, ()):
                    lease_gpus_of.learn(event)  # a lease over several GPUs, on one of the others?
                    matches = _event_matches(event, types, services, gpus, lease_gpus_of)
                if not matches:
                    continue
                click.echo(json.dumps(event.to_dict(), sort_keys=True) if state.json else format_event(event))
                shown += 1
    except KeyboardInterrupt:
        pass
    finally:
        if sub is not None:
            sub.close()
        if client is not None:
            client.close()


def recent_events(client: redis.Redis, keys: Keys, count: int) -> list[Event]:
    if count <= 0:
        return []
    entries: list[Any] = client.xrevrange(keys.event_log, count=count) or []
    return list(reversed(decode_entries(entries)))


#: How ``top`` colours the events it lists (rich only).
EVENT_STYLES = {
    "revoked": "red",
    "expired": "red",
    "lost": "bold red",
    "timed_out": "yellow",
    "evict_requested": "yellow",
    "evicted": "yellow",
    "vram_alert": "bold red",
    "gpu_offline": "bold red",
    "gpu_online": "green",
    "granted": "green",
}


def top_view(snap: dict[str, Any], target: Target, recent: list[Event], gauge: bool = False) -> list[Block]:
    out = status_view(snap, target, gauge)
    if recent:
        out += [Line(), Line(f"Recent events ({len(recent)})", "bold")]
        out += [Line(f"  {format_event(e)}", EVENT_STYLES.get(e.type, "")) for e in recent]
    return out


@cli.command(short_help="A live, refreshing view of GPUs, leases, queue and events.")
@click.option("--interval", type=click.FloatRange(min=0.1, max=3600), default=2.0, show_default=True, metavar="SECONDS")
@click.option("--events", "n_events", type=click.IntRange(min=0, max=200), default=10, show_default=True)
@click.option("--once", is_flag=True, help="Print one view and exit (no screen clearing).")
@click.pass_obj
def top(state: CliState, interval: float, n_events: int, once: bool) -> None:
    """GPUs, leases, the queue (with why each request waits) and the latest events, refreshed every
    --interval seconds until Ctrl-C. On a terminal it takes the whole screen (rich) and gives it back on
    exit; elsewhere it prints plain views one after another (--json: one JSON object per view)."""
    from gpuboss.redis_io import retry_sync

    cfg = state.config()
    target = find_target(cfg, start=False)
    keys = Keys(cfg.namespace)
    client = connect(target, cfg)

    def read() -> tuple[dict[str, Any], list[Event]]:
        snap = read_namespace(client, keys, target.shown, cfg.connect_timeout)
        explain_queue(snap)
        recent = retry_sync(lambda: recent_events(client, keys, n_events), target.shown, cfg.connect_timeout)
        return snap, recent

    footer = Line(f"(every {interval:g} s; Ctrl-C to quit)", "dim")
    try:
        with sigterm_as_interrupt():
            if state.json:
                while True:
                    snap, recent = read()
                    click.echo(
                        json.dumps({**snap, "events": [e.to_dict() for e in recent]}, sort_keys=True, default=str)
                    )
                    if once:
                        return
                    time.sleep(interval)
            elif once:
                snap, recent = read()
                _show(state, top_view(snap, target, recent, gauge=state.rich()))
            elif state.rich():
                from rich.live import Live

                from gpuboss.fmt import rich_view

                with Live(console=_console(), screen=True, auto_refresh=False, redirect_stderr=False) as live:
                    while True:
                        snap, recent = read()
                        live.update(
                            rich_view([*top_view(snap, target, recent, gauge=True), Line(), footer]), refresh=True
                        )
                        time.sleep(interval)
            else:
                while True:
                    snap, recent = read()
                    click.clear()
                    click.echo(plain([*top_view(snap, target, recent), Line(), footer]))
                    time.sleep(interval)
    except KeyboardInterrupt:
        return
    finally:
        client.close()


# ---------------------------------------------------------------- gpuboss serve


@cli.command(short_help="Serve /health and Prometheus /metrics over HTTP.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(min=0, max=65535), default=8003, show_default=True)
@click.option(
    "--min-free-gb",
    type=click.FloatRange(min=0, max=1e6),
    default=None,
    metavar="GB",
    help="/health counts a GPU as available only with at least this much VRAM free.",
)
@click.pass_obj
def serve(state: CliState, host: str, port: int, min_free_gb: float | None) -> None:
    """Serve /metrics (Prometheus: per-GPU VRAM, queue length, event counters, wait and hold times) and
    /health (the JSON of `gpuboss health`; 200 when a GPU is available, else 503) until Ctrl-C or SIGTERM."""
    from gpuboss.metrics import Exporter, make_server

    cfg = state.config()
    target = find_target(cfg, start=False)
    min_free = None if min_free_gb is None else math.ceil(min_free_gb * 1024)
    exporter = Exporter(target.url, cfg.namespace, cfg.connect_timeout, min_free, classes=cfg.priorities)
    try:
        server = make_server(exporter, host, port)
    except OSError as err:
        exporter.close()
        raise CliError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None

    exporter.start()
    bound_host, bound_port = server.server_address[:2]
    try:
        # (SIGTERM is taken over before the line that says where it listens: a supervisor may stop it on that line)
        with sigterm_as_interrupt():
            log.info(
                "gpuboss: serving http://%s:%s/metrics and /health for namespace %r",
                bound_host,
                bound_port,
                cfg.namespace,
            )
            server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        log.info("gpuboss: stopping")
    finally:
        server.server_close()
        exporter.close()


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``gpuboss`` executable."""
    cli.main(args=args, prog_name="gpuboss")


if __name__ == "__main__":  # pragma: no cover
    main()
