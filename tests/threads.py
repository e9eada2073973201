"""Small helpers of the in-process tests: run a blocking call on a thread, take its result, wait for a state."""

from __future__ import annotations

import threading
import time
from typing import Any

#: How long a helper waits before it fails the test (the outcome is awaited; no duration is asserted).
WAIT_S = 10.0


def until(check: Any, what: str, limit: float = WAIT_S) -> None:
    """Wait until ``check()`` is true; fail the test naming ``what`` if it is not within ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


def in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """Start ``fn()`` on a daemon thread; its return value or exception lands in the dict."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as err:  # noqa: BLE001  # handed to the test by result(), which re-raises it
            out["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def result(thread: threading.Thread, out: dict[str, Any], limit: float = WAIT_S) -> Any:
    """The return value of a call started by in_thread (its exception is raised here)."""
    thread.join(limit)
    assert not thread.is_alive(), "the call did not return in time"
    if "error" in out:
        raise out["error"]
    return out["value"]
