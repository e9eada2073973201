"""TLS (``rediss://`` with certificates made here) and the minimal Redis ACL of ``docs/security.md``.

The ACL test reads the ``ACL SETUSER`` line from the doc and creates exactly that user on a private
redis-server, so the doc and what gpuboss needs cannot drift apart unnoticed.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from gpuboss import AsyncGPUBoss, ConfigError, GPUBoss, Keys, events
from gpuboss.cli import cli
from gpuboss.errors import RedisUnavailable
from gpuboss.server import RedisProcess
from gpuboss.topology import parse_url

from tests.conftest import GPUS
from tests.topologies import (
    Certs,
    Unavailable,
    client,
    free_port,
    make_certs,
    redis_62,
    start_node,
    start_tls_node,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent
SECURITY_DOC = ROOT / "docs" / "security.md"
#: Stands for the password in the rules until :func:`make_user` puts a real one in.
PW = "PASSWORD-PLACEHOLDER"


# ---------------------------------------------------------------- the documented ACL


def documented_acl(namespace: str, password: str) -> list[str]:
    """The arguments of the doc's ``ACL SETUSER`` line, for this namespace and password."""
    lines = [line for line in SECURITY_DOC.read_text().splitlines() if line.startswith("ACL SETUSER ")]
    assert len(lines) == 1, "docs/security.md must have exactly one ACL SETUSER line"
    words = lines[0].replace("<namespace>", namespace).replace("<password>", password).split()
    return words[3:]  # after ACL SETUSER <user>


def granted_commands(rules: list[str]) -> set[str]:
    return {r[1:].lower() for r in rules if r.startswith("+")}


def script_commands() -> set[str]:
    """Every command the scripts call (``redis.call('X', ...)`` in lua/)."""
    found = set()
    for path in (ROOT / "lua").rglob("*.lua"):
        found |= {m.lower() for m in re.findall(r"redis\.p?call\(\s*'([A-Za-z]+)'", path.read_text())}
    return found


def test_the_documented_acl_grants_every_command_the_scripts_run() -> None:
    rules = documented_acl("ns", "pw")
    missing = script_commands() - granted_commands(rules)
    assert not missing, f"docs/security.md's ACL lacks {sorted(missing)}, which lua/ scripts call"
    assert "-@all" in rules and "resetkeys" in rules and "resetchannels" in rules
    assert [r for r in rules if r[0] in "~&"] == ["~ns:*", "&ns:*"]


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = start_node(tmp_path_factory.mktemp("acl"), free_port())
    yield server
    server.stop()


def make_user(server: RedisProcess, rules: list[str]) -> tuple[str, str]:
    """A fresh ACL user with these rules; its name and password."""
    name, password = f"u{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    client(server.port).acl_setuser(name, reset=True)  # start from nothing
    client(server.port).execute_command("ACL", "SETUSER", name, *[r.replace(f">{PW}", f">{password}") for r in rules])
    return name, password


def user_url(server: RedisProcess, name: str, password: str) -> str:
    return f"redis://{name}:{password}@127.0.0.1:{server.port}/0"


def test_gpuboss_works_with_exactly_the_documented_acl(acl_server: RedisProcess) -> None:
    ns = f"acl{uuid.uuid4().hex[:8]}"
    name, password = make_user(acl_server, documented_acl(ns, PW))
    url = user_url(acl_server, name, password)
    admin = client(acl_server.port)
    with pytest.raises(redis.exceptions.NoPermissionError):  # the user really is restricted
        redis.Redis.from_url(url).get("elsewhere")

    boss = GPUBoss(url, namespace=ns, gpus=GPUS, service="acl")
    waiter_boss = GPUBoss(url, namespace=ns, gpus=GPUS, service="acl-waiter")
    with events.subscribe(url, ns) as sub:
        big = boss.acquire(24, device="gpu0")
        got: list[object] = []
        waiter = threading.Thread(target=lambda: got.append(waiter_boss.acquire(24, device="gpu0", timeout=10)))
        waiter.start()
        wait_until(lambda: admin.zcard(Keys(ns).queue), 10, "the waiter to queue behind the big lease")
        assert boss.release(big) is True  # hands gpu0 to the waiter
        waiter.join(10)
        assert len(got) == 1
        handed = got[0]
        types = []
        while types.count("granted") < 2 and (event := sub.get(timeout=5)) is not None:
            types.append(event.type)
        assert "queued" in types and types.count("granted") >= 2, types

    assert admin.info("commandstats")["cmdstat_fcall"]["calls"] > 0  # the function library, loaded by this user
    assert "cmdstat_evalsha" not in admin.info("commandstats")
    admin.function_flush()  # "Function not found" -> FUNCTION LOAD, as this user
    boss.release(boss.acquire(1, ttl=5))
    admin.script_flush()
    short = boss.acquire(1, ttl=0.2)
    boss._heartbeat.forget(short.id)  # its holder "dies": the lease expires, and collect reclaims it
    wait_until(lambda: boss.collect()["leases"] == 1, 10, "the expired lease to be collected")
    assert [e.type for e in events.replay(url, ns)][:2] == ["gpu_registered", "gpu_registered"]

    base = ["--redis-url", url, "--namespace", ns]
    for command in (["status"], ["--json", "leases"], ["gc"], ["health"]):
        result = CliRunner().invoke(cli, [*base, *command])
        assert result.exit_code == 0, (command, result.output)
    revoke = CliRunner().invoke(cli, [*base, "release", getattr(handed, "id", ""), "--yes"])
    assert revoke.exit_code == 0, revoke.output

    async def async_side() -> None:
        aboss = AsyncGPUBoss(url, namespace=ns, gpus=GPUS, service="acl-async")
        async with events.asubscribe(url, ns) as asub:
            async with aboss.lease(vram_gb=2):
                pass
            assert await asub.get(timeout=5) is not None
        await aboss.close()

    asyncio.run(async_side())
    boss.close()
    waiter_boss.close()
    assert not admin.hgetall(Keys(ns).leases)


