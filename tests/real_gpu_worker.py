"""Child processes for tests/test_real_gpu.py: each holds GPU memory through torch, which the test process never
imports (its CUDA context would count in the readings, and torch's warnings would fail the run).

    python -m tests.real_gpu_worker cuda                     # what CUDA shows this process: one UUID a line
    python -m tests.real_gpu_worker hog DEVICE MIB           # hold MIB on DEVICE until a line on stdin
    python -m tests.real_gpu_worker holder URL NS GB MIB     # lease GB, use MIB on the lease's device; stdin ends it
                                                             # (REAL_GPU_SAMPLE_S: its sample interval, 0.2 s)
    python -m tests.real_gpu_worker worker URL NS GB MIB     # the same, and run a cuBLAS matmul and attention

Each prints ``ready ...`` once its memory is held, and ``freed`` once it has given it back.
"""

from __future__ import annotations

import os
import sys
from typing import Any

MIB = 1024 * 1024


def torch_module() -> Any:
    import torch

    if not torch.cuda.is_available():
        print("no-cuda", flush=True)
        sys.exit(3)
    return torch


def hold(torch: Any, device: str, mib: int) -> Any:
    """``mib`` MiB on ``device``, written to (so every page is backed), with the CUDA context made first."""
    block = torch.empty(mib * MIB, dtype=torch.uint8, device=device)
    block.fill_(1)
    torch.cuda.synchronize(device)
    return block


def free(torch: Any, device: str) -> None:
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    print("freed", flush=True)


def cuda() -> None:
    torch = torch_module()
    for i in range(torch.cuda.device_count()):
        print(f"GPU-{torch.cuda.get_device_properties(i).uuid}", flush=True)


def hog(device: str, mib: int) -> None:
    torch = torch_module()
    block = hold(torch, device, mib)
    print(f"ready {mib}", flush=True)
    sys.stdin.readline()
    del block
    free(torch, device)


def work(torch: Any, device: str) -> None:
    """What a model does besides holding its weights: a bf16 matmul (cuBLAS and its workspace) and attention
    (the flash kernels), whose modules and handles load into the process's memory beyond its tensors."""
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    (a @ a).sum().item()
    q = torch.randn(4, 16, 2048, 128, device=device, dtype=torch.bfloat16)
    torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().item()
    torch.cuda.synchronize(device)


def holder(url: str, namespace: str, vram_gb: float, mib: int, *, busy: bool = False) -> None:
    """Lease ``vram_gb`` (with the library's default alert margin), hold ``mib`` on its device, and with
    ``busy`` also :func:`work`; prints ``ready <lease id> <device> <MiB torch holds>``."""
    from gpuboss import GPUBoss

    torch = torch_module()
    interval = float(os.environ.get("REAL_GPU_SAMPLE_S", "0.2"))
    boss = GPUBoss(
        url, namespace=namespace, service="real-gpu-holder", gpus="auto", sample_interval_s=interval, host_timeout_s=600
    )
    try:
        lease = boss.acquire(vram_gb=vram_gb, device="cuda:0", timeout=30)  # the card CUDA shows it
        block = hold(torch, str(lease.device), mib)
        if busy:
            work(torch, str(lease.device))
        held = torch.cuda.memory_reserved(str(lease.device)) // MIB
        print(f"ready {lease.id} {lease.device} {held}", flush=True)
        sys.stdin.readline()
        del block
        free(torch, str(lease.device))
        boss.release(lease)
    finally:
        boss.close()


def main(argv: list[str]) -> None:
    match argv:
        case ["cuda"]:
            cuda()
        case ["hog", device, mib]:
            hog(device, int(mib))
        case ["holder" | "worker" as mode, url, namespace, vram_gb, mib]:
            holder(url, namespace, float(vram_gb), int(mib), busy=mode == "worker")
        case _:
            sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
