"""The lease state machine, :class:`Lease` and the :class:`Device` string handed to a ``with`` block.

A request and the lease it becomes move through these states; every change goes through
:func:`advance`, so an impossible change (a released lease granted again, say) is a bug caught at once::

    requested --queued--> queued --granted--> granted --released--> released
        |                   |                    '------lost------> lost     (expired, revoked, Redis lost it)
        '--granted----------+--timed_out-------> timed_out
                            '--cancelled-------> cancelled

``renewing`` is not a state of its own: a granted lease is renewed by the heartbeat until it leaves
``granted``.
"""

from __future__ import annotations

import enum
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gpuboss.errors import LeaseLost


class LeaseState(enum.Enum):
    REQUESTED = "requested"
    QUEUED = "queued"
    GRANTED = "granted"
    RELEASED = "released"
    LOST = "lost"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"


#: (state, event) -> next state. Nothing else is allowed.
TRANSITIONS: dict[tuple[LeaseState, str], LeaseState] = {
    (LeaseState.REQUESTED, "queued"): LeaseState.QUEUED,
    (LeaseState.REQUESTED, "granted"): LeaseState.GRANTED,
    (LeaseState.REQUESTED, "timed_out"): LeaseState.TIMED_OUT,
    (LeaseState.REQUESTED, "cancelled"): LeaseState.CANCELLED,
    (LeaseState.QUEUED, "queued"): LeaseState.QUEUED,
    (LeaseState.QUEUED, "granted"): LeaseState.GRANTED,
    (LeaseState.QUEUED, "timed_out"): LeaseState.TIMED_OUT,
    (LeaseState.QUEUED, "cancelled"): LeaseState.CANCELLED,
    (LeaseState.GRANTED, "released"): LeaseState.RELEASED,
    (LeaseState.GRANTED, "lost"): LeaseState.LOST,
    # A release after the lease was found lost, or a second release, changes nothing.
    (LeaseState.LOST, "released"): LeaseState.LOST,
    (LeaseState.RELEASED, "released"): LeaseState.RELEASED,
    (LeaseState.RELEASED, "lost"): LeaseState.RELEASED,
    (LeaseState.LOST, "lost"): LeaseState.LOST,
}


class IllegalTransition(RuntimeError):
    """A state change the table does not allow: a bug in gpuboss, never a user error."""


def advance(state: LeaseState, event: str) -> LeaseState:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"lease cannot go from {state.value} on {event!r}") from None


OnLost = Callable[["Lease"], Any]


@dataclass(eq=False)
class Lease:
    """A granted VRAM lease. Times are Unix seconds from the Redis clock."""

    id: str
    gpu: str
    device: str
    vram_mib: int
    priority: str
    token: int
    service: str
    host: str
    pid: int
    acquired_at: float
    expires_at: float
    requested_at: float
    ttl: float
    on_lost: OnLost | None = None
    state: LeaseState = LeaseState.GRANTED
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_record(cls, raw: str | dict[str, Any], on_lost: OnLost | None = None) -> Lease:
        rec = json.loads(raw) if isinstance(raw, str) else raw
        return cls(
            id=str(rec["id"]),
            gpu=str(rec["gpu"]),
            device=str(rec["device"]),
            vram_mib=int(rec["vram_mib"]),
            priority=str(rec["priority"]),
            token=int(rec["token"]),
            service=str(rec["service"]),
            host=str(rec["host"]),
            pid=int(rec["pid"]),
            acquired_at=rec["acquired_at"] / 1000,
            expires_at=rec["expires_at"] / 1000,
            requested_at=rec["requested_at"] / 1000,
            ttl=rec["ttl_ms"] / 1000,
            on_lost=on_lost,
        )

    @property
    def vram_gb(self) -> float:
        return self.vram_mib / 1024

    @property
    def lost(self) -> bool:
        """True once the lease is known to be gone while it was held."""
        return self.state is LeaseState.LOST

    @property
    def active(self) -> bool:
        return self.state is LeaseState.GRANTED

    @property
    def waited(self) -> float:
        """Seconds between the request and the grant, by the Redis clock."""
        return max(0.0, self.acquired_at - self.requested_at)

    def raise_if_lost(self) -> None:
        """Raise :class:`LeaseLost` if the lease is gone: call it at safe points of long work."""
        if self.lost:
            raise LeaseLost(f"lease {self.id} on {self.gpu} ({self.device}) was lost (expired or revoked)")

    def _move(self, event: str) -> bool:
        """Apply an event; True when the state changed."""
        with self._lock:
            before = self.state
            self.state = advance(before, event)
            return self.state is not before


class Device(str):
    """The device string of a lease (``"cuda:0"``), usable anywhere a device string goes.

    ``device.lease`` is the :class:`Lease` it came from.
    """

    lease: Lease

    def __new__(cls, lease: Lease) -> Device:
        obj = super().__new__(cls, lease.device)
        obj.lease = lease
        return obj
