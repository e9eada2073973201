"""Which Redis a URL names and how to reach it: one server, a Sentinel-managed primary, or a Cluster.

``docs/topologies.md`` has the long version. The forms:

==================================================================  ==========================================
URL                                                                 what
==================================================================  ==========================================
``redis://[[user]:password@]host[:port][/db]``                      one server (``rediss://``: over TLS)
``unix://[[user]:password@]/path/to/redis.sock[?db=N]``             one server on a unix socket
``redis+sentinel://[[user]:password@]host:port[,host:port...]/name[/db]``  the primary that the Sentinels
                                                                    call ``name`` (``rediss+sentinel://``: TLS)
``redis+cluster://[[user]:password@]host:port[,host:port...]``      a Redis Cluster, reached from any of the
                                                                    seed nodes (``rediss+cluster://``: TLS)
``fakeredis://name``                                                an in-process fake (tests, demos)
==================================================================  ==========================================

The credentials in the URL are those of the data nodes (the primary and its replicas, or the cluster's
nodes). Sentinels are asked without credentials unless ``?sentinel_auth=yes`` says they want the same ones.

Options go in the query: the TLS files and checks (``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``,
``ssl_cert_reqs``, ``ssl_check_hostname``) and a few connection options. No secret goes in the query: the
only secret a URL carries is its password, which :func:`redact_url` hides.

This module only parses; ``redis_io.py`` connects.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote

from gpuboss.errors import ConfigError

Kind = Literal["single", "sentinel", "cluster"]

#: Scheme -> (topology, over TLS).
SCHEMES: dict[str, tuple[Kind, bool]] = {
    "redis": ("single", False),
    "rediss": ("single", True),
    "unix": ("single", False),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
}
FAKE_SCHEME = "fakeredis"
DEFAULT_PORTS: dict[Kind, int] = {"single": 6379, "sentinel": 26379, "cluster": 6379}

CERT_REQS = ("none", "optional", "required")
BOOLEAN_WORDS = dict.fromkeys(("1", "yes", "true", "on"), True) | dict.fromkeys(("0", "no", "false", "off"), False)
#: TLS options: files (which must exist) and checks. Only for the ``rediss`` schemes.
TLS_FILE_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
TLS_OPTIONS = (*TLS_FILE_OPTIONS, "ssl_cert_reqs", "ssl_check_hostname")
#: Connection options any topology takes.
COMMON_OPTIONS = ("client_name", "health_check_interval", "socket_keepalive")
#: Options by topology (``db`` is a path segment except on a unix socket, where it is a query option).
OPTIONS: dict[Kind, tuple[str, ...]] = {
    "single": (*COMMON_OPTIONS, "db", *TLS_OPTIONS),
    "sentinel": (*COMMON_OPTIONS, "sentinel_auth", *TLS_OPTIONS),
    "cluster": (*COMMON_OPTIONS, *TLS_OPTIONS),
}
#: The forms, for error messages.
FORMS = (
    "redis://[[user]:password@]host[:port][/db], rediss://..., unix:///path/to/redis.sock, "
    "redis+sentinel://[[user]:password@]host:port[,host:port...]/service_name[/db], rediss+sentinel://..., "
    "redis+cluster://[[user]:password@]host:port[,host:port...], rediss+cluster://..., fakeredis://name"
)

#: A query option whose name says it holds a secret: never shown (gpuboss takes none, but a URL may have one).
_SECRET_OPTION = re.compile(r"([?&][^=&#]*(?:pass|secret|token)[^=&#]*)=[^&#]*", re.IGNORECASE)


@dataclass(frozen=True)
class Target:
    """A parsed URL of a real Redis (not ``fakeredis://``)."""

    kind: Kind
    tls: bool
    #: (host, port) of the server, the Sentinels or the cluster's seed nodes; empty for a unix socket.
    endpoints: tuple[tuple[str, int], ...]
    #: The Sentinel service name (the primary's name); "" for the other topologies.
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    options: dict[str, str] = field(default_factory=dict)

    @property
    def sentinel_auth(self) -> bool:
        return BOOLEAN_WORDS.get(self.options.get("sentinel_auth", "no").lower(), False)

    def credentials(self) -> dict[str, Any]:
        """``username``/``password`` keyword arguments for redis-py (only those given)."""
        out: dict[str, Any] = {}
        if self.username:
            out["username"] = self.username
        if self.password is not None:
            out["password"] = self.password
        return out

    def tls_kwargs(self) -> dict[str, Any]:
        """redis-py's TLS keyword arguments: ``ssl=True`` and the ``ssl_*`` options of the URL."""
        if not self.tls:
            return {}
        out: dict[str, Any] = {"ssl": True}
        for name in TLS_FILE_OPTIONS:
            if name in self.options:
                out[name] = self.options[name]
        if "ssl_cert_reqs" in self.options:
            out["ssl_cert_reqs"] = self.options["ssl_cert_reqs"].lower()
        if "ssl_check_hostname" in self.options:
            out["ssl_check_hostname"] = BOOLEAN_WORDS[self.options["ssl_check_hostname"].lower()]
        return out

    def connection_kwargs(self) -> dict[str, Any]:
        """The common options as redis-py keyword arguments."""
        out: dict[str, Any] = {}
        if "client_name" in self.options:
            out["client_name"] = self.options["client_name"]
        if "health_check_interval" in self.options:
            out["health_check_interval"] = int(self.options["health_check_interval"])
        if "socket_keepalive" in self.options:
            out["socket_keepalive"] = BOOLEAN_WORDS[self.options["socket_keepalive"].lower()]
        return out


def scheme_of(url: str) -> str:
    """The scheme of a URL (lower case), or "" when it has none."""
    head, sep, _ = url.partition("://")
    return head.lower() if sep else ""


def is_cluster_url(url: str | None) -> bool:
    return bool(url) and SCHEMES.get(scheme_of(url or ""), ("single", False))[0] == "cluster"


def _split(url: str) -> tuple[str, str, str, str]:
    """scheme, netloc, path, query of a URL, without urllib's single-host assumptions (a netloc may list
    several ``host:port``); the fragment is dropped."""
    scheme, _, rest = url.partition("://")
    rest = rest.partition("#")[0]
    rest, _, query = rest.partition("?")
    slash = rest.find("/")
    netloc, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
    return scheme.lower(), netloc, path, query


def redact_url(url: str) -> str:
    """The URL without its password (nor any query option that looks like a secret), for logs and errors.

    Never raises. Everything before the last ``@`` is taken as the credentials, so a password with an
    unescaped ``/``, ``?``, ``#`` or ``@`` is hidden too (at worst, more than the password is).
    """
    head, sep, rest = url.partition("://")
    if not sep:
        return url if "@" not in url else "***"
    userinfo, at, tail = rest.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        rest = f"{user}:***@{tail}" if colon else rest
    return f"{head}://{_SECRET_OPTION.sub(lambda m: m.group(1) + '=***', rest)}"


def _bad(url: str, problem: str) -> ConfigError:
    return ConfigError(f"redis_url {redact_url(url)!r}: {problem}")


def _endpoint(url: str, text: str, kind: Kind) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6]:port
        host, close, rest = text[1:].partition("]")
        if not close or (rest and not rest.startswith(":")):
            raise _bad(url, f"{text!r} is not a host[:port]")
        port_text = rest[1:]
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise _bad(url, f"a host is missing in {text!r}")
    if not port_text:
        return host, DEFAULT_PORTS[kind]
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise _bad(url, f"the port of {text!r} must be a number from 1 to 65535")
    return host, int(port_text)