def test_the_documented_acl_on_redis_6_without_the_function_rules(tmp_path: Path) -> None:
    """Redis 6.2 has no functions and refuses an ACL that names them: docs/security.md says to leave out
    ``+fcall +function|load`` there. The rest is enough, the allow-oom scripts' first line (a DEL) included."""
    server = start_node(tmp_path, free_port(), binary=redis_62())
    try:
        ns = f"acl{uuid.uuid4().hex[:8]}"
        rules = documented_acl(ns, PW)
        with pytest.raises(redis.exceptions.ResponseError, match="fcall"):
            make_user(server, rules)
        name, password = make_user(server, [r for r in rules if r not in ("+fcall", "+function|load")])
        admin = client(server.port)
        with GPUBoss(user_url(server, name, password), namespace=ns, gpus=GPUS, service="acl-6") as boss:
            held = boss.acquire(24, device="gpu0", ttl=1)
            time.sleep(1.5)  # renewed (renew: an allow-oom script, first line DEL) past its TTL
            assert not held.lost and boss.release(held) is True
            assert boss.collect() == {"leases": 0, "requests": 0, "revoked": 0, "withdrawn": 0, "granted": 0}
        assert admin.info("commandstats")["cmdstat_evalsha"]["calls"] >= 4
        assert not admin.hgetall(Keys(ns).leases)
    finally:
        server.stop()


@pytest.mark.parametrize("drop", [("+fcall",), ("+function|load",)], ids=["no-fcall", "no-function-load"])
def test_a_user_without_functions_runs_the_scripts_by_evalsha(acl_server: RedisProcess, drop: tuple[str, ...]) -> None:
    """Redis 6.2 has no functions; a user may lack them: every call goes by EVALSHA then, with the same result."""
    ns = f"acl{uuid.uuid4().hex[:8]}"
    admin = client(acl_server.port)
    admin.function_flush()  # so that this user would have to load the library itself
    name, password = make_user(acl_server, [r for r in documented_acl(ns, PW) if r not in drop])
    admin.config_resetstat()
    with GPUBoss(user_url(acl_server, name, password), namespace=ns, gpus=GPUS, service="acl-old") as boss:
        with boss.lease(vram_gb=4) as device:
            assert device.startswith("cuda:") and admin.hlen(Keys(ns).leases) == 1
        assert boss.collect() == {"leases": 0, "requests": 0, "revoked": 0, "withdrawn": 0, "granted": 0}
    stats = admin.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] >= 3
    assert not admin.hgetall(Keys(ns).leases)


@pytest.mark.parametrize(
    ("drop", "replace", "needle"),
    [
        (("+evalsha", "+fcall"), None, "evalsha"),
        (("+publish",), None, "script can't run this command|permissions to run the 'publish' command"),
        (("+hgetall",), None, "hgetall"),
        (("~NS:*",), "~other:*", "No permissions to access a key|no permissions to access"),
        (("&NS:*",), "&other:*", "channel"),
    ],
    ids=["no-fcall-no-evalsha", "no-publish-in-scripts", "no-hgetall", "other-keys", "other-channels"],
)
def test_a_missing_permission_is_one_clear_error(
    acl_server: RedisProcess, drop: tuple[str, ...], replace: str | None, needle: str
) -> None:
    ns = f"acl{uuid.uuid4().hex[:8]}"
    rules = [r for r in documented_acl(ns, PW) if r not in {d.replace("NS", ns) for d in drop}]
    if replace is not None:
        rules.append(replace)
    name, password = make_user(acl_server, rules)
    url = user_url(acl_server, name, password)
    if drop[0].startswith("&"):
        with pytest.raises(ConfigError, match="lacks a permission") as err:
            events.subscribe(url, ns, connect_timeout=1)
        boss = None
    else:
        boss = GPUBoss(url, namespace=ns, gpus=GPUS, connect_timeout=1)
        with pytest.raises(ConfigError, match="lacks a permission") as err:
            boss.acquire(1, timeout=0)
    message = str(err.value)
    assert re.search(needle, message, re.IGNORECASE), message
    assert "docs/security.md" in message and password not in message
    result = CliRunner().invoke(cli, ["--redis-url", url, "--namespace", ns, "status"])
    if drop[0] in ("+hgetall", "~NS:*"):
        assert result.exit_code == 1 and "lacks a permission" in result.output
        assert "Traceback" not in result.output and password not in result.output
    if boss is not None:
        boss.close()
    assert not client(acl_server.port).hgetall(Keys(ns).leases)


