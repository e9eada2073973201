"""Passwords never leak: not in logs, exception messages (nor their tracebacks), events, or ``gpuboss``
output, whatever the URL form and whatever goes wrong (a refused connection, a wrong password, a bad URL).

Each test gives gpuboss a password that appears nowhere else and looks for it in everything it said.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from click.testing import CliRunner
from gpuboss import AsyncGPUBoss, GPUBoss, events
from gpuboss.cli import cli
from gpuboss.errors import GPUBossError
from gpuboss.server import RedisProcess
from gpuboss.topology import parse_url, redact_url
from hypothesis import assume, given
from hypothesis import strategies as st

from tests.conftest import GPUS
from tests.topologies import free_port, start_node

SECRET = f"pw-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def locked_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A private redis-server whose default user needs ``SECRET``."""
    server = start_node(tmp_path_factory.mktemp("locked"), free_port(), ["--requirepass", SECRET])
    yield server
    server.stop()


@pytest.fixture
def every_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Every logger (gpuboss's, redis-py's, the root) at DEBUG."""
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="gpuboss")
    caplog.set_level(logging.DEBUG, logger="redis")
    return caplog


def said(err: BaseException) -> str:
    """Everything an exception shows: its message, its repr, and the traceback printed for it."""
    return f"{err}\n{err!r}\n{''.join(traceback.format_exception(err))}"


def assert_hidden(*texts: Any, secret: str = SECRET) -> None:
    for text in texts:
        shown = str(text)
        assert secret not in shown, f"the password leaked: {shown[:2000]}"
        assert quote(secret, safe="") not in shown


def good_url(server: RedisProcess) -> str:
    return f"redis://:{SECRET}@127.0.0.1:{server.port}/0"


def refused_urls() -> list[str]:
    """The same password in every URL form, each pointing where nothing listens."""
    port = free_port()
    return [
        f"redis://:{SECRET}@127.0.0.1:{port}/0",
        f"redis://someone:{SECRET}@127.0.0.1:{port}/0",
        f"rediss://:{SECRET}@127.0.0.1:{port}/0?ssl_cert_reqs=none",
        f"redis+sentinel://:{SECRET}@127.0.0.1:{port},127.0.0.1:{free_port()}/mymaster",
        f"redis+sentinel://:{SECRET}@127.0.0.1:{port}/mymaster?sentinel_auth=yes",
        f"redis+cluster://:{SECRET}@127.0.0.1:{port},127.0.0.1:{free_port()}",
    ]


# ---------------------------------------------------------------- a normal run


def test_a_normal_run_shows_no_password(
    locked_server: RedisProcess, every_log: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    ns = f"sec{uuid.uuid4().hex[:8]}"
    url = good_url(locked_server)
    boss = GPUBoss(url, namespace=ns, gpus=GPUS, service="secret-keeper")
    with events.subscribe(url, ns) as sub:
        with boss.lease(vram_gb=2):
            pass
        seen = [sub.get(timeout=5) for _ in range(4)]
    boss.close()

    async def async_side() -> None:
        aboss = AsyncGPUBoss(url, namespace=ns, gpus=GPUS)
        async with aboss.lease(vram_gb=1):
            pass
        await aboss.close()

    asyncio.run(async_side())
    logged = every_log.text
    assert ":***@" in logged  # the URL was logged, redacted
    assert_hidden(logged, *(e.to_dict() for e in seen if e is not None), *events.replay(url, ns))
    config = tmp_path / "gpuboss.yaml"
    config.write_text(f"redis_url: {url}\nnamespace: {ns}\n")
    for command in (
        ["status"],
        ["--json", "status"],
        ["health"],
        ["gc"],
        ["config", "check", str(config)],
        ["--debug", "status"],
    ):
        result = CliRunner().invoke(cli, ["--redis-url", url, "--namespace", ns, *command])
        assert result.exit_code in (0, 3), (command, result.output)
        assert_hidden(result.output)


# ---------------------------------------------------------------- failures


@pytest.mark.parametrize("index", range(6), ids=["redis", "user", "rediss", "sentinel", "sentinel-auth", "cluster"])
def test_a_refused_connection_shows_no_password(index: int, every_log: pytest.LogCaptureFixture) -> None:
    url = refused_urls()[index]
    boss = GPUBoss(url, gpus=GPUS, connect_timeout=0.3)
    with pytest.raises(GPUBossError) as err:
        boss.acquire(1, timeout=0)
    assert ":***@" in str(err.value), str(err.value)
    with pytest.raises(GPUBossError) as sub_err:
        events.subscribe(url, connect_timeout=0.3)
    with pytest.raises(GPUBossError) as replay_err:
        events.replay(url, connect_timeout=0.3)
    boss.close()
    base = ["--redis-url", url, "--connect-timeout", "0.3"]
    cli_out = [CliRunner().invoke(cli, [*base, *c]).output for c in (["status"], ["--debug", "health"])]
    assert_hidden(said(err.value), said(sub_err.value), said(replay_err.value), every_log.text, *cli_out)


def test_a_wrong_password_shows_neither_password(
    locked_server: RedisProcess, every_log: pytest.LogCaptureFixture
) -> None:
    wrong = f"wrong-{uuid.uuid4().hex}"
    url = f"redis://:{wrong}@127.0.0.1:{locked_server.port}/0"
    boss = GPUBoss(url, gpus=GPUS, connect_timeout=5)
    with pytest.raises(GPUBossError, match="refused the credentials") as err:
        boss.acquire(1, timeout=0)

    async def async_side() -> BaseException:
        aboss = AsyncGPUBoss(url, gpus=GPUS, connect_timeout=5)
        try:
            await aboss.acquire(1, timeout=0)
        except GPUBossError as caught:
            return caught
        finally:
            await aboss.close()
        raise AssertionError("a wrong password was accepted")

    async_err = asyncio.run(async_side())
    with pytest.raises(GPUBossError, match="refused the credentials") as sub_err:
        events.subscribe(url)
    boss.close()
    outputs = []
    for command in (["status"], ["--debug", "status"], ["--json", "health"], ["watch", "--since", "1m"]):
        result = CliRunner().invoke(cli, ["--redis-url", url, *command])
        assert result.exit_code == 1 and "refused the credentials" in result.output, (command, result.output)
        assert "Traceback" not in result.output or "--debug" in command
        outputs.append(result.output)
    for secret in (wrong, SECRET):
        assert_hidden(said(err.value), said(async_err), said(sub_err.value), every_log.text, *outputs, secret=secret)


@pytest.mark.parametrize(
    "url",
    [
        f"redis://:{SECRET}@127.0.0.1:notaport/0",
        f"redis://:{SECRET}@127.0.0.1:6379/zero",
        f"redis+sentinel://:{SECRET}@h:1,h:2",
        f"redis+cluster://:{SECRET}@h:1/5",
        f"rediss://:{SECRET}@h:1/0?ssl_ca_certs=/nonexistent",
        f"redis://:{SECRET}@h:1/0?unknown=1",
        f"http://:{SECRET}@h:1/0",
        f"redis://:{SECRET}@h:1,h:2/0",
    ],
)
def test_a_bad_url_is_a_config_error_without_the_password(url: str) -> None:
    with pytest.raises(GPUBossError) as err:
        GPUBoss(url, gpus=GPUS)
    assert "redis_url" in str(err.value)
    result = CliRunner().invoke(cli, ["--redis-url", url, "status"])
    assert result.exit_code == 1
    assert_hidden(said(err.value), result.output)


# ---------------------------------------------------------------- redact_url itself


password_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=30).map(
    lambda s: "pw-" + s
)


@given(password=password_text, scheme=st.sampled_from(["redis", "rediss", "redis+sentinel", "redis+cluster", "unix"]))
def test_redact_url_never_shows_a_percent_encoded_password(password: str, scheme: str) -> None:
    encoded = quote(password, safe="")
    hosts = "/tmp/r.sock" if scheme == "unix" else "h1:1,h2:2/svc" if "sentinel" in scheme else "h1:1"
    url = f"{scheme}://user:{encoded}@{hosts}"
    shown = redact_url(url)
    assert encoded not in shown and "user:***@" in shown
    assert parse_url(url).password == password


@given(password=st.text(min_size=1, max_size=20).map(lambda s: "pw-" + s), rest=st.text(max_size=30))
def test_redact_url_never_raises_and_hides_even_an_unencoded_password(password: str, rest: str) -> None:
    assume(password not in rest)
    shown = redact_url(f"redis://u:{password}@host:1/0{rest}")
    assert password not in shown
