#!/usr/bin/env python3
"""Two model servers keep their models warm on one GPU, and each unloads for the other when it is idle.

Each server (a process of its own) wraps its model server's load and unload calls in `boss.keep_warm(...)`:
the model stays loaded between requests, but while it is idle it is the first thing to go when the other
server needs the GPU, and after `idle_timeout_s` without requests it is unloaded anyway. A request that finds
its model unloaded waits for the GPU, reloads, and is served; the server reports how long that took. A model
is never unloaded while a request runs.

The model server behind each process is one of three thin classes with the same three calls (load onto the
leased device, unload and free the memory, generate):

    OllamaServer     an Ollama server's HTTP API: load with keep_alive -1 (gpuboss decides when it goes),
                     unload with keep_alive 0 and wait until /api/ps no longer lists it
    TorchServer      a PyTorch module moved to the leased device (the CPU when CUDA does not show it); unload
                     drops it and empties the CUDA cache before the lease is handed back
    SimulatedServer  no GPU, no network: sleeps stand in for the load and the answer

    python examples/warm_model.py                              # embedded Redis; torch if installed, else simulated
    python examples/warm_model.py --backend ollama --ollama-url http://localhost:11434
    python examples/warm_model.py --quick --redis-url redis://localhost:6379/0
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import multiprocessing
import sys
import time
import urllib.request
from typing import Any, Protocol

from gpuboss import GPUBoss, Lease

try:  # torch is optional here: pip install torch
    import torch
except ImportError:  # pragma: no cover - depends on the machine
    torch = None

GPUS = [{"id": "gpu0", "name": "demo GPU (24 GB)", "vram_gb": 24, "index": 0}]
MODELS = {"chat": "gemma3:12b", "code": "qwen2.5-coder:14b"}  # two models of 16 GB: only one fits


class ModelServer(Protocol):
    kind: str

    def load(self, device: str) -> str:
        """Load the model onto ``device`` (the leased one); return where it really went."""

    def unload(self) -> None:
        """Unload it; return only once its memory is free (the lease is handed back right after)."""

    def generate(self, prompt: str, work_s: float) -> str: ...


class OllamaServer:
    """An Ollama server (https://github.com/ollama/ollama/blob/main/docs/api.md). Ollama places models on the
    GPUs it sees: run one `ollama serve` per GPU (CUDA_VISIBLE_DEVICES from `lease.child_env()`, its own
    OLLAMA_HOST) and send each model to the server of its lease's GPU; here there is one."""

    kind = "ollama"

    def __init__(self, model: str, url: str) -> None:
        self.model, self.url = model, url.rstrip("/")

    def _call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as reply:  # a first load can take minutes
            return dict(json.loads(reply.read() or b"{}"))

    def load(self, device: str) -> str:
        self._call("/api/generate", {"model": self.model, "keep_alive": -1})  # no prompt: load only, keep it
        return f"{self.url} ({device})"

    def unload(self) -> None:
        self._call("/api/generate", {"model": self.model, "keep_alive": 0})
        while any(m.get("name") == self.model for m in self._call("/api/ps").get("models", [])):
            time.sleep(0.1)  # still in memory

    def generate(self, prompt: str, work_s: float) -> str:
        body = {"model": self.model, "prompt": prompt, "stream": False, "keep_alive": -1}
        return str(self._call("/api/generate", body)["response"])


class TorchServer:
    """A PyTorch model. A real server would load its weights here, e.g.
    ``AutoModelForCausalLM.from_pretrained(name, torch_dtype=torch.bfloat16).to(device)``; a small stand-in
    module keeps the example quick."""

    kind = "torch"

    def __init__(self, model: str) -> None:
        self.model = model
        self.net: Any = None
        self.device = "cpu"

    def load(self, device: str) -> str:
        assert torch is not None
        visible = torch.cuda.is_available() and int(device.split(":")[1]) < torch.cuda.device_count()
        self.device = device if visible else "cpu"  # the CPU when this process does not see the leased GPU
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 16))
        self.net = self.net.to(self.device).eval()
        return self.device

    def unload(self) -> None:
        assert torch is not None
        self.net = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # back to the driver, not only to PyTorch's cache, before the lease goes

    def generate(self, prompt: str, work_s: float) -> str:
        assert torch is not None and self.net is not None, "a request ran without its model"
        with torch.no_grad():
            logits = self.net(torch.randn(1, 256, device=self.device))
        time.sleep(work_s)
        return f"answer to {prompt!r} ({logits.shape[-1]} logits on {self.device})"


class SimulatedServer:
    """No GPU, no network: the load and the answer are sleeps."""

    kind = "simulated"

    def __init__(self, model: str, load_s: float) -> None:
        self.model, self.load_s = model, load_s
        self.resident = False

    def load(self, device: str) -> str:
        time.sleep(self.load_s)
        self.resident = True
        return device

    def unload(self) -> None:
        self.resident = False

    def generate(self, prompt: str, work_s: float) -> str:
        assert self.resident, "a request ran without its model"
        time.sleep(work_s)
        return f"answer to {prompt!r}"


def make_backend(kind: str, model: str, ollama_url: str, load_s: float) -> ModelServer:
    if kind == "auto":
        kind = "torch" if torch is not None else "simulated"
    if kind == "ollama":
        return OllamaServer(model, ollama_url)
    if kind == "torch":
        if torch is None:
            raise SystemExit("--backend torch needs PyTorch (pip install torch)")
        return TorchServer(model)
    return SimulatedServer(model, load_s)


def server(
    name: str, redis_url: str | None, namespace: str, idle_s: float, options: Any, inbox: Any, events: Any
) -> None:
    model = MODELS[name]
    backend = make_backend(options["backend"], model, options["ollama_url"], load_s=0.05)

    def on_load(lease: Lease) -> None:  # the lease is held: load onto its device
        where = backend.load(lease.device)
        events.put((name, f"loaded {model} on {where} ({backend.kind})"))

    def on_unload(reason: str) -> None:  # reclaimed, idle_timeout, lost or closed: free the memory, then return
        backend.unload()
        events.put((name, f"unloaded {model} ({reason})"))

    with (
        GPUBoss(redis_url, namespace=namespace, service=name, gpus=GPUS, default_ttl=max(3.0, idle_s)) as boss,
        boss.keep_warm(model, vram_gb=16, idle_timeout_s=idle_s, on_load=on_load, on_unload=on_unload) as warm,
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
    parser.add_argument("--backend", choices=["auto", "simulated", "torch", "ollama"], default="auto")
    parser.add_argument("--ollama-url", default="http://localhost:11434")
    parser.add_argument("--quick", action="store_true", help="a short run (for tests)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    rounds, work_s, idle_s = (3, 0.05, 1.0) if args.quick else (5, 0.5, 3.0)
    options = {"backend": args.backend, "ollama_url": args.ollama_url}

    ctx = multiprocessing.get_context("spawn")
    events = ctx.Queue()
    inboxes = {name: ctx.Queue() for name in MODELS}
    procs = {
        name: ctx.Process(
            target=server, args=(name, args.redis_url, args.namespace, idle_s, options, inboxes[name], events)
        )
        for name in MODELS
    }
    answers = 0

    def show_until(what: Any) -> None:
        nonlocal answers
        while True:
            event = events.get(timeout=600 if args.backend == "ollama" else 120)
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
