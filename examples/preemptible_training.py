#!/usr/bin/env python3
"""A low-priority training job yields the GPU to a high-priority inference request, then resumes.

The training job (a process of its own) holds the whole GPU with a preemptible `low` lease. Between two
steps, its safe point, it looks whether a higher priority asked for the GPU (`lease.evict_requested`); if
so it checkpoints its step counter there and calls `yield_if_requested()`, which hands the GPU back and
waits, keeping its place in the queue, until the GPU comes back; then it goes on from its checkpoint. No
step runs on the GPU between the checkpoint and the resume: the hand-back happens in the training thread,
at the safe point (an `on_evict` callback would run on the boss's thread, while a step may still be running:
docs/eviction.md). The parent checks that no step was lost or repeated.

    python examples/preemptible_training.py             # embedded Redis
    python examples/preemptible_training.py --quick --redis-url redis://localhost:6379/0
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gpuboss import GPUBoss
from gpuboss.lease import EvictNotice

GPUS = [{"id": "gpu0", "name": "demo GPU", "vram_gb": 24, "index": 0}]


def train(redis_url: str | None, namespace: str, steps: int, step_s: float, checkpoint: str, events: Any) -> None:
    """The training job: `steps` steps on the whole GPU, checkpointing when a higher priority needs it."""
    state = {"step": 0}

    def save(notice: EvictNotice | None) -> None:
        Path(checkpoint).write_text(json.dumps(state))
        asked = f" ({notice.need_gb:g} GB asked)" if notice is not None else ""
        events.put((time.time(), "train", f"checkpoint at step {state['step']}{asked}"))

    with (
        GPUBoss(redis_url, namespace=namespace, service="train", gpus=GPUS) as boss,
        boss.lease(vram_gb=24, priority="low") as device,
    ):
        lease = device.lease
        events.put((time.time(), "train", f"training on {device}"))
        while state["step"] < steps:
            if lease.evict_requested:  # the safe point, between two steps: a higher priority needs the GPU
                save(lease.notice)
                if lease.yield_if_requested():  # handed back and granted again: reload the checkpoint
                    state = json.loads(Path(checkpoint).read_text())
                    events.put((time.time(), "train", f"resumed at step {state['step']} on {lease.device}"))
            time.sleep(step_s)  # one training step on the GPU
            state["step"] += 1
        events.put((time.time(), "train", f"done: {state['step']} steps, evicted {lease.evictions} time(s)"))
        events.put(("result", state["step"], lease.evictions))


def infer(redis_url: str | None, namespace: str, work_s: float, events: Any) -> None:
    """The inference service: one urgent request for most of the GPU."""
    with GPUBoss(redis_url, namespace=namespace, service="infer", gpus=GPUS) as boss:
        asked = time.time()
        events.put((asked, "infer", "needs 16 GB now (high priority)"))
        with boss.lease(vram_gb=16, priority="high", timeout=60) as device:
            events.put((time.time(), "infer", f"granted on {device} after {1000 * (time.time() - asked):.0f} ms"))
            time.sleep(work_s)
        events.put((time.time(), "infer", "done, GPU released"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--redis-url", default=None, help="Redis to use (default: the embedded Redis)")
    parser.add_argument("--namespace", default="example-preempt")
    parser.add_argument("--quick", action="store_true", help="a short run (for tests)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    steps, step_s, work_s = (150, 0.02, 0.2) if args.quick else (300, 0.02, 1.0)
    ctx = multiprocessing.get_context("spawn")
    events = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = str(Path(tmp) / "checkpoint.json")
        trainer = ctx.Process(target=train, args=(args.redis_url, args.namespace, steps, step_s, checkpoint, events))
        trainer.start()
        while True:  # wait until training runs
            event = events.get(timeout=60)
            print(f"[{event[1]:>5}] {event[2]}")
            if "training on" in event[2]:
                break
        server = ctx.Process(target=infer, args=(args.redis_url, args.namespace, work_s, events))
        server.start()
        result = None
        while result is None:
            event = events.get(timeout=120)
            if event[0] == "result":
                result = event
            else:
                print(f"[{event[1]:>5}] {event[2]}")
        trainer.join(30)
        server.join(30)
    done_steps, evictions = result[1], result[2]
    ok = done_steps == steps and evictions >= 1 and trainer.exitcode == 0 and server.exitcode == 0
    print(f"{'OK' if ok else 'FAILED'}: {done_steps}/{steps} steps, each exactly once; {evictions} eviction(s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
