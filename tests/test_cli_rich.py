"""Rich output on a terminal, plain text elsewhere: FORCE_COLOR / NO_COLOR / --plain / --json through click's
runner, the installed executable on a pseudo-terminal and into a pipe, and `top` live on a terminal."""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from gpuboss import GPUBoss, Lease
from gpuboss.cli import cli

GPUS1 = [{"id": "gpu0", "name": "RTX 4090", "vram_gb": 24, "index": 0, "reserve_gb": 1}]
GPUBOSS = Path(sys.executable).parent / "gpuboss"
ESC = "\x1b["
RULE = "─"  # rich's table header rule (box.SIMPLE_HEAD)
GAUGE = ("█", "░")
ENTER_SCREEN, LEAVE_SCREEN = b"\x1b[?1049h", b"\x1b[?1049l"


@pytest.fixture(autouse=True)
def no_outside_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GPUBOSS_REDIS_URL", "GPUBOSS_CONFIG", "NO_COLOR", "FORCE_COLOR"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def held(real_url: str, namespace: str) -> Iterator[Lease]:
    boss = GPUBoss(real_url, namespace=namespace, service="chat", gpus=GPUS1)
    lease = boss.acquire(20, priority="high", ttl=60)
    try:
        yield lease
    finally:
        boss.release(lease)
        boss.close()


def gpuboss(url: str, namespace: str, *args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, ["--redis-url", url, "--namespace", namespace, *args], env=env)


@pytest.mark.parametrize("command", [["status"], ["leases"], ["queue"], ["gpus"], ["top", "--once"]])
def test_force_color_gives_rich_tables_and_no_color_or_plain_gives_text(
    real_url: str, namespace: str, held: Lease, command: list[str]
) -> None:
    rich = gpuboss(real_url, namespace, *command, env={"FORCE_COLOR": "1", "COLUMNS": "200"})
    assert rich.exit_code == 0, rich.output
    assert ESC in rich.stdout
    if command != ["queue"]:  # the queue is empty: no table to draw
        assert RULE in rich.stdout
    plain = gpuboss(real_url, namespace, *command)
    assert ESC not in plain.stdout and RULE not in plain.stdout and not any(c in plain.stdout for c in GAUGE)
    for env, extra in (({"FORCE_COLOR": "1", "NO_COLOR": "1"}, []), ({"FORCE_COLOR": "1"}, ["--plain"])):
        again = CliRunner().invoke(cli, [*extra, "--redis-url", real_url, "--namespace", namespace, *command], env=env)
        assert again.exit_code == 0, again.output
        assert ESC not in again.stdout and RULE not in again.stdout
        assert _shape(again.stdout) == _shape(plain.stdout)


def _shape(text: str) -> list[str]:
    """The lines of a plain view with times and the stamp left out (they move between two runs)."""
    return [line.split()[0] if line.strip() else "" for line in text.splitlines() if "Redis clock" not in line]


def test_rich_status_carries_the_same_facts(real_url: str, namespace: str, held: Lease) -> None:
    out = gpuboss(real_url, namespace, "status", env={"FORCE_COLOR": "1", "COLUMNS": "250"}).stdout
    text = _strip(out)
    assert "GPUs (1)" in text and "Leases (1)" in text and "Queue (0 waiting" in text
    gpu = next(line for line in text.splitlines() if line.startswith("gpu0"))
    assert "20.0 GB" in gpu and "3.0 GB" in gpu and "USE" in text
    assert gpu.rstrip().endswith("█" * 9 + "░")  # 20 of 23 GB leasable taken
    lease = next(line for line in text.splitlines() if line.startswith(held.id[:8]))
    assert "high" in lease and "active" in lease


def test_json_never_changes_with_the_terminal(real_url: str, namespace: str, held: Lease) -> None:
    for command in (["status"], ["leases"], ["gpus"], ["top", "--once"]):
        forced = gpuboss(real_url, namespace, "--json", *command, env={"FORCE_COLOR": "1"})
        assert forced.exit_code == 0 and ESC not in forced.stdout
        data, plain = json.loads(forced.stdout), json.loads(gpuboss(real_url, namespace, "--json", *command).stdout)
        assert type(data) is type(plain) and len(data) == len(plain)
        if isinstance(data, dict):
            assert data.keys() == plain.keys()
    leases = json.loads(gpuboss(real_url, namespace, "--json", "leases", env={"FORCE_COLOR": "1"}).stdout)
    assert [lease["id"] for lease in leases] == [held.id]


def _strip(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", text)


# ---------------------------------------------------------------- the executable on a terminal


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "COLUMNS", "LINES")}
    env["TERM"] = "xterm-256color"
    env.update(extra)
    return env


class Terminal:
    """The installed executable with a pseudo-terminal (40 x 160) as its stdin, stdout and stderr."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
        self.proc = subprocess.Popen(
            [str(GPUBOSS), *args], stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
        )
        os.close(slave)
        self.output = b""

    def read_until(self, predicate: Any, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.output):
            assert time.monotonic() < deadline, f"not seen in time; output so far: {self.output[-2000:]!r}"
            self._read(0.2)

    def _read(self, wait: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], wait)
        if not ready:
            return True
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: the other side is closed
            return False
        self.output += chunk
        return bool(chunk)

    def finish(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.1)
        while self._read(0.1) and select.select([self.master], [], [], 0)[0]:
            pass
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        code = self.proc.wait()
        os.close(self.master)
        return code


def test_the_executable_draws_rich_on_a_terminal_and_plain_into_a_pipe(
    real_url: str, namespace: str, held: Lease
) -> None:
    args = ["--redis-url", real_url, "--namespace", namespace, "leases"]
    term = Terminal(args, _env())
    assert term.finish() == 0, term.output
    out = term.output.decode()
    assert ESC in out and RULE in out and held.id[:8] in out

    no_color = Terminal(args, _env(NO_COLOR="1"))
    assert no_color.finish() == 0
    text = no_color.output.decode()
    assert ESC not in text and RULE not in text and held.id[:8] in text

    piped = subprocess.run([str(GPUBOSS), *args], env=_env(), capture_output=True, text=True, timeout=60, check=False)
    assert piped.returncode == 0, piped.stderr
    assert ESC not in piped.stdout and RULE not in piped.stdout
    row = next(line for line in piped.stdout.splitlines() if held.id[:8] in line)
    assert row.split()[1:4] == ["chat", "high", "gpu0"]


@pytest.mark.parametrize(
    "stop",
    [
        pytest.param(lambda pid: os.killpg(pid, signal.SIGINT), id="Ctrl-C"),  # as a terminal sends it to its group
        pytest.param(lambda pid: os.kill(pid, signal.SIGTERM), id="SIGTERM"),  # kill, a supervisor: exited 143
    ],
)
def test_top_is_live_on_a_terminal_and_gives_the_screen_back(
    real_url: str, namespace: str, held: Lease, stop: Any
) -> None:
    term = Terminal(["--redis-url", real_url, "--namespace", namespace, "top", "--interval", "0.2"], _env())
    try:
        term.read_until(lambda out: ENTER_SCREEN in out and out.count(b"Recent events") >= 2)  # two frames drawn
    finally:
        stop(term.proc.pid)
        code = term.finish()
    assert code == 0, term.output[-2000:]
    assert LEAVE_SCREEN in term.output[term.output.rindex(ENTER_SCREEN) :]
    frame = _strip(term.output.decode(errors="replace"))
    assert "GPUs (1)" in frame and held.id[:8] in frame and "Ctrl-C to quit" in frame
    assert "Traceback" not in frame
