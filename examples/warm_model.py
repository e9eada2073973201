#!/usr/bin/env python3
"""Two model servers keep their models warm on one GPU, and each unloads for the other when it is idle.

Each server (a process of its own) wraps its model server's load and unload calls in `boss.keep_warm(...)`:
the model stays loaded between requests, but while it is idle it is the first thing to go when the other
server needs the GPU, and after `idle_timeout_s` without requests it is unloaded anyway. A request that finds
its model unloaded waits for the GPU, reloads, and is served; the server reports how long that took. A model
is never unloaded while a request runs. The load and unload calls are simulated here; the comments show
where a real server's go (an Ollama-style HTTP API, or vLLM's sleep/wake_up).

    python examples/warm_model.py                # embedded Redis
    python examples/warm_model.py --quick --redis-url redis://localhost:6379/0
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import sys
import time
from typing import Any

from gpuboss import GPUBoss, Lease

GPUS = [{"id": "gpu0", "name": "demo GPU (24 GB)", "vram_gb": 24, "index": 0}]
MODELS = {"chat": "gemma3:12b", "code": "qwen2.5-coder:14b"}  # two models of 16 GB: only one fits


class ModelServer:
    """Stands for the real model server this process fronts."""

    def __init__(self, name: str, model: str, load_s: float, events: Any) -> None:
        self.name, self.model, self.load_s, self.events = name, model, load_s, events
        self.resident = False

    def load(self, lease: Lease) -> None:
        # Real server: e.g. POST /api/generate {"model": ..., "keep_alive": -1} on the lease's GPU
        # (CUDA_VISIBLE_DEVICES from lease.child_env()), or vLLM's POST /wake_up.
        time.sleep(self.load_s)
        self.resident = True
        self.events.put((self.name, f"loaded {self.model} on {lease.device}"))

    def unload(self, reason: str) -> None:
        # Real server: e.g. POST /api/generate {"model": ..., "keep_alive": 0}, or vLLM's POST /sleep; return only
        # once the memory is free, since the lease is handed back right after.
        self.resident = False
        self.events.put((self.name, f"unloaded {self.model} ({reason})"))

    def generate(self, prompt: str, work_s: float) -> str:
        assert self.resident, "a request ran without its model"
        time.sleep(work_s)
        return f"answer to {prompt!r}"


def server(name: str, redis_url: str | None, namespace: str, idle_s: float, inbox: Any, events: Any) -> None:
    model = MODELS[name]
    backend = ModelServer(name, model, load_s=0.05, events=events)
    with (
        GPUBoss(redis_url, namespace=namespace, service=name, gpus=GPUS, default_ttl=max(1.0, idle_s)) as boss,
        boss.keep_warm(
            model, vram_gb=16, idle_timeout_s=idle_s, on_load=backend.load, on_unload=backend.unload
        ) as warm,
    ):
        events.put((name, "ready"))
        while (job := inbox.get()) is not None:
            asked = time.monotonic()
            reloads = warm.reloads
            with warm.busy():  # the lease is busy: never unloaded while the request runs
                answer = backend.generate(job["prompt"], job["work_s"])
            took = time.monotonic() - asked
            note = f", reloaded first (waited {warm.wait_s:.3f} s, loaded in {warm.load_s:.3f} s)"
            events.put((name, f"served {job['prompt']!r} in {took:.3f} s{note if warm.reloads > reloads else ''}"))
            events.put(("done", name, answer))
        events.put((name, f"stopping: {warm.loads} load(s), {warm.reloads} reload(s), {warm.unloads} unload(s)"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", default=None, help="default: GPUBOSS_REDIS_URL, else the embedded Redis")
    parser.add_argument("--namespace", default="example-warm")
    parser.add_argument("--quick", action="store_true", help="a short run (for tests)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    rounds, work_s, idle_s = (3, 0.05, 1.0) if args.quick else (5, 0.5, 3.0)

    ctx = multiprocessing.get_context("spawn")
    events = ctx.Queue()
    inboxes = {name: ctx.Queue() for name in MODELS}
    procs = {
        name: ctx.Process(target=server, args=(name, args.redis_url, args.namespace, idle_s, inboxes[name], events))
        for name in MODELS
    }
    answers = 0

    def show_until(what: Any) -> None:
        nonlocal answers
        while True:
            event = events.get(timeout=120)
            if event[0] == "done":
                answers += 1
            else:
                print(f"[{event[0]:>4}] {event[1]}", flush=True)
            if what(event):
                return

    for name in MODELS:  # one after the other: the second one's load unloads the first, idle, model
        procs[name].start()
        show_until(lambda e, n=name: e == (n, "ready"))
    for n in range(rounds):  # requests alternate: each model is reloaded in turn
        for name in MODELS:
            inboxes[name].put({"prompt": f"question {n + 1} to {name}", "work_s": work_s})
            show_until(lambda e: e[0] == "done")
    print(f"[main] no requests for a while: the idle model is unloaded after {idle_s:g} s", flush=True)
    show_until(lambda e: "(idle_timeout)" in str(e[1]))
    for name in MODELS:
        inboxes[name].put(None)
    stopped: set[str] = set()

    def stopping(event: Any) -> bool:
        if str(event[1]).startswith("stopping"):
            stopped.add(event[0])
        return stopped == set(MODELS)

    show_until(stopping)
    for proc in procs.values():
        proc.join(30)
    ok = answers == rounds * len(MODELS) and all(p.exitcode == 0 for p in procs.values())
    print(f"{'OK' if ok else 'FAILED'}: {answers} requests served, two 16 GB models taking turns on a 24 GB GPU")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