def test_wrong_password_is_refused_at_once(acl_server: RedisProcess) -> None:
    ns = f"acl{uuid.uuid4().hex[:8]}"
    name, password = make_user(acl_server, documented_acl(ns, PW))
    boss = GPUBoss(user_url(acl_server, name, "not-" + password), namespace=ns, gpus=GPUS, connect_timeout=30)
    with pytest.raises(ConfigError, match="refused the credentials") as err:
        boss.acquire(1, timeout=0)  # no 30 s of retries: a wrong password does not get better
    assert password not in str(err.value) and ":***@" in str(err.value)
    boss.close()


# ---------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    try:
        return make_certs(tmp_path_factory.mktemp("certs"))
    except Unavailable as why:
        pytest.skip(str(why))


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[RedisProcess]:
    try:
        server = start_tls_node(tmp_path_factory.mktemp("tls"), certs)
    except Unavailable as why:
        pytest.skip(str(why))
    yield server
    server.stop()


def tls_url(server: RedisProcess, certs: Certs, **extra: str) -> str:
    options = {
        "ssl_ca_certs": str(certs.ca),
        "ssl_certfile": str(certs.client_cert),
        "ssl_keyfile": str(certs.client_key),
        **extra,
    }
    return f"rediss://127.0.0.1:{server.port}/0?" + "&".join(f"{k}={v}" for k, v in options.items())


def test_leases_events_and_cli_over_tls(tls_server: RedisProcess, certs: Certs) -> None:
    ns = f"tls{uuid.uuid4().hex[:8]}"
    url = tls_url(tls_server, certs)
    boss = GPUBoss(url, namespace=ns, gpus=GPUS, service="tls")
    with events.subscribe(url, ns) as sub:
        held = boss.acquire(24, device="gpu0")
        got: list[object] = []
        waiter = threading.Thread(target=lambda: got.append(boss.acquire(24, device="gpu0", timeout=10)))
        waiter.start()
        event = sub.get(timeout=5)
        while event is not None and event.type != "queued":
            event = sub.get(timeout=5)
        assert event is not None
        boss.release(held)
        waiter.join(10)
        assert len(got) == 1
    status = CliRunner().invoke(cli, ["--redis-url", url, "--namespace", ns, "status"])
    assert status.exit_code == 0, status.output

    async def async_side() -> None:
        aboss = AsyncGPUBoss(url, namespace=ns, gpus=GPUS)
        async with aboss.lease(vram_gb=1) as device:
            assert device.startswith("cuda:")
        await aboss.close()

    asyncio.run(async_side())
    boss.close()


def test_tls_without_a_client_certificate_or_with_another_ca_is_unavailable(
    tls_server: RedisProcess, certs: Certs, tmp_path: Path
) -> None:
    other = make_certs(tmp_path / "other")
    for url, reason in (
        (tls_url(tls_server, certs, ssl_ca_certs=str(other.ca)), "certificate verify failed"),
        (f"rediss://127.0.0.1:{tls_server.port}/0?ssl_ca_certs={certs.ca}", "unreachable"),
    ):
        boss = GPUBoss(url, gpus=GPUS, connect_timeout=0.5)
        with pytest.raises(RedisUnavailable, match=reason):
            boss.acquire(1, timeout=0)
        boss.close()


def test_plain_redis_to_a_tls_port_is_unavailable(tls_server: RedisProcess) -> None:
    boss = GPUBoss(f"redis://127.0.0.1:{tls_server.port}/0", gpus=GPUS, connect_timeout=0.5)
    with pytest.raises(RedisUnavailable):
        boss.acquire(1, timeout=0)
    boss.close()


@pytest.mark.parametrize(
    ("query", "problem"),
    [
        ("ssl_ca_certs=/nonexistent/ca.crt", "ssl_ca_certs='/nonexistent/ca.crt': no such file"),
        ("ssl_cert_reqs=maybe", "ssl_cert_reqs must be one of none, optional, required"),
        ("ssl_check_hostname=perhaps", "ssl_check_hostname must be yes or no"),
        ("ssl_password=x", "unknown option 'ssl_password'"),
        ("ssl_cert_reqs", "name=value"),
    ],
)
def test_bad_tls_options_are_config_errors(query: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(problem)):
        GPUBoss(f"rediss://:pw@127.0.0.1:6380/0?{query}", gpus=GPUS)


def test_tls_options_need_a_tls_scheme() -> None:
    with pytest.raises(ConfigError, match=r"needs TLS: use rediss://"):
        parse_url("redis://127.0.0.1:6380/0?ssl_cert_reqs=none")
    assert parse_url("rediss://127.0.0.1:6380/0?ssl_cert_reqs=none&ssl_check_hostname=no").tls_kwargs() == {
        "ssl": True,
        "ssl_cert_reqs": "none",
        "ssl_check_hostname": False,
    }
