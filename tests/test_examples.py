"""Every program in ``examples/`` runs, in its short ``--quick`` mode, against the private redis-server.

The web service is also run as a real server: the test itself sends one request that gets 200 and one,
while another service holds the whole GPU, that gets 503 with a Retry-After header.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from gpuboss import GPUBoss

from tests.conftest import raw_client

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
GPU24 = [{"id": "gpu0", "name": "demo GPU", "vram_gb": 24, "index": 0}]


def example_env(tmp_path: Path) -> dict[str, str]:
    """The environment of an example: no gpuboss settings from outside, a private embedded-Redis dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUBOSS_")}
    env["GPUBOSS_RUNTIME_DIR"] = str(tmp_path / "rt")  # never the user's embedded Redis, even by mistake
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_example(name: str, url: str, namespace: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(EXAMPLES / name), "--redis-url", url, "--namespace", namespace, "--quick", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=example_env(tmp_path), check=False)


def assert_nothing_held(url: str, namespace: str) -> None:
    client = raw_client(url)
    try:
        assert client.hlen(f"{namespace}:leases") == 0
        assert client.zcard(f"{namespace}:queue") == 0
    finally:
        client.close()


def test_manual_acquire(real_url: str, namespace: str, tmp_path: Path) -> None:
    done = run_example("manual_acquire.py", real_url, namespace, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "acquired 8 GB on gpu0 (cuda:0)" in done.stdout
    assert "releasing again is harmless: False" in done.stdout
    assert done.stdout.count("ran on cuda:0") == 8
    assert "8 jobs done; at most 4 ran at once" in done.stdout
    assert f"namespace '{namespace}' on Redis {real_url}" in done.stderr  # it logs which Redis it uses
    assert_nothing_held(real_url, namespace)


def test_process_pool(real_url: str, namespace: str, tmp_path: Path) -> None:
    done = run_example("process_pool.py", real_url, namespace, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "6 tasks done by " in done.stdout and "at most 2 held the GPU at once" in done.stdout
    assert "the parent's lease after the workers exited: held True" in done.stdout
    assert " got cuda:0 (8 GB on gpu0, held by pid " in done.stdout
    assert "released by the parent: released" in done.stdout
    assert "6 requests served by " in done.stdout and " model worker(s) on cuda:0" in done.stdout
    assert "after the pool shut down, the other 20 GB were leased at once" in done.stdout
    assert "; their leases were revoked and 20 GB leased at once" in done.stdout
    assert done.stderr.count("its process, pid ") == 2  # the warning of each lease revoked (both were busy)
    assert "parent released its own 4 GB: True" in done.stdout  # Redis still had it as the parent's
    assert_nothing_held(real_url, namespace)


def test_torch_load(real_url: str, namespace: str, tmp_path: Path) -> None:
    done = run_example("torch_load.py", real_url, namespace, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "leased 4 GB on gpu0 (cuda:0)" in done.stdout
    assert "model loaded on " in done.stdout  # cuda:0 with torch and a GPU, else cpu
    assert "step 2/2: output shape (8, 10)" in done.stdout
    assert done.stdout.rstrip().endswith("lease released")
    assert_nothing_held(real_url, namespace)


def test_torch_load_on_this_machines_gpus_says_why_it_cannot_without_nvml(
    real_url: str, namespace: str, tmp_path: Path
) -> None:
    from gpuboss.nvml import discover

    if discover().gpus:
        pytest.skip("this machine has a GPU: tests/test_real_gpu.py runs the example on it")
    done = run_example("torch_load.py", real_url, namespace, tmp_path, "--gpus", "auto")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "gpuboss: gpus: auto cannot discover GPUs" in done.stderr and "Traceback" not in done.stderr
    assert_nothing_held(real_url, namespace)


def test_one_model_at_a_time(real_url: str, namespace: str, tmp_path: Path) -> None:
    done = run_example("one_model_at_a_time.py", real_url, namespace, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK: 4 model loads, never two on the GPU at the same time" in done.stdout
    assert done.stdout.count("model loaded on cuda:0 (24 GB)") == 4
    assert_nothing_held(real_url, namespace)


def test_web_service_self_test(real_url: str, namespace: str, tmp_path: Path) -> None:
    done = run_example("web_service.py", real_url, namespace, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "GET /generate with a free GPU: 200" in done.stdout
    assert "while another service holds the GPU: 503, Retry-After: 1" in done.stdout
    assert "PASS" in done.stdout
    assert_nothing_held(real_url, namespace)


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError(f"no output within {timeout} s")
    return proc.stdout.readline()


def _get(url: str) -> tuple[int, dict[str, str], dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read())


def test_web_service_answers_200_then_503_with_retry_after(real_url: str, namespace: str, tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        str(EXAMPLES / "web_service.py"),
        "--redis-url",
        real_url,
        "--namespace",
        namespace,
        "--port",
        "0",
        "--lease-timeout",
        "0.5",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=example_env(tmp_path))
    try:
        line = _read_line(proc, timeout=30)
        assert line.startswith("listening on http://"), line
        base = line.split()[-1]

        status, _, body = _get(f"{base}/generate?prompt=abc")
        assert status == 200, body
        assert body["device"] == "cuda:0"
        assert body["output"] == "echo from cuda:0: cba"

        # Another service takes the whole GPU: the web service's lease times out and it sheds the request.
        with GPUBoss(real_url, namespace=namespace, service="hog", gpus=GPU24) as hog, hog.lease(vram_gb=24):
            started = time.monotonic()
            status, headers, body = _get(f"{base}/generate?prompt=abc")
            waited = time.monotonic() - started
        assert status == 503, body
        assert headers["Retry-After"] == "1"
        assert body == {"error": "GPU busy, retry later"}
        assert 0.4 < waited < 10

        status, _, _ = _get(f"{base}/generate?prompt=again")  # the GPU is free again
        assert status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:  # pragma: no cover - only if the example hangs
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"web_service.py did not stop on SIGTERM: {out}{err}")
    assert proc.returncode == 0, out + err
    assert "shutting down" in out
    assert_nothing_held(real_url, namespace)


def test_preemptible_training(real_url: str, namespace: str, tmp_path: Path) -> None:
    done = run_example("preemptible_training.py", real_url, namespace, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK: 150/150 steps, each exactly once; 1 eviction(s)" in done.stdout
    lines = done.stdout.splitlines()
    checkpoint = next(i for i, line in enumerate(lines) if "checkpoint at step" in line)
    step = lines[checkpoint].split("checkpoint at step ")[1].split()[0]
    assert any(f"resumed at step {step} on cuda:0" in line for line in lines[checkpoint:])
    assert_nothing_held(real_url, namespace)


def test_warm_model(real_url: str, namespace: str, tmp_path: Path) -> None:
    done = run_example("warm_model.py", real_url, namespace, tmp_path, "--backend", "simulated")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK: 6 requests served, two 16 GB models taking turns on a 24 GB GPU" in done.stdout
    assert "[chat] loaded gemma3:12b on cuda:0 (simulated)" in done.stdout
    lines = done.stdout.splitlines()
    assert sum("reloaded first" in line for line in lines) >= 5  # each request found the other model loaded
    assert any(line.startswith("[chat] unloaded gemma3:12b (reclaimed)") for line in lines)
    assert any(line.startswith("[code] unloaded qwen2.5-coder:14b (reclaimed)") for line in lines)
    main = next(i for i, line in enumerate(lines) if line.startswith("[main] no requests"))
    assert any("(idle_timeout)" in line for line in lines[main:])
    assert_nothing_held(real_url, namespace)


class StubOllama(ThreadingHTTPServer):
    """The part of Ollama's HTTP API the warm-model example uses (/api/generate to load, unload and answer;
    /api/ps), keeping score: how many models were loaded at once, and any answer asked of a model not loaded."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), StubOllamaHandler)
        self.loaded: set[str] = set()
        self.most = 0
        self.calls: list[tuple[str, str]] = []
        self.cold: list[str] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class StubOllamaHandler(BaseHTTPRequestHandler):
    server: StubOllama

    def log_message(self, *args: Any) -> None:
        pass  # quiet

    def reply(self, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        assert self.path == "/api/ps"
        with self.server.lock:
            self.reply({"models": [{"name": m, "model": m} for m in sorted(self.server.loaded)]})

    def do_POST(self) -> None:
        assert self.path == "/api/generate"
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        model, stub = body["model"], self.server
        with stub.lock:
            if body.get("keep_alive") == 0 and not body.get("prompt"):
                stub.calls.append(("unload", model))
                stub.loaded.discard(model)
                self.reply({"model": model, "response": "", "done": True, "done_reason": "unload"})
                return
            if body.get("prompt"):
                stub.calls.append(("generate", model))
                if model not in stub.loaded:
                    stub.cold.append(model)  # Ollama would load it on the fly, without a lease
            else:
                stub.calls.append(("load", model))
            assert body.get("keep_alive") == -1, body  # kept loaded: gpuboss decides when it goes
            stub.loaded.add(model)
            stub.most = max(stub.most, len(stub.loaded))
        self.reply({"model": model, "response": f"answer from {model}" if body.get("prompt") else "", "done": True})


def test_warm_model_with_an_ollama_server(real_url: str, namespace: str, tmp_path: Path) -> None:
    """The example's OllamaServer against a stand-in for Ollama's API: the two models are loaded one at a time,
    each unloaded (keep_alive 0) before the other loads, and no answer is asked of a model that is not loaded."""
    stub = StubOllama()
    thread = threading.Thread(target=stub.serve_forever, daemon=True)
    thread.start()
    try:
        done = run_example(
            "warm_model.py", real_url, namespace, tmp_path, "--backend", "ollama", "--ollama-url", stub.url
        )
    finally:
        stub.shutdown()
        stub.server_close()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK: 6 requests served" in done.stdout and "(ollama)" in done.stdout
    assert stub.most == 1 and stub.cold == [] and stub.loaded == set(), (stub.most, stub.cold, stub.loaded)
    kinds = [kind for kind, _ in stub.calls]
    assert kinds.count("generate") == 6 and kinds.count("load") == kinds.count("unload") >= 6
    assert_nothing_held(real_url, namespace)