def _options(url: str, query: str, kind: Kind, tls: bool, scheme: str) -> dict[str, str]:
    options: dict[str, str] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise _bad(url, "the query must be name=value pairs joined by '&'") from None
    allowed = OPTIONS[kind]
    for name, value in pairs:
        if name not in allowed:
            raise _bad(url, f"unknown option {name!r}; a {scheme}:// URL takes {', '.join(allowed)}")
        options[name] = value
    for name in TLS_OPTIONS:
        if name in options and not tls:
            tls_scheme = scheme.replace("redis", "rediss", 1) if scheme != "unix" else "rediss"
            raise _bad(url, f"option {name!r} needs TLS: use {tls_scheme}://")
    for name in TLS_FILE_OPTIONS:
        if name in options and not os.path.exists(options[name]):
            raise _bad(url, f"option {name}={options[name]!r}: no such file or folder")
    if "ssl_cert_reqs" in options and options["ssl_cert_reqs"].lower() not in CERT_REQS:
        raise _bad(url, f"option ssl_cert_reqs must be one of {', '.join(CERT_REQS)}")
    for name in ("ssl_check_hostname", "socket_keepalive", "sentinel_auth"):
        if name in options and options[name].lower() not in BOOLEAN_WORDS:
            raise _bad(url, f"option {name} must be yes or no")
    if "health_check_interval" in options and not options["health_check_interval"].isdigit():
        raise _bad(url, "option health_check_interval must be whole seconds")
    if "db" in options and not options["db"].isdigit():
        raise _bad(url, "option db must be a database number")
    return options


