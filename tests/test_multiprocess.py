"""Many processes leasing from the same GPUs at once never over-commit them.

Eight worker processes (``tests/workers.py stress``) each run a few dozen requests of random size,
priority, timeout and hold time against the two test GPUs on the private redis-server, and log every
request as a JSON line: its outcome and, for a grant, the GPU, the MiB and the interval from the moment
``acquire()`` returned to the moment just before ``release()`` was called, on ``time.monotonic()`` (one
clock for every process on Linux). That interval lies inside the time the lease really existed in Redis,
so if two recorded intervals on one GPU overlap, both leases existed at once. Meanwhile a thread of the
test samples the Redis counters.
"""

from __future__ import annotations

import bisect
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from gpuboss import GPUBoss, Keys
from gpuboss.config import gb_to_mib
from gpuboss.server import RedisProcess

from tests.conftest import GPUS, namespace_keys, raw_client
from tests.workers import Worker

pytestmark = pytest.mark.slow

WORKERS = 8
PER_WORKER = 50
MAX_HOLD_S = 0.15  # far below the shortest TTL the workers use (2 s): a held lease never outlives its TTL

LEASABLE_MIB = {g["id"]: gb_to_mib(g["vram_gb"]) - gb_to_mib(g.get("reserve_gb", 0)) for g in GPUS}
DEVICES = {g["id"]: f"cuda:{g['index']}" for g in GPUS}


def overcommits(intervals: list[tuple[float, float, int]], limit: int) -> tuple[list[str], int]:
    """Sweep the (start, end, mib) intervals of one GPU: the instants where their sum passes ``limit``, and
    the highest sum seen. At equal times an end is taken before a start (a release strictly precedes the
    grant it makes room for, so equal stamps cannot hide a real overlap)."""
    events = sorted([(s, 1, mib) for s, _, mib in intervals] + [(e, 0, -mib) for _, e, mib in intervals])
    total, peak, bad = 0, 0, []
    for t, _, delta in events:
        total += delta
        peak = max(peak, total)
        if total > limit:
            bad.append(f"t={t:.6f}: {total} MiB leased > {limit} MiB")
    return bad, peak


