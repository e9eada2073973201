"""A small TCP proxy whose live connections can be cut at will: the "dropped connection" fault of the chaos run.

:class:`Proxy` listens on a loopback port and relays every connection it accepts to a target (Redis), on an
asyncio loop in a thread of its own. :meth:`Proxy.cut` aborts every live connection at once, on both sides
(the client sees a reset or EOF, exactly as when a network path or a load balancer drops it); new
connections are relayed as before. When the target refuses a connection (Redis is restarting) the client's
connection is closed at once.

Standalone: ``python -m bench.proxy --target 127.0.0.1:6380 [--port 7000]``; SIGUSR1 cuts every live
connection, SIGINT or SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

CHUNK = 65536


@dataclass
class ProxyStats:
    accepted: int = 0
    refused: int = 0  # the target could not be reached: the client's connection was closed
    cut: int = 0  # connections aborted by cut()
    cuts: int = 0  # calls of cut()


class _Pair:
    """One relayed connection: the client side and the target side."""

    def __init__(self, client: asyncio.StreamWriter, target: asyncio.StreamWriter) -> None:
        self.client = client
        self.target = target

    def abort(self) -> None:
        for writer in (self.client, self.target):
            writer.transport.abort()


class Proxy:
    """Relay ``127.0.0.1:<port>`` to ``target_host:target_port``; :meth:`cut` drops every live connection."""

    def __init__(self, target_host: str, target_port: int, port: int = 0, host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.port = port
        self.stats = ProxyStats()
        self._pairs: set[_Pair] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    # -- control, from any thread

    def start(self) -> Proxy:
        """Start the loop thread and listen; returns once the port is bound."""
        self._thread = threading.Thread(target=self._run, name="chaos-proxy", daemon=True)
        self._thread.start()
        self._ready.wait(timeout=10)
        if self._error is not None:
            raise RuntimeError(f"proxy did not start: {self._error}") from self._error
        if not self._ready.is_set():
            raise RuntimeError("proxy did not start within 10 s")
        return self

    def cut(self) -> int:
        """Abort every live connection now; how many were cut."""
        return self._call(self._cut)

    def live(self) -> int:
        """How many connections are relayed now."""
        return self._call(lambda: len(self._pairs))

    def stop(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop stopped meanwhile
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _call(self, fn: Callable[[], int]) -> int:
        loop = self._loop
        if loop is None:
            raise RuntimeError("proxy not started")

        async def run() -> int:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout=10)

    # -- the loop thread

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._listen())
        except OSError as err:
            self._error = err
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._relay, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        self._cut()
        asyncio.get_running_loop().call_soon(asyncio.get_running_loop().stop)

    def _cut(self) -> int:
        pairs = list(self._pairs)
        self._pairs.clear()
        for pair in pairs:
            pair.abort()
        self.stats.cuts += 1
        self.stats.cut += len(pairs)
        return len(pairs)

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.stats.accepted += 1
        try:
            target_reader, target_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            self.stats.refused += 1
            client_writer.transport.abort()
            return
        pair = _Pair(client_writer, target_writer)
        self._pairs.add(pair)
        try:
            await asyncio.gather(_pump(client_reader, target_writer), _pump(target_reader, client_writer))
        finally:
            self._pairs.discard(pair)
            pair.abort()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy one direction until EOF or an error on either side (which ends the pair)."""
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass  # the other side went away, or the pair was cut: the finally of _relay closes both sides
    finally:
        writer.transport.abort()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.proxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="HOST:PORT to relay to")
    parser.add_argument("--port", type=int, default=0, help="loopback port to listen on (0: any free one)")
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    proxy = Proxy(host or "127.0.0.1", int(port), port=args.port).start()
    print(f"relaying 127.0.0.1:{proxy.port} -> {args.target}; SIGUSR1 cuts every connection", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: print(f"cut {proxy.cut()} connections", flush=True))
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass  # Ctrl-C: stop like SIGTERM
    proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
