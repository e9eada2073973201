#!/usr/bin/env python3
"""A web service that leases GPU memory for each request, and answers 503 with Retry-After when it can't.

"Handle lease failures gracefully": when the GPU stays full for longer than a client should wait, the
service does not queue the request forever or crash; it says "busy, come back in N seconds".

    python examples/web_service.py                  # http://127.0.0.1:8000 on the embedded Redis
    curl -i 'http://127.0.0.1:8000/generate?prompt=hello'
    python examples/web_service.py --quick          # self-test: one 200, one 503, then exit

Only the standard library (http.server) besides gpuboss.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from urllib.parse import parse_qs, urlsplit

from gpuboss import GPUBoss, LeaseTimeout, RedisUnavailable

# The GPU this host has. In a real deployment this comes from config.yaml: GPUBoss.from_config("config.yaml").
GPUS = [{"id": "gpu0", "name": "demo GPU", "vram_gb": 24, "index": 0}]


def make_handler(boss: GPUBoss, vram_gb: float, lease_timeout: float) -> type[BaseHTTPRequestHandler]:
    # Tell clients to come back after about as long as we were willing to wait ourselves.
    retry_after = max(1, math.ceil(lease_timeout))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path == "/healthz":
                self.reply(200, {"ok": True})
                return
            if url.path != "/generate":
                self.reply(404, {"error": "try /generate?prompt=..."})
                return
            prompt = parse_qs(url.query).get("prompt", [""])[0]
            try:
                # Wait at most `lease_timeout` seconds for the memory; "high": users are waiting on this.
                with boss.lease(vram_gb=vram_gb, priority="high", timeout=lease_timeout) as device:
                    output = run_model(prompt, device)  # the model runs on `device` ("cuda:0")
            except LeaseTimeout:
                # The GPU stayed full: our request already left the queue. Shed load politely.
                self.reply(503, {"error": "GPU busy, retry later"}, {"Retry-After": str(retry_after)})
            except RedisUnavailable:
                self.reply(503, {"error": "GPU scheduler unreachable"}, {"Retry-After": "5"})
            else:  # the lease is already released: answer after giving the memory back
                self.reply(200, {"output": output, "device": str(device), "token": device.lease.token})

        def reply(self, status: int, body: dict[str, object], headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            print(f"  {self.address_string()} {format % args}", file=sys.stderr, flush=True)

    return Handler


def run_model(prompt: str, device: str) -> str:
    """Stands in for model.generate() on the leased device."""
    time.sleep(0.05)
    return f"echo from {device}: {prompt[::-1]}"


def self_test(base: str, redis_url: str | None, namespace: str) -> bool:
    """--quick: one request that gets 200, then one that gets 503 while another service holds the GPU."""

    def get(path: str) -> tuple[int, dict[str, str]]:
        try:
            with urllib.request.urlopen(base + path, timeout=30) as resp:
                return resp.status, dict(resp.headers)
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers)

    status, _ = get("/generate?prompt=hello")
    print(f"GET /generate with a free GPU: {status}", flush=True)
    ok = status == 200
    # Another service takes the whole GPU, so our handler's lease times out.
    with GPUBoss(redis_url, namespace=namespace, service="hog", gpus=GPUS) as hog, hog.lease(vram_gb=24):
        status, headers = get("/generate?prompt=hello")
        print(f"GET /generate while another service holds the GPU: {status}, Retry-After: {headers.get('Retry-After')}")
        ok = ok and status == 503 and headers.get("Retry-After") is not None
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", help="default: GPUBOSS_REDIS_URL, else the embedded Redis")
    parser.add_argument("--namespace", default="gpuboss")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--vram-gb", type=float, default=6.0, help="VRAM one request needs")
    parser.add_argument("--lease-timeout", type=float, default=2.0, help="seconds a request waits for VRAM")
    parser.add_argument("--quick", action="store_true", help="self-test on a free port, then exit")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # gpuboss logs which Redis it uses

    boss = GPUBoss(args.redis_url, namespace=args.namespace, service="web", gpus=GPUS)
    lease_timeout = min(args.lease_timeout, 0.5) if args.quick else args.lease_timeout
    handler = make_handler(boss, args.vram_gb, lease_timeout)
    server = ThreadingHTTPServer((args.host, 0 if args.quick else args.port), handler)
    base = f"http://{args.host}:{server.server_address[1]}"
    print(f"listening on {base}", flush=True)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # leave serve_forever() cleanly on SIGTERM as on Ctrl-C

    signal.signal(signal.SIGTERM, stop)
    try:
        if args.quick:
            thread = threading.Thread(target=server.serve_forever, daemon=True)
            thread.start()
            ok = self_test(base, args.redis_url, args.namespace)
            server.shutdown()
            print("PASS" if ok else "FAIL", flush=True)
            return 0 if ok else 1
        server.serve_forever()
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    finally:
        server.server_close()
        boss.close()  # gives back any lease still held
    return 0


if __name__ == "__main__":
    sys.exit(main())
