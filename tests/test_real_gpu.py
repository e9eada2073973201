"""gpuboss against the real NVIDIA GPUs of this machine: discovery against ``nvidia-smi``, registration by UUID,
device strings and ``child_env()`` against what CUDA shows a process, the sampler's readings against NVML,
memory held outside gpuboss holding back a grant until it is freed, and a holder over budget getting a
``vram_alert``.

Skipped, with the reason, where NVML or a GPU is missing (CI, laptops); the parts that allocate GPU memory
also need torch with CUDA, and run it in child processes (tests/real_gpu_worker.py) so that this process
holds no CUDA context. Run it with ``make gpu-check`` on a machine with a card; the tests elsewhere check
the same code against a fake NVML (tests/fake_nvml.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gpuboss import GPUBoss, InsufficientCapacity, Keys, Lease, LeaseTimeout, events
from gpuboss.devices import visible_devices
from gpuboss.nvml import NvmlSession, PhysicalGpu, discover
from gpuboss.profiles import get_gpu_profile
from gpuboss.redis_io import connect_sync

ROOT = Path(__file__).resolve().parent.parent
FOUND = discover()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not FOUND.gpus, reason=f"no NVIDIA GPU here: {FOUND.reason or 'NVML lists none'}"),
]
GB = 1024
SAMPLE_S = 0.2
#: One GPU without MIG: the one the tests lease, hold memory on and read.
CARD: PhysicalGpu | None = next((g for g in FOUND.gpus if not g.mig_enabled), None)


def card() -> PhysicalGpu:
    if CARD is None:
        pytest.skip("every GPU here has MIG enabled: the allocation tests need a whole card")
    return CARD


class Child:
    """A child process of tests/real_gpu_worker.py, stopped by its PID at the end."""

    def __init__(self, *argv: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.real_gpu_worker", *argv],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def line(self, limit_s: float = 120.0) -> str:
        """The next line it prints; a line that says it could not run skips the test."""
        assert self.proc.stdout is not None
        got: list[str] = []
        reader = threading.Thread(target=lambda: got.append(self.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(limit_s)
        assert got, f"the child said nothing within {limit_s} s"
        text = got[0].strip()
        if text == "no-cuda" or (not text and self.proc.wait(10) == 3):
            pytest.skip("torch sees no CUDA device")
        assert text, f"the child exited with {self.proc.wait(10)} without a word"
        return text

    def tell(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


class Waiter:
    """A request for ``vram_gb`` on ``gpu`` waiting in a thread of its own (queued when this returns)."""

    def __init__(self, boss: GPUBoss, gpu: str, vram_gb: int, client: Any, keys: Keys) -> None:
        self.got: list[tuple[Lease, float]] = []

        def wait() -> None:
            self.got.append((boss.acquire(vram_gb=vram_gb, device=gpu, timeout=60), time.monotonic()))

        self.thread = threading.Thread(target=wait, daemon=True)
        self.thread.start()
        wait_until(lambda: client.zcard(keys.queue) == 1, "the request queued")

    def granted(self, since: float, limit_s: float, why: str) -> tuple[Lease, float]:
        """Its lease, and the ms from ``since`` (monotonic) to its grant; ``why`` when none came in ``limit_s``."""
        self.thread.join(limit_s)
        assert self.got, why
        lease, at = self.got[0]
        return lease, (at - since) * 1000


@pytest.fixture(scope="module")
def torch_cuda() -> list[str]:
    """The UUIDs CUDA shows a process with this environment, in cuda:N order (torch in a child)."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "tests.real_gpu_worker", "cuda"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("torch took over 120 s to list the CUDA devices")
    if out.returncode != 0:
        pytest.skip(f"no torch with CUDA here ({out.stdout.strip() or out.stderr.strip().splitlines()[-1:]})")
    return out.stdout.split()


@pytest.fixture
def children() -> Iterator[list[Child]]:
    made: list[Child] = []
    yield made
    for child in made:
        child.stop()


