"""The "done when" scenario of cooperative eviction (issue 4), with a real redis-server and separate processes.

A low-priority job (``tests/workers.py checkpointer``) holds the whole simulated GPU and counts steps, with
``yield_if_requested()`` as its safe point before each step and an ``on_evict`` that saves the last finished
step to a checkpoint file. This test process is the high-priority service: it asks for most of the GPU,
holds it, and releases it. Every time compared below is ``time.monotonic()`` (CLOCK_MONOTONIC, one clock for
all processes on the host), and every ordering asserted is causal (an effect stamped after its cause), never
a bound on how long something took: the latencies are printed, not asserted.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gpuboss import GPUBoss, Keys, Lease
from gpuboss.events import replay

from tests.conftest import raw_client
from tests.workers import Worker

pytestmark = pytest.mark.slow

GPU = [{"id": "g0", "name": "sim-24gb", "vram_gb": 24, "index": 0}]
WAIT_S = 30.0
STEPS = 200
HOLD_AT = 100  # the job waits for the request at this step if it has not come yet


@pytest.fixture
def requester(real_url: str, namespace: str) -> Iterator[GPUBoss]:
    boss = GPUBoss(real_url, namespace=namespace, gpus=GPU, service="realtime")
    boss.release(boss.acquire(1, priority="high", timeout=0))  # warm: GPUs registered, scripts loaded
    yield boss
    boss.close()


def read_until(worker: Worker, prefix: str, seen: list[str], timeout: float = WAIT_S) -> str:
    """Read the worker's lines into ``seen`` up to the first one that starts with ``prefix``; its rest."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = worker.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(
                f"worker {worker.pid}: no {prefix!r} line within {timeout} s; last lines {seen[-5:]}; "
                f"stderr: {worker.err()}"
            ) from None
        if line is None:
            raise AssertionError(f"worker {worker.pid} exited before {prefix!r}; stderr: {worker.err()}")
        seen.append(line)
        if line.startswith(prefix):
            return line[len(prefix) :].strip()


def steps_of(lines: list[str]) -> list[tuple[int, float]]:
    return [(int(n), float(t)) for n, t in (line.split()[1:3] for line in lines if line.startswith("STEP "))]


def checkpointer(url: str, ns: str, tmp_path: Path, *extra: str) -> tuple[Worker, Path]:
    ckpt = tmp_path / "job.ckpt"
    worker = Worker(
        "checkpointer",
        url,
        ns,
        GPU,
        "--vram",
        "24",
        "--checkpoint",
        str(ckpt),
        "--steps",
        str(STEPS),
        "--hold-at",
        str(HOLD_AT),
        *extra,
    )
    return worker, ckpt


