"""The queue's WHY column (``gpuboss queue``, ``status``, ``top``) for requests that the scheduling policy holds
back: a runtime pause, a pause rule, a time window, and the class and service caps, named with their figures
as the scripts decide them (lua/includes/state.lua ``held_back``); and the head the queue then waits for, the
first request that is not held back (lua/includes/grant.lua ``grant_waiting``). Each case is set up through
the public API and the CLI against a real redis-server."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from click.testing import CliRunner, Result
from gpuboss import GPUBoss, Keys, Lease
from gpuboss.cli import _operator, cli
from gpuboss.events import replay
from gpuboss.snapshot import describe_rules, explain_queue

from tests.conftest import raw_client
from tests.threads import WAIT_S, in_thread, until

GPUS2 = [
    {"id": "gpu0", "name": "RTX 4090", "vram_gb": 24, "index": 0, "reserve_gb": 1},
    {"id": "gpu1", "name": "RTX 4080", "vram_gb": 16, "index": 1},
]
#: How long a waiter of these tests waits at most: each test makes its waiters grantable before it ends.
WAITER_TIMEOUT = 30.0


@pytest.fixture(autouse=True)
def no_outside_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPUBOSS_REDIS_URL", raising=False)
    monkeypatch.delenv("GPUBOSS_CONFIG", raising=False)


def gpuboss(url: str, namespace: str, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--redis-url", url, "--namespace", namespace, *args])


class Scene:
    """The bosses, leases and waiting requests of one test; everything granted is released at its end."""

    def __init__(self, url: str, namespace: str) -> None:
        self.url, self.namespace = url, namespace
        self.bosses: list[GPUBoss] = []
        self.leases: list[tuple[GPUBoss, Lease]] = []
        self.waiters: list[tuple[Any, dict[str, Any], GPUBoss]] = []
        self.client = raw_client(url)

    def boss(self, service: str, **settings: Any) -> GPUBoss:
        made = GPUBoss(self.url, namespace=self.namespace, gpus=GPUS2, service=service, **settings)
        self.bosses.append(made)
        return made

    def hold(self, boss: GPUBoss, gb: float, **kw: Any) -> Lease:
        lease = boss.acquire(gb, timeout=0, **kw)
        self.leases.append((boss, lease))
        return lease

    def release(self, lease: Lease) -> None:
        boss = next(b for b, held in self.leases if held is lease)
        self.leases.remove((boss, lease))
        boss.release(lease)

    def wait(self, boss: GPUBoss, call: Callable[[], Any]) -> None:
        """Start ``call`` (a request that queues) on a thread and wait until the queue has one more entry."""
        before = self.client.zcard(Keys(self.namespace).queue)
        thread, out = in_thread(call)
        self.waiters.append((thread, out, boss))
        until(lambda: self.client.zcard(Keys(self.namespace).queue) > before, "the request queued")

    def queue(self) -> dict[str, dict[str, Any]]:
        """``gpuboss --json queue``, by service."""
        done = gpuboss(self.url, self.namespace, "--json", "queue")
        assert done.exit_code == 0, done.output
        return {r["service"]: r for r in json.loads(done.stdout)}

    def close(self) -> None:
        for thread, out, boss in self.waiters:
            thread.join(WAITER_TIMEOUT + WAIT_S)
            value = out.get("value")  # (an error: the request timed out, the test failed before it let it go)
            if isinstance(value, Lease):
                self.leases.append((boss, value))
        for boss, lease in self.leases:
            if lease.active:
                boss.release(lease)
        for boss in reversed(self.bosses):
            boss.close()
        self.client.close()


@pytest.fixture
def scene(real_url: str, namespace: str) -> Iterator[Scene]:
    made = Scene(real_url, namespace)
    try:
        yield made
    finally:
        made.close()


def _row(text: str, service: str) -> str:
    return next(line for line in text.splitlines() if f" {service} " in line)


# ---------------------------------------------------------------- against a real redis-server


def test_why_names_a_paused_class_and_the_head_behind_it(scene: Scene) -> None:
    """``gpuboss pause high``: the high request waits without blocking anyone, WHY says who paused its class,
    and the queue waits for the first request that is not held back (#2), not for #1."""
    url, ns = scene.url, scene.namespace
    assert gpuboss(url, ns, "pause", "high").exit_code == 0
    chat, urgent, api, late = (scene.boss(s) for s in ("chat", "urgent", "api", "late"))
    held = scene.hold(chat, 20, device="gpu0")  # gpu0: 3 GB free, gpu1: 16 GB
    scene.wait(urgent, lambda: urgent.acquire(1, priority="high", timeout=WAITER_TIMEOUT))
    scene.wait(api, lambda: api.acquire(20, priority="normal", timeout=WAITER_TIMEOUT))
    scene.wait(late, lambda: late.acquire(1, priority="low", device="gpu1", timeout=WAITER_TIMEOUT))
    try:
        text = gpuboss(url, ns, "queue")
        assert text.exit_code == 0, text.output
        first = _row(text.stdout, "urgent")
        assert first.split()[0] == "1"
        assert re.search(rf"class high paused by {re.escape(_operator())} [\d.]+ (ms|s) ago$", first), first
        assert _row(text.stdout, "api").endswith("needs 20.0 GB, at most 16.0 GB free (on gpu1)")
        assert _row(text.stdout, "late").endswith("behind #2 (strict order)")

        data = scene.queue()
        assert [data[s]["position"] for s in ("urgent", "api", "late")] == [1, 2, 3]
        assert data["urgent"]["why"].startswith(f"class high paused by {_operator()} ")
        assert data["late"]["why"] == "behind #2 (strict order)"

        status = gpuboss(url, ns, "status")
        assert status.exit_code == 0, status.output
        assert _row(status.stdout, "urgent").split(" class high paused by ")[1].startswith(_operator())
        assert _row(status.stdout, "late").endswith("behind #2 (strict order)")
        top = json.loads(gpuboss(url, ns, "--json", "top", "--once").stdout)
        assert top["policy"]["paused"]["high"]["by"] == _operator()
        assert [r["why"] for r in top["queue"]][1:] == [data["api"]["why"], "behind #2 (strict order)"]
    finally:
        assert gpuboss(url, ns, "resume", "high").exit_code == 0
        scene.release(held)  # api and late fit now


def test_why_names_a_pause_rule_and_a_time_window(scene: Scene) -> None:
    """``pause: [{class: low, while: [high]}]`` while a high lease is active, and a window pausing ``normal``
    now: WHY names the rule (with the leases it waits on) and the window (with the time it has left)."""
    now = datetime.now(UTC)
    start, end = now - timedelta(minutes=2), now + timedelta(minutes=5)  # (an end before the start spans midnight)
    policy = {
        "pause": [{"class": "low", "while": ["high"]}],
        "windows": [{"class": "normal", "pause": f"{start:%H:%M}-{end:%H:%M}", "tz": "UTC"}],
    }
    chat, batch, api = (scene.boss(s, **policy) for s in ("chat", "batch", "api"))
    high = scene.hold(chat, 1, priority="high")  # its first acquire stores the rules
    scene.wait(batch, lambda: batch.acquire(1, priority="low", timeout=WAITER_TIMEOUT))
    scene.wait(api, lambda: api.acquire(1, priority="normal", timeout=WAITER_TIMEOUT))
    try:
        text = gpuboss(scene.url, scene.namespace, "queue")
        assert text.exit_code == 0, text.output
        window = _row(text.stdout, "api")
        assert window.split()[0] == "1", text.stdout
        assert re.search(r"class normal paused by a time window, for [2-5] min \d\d s more$", window), window
        rule = _row(text.stdout, "batch")
        assert rule.endswith("class low paused while class high has 1 lease (pause rule)"), rule
        data = scene.queue()
        assert data["batch"]["why"] == "class low paused while class high has 1 lease (pause rule)"
    finally:
        scene.release(high)  # the pause rule lets go; a boss without windows removes them and serves the queue
        ops = scene.boss("ops", windows=[])
        scene.hold(ops, 1)


def test_why_names_the_caps_and_their_figures(scene: Scene) -> None:
    """A class's and a service's lease caps, and a service's VRAM cap: each request waits on its own cap."""
    caps = {
        "services": {"ai": {"max_leases": 1}, "embed": {"max_vram_gb": 6}},
        "classes": {"high": {"max_leases": 1}},
    }
    ai, embed, web = (scene.boss(s, caps=caps) for s in ("ai", "embed", "web"))
    held = [scene.hold(ai, 1), scene.hold(embed, 4), scene.hold(web, 1, priority="high")]
    scene.wait(ai, lambda: ai.acquire(1, timeout=WAITER_TIMEOUT))
    scene.wait(embed, lambda: embed.acquire(4, timeout=WAITER_TIMEOUT))
    scene.wait(web, lambda: web.acquire(1, priority="high", timeout=WAITER_TIMEOUT))
    try:
        text = gpuboss(scene.url, scene.namespace, "queue")
        assert text.exit_code == 0, text.output
        assert _row(text.stdout, "web").split()[0] == "1"
        assert _row(text.stdout, "web").endswith("class high at its cap of 1 lease")
        assert _row(text.stdout, "ai").endswith("service ai at its cap of 1 lease")
        assert _row(text.stdout, "embed").endswith("service embed would exceed its 6.0 GB cap (4.0 GB held + 4.0 GB)")
        snap = json.loads(gpuboss(scene.url, scene.namespace, "--json", "status").stdout)
        assert snap["usage"]["svc:ai"] == 1 and snap["usage"]["svcmib:embed"] == 4096
        assert snap["policy"]["caps"]["services"]["embed"] == {"mib": 6144}
    finally:
        for lease in held:
            scene.release(lease)


def test_why_of_a_growth_names_the_vram_cap_not_the_lease_cap(scene: Scene) -> None:
    """A growth (``lease.resize``) adds no lease: the service at its cap of 1 lease is not what holds it back,
    its VRAM cap is."""
    ai = scene.boss("ai", caps={"services": {"ai": {"max_leases": 1, "max_vram_gb": 6}}})
    lease = scene.hold(ai, 4)
    scene.wait(ai, lambda: lease.resize(8, timeout=WAITER_TIMEOUT))
    try:
        (row,) = json.loads(gpuboss(scene.url, scene.namespace, "--json", "queue").stdout)
        assert row["grow_of"] == lease.id and row["position"] == 1
        assert row["why"] == "service ai would exceed its 6.0 GB cap (4.0 GB held + 4.0 GB)"
    finally:  # a boss with a larger cap stores it, and its acquire serves the queue: the growth is granted
        ops = scene.boss("ops", caps={"services": {"ai": {"max_leases": 1, "max_vram_gb": 8}}})
        scene.hold(ops, 1)
        until(lambda: lease.vram_mib == 8192, "the growth was granted")


def test_why_under_backfill_names_the_gpus_kept_for_the_blocked_requests_ahead(scene: Scene) -> None:
    """With ``queueing: backfill`` a request may pass the blocked ones ahead on a GPU none of them waits for
    (lua/includes/grant.lua): each blocked request keeps the GPU it waits for, and WHY names what is kept for
    whom, instead of "behind #1 (strict order)"."""
    big, mid, small, owner = (scene.boss(s, queueing="backfill") for s in ("big", "mid", "small", "owner"))
    on_gpu0 = scene.hold(owner, 20, device="gpu0")  # gpu0: 3 GB free of 23
    on_gpu1 = scene.hold(owner, 10, device="gpu1")  # gpu1: 6 GB free of 16
    scene.wait(big, lambda: big.acquire(20, timeout=WAITER_TIMEOUT))  # only gpu0 is that large: kept for #1
    scene.wait(mid, lambda: mid.acquire(8, timeout=WAITER_TIMEOUT))  # gpu1 has the most free: kept for #2
    scene.wait(small, lambda: small.acquire(2, timeout=WAITER_TIMEOUT))  # either would do: both are kept
    data = scene.queue()
    assert data["big"]["why"] == "needs 20.0 GB, at most 6.0 GB free (on gpu1)"
    assert data["mid"]["why"] == "needs 8.0 GB, at most 6.0 GB free (on gpu1)"
    assert data["small"]["why"] == (
        "needs 2.0 GB; gpu0 (3.0 GB free) is kept for #1, gpu1 (6.0 GB free) is kept for #2"
    )
    scene.release(on_gpu1)  # gpu1: 16 GB free: #2 and then #3 go there, #1 still waits for gpu0
    until(lambda: list(scene.queue()) == ["big"], "mid and small granted past big")
    scene.release(on_gpu0)
    until(lambda: not scene.queue(), "big granted")


def test_why_under_overtake_counts_the_passes_left(scene: Scene) -> None:
    """With ``overtake: 1`` a later request that fits passes the blocked one (its ticket counts the pass), and
    `gpuboss queue` says how many passes are left: one before, none after (then it holds the rest, strict)."""
    big, small, owner = (scene.boss(s, overtake=1) for s in ("big", "small", "owner"))
    held = scene.hold(owner, 20, device="gpu0")  # gpu0: 3 GB free of 23
    scene.hold(owner, 16, device="gpu1")  # gpu1: full
    scene.wait(big, lambda: big.acquire(20, timeout=WAITER_TIMEOUT))
    assert scene.queue()["big"]["why"] == (
        "needs 20.0 GB, at most 3.0 GB free (on gpu0); later requests may pass it 1 more time"
    )
    scene.leases.append((small, small.acquire(2, timeout=WAITER_TIMEOUT)))  # passes it (a try, timeout=0, would not)
    assert scene.queue()["big"]["why"] == "needs 20.0 GB, at most 1.0 GB free (on gpu0)"
    scene.wait(small, lambda: small.acquire(1, timeout=WAITER_TIMEOUT))  # fits, but no pass is left
    assert scene.queue()["small"]["why"] == "behind #1 (strict order)"
    scene.release(held)  # gpu0: 21 GB free: big, then small, in one call
    until(lambda: not scene.queue(), "both granted")
    granted = [e.data["service"] for e in replay(scene.url, scene.namespace) if e.type == "granted"]
    assert granted[-3:] == ["small", "big", "small"]


def test_status_names_the_rules_in_force(scene: Scene) -> None:
    """`gpuboss status` says which scheduling rules the namespace runs (the policy hash, as the scripts read it),
    or that it runs the defaults; a class paused by `gpuboss pause` shows with who paused it."""
    plain = gpuboss(scene.url, scene.namespace, "--plain", "status")
    assert "Rules: the defaults (strict order; nothing paused, capped or limited in time)" in plain.stdout
    rules = {
        "queueing": "backfill",
        "overtake": 3,
        "pause": [{"class": "low", "while": ["high"], "evict": True}],
        "caps": {"services": {"ai": {"max_leases": 2, "max_vram_gb": 6}}, "classes": {"high": {"max_leases": 1}}},
        "max_hold": {"low": {"seconds": 7200, "action": "revoke"}},
        "aging": {"every_s": 600, "max_boost": 1},
    }
    boss = scene.boss("ops", **rules)
    scene.hold(boss, 1)  # (its first acquire stores the rules)
    assert gpuboss(scene.url, scene.namespace, "pause", "normal").exit_code == 0
    try:
        text = gpuboss(scene.url, scene.namespace, "--plain", "status")
        assert text.exit_code == 0, text.output
        lines = text.stdout.splitlines()
        start = lines.index("Rules (8, in force in every process)")
        assert lines[start + 1 : start + 9] == [
            "  queueing backfill: a later request may use a GPU that none of the blocked ones ahead waits for",
            "  overtake 3: a request that does not fit may be passed 3 times",
            f"  class normal paused by gpuboss pause ({_operator()})",
            "  class low paused while high is active, evicting its leases",
            "  service ai capped at 2 leases, 6.0 GB",
            "  class high capped at 1 lease",
            "  class low leases held at most 2 h 00 min, then revoked",
            "  aging: a waiting request moves up a class per 10 min 00 s waited, at most 1",
        ]
        assert lines[start + 9] == ""
    finally:
        assert gpuboss(scene.url, scene.namespace, "resume", "normal").exit_code == 0


def test_rules_described_from_the_policy_as_the_scripts_read_it() -> None:
    now = 1_000_000
    windows = [
        {"class": "low", "from": now - 60_000, "to": now + 90_000},
        {"class": "low", "from": now + 90_000, "to": now + 150_000},  # adjacent: the pause runs on
        {"class": "batch", "from": now + 60_000, "to": now + 120_000},
    ]
    assert describe_rules({"windows": windows}, now) == [
        "class batch paused in time windows (not paused now)",
        "class low paused in time windows (paused now, for 2 min 30 s more)",
    ]
    assert describe_rules({}, now) == []
    assert describe_rules({"queueing": "strict", "overtake": 0}, now) == []  # the defaults, stored
    # Shapes the scripts would not read as a rule are left out: a class unpaused as false, a pause rule with no
    # class to wait on, a cap without a limit, a max_hold without its time, aging without its interval.
    odd = {
        "paused": {"low": False},
        "pause": [{"class": "low", "while": []}, "x"],
        "caps": {"services": {"ai": {}}},
        "max_hold": {"low": {"action": "evict"}},
        "aging": {"max_boost": 1},
    }
    assert describe_rules(odd, now) == []
    assert describe_rules({"max_hold": {"low": {"ms": 1500}}}, now) == [
        "class low leases held at most 1.5 s, then asked to checkpoint (evict)"
    ]
    assert describe_rules({"pause": [{"class": "batch", "while": ["high", "critical"]}]}, now) == [
        "class batch paused while high or critical is active"
    ]


def test_why_of_a_request_over_two_gpus_waits_for_both(scene: Scene) -> None:
    wide, owner = scene.boss("wide"), scene.boss("owner")
    held = scene.hold(owner, 10, device="gpu1")  # gpu1: 6 GB free; gpu0: 23
    scene.wait(wide, lambda: wide.acquire(24, gpus=2, timeout=WAITER_TIMEOUT))  # 12 GB on each of two GPUs
    assert scene.queue()["wide"]["why"] == "needs 2 GPUs of one host with 12.0 GB free each: at most 1"
    scene.release(held)
    until(lambda: not scene.queue(), "granted over both GPUs")


# ---------------------------------------------------------------- the rules' corners, on a snapshot


def _snap(policy: dict[str, Any], usage: dict[str, int], queue: list[dict[str, Any]]) -> dict[str, Any]:
    gpus = [
        {"id": "gpu0", "free_mib": 8192, "offline": None, "hold": None},
    ]
    entries = [{"position": i, "id": f"r{i}", "vram_mib": 1024, **e} for i, e in enumerate(queue, start=1)]
    return {"time": 1_000_000.0, "gpus": gpus, "policy": policy, "usage": usage, "queue": entries}


def test_held_back_follows_the_scripts_order_and_corners() -> None:
    now = 1_000_000_000  # ms, the snapshots' time
    hour = 3_600_000
    # two windows of one class that meet (a window over midnight, every day): paused until the later one ends
    windows = [
        {"class": "low", "from": now - hour, "to": now + hour},
        {"class": "low", "from": now + hour, "to": now + 3 * hour},
        {"class": "normal", "from": now + hour, "to": now + 2 * hour},  # not yet
    ]
    caps = {"services": {"ai": {"leases": 1, "mib": 2048}}, "classes": {"high": {"leases": 0}}}
    snap = _snap(
        {"windows": windows, "caps": caps, "paused": {"batch": {}}},
        {"svc:ai": 3, "svcmib:ai": 1024},
        [
            {"priority": "high", "service": "web"},  # a cap of 0 leases holds every request back
            {"priority": "low", "service": "ai"},  # the window comes before the caps
            {"priority": "normal", "service": "ai"},  # cap lowered below what is held
            {"priority": "normal", "service": "ai", "grow_of": "L1"},  # a growth: only the VRAM cap
            {"priority": "normal", "service": "ai", "grow_of": "L1", "vram_mib": 2048},
            {"priority": "batch", "service": "x"},  # paused with no record of who
            {"priority": "normal", "service": "web", "vram_mib": 16384},  # the head: held back by nothing
            {"priority": "normal", "service": "web"},
        ],
    )
    explain_queue(snap)
    assert [e["why"] for e in snap["queue"]] == [
        "class high at its cap of 0 leases",
        "class low paused by a time window, for 3 h 00 min more",
        "service ai over its cap of 1 lease (3 active)",
        "fits on gpu0 now: granted by the next call",
        "service ai would exceed its 2.0 GB cap (1.0 GB held + 2.0 GB)",
        "class batch paused",
        "behind #4 (strict order)",
        "behind #4 (strict order)",
    ]
    # no policy (a snapshot of an older namespace, or one without rules): nothing is held back
    bare = _snap({}, {}, [{"priority": "low", "service": "ai"}])
    explain_queue(bare)
    assert bare["queue"][0]["why"] == "fits on gpu0 now: granted by the next call"


def test_backfill_looks_past_64_blocked_requests_and_one_over_several_gpus_keeps_none() -> None:
    gpus = [
        {"id": "gpu0", "free_mib": 1024, "leasable_mib": 8192, "offline": None, "hold": None},
        {"id": "gpu1", "free_mib": 2048, "leasable_mib": 8192, "offline": None, "hold": None},
    ]
    wide = {"vram_mib": 4096, "count": 2}  # over two GPUs: waits, but keeps neither (lua target() is nil)
    queue = [wide] + [{"vram_mib": 4096, "pin": "gpu0"}] * 64 + [{"vram_mib": 512}]
    entries = [{"position": i, "id": f"r{i}", **e} for i, e in enumerate(queue, start=1)]
    snap = {"time": 1_000_000.0, "gpus": gpus, "policy": {"queueing": "backfill"}, "usage": {}, "queue": entries}
    explain_queue(snap)
    whys = [e["why"] for e in snap["queue"]]
    assert whys[0] == "needs 2 GPUs of one host with 4.0 GB free each: at most 0"
    assert whys[1] == "needs 4.0 GB, gpu0 has 1.0 GB free"
    assert whys[2] == "needs 4.0 GB; gpu0 (1.0 GB free) is kept for #2" and whys[63] == whys[2]  # 64th blocked
    assert whys[64:] == ["behind 64 blocked requests: backfill looks no further"] * 2
    entries[-1]["position"] = 3  # the same small request third in line: gpu1 is free for it
    snap["queue"] = [entries[0], entries[1], entries[-1]]
    explain_queue(snap)
    assert snap["queue"][2]["why"] == "fits on gpu1 now: granted by the next call"


def test_why_of_a_request_over_several_gpus_counts_them_on_one_host() -> None:
    gpus = [
        {"id": f"gpu{i}", "host": host, "free_mib": free, "leasable_mib": 8192, "offline": None, "hold": None}
        for i, (host, free) in enumerate([("a", 4096), ("a", 1024), ("b", 4096), ("b", 4096), ("b", 512)])
    ]
    queue = [{"position": 1, "id": "r1", "vram_mib": 4096, "count": 3}]
    snap = {"time": 1_000_000.0, "gpus": gpus, "policy": {}, "usage": {}, "queue": queue}
    explain_queue(snap)
    assert queue[0]["why"] == "needs 3 GPUs of one host with 4.0 GB free each: at most 2 (on b)"
    queue[0]["count"] = 2
    explain_queue(snap)
    assert queue[0]["why"] == "fits on gpu2, gpu3 now: granted by the next call"


def test_the_backfill_limit_is_the_scripts_own() -> None:
    """snapshot.BACKFILL_LIMIT mirrors lua/includes/grant.lua's: a change to one must show in the other."""
    from pathlib import Path

    from gpuboss import snapshot

    lua = (Path(__file__).resolve().parent.parent / "lua" / "includes" / "grant.lua").read_text()
    (value,) = re.findall(r"^local BACKFILL_LIMIT = (\d+)$", lua, flags=re.MULTILINE)
    assert int(value) == snapshot.BACKFILL_LIMIT


def test_why_with_overtake_says_how_often_a_blocked_request_may_still_be_passed() -> None:
    """``overtake: 2``: a blocked request passed once neither holds the ones behind it nor keeps its GPU, and
    says so; passed twice, it holds them (strict) or keeps its GPU (backfill), as without the rule."""
    gpus = [{"id": "gpu0", "free_mib": 2048, "leasable_mib": 16384, "offline": None, "hold": None}]
    queue = [
        {"position": 1, "id": "r1", "vram_mib": 8192, "passed": 1},
        {"position": 2, "id": "r2", "vram_mib": 4096},
        {"position": 3, "id": "r3", "vram_mib": 1024},
        {"position": 4, "id": "r4", "vram_mib": 512},
    ]
    snap = {"time": 1_000_000.0, "gpus": gpus, "policy": {"overtake": 2}, "usage": {}, "queue": queue}
    explain_queue(snap)
    assert [e["why"] for e in queue] == [
        "needs 8.0 GB, at most 2.0 GB free (on gpu0); later requests may pass it 1 more time",
        "needs 4.0 GB, at most 2.0 GB free (on gpu0); later requests may pass it 2 more times",
        "fits on gpu0 now: granted by the next call",
        "behind #3 (strict order)",
    ]
    queue[0]["passed"] = 2
    explain_queue(snap)
    assert [e["why"] for e in queue][:2] == ["needs 8.0 GB, at most 2.0 GB free (on gpu0)", "behind #1 (strict order)"]
    snap["policy"] = {"overtake": 2, "queueing": "backfill"}
    explain_queue(snap)
    assert queue[2]["why"] == "needs 1.0 GB; gpu0 (2.0 GB free) is kept for #1; later requests may pass it 2 more times"
    queue[0]["passed"] = 1
    explain_queue(snap)
    assert queue[2]["why"] == "fits on gpu0 now: granted by the next call"