def peak_concurrency(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    now = peak = 0
    for _, delta in events:
        now += delta
        peak = max(peak, now)
    return peak


class Observer(threading.Thread):
    """Samples ``used``, ``capacity`` and ``leases`` in one MULTI until stopped; keeps every violation."""

    def __init__(self, url: str, keys: Keys) -> None:
        super().__init__(name="observer", daemon=True)
        self.client = raw_client(url)
        self.keys = keys
        self.stop = threading.Event()
        self.samples = 0
        self.busy_samples = 0
        self.violations: list[str] = []

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                pipe = self.client.pipeline(transaction=True)
                pipe.hgetall(self.keys.used)
                pipe.hgetall(self.keys.capacity)
                pipe.hgetall(self.keys.leases)
                used, capacity, leases = pipe.execute()
                self.samples += 1
                in_leases: dict[str, int] = {}
                for raw in leases.values():
                    rec = json.loads(raw)
                    in_leases[rec["gpu"]] = in_leases.get(rec["gpu"], 0) + int(rec["vram_mib"])
                if leases:
                    self.busy_samples += 1
                for gpu, cap in capacity.items():
                    u = int(used.get(gpu, 0))
                    if not 0 <= u <= int(cap):
                        self.violations.append(f"sample {self.samples}: used[{gpu}]={u} outside 0..{cap}")
                    if u != in_leases.get(gpu, 0):
                        self.violations.append(
                            f"sample {self.samples}: used[{gpu}]={u} but its leases hold {in_leases.get(gpu, 0)}"
                        )
                time.sleep(0.002)
        except Exception as err:  # noqa: BLE001 - a dead observer must fail the test, not pass silently
            self.violations.append(f"observer crashed: {type(err).__name__}: {err}")
        finally:
            self.client.close()


def test_many_processes_never_overcommit(redis_server: RedisProcess, namespace: str, tmp_path: Path) -> None:
    url = redis_server.url
    keys = Keys(namespace)
    client = raw_client(url)

    # Register the GPUs first, so the observer checks against the capacity from its first sample.
    with GPUBoss(url, namespace=namespace, gpus=GPUS, service="mp-setup") as setup:
        assert setup.release(setup.acquire(1, timeout=0))
    assert {k: int(v) for k, v in client.hgetall(keys.capacity).items()} == LEASABLE_MIB

    logs = [tmp_path / f"worker{i}.jsonl" for i in range(WORKERS)]
    workers = [
        Worker(
            "stress",
            url,
            namespace,
            GPUS,
            *("--seed", str(i), "--count", str(PER_WORKER), "--out", str(logs[i])),
            *("--max-hold", str(MAX_HOLD_S)),
        )
        for i in range(WORKERS)
    ]
    observer = Observer(url, keys)
    try:
        for w in workers:
            w.expect("READY", timeout=30)
        observer.start()
        started = time.monotonic()
        for w in workers:
            w.send("GO")
        for w in workers:
            left = max(1.0, 60 - (time.monotonic() - started))
            w.expect("DONE", timeout=left)  # no request hung
            assert w.wait(timeout=10) == 0, w.err()
        elapsed = time.monotonic() - started
    finally:
        observer.stop.set()
        observer.join(timeout=10)
        for w in workers:
            w.close()

    # -- every request ended in a grant or a LeaseTimeout, and nothing else
    records: list[dict[str, Any]] = []
    for path in logs:
        records += [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == WORKERS * PER_WORKER
    outcomes = {r["outcome"] for r in records}
    assert outcomes <= {"granted", "timeout"}, [r for r in records if r["outcome"] not in ("granted", "timeout")]
    granted = [r for r in records if r["outcome"] == "granted"]
    timed_out = [r for r in records if r["outcome"] == "timeout"]
    assert len(granted) >= len(records) // 3, f"only {len(granted)} of {len(records)} granted"
    assert timed_out, "no request timed out: the run had no contention worth the name"
    assert any(r["timeout"] > 0 for r in timed_out), "no queued request timed out (only timeout=0 ones)"
    assert any(r["t_grant"] - r["t_request"] > 0.02 for r in granted), "no grant ever waited in the queue"
    for r in timed_out:
        # LeaseTimeout came when due (no hang): within the timeout plus scheduling slack on a busy machine.
        assert r["t_done"] - r["t_request"] <= r["timeout"] + 5, r

    # -- every grant is what was asked, was never lost while held, and was still held when released
    for r in granted:
        assert r["gpu"] in LEASABLE_MIB, r
        assert r["device"] == DEVICES[r["gpu"]], r
        assert r["vram_mib"] == gb_to_mib(r["vram_gb"]), r
        assert r["lease_priority"] == r["priority"], r
        assert r["t_request"] <= r["t_grant"] <= r["t_release"], r
        assert r["lost_before_release"] is False, r
        assert r["released"] is True, f"lease {r['id']} was gone before its holder released it: {r}"

    # -- no over-commit at any instant, on either GPU
    for gpu, limit in LEASABLE_MIB.items():
        intervals = [(r["t_grant"], r["t_release"], r["vram_mib"]) for r in granted if r["gpu"] == gpu]
        assert intervals, f"no lease ever landed on {gpu}"
        bad, _peak = overcommits(intervals, limit)
        assert not bad, f"{gpu} over-committed: {bad[:10]}"
    # The test is only worth something if leases really overlapped.
    assert peak_concurrency([(r["t_grant"], r["t_release"]) for r in granted]) >= 3

    # -- fencing tokens: unique, and increasing in grant order. A lease whose acquire() returned before
    # another's acquire() was called was granted first, so its token must be the smaller one.
    tokens = [r["token"] for r in granted]
    assert len(set(tokens)) == len(tokens), "a fencing token was handed out twice"
    assert min(tokens) > 0
    by_grant = sorted(granted, key=lambda r: r["t_grant"])
    grant_times = [r["t_grant"] for r in by_grant]
    prefix_max: list[int] = []
    for r in by_grant:
        prefix_max.append(max(r["token"], prefix_max[-1] if prefix_max else 0))
    for r in granted:
        k = bisect.bisect_left(grant_times, r["t_request"])
        if k:
            assert prefix_max[k - 1] < r["token"], f"token {r['token']} is not above an earlier grant's: {r}"
    assert int(client.get(keys.token) or 0) >= max(tokens)

    # -- the observer saw the counters consistent and within capacity at every sample
    assert observer.samples >= 50, observer.samples
    assert observer.busy_samples > 0
    assert not observer.violations, observer.violations[:10]

    # -- after every worker exited, only the fixed keys are left, with nothing leased
    left = namespace_keys(client, namespace)
    assert left <= set(keys.fixed()), sorted(left - set(keys.fixed()))
    assert {keys.gpus, keys.capacity, keys.used, keys.token} <= left
    assert {k: int(v) for k, v in client.hgetall(keys.used).items()} == dict.fromkeys(LEASABLE_MIB, 0)
    client.close()
    assert elapsed < 40, f"the run took {elapsed:.1f} s"