@pytest.fixture
def boss(real_url: str, namespace: str) -> Iterator[GPUBoss]:
    made = GPUBoss(
        real_url, namespace=namespace, service="real-gpu", gpus="auto", sample_interval_s=SAMPLE_S, host_timeout_s=30
    )
    yield made
    made.close()


def reading(client: Any, keys: Keys, gpu: str) -> tuple[int, int] | None:
    """The stored reading of ``gpu``: (used MiB, sampled at, Redis ms)."""
    raw = client.hget(keys.observed, gpu)
    if not raw:
        return None
    used, at, _ = (int(x) for x in str(raw).split(","))
    return used, at


def wait_until(predicate: Any, what: str, limit: float = 60.0) -> Any:
    """Poll a condition (a liveness bound, not a timing assertion); its last value."""
    deadline = time.monotonic() + limit
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.02)
    return value


def redis_ms(client: Any) -> int:
    sec, usec = client.time()
    return int(sec) * 1000 + int(usec) // 1000


def nvml_used_mib(uuid: str) -> int:
    with NvmlSession.open() as session:
        return next(s.used_mib for s in session.sample().samples if s.uuid == uuid)


# ---------------------------------------------------------------- discovery


def test_discovery_matches_nvidia_smi() -> None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        pytest.skip("nvidia-smi is not on PATH")
    fields = "index,uuid,name,memory.total,pci.bus_id,compute_cap"
    out = subprocess.run(
        [smi, f"--query-gpu={fields}", "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    rows = [[c.strip() for c in line.split(",")] for line in out.stdout.strip().splitlines()]
    assert len(rows) == len(FOUND.gpus), (rows, FOUND.gpus)
    for gpu, (index, uuid, name, memory, bus, cc) in zip(FOUND.gpus, rows, strict=True):
        assert (gpu.index, gpu.uuid, gpu.name) == (int(index), uuid, name)
        assert gpu.memory_total_mib == int(memory), "MiB, as nvidia-smi rounds them"
        assert gpu.pci_bus_id.lower() == bus.lower()
        assert gpu.compute_capability == tuple(int(x) for x in cc.split("."))
    assert FOUND.problems == ()
    # The memory the driver reserves, where this nvidia-smi can say (older ones cannot): NVML's v2 figure.
    out = subprocess.run(
        [smi, "--query-gpu=memory.reserved,memory.used", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode == 0:
        for gpu, line in zip(FOUND.gpus, out.stdout.strip().splitlines(), strict=True):
            reserved, used = (int(c.strip()) for c in line.split(","))
            print(f"\n{gpu.uuid}: total {gpu.memory_total_mib}, reserved {reserved} MiB, used {used} MiB")
            if not gpu.mig_enabled:
                assert gpu.memory_reserved_mib == reserved
                sampled = nvml_used_mib(gpu.uuid)
                assert abs(sampled - used) <= 64, f"gpuboss reads {sampled} MiB used where nvidia-smi shows {used}"


def test_the_profile_of_each_card_is_known_and_its_memory_near_the_card() -> None:
    for gpu in FOUND.gpus:
        profile = get_gpu_profile(gpu.name, memory_mib=gpu.memory_total_mib)
        cc = f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]}" if gpu.compute_capability else None
        assert cc in (None, profile.compute_capability), (gpu.name, profile)
        # Data sheets give decimal GB or round up; NVML gives what the driver leaves to CUDA.
        assert 0.85 <= gpu.memory_total_mib / (profile.vram_gb * 1000**3 / 1024**2) <= 1.1, (gpu, profile)


def test_the_cli_discovers_the_same_gpus() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gpuboss.cli", "--json", "gpus", "discover"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    import json

    listed = json.loads(out.stdout)
    assert [(g["id"], g["capacity_mib"]) for g in listed] == [(u.uuid, u.memory_usable_mib) for u in FOUND.units()]


# ---------------------------------------------------------------- registration, devices


def test_gpus_auto_registers_each_card_by_uuid_at_its_memory(boss: GPUBoss, real_url: str, namespace: str) -> None:
    registered = {g.id: g for g in boss.register_gpus()}
    assert set(registered) == {u.uuid for u in FOUND.units()}
    for unit in FOUND.units():
        info = registered[unit.uuid]
        assert (info.uuid, info.capacity_mib, info.reserve_mib, info.host) == (
            unit.uuid,
            unit.memory_usable_mib,
            0,
            boss._core.host,
        )
    client = connect_sync(real_url, 5.0)
    try:
        assert client.hget(Keys(namespace).hosts, boss._core.host) is not None, "the host beat"
    finally:
        client.close()


def test_the_device_string_is_the_cuda_ordinal_of_the_leased_card(
    boss: GPUBoss, torch_cuda: list[str], children: list[Child]
) -> None:
    gpu = card()
    assert list(visible_devices(FOUND.gpus).uuids) == torch_cuda, "gpuboss's CUDA order is torch's"
    lease = boss.acquire(vram_gb=1, device=gpu.uuid, timeout=10)
    assert (lease.gpu, lease.uuid) == (gpu.uuid, gpu.uuid)
    assert str(lease.device) == f"cuda:{torch_cuda.index(gpu.uuid)}"
    env = lease.child_env()
    out = subprocess.run(
        [sys.executable, "-m", "tests.real_gpu_worker", "cuda"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.stdout.split() == [gpu.uuid], f"a child with {env} sees exactly the leased card as cuda:0"
    boss.release(lease)


def test_the_whole_usable_card_can_be_leased_and_allocated_and_no_more(
    boss: GPUBoss, real_url: str, namespace: str, torch_cuda: list[str], children: list[Child]
) -> None:
    gpu = card()
    (info,) = [g for g in boss.register_gpus() if g.id == gpu.uuid]
    client, keys = connect_sync(real_url, 5.0), Keys(namespace)
    try:
        idle = wait_until(lambda: reading(client, keys, gpu.uuid), "a first reading")[0]
    finally:
        client.close()
    with pytest.raises(InsufficientCapacity):  # at once: no wait for a size no reading can ever make fit
        boss.acquire(vram_gb=(info.capacity_mib + 1) / GB, device=gpu.uuid, timeout=30)
    lease = boss.acquire(vram_gb=(info.capacity_mib - idle) / GB, device=gpu.uuid, timeout=10)
    # Its holder can allocate all of it but its CUDA context (well under 1 GiB).
    mib = lease.vram_mib - GB
    hog = Child("hog", "cuda:0", str(mib), env=lease.child_env())
    children.append(hog)
    assert hog.line() == f"ready {mib}", "CUDA allocates what was leased"
    print(f"\nleased {lease.vram_mib} of {gpu.memory_total_mib} MiB (driver reserves {gpu.memory_reserved_mib})")
    boss.release(lease)


# ---------------------------------------------------------------- the sampler and effective free VRAM


def test_memory_held_outside_gpuboss_holds_back_a_grant_until_it_is_freed(
    boss: GPUBoss, real_url: str, namespace: str, torch_cuda: list[str], children: list[Child]
) -> None:
    gpu = card()
    boss.register_gpus()
    client, keys = connect_sync(real_url, 5.0), Keys(namespace)
    try:
        idle = wait_until(lambda: reading(client, keys, gpu.uuid), "a first reading")[0]
        # A stray job (not a gpuboss client) takes 60% of the card; the request asks for half of it.
        hog_mib = gpu.memory_total_mib * 6 // 10
        want_gb = gpu.memory_total_mib // 2 // GB
        hog = Child("hog", "cuda:0", str(hog_mib), env={"CUDA_VISIBLE_DEVICES": gpu.uuid})
        children.append(hog)
        assert hog.line() == f"ready {hog_mib}"
        held = nvml_used_mib(gpu.uuid)
        assert held >= idle + hog_mib, f"NVML shows the stray memory ({idle} -> {held} MiB)"
        since = redis_ms(client)
        seen = wait_until(lambda: (r := reading(client, keys, gpu.uuid)) and r[1] >= since and r, "a fresh reading")
        assert abs(seen[0] - held) <= 256, f"the stored reading {seen[0]} MiB is what NVML shows ({held} MiB)"

        with pytest.raises(LeaseTimeout):
            boss.acquire(vram_gb=want_gb, device=gpu.uuid, timeout=0)
        waiter = Waiter(boss, gpu.uuid, want_gb, client, keys)
        time.sleep(10 * SAMPLE_S)
        assert not waiter.got, "no grant while the stray memory is held"

        hog.tell()
        assert hog.line() == "freed"
        lease, took_ms = waiter.granted(time.monotonic(), 60, "granted once the memory was freed")
        assert (lease.gpu, lease.vram_mib) == (gpu.uuid, want_gb * GB)
        print(f"\ngranted {took_ms:.0f} ms after the stray memory was freed (sampling every {SAMPLE_S} s)")
        boss.release(lease)
    finally:
        client.close()


def test_vram_status_reads_the_card_and_lists_a_process_using_it(
    boss: GPUBoss, torch_cuda: list[str], children: list[Child]
) -> None:
    gpu = card()
    hog = Child("hog", "cuda:0", "2048", env={"CUDA_VISIBLE_DEVICES": gpu.uuid})
    children.append(hog)
    assert hog.line() == "ready 2048"
    (status,) = [s for s in boss.vram_status() if s.id == gpu.uuid]
    assert status.total_mib == gpu.memory_total_mib and status.used_mib >= 2048
    assert status.used_mib + status.free_mib <= status.total_mib
    pids = {p.pid: p.used_mib for p in status.processes}
    if hog.pid not in pids:
        pytest.skip(f"NVML lists pids {sorted(pids)}, not the child's {hog.pid}: a PID namespace (docs/inventory.md)")
    used = pids[hog.pid]
    assert used is None or used >= 2048, f"the child uses {used} MiB"


def test_a_holder_over_budget_gets_a_vram_alert(
    real_url: str, namespace: str, torch_cuda: list[str], children: list[Child]
) -> None:
    gpu = card()
    # The holder leases 1 GB and uses 3 GB (and its CUDA context) on its lease's device.
    holder = Child("holder", real_url, namespace, "1", str(3 * GB), env={"CUDA_VISIBLE_DEVICES": gpu.uuid})
    children.append(holder)
    _, lease_id, device, _ = holder.line().split()
    assert device == "cuda:0", "the card CUDA shows it"
    with NvmlSession.open() as session:
        listed = {p.pid for s in session.sample().samples for p in s.processes}
    if holder.pid not in listed:
        pytest.skip(f"NVML lists pids {sorted(listed)}, not the holder's {holder.pid}: a PID namespace")

    def alert() -> list[events.Event]:
        return [e for e in events.replay(real_url, namespace) if e.type == "vram_alert"]

    (event,) = wait_until(alert, "a vram_alert")
    assert (event.lease, event.gpu, event["pid"], event["leased_mib"]) == (lease_id, gpu.uuid, holder.pid, GB)
    assert event["used_mib"] >= 3 * GB and event["over_mib"] == event["used_mib"] - GB
    holder.tell()
    assert holder.line() == "freed"
    assert holder.proc.wait(60) == 0


def test_a_holder_within_its_lease_gets_no_alert_for_its_cuda_context(
    real_url: str, namespace: str, torch_cuda: list[str], children: list[Child]
) -> None:
    """The default ``alert_margin_gb`` covers what a process holds beyond its tensors: the CUDA context, the
    kernels and handles of cuBLAS and attention (684 MiB for torch 2.11 with CUDA 13 on an H200, more than
    the 512 MiB default this margin had before)."""
    gpu = card()
    worker = Child("worker", real_url, namespace, "2", "1024", env={"CUDA_VISIBLE_DEVICES": gpu.uuid})
    children.append(worker)
    torch_mib = worker.line().split()[3]
    assert int(torch_mib) <= 2 * GB, f"torch holds {torch_mib} MiB: within the 2 GB lease"
    with NvmlSession.open() as session:
        listed = {p.pid: p.used_mib for s in session.sample().samples for p in s.processes}
    if worker.pid not in listed:
        pytest.skip(f"NVML lists pids {sorted(listed)}, not the worker's {worker.pid}: a PID namespace")
    used = listed[worker.pid]
    print(f"\nthe worker uses {used} MiB: {torch_mib} MiB through torch, the rest its context and libraries")
    client, keys = connect_sync(real_url, 5.0), Keys(namespace)
    try:
        since = redis_ms(client)
        # Five readings after the work: each one compared the worker's usage with its lease.
        for _ in range(5):
            since = wait_until(
                lambda after=since: (r := reading(client, keys, gpu.uuid)) and r[1] > after and r[1], "a reading"
            )
    finally:
        client.close()
    alerts = [e for e in events.replay(real_url, namespace) if e.type == "vram_alert"]
    assert alerts == [], f"a holder within its lease was told it is over budget: {alerts}"
    worker.tell()
    assert worker.line() == "freed"


def test_the_torch_example_runs_on_the_card_it_leases(real_url: str, namespace: str, torch_cuda: list[str]) -> None:
    """examples/torch_load.py with ``--gpus auto``: the lease names a real card by UUID and the model runs on
    the CUDA device gpuboss gives for it."""
    gpu = card()
    example = ROOT / "examples" / "torch_load.py"
    argv = [sys.executable, str(example), "--redis-url", real_url, "--namespace", namespace, "--gpus", "auto"]
    done = subprocess.run(
        argv, env={**os.environ, "CUDA_VISIBLE_DEVICES": gpu.uuid}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"leased 4 GB on {gpu.uuid} (cuda:0)" in done.stdout
    assert "model loaded on cuda:0" in done.stdout and "step 5/5: output shape (8, 10)" in done.stdout
    assert done.stdout.rstrip().endswith("lease released")


def test_memory_a_holder_frees_and_releases_is_seen_at_once(
    real_url: str, namespace: str, torch_cuda: list[str], children: list[Child]
) -> None:
    """Both processes sample every 60 s, yet the waiter is served right after the holder frees its memory and
    releases: the release reads the card out of turn (sampler.py). Before, the card looked full until the
    next round, up to 60 s later."""
    gpu = card()
    slow = {"CUDA_VISIBLE_DEVICES": gpu.uuid, "REAL_GPU_SAMPLE_S": "60"}
    lease_mib = gpu.memory_usable_mib * 6 // 10
    holder = Child("holder", real_url, namespace, str(lease_mib / GB), str(lease_mib - GB), env=slow)
    children.append(holder)
    assert holder.line().startswith("ready ")
    boss = GPUBoss(
        real_url, namespace=namespace, service="waiter", gpus="auto", sample_interval_s=60, host_timeout_s=600
    )
    client, keys = connect_sync(real_url, 5.0), Keys(namespace)
    try:
        boss.register_gpus()
        # A reading that shows the holder's memory (its own first round may have come before it allocated, and
        # the next is a minute away): taken out of turn, as a release does.
        sampler = boss._inventory.sampler
        assert sampler is not None
        sampler.poke([gpu.uuid])
        wait_until(
            lambda: (r := reading(client, keys, gpu.uuid)) and r[0] >= lease_mib - GB, "the holder's memory read"
        )
        want_gb = gpu.memory_usable_mib // 2 // GB
        waiter = Waiter(boss, gpu.uuid, want_gb, client, keys)
        holder.tell()
        assert holder.line() == "freed"  # then it releases
        why = "served by the reading the release took, not by a round 60 s later"
        lease, took_ms = waiter.granted(time.monotonic(), 30, why)
        print(f"\ngranted {took_ms:.0f} ms after the holder freed its memory (rounds every 60 s)")
        boss.release(lease)
        assert holder.proc.wait(60) == 0
    finally:
        client.close()
        boss.close()