def in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as err:  # noqa: BLE001  # handed to the test, which re-raises it
            out["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def report(what: str, **ms: float) -> None:
    print(f"\n{what}: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in ms.items()))


def test_low_job_checkpoints_yields_to_high_and_resumes_with_its_progress(
    real_url: str, namespace: str, requester: GPUBoss, tmp_path: Path
) -> None:
    job, ckpt = checkpointer(real_url, namespace, tmp_path)
    seen: list[str] = []
    try:
        read_until(job, "READY", seen)
        low_id = read_until(job, "HELD", seen).split('"id": "', 1)[1].split('"', 1)[0]
        read_until(job, "STEP 10 ", seen)  # working: it has progress to lose

        t_request = time.monotonic()
        high: Lease = requester.acquire(20, priority="high", timeout=WAIT_S)
        t_granted = time.monotonic()
        assert high.gpu == "g0"
        t_callback = float(read_until(job, "CHECKPOINT", seen))
        saved_step, t_saved = (float(v) for v in read_until(job, "SAVED", seen).split())
        saved = int(saved_step)
        assert ckpt.read_text() == str(saved)
        assert 10 <= saved <= HOLD_AT
        # The job handed its lease back and waits, keeping its place: its request is in the queue.
        assert raw_client(real_url).zrange(Keys(namespace).queue, 0, -1) == [low_id]
        assert t_request <= t_callback <= t_saved <= t_granted  # asked, saved, and only then the high grant

        t_release = time.monotonic()
        assert requester.release(high)
        restored, in_memory, t_resumed_s, evictions = read_until(job, "RESUMED", seen).split()
        t_resumed = float(t_resumed_s)
        assert (int(restored), int(in_memory), int(evictions)) == (saved, saved, 1)
        assert t_resumed >= t_release  # resumed only after the high lease was released
        done_step, done_evictions, _ = read_until(job, "DONE", seen).split()
        assert (int(done_step), int(done_evictions)) == (STEPS, 1)
        assert job.wait(WAIT_S) == 0, job.err()
    finally:
        job.close()

    # Progress intact: every step once, in order, none run between the checkpoint and the resume.
    steps = steps_of(seen)
    assert [n for n, _ in steps] == list(range(1, STEPS + 1))
    assert all(t <= t_saved for n, t in steps if n <= saved)
    assert all(t >= t_resumed for n, t in steps if n > saved)

    events = [e for e in replay(real_url, namespace) if e.lease == low_id]
    kinds = [e.type for e in events]
    for kind in ("evict_requested", "checkpoint_started", "evicted", "resumed"):
        assert kinds.count(kind) == 1, kinds
    assert kinds.index("evict_requested") < kinds.index("checkpoint_started") < kinds.index("evicted")
    assert kinds.index("evicted") < kinds.index("resumed")
    evict_requested = next(e for e in events if e.type == "evict_requested")
    assert evict_requested.data["by"] == high.id
    report(
        "eviction over pub/sub",
        request_to_callback=t_callback - t_request,
        request_to_grant=t_granted - t_request,
        checkpoint=t_saved - t_callback,
        release_to_resume=t_resumed - t_release,
    )


@pytest.mark.parametrize("where", ["another machine", "this machine"])
def test_a_job_killed_during_its_checkpoint_is_collected_by_its_ttl_or_revoked_on_its_machine(
    where: str, real_url: str, namespace: str, requester: GPUBoss, tmp_path: Path
) -> None:
    """The requester waits for the killed victim's VRAM: from another machine until the victim's TTL (1 s here)
    runs out; on the victim's machine it sees the process gone and revokes the lease (a TTL of 60 s here, which
    it does not wait for)."""
    if where == "another machine":
        requester._core.me = None  # it cannot tell that the victim's process is gone
    ttl = "1" if where == "another machine" else "60"
    job, ckpt = checkpointer(real_url, namespace, tmp_path, "--ttl", ttl, "--checkpoint-s", "3600")
    seen: list[str] = []
    try:
        read_until(job, "READY", seen)
        low_id = read_until(job, "HELD", seen).split('"id": "', 1)[1].split('"', 1)[0]
        read_until(job, "STEP 10 ", seen)
        t_request = time.monotonic()
        thread, out = in_thread(lambda: (requester.acquire(20, priority="high", timeout=WAIT_S), time.monotonic()))
        t_callback = float(read_until(job, "CHECKPOINT", seen))
        t_kill = time.monotonic()
        job.kill()  # SIGKILL by its PID, in the middle of its checkpoint
        thread.join(WAIT_S + 5)
        assert not thread.is_alive(), "the high request did not return"
        if "error" in out:
            raise out["error"]
        high, t_granted = out["value"]
    finally:
        job.close()
    assert not ckpt.exists()  # it died before saving anything
    assert high.gpu == "g0" and high.vram_mib == 20 * 1024
    assert t_request <= t_callback <= t_kill <= t_granted
    kinds = [e.type for e in replay(real_url, namespace) if e.lease == low_id]
    collected = "expired" if where == "another machine" else "revoked"
    assert "evict_requested" in kinds and collected in kinds and "evicted" not in kinds, kinds
    assert raw_client(real_url).hget(Keys(namespace).leases, low_id) is None
    assert requester.release(high)
    report(
        f"victim killed during its checkpoint, requester on {where} (TTL {ttl} s)",
        request_to_callback=t_callback - t_request,
        request_to_grant=t_granted - t_request,
        kill_to_grant=t_granted - t_kill,
    )
