#!/usr/bin/env python3
"""Load a PyTorch model on the device gpuboss leases, and run it.

Works everywhere: with torch and a GPU the model goes to the leased "cuda:N"; with torch but no CUDA (or
fewer GPUs than declared) it falls back to the CPU; without torch it uses a tiny stand-in model. The lease
is taken either way, so the example shows the pattern, not the hardware.

By default the lease is on a declared 24 GB demo GPU; ``--gpus auto`` leases this machine's real GPUs,
discovered through NVML (``gpus: auto``): the device is then the CUDA ordinal of the leased card in this
process, whatever CUDA_VISIBLE_DEVICES says.

    python examples/torch_load.py                      # embedded Redis, the demo GPU
    python examples/torch_load.py --gpus auto          # this machine's GPUs
    python examples/torch_load.py --quick --redis-url redis://localhost:6379/0
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from gpuboss import ConfigError, GPUBoss

try:  # torch is optional here: pip install torch
    import torch
except ImportError:  # pragma: no cover - depends on the machine
    torch = None

GPUS = [{"id": "gpu0", "name": "demo GPU", "vram_gb": 24, "index": 0}]


class FakeModel:
    """Stands in for a torch.nn.Module when torch is not installed."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.device = "cpu"

    def to(self, device: str) -> FakeModel:
        self.device = device
        return self

    def __call__(self, batch: list[list[float]]) -> list[list[float]]:
        return [[sum(row) / len(row)] * 10 for row in batch]


def pick_device(leased: str) -> tuple[str, str]:
    """The device to really use for the leased one, and why.

    The lease says "cuda:N" (the GPU's ``index`` in the config). If this process sees a different set of
    GPUs (CUDA_VISIBLE_DEVICES), map the index accordingly; here we only check that it exists. With
    ``gpus: auto`` gpuboss has already mapped it: the lease's device is this process's ordinal of the card.
    """
    if torch is None:
        return "cpu", "torch is not installed: a stand-in model on the CPU"
    if not torch.cuda.is_available():
        return "cpu", "torch sees no CUDA device: falling back to the CPU"
    index = int(leased.split(":", 1)[1])
    if index >= torch.cuda.device_count():
        return "cpu", f"{leased} is not visible to this process: falling back to the CPU"
    return leased, f"running on {leased}"


def load_model(device: str, width: int) -> Any:
    if torch is None:
        return FakeModel(width).to(device)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 10))
    return model.to(device).eval()


def run(model: Any, device: str, width: int) -> str:
    if torch is None:
        out = model([[float(i % 7) for i in range(width)] for _ in range(8)])
        return f"({len(out)}, {len(out[0])})"
    with torch.no_grad():
        out = model(torch.randn(8, width, device=device))
    return str(tuple(out.shape))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", help="default: GPUBOSS_REDIS_URL, else the embedded Redis")
    parser.add_argument("--namespace", default="gpuboss")
    parser.add_argument("--vram-gb", type=float, default=4.0, help="what the model needs on the GPU")
    parser.add_argument("--quick", action="store_true", help="a smaller model and fewer steps")
    parser.add_argument(
        "--gpus", choices=["demo", "auto"], default="demo", help="demo: a declared 24 GB GPU; auto: this machine's"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    width, steps = (256, 2) if args.quick else (2048, 5)

    gpus = "auto" if args.gpus == "auto" else GPUS
    try:
        return lease_and_run(args, gpus, width, steps)
    except ConfigError as err:  # --gpus auto without NVML or a GPU: it says why and what to do
        print(f"gpuboss: {err}", file=sys.stderr)
        return 1


def lease_and_run(args: argparse.Namespace, gpus: Any, width: int, steps: int) -> int:
    with GPUBoss(args.redis_url, namespace=args.namespace, service="torch-example", gpus=gpus) as boss:
        # Hold the memory for as long as the model lives on the GPU; the block releases it, even on errors.
        with boss.lease(vram_gb=args.vram_gb, priority="normal", timeout=60) as leased:
            lease = leased.lease
            print(f"leased {lease.vram_gb:g} GB on {lease.gpu} ({leased}), fencing token {lease.token}")
            if lease.uuid is not None:
                print(f"a child process would get {lease.child_env()}")
            device, why = pick_device(leased)
            print(why)
            started = time.monotonic()
            model = load_model(device, width)
            print(f"model loaded on {device} in {time.monotonic() - started:.2f} s")
            for step in range(steps):
                lease.raise_if_lost()  # long work: check at safe points that the lease is still ours
                print(f"step {step + 1}/{steps}: output shape {run(model, device, width)}")
            del model  # free the memory before the lease goes back (torch.cuda.empty_cache() too, on a GPU)
            if torch is not None and device.startswith("cuda"):
                torch.cuda.empty_cache()
        print("lease released")
    return 0


if __name__ == "__main__":
    sys.exit(main())