def parse_url(url: str) -> Target:
    """Parse a Redis URL (every form but ``fakeredis://``), raising :class:`ConfigError` naming the problem."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(f"redis_url {redact_url(str(url))!r} is not a URL; the forms are: {FORMS}")
    scheme, netloc, path, query = _split(url)
    if scheme not in SCHEMES:
        raise _bad(url, f"unknown scheme {scheme + '://'!r}; the forms are: {FORMS}")
    kind, tls = SCHEMES[scheme]
    userinfo, at, hosts = netloc.rpartition("@")
    username: str | None = None
    password: str | None = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    options = _options(url, query, kind, tls, scheme)
    if scheme == "unix":
        if not path:
            raise _bad(url, "a unix:// URL names the socket's path: unix:///path/to/redis.sock")
        db = int(options.get("db", "0"))
        return Target(kind, tls, (), "", db, username, password, options)
    if not hosts:
        raise _bad(url, "no host:port")
    endpoints = tuple(_endpoint(url, h, kind) for h in hosts.split(","))
    segments = [s for s in path.split("/") if s]
    if kind == "single":
        if len(endpoints) != 1:
            raise _bad(url, f"{scheme}:// takes one host; several are for redis+sentinel:// or redis+cluster://")
        if len(segments) > 1 or (segments and not segments[0].isdigit()) or ("db" in options and segments):
            raise _bad(url, "the path must be the database number: /0")
        db = int(segments[0]) if segments else int(options.get("db", "0"))
        return Target(kind, tls, endpoints, "", db, username, password, options)
    if kind == "sentinel":
        if not segments or len(segments) > 2 or (len(segments) == 2 and not segments[1].isdigit()):
            raise _bad(url, "the path must be the Sentinel service name, then optionally the database: /mymaster/0")
        db = int(segments[1]) if len(segments) == 2 else 0
        return Target(kind, tls, endpoints, unquote(segments[0]), db, username, password, options)
    if segments and segments != ["0"]:
        raise _bad(url, "a Redis Cluster has only database 0: leave the path empty")
    return Target(kind, tls, endpoints, "", 0, username, password, options)


def hash_tag(namespace: str) -> str | None:
    """The hash tag Redis Cluster hashes the namespace's keys by, or None when it has none.

    Redis hashes the part between the first ``{`` and the next ``}`` when it is not empty; every key of a
    namespace starts with ``<namespace>:``, so a tag inside the namespace puts them all in one slot.
    """
    start = namespace.find("{")
    if start < 0:
        return None
    end = namespace.find("}", start + 1)
    if end <= start + 1:
        return None
    return namespace[start + 1 : end]


def check_cluster_namespace(namespace: str) -> None:
    """Raise ValueError when ``namespace`` cannot be used on a Redis Cluster (no hash tag)."""
    if hash_tag(namespace) is None:
        bare = namespace.replace("{", "").replace("}", "") or "gpuboss"
        raise ValueError(
            f"namespace {namespace!r} has no hash tag, so its keys would spread over the cluster's slots and its "
            f"scripts could not run: on a Redis Cluster (redis+cluster://) the namespace must carry one, e.g. "
            f"namespace: '{{{bare}}}'"
        )
