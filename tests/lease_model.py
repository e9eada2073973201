"""A small pure-Python reference model of the lease scripts in ``lua/``, for ``tests/test_model.py``.

It is written from the specification (issue 2 and the script headers), not from the Lua: integer MiB per
GPU, a queue ordered by priority then arrival, strict order (a head that does not fit holds everyone behind
it), a newcomer that never jumps a waiting request of the same or a higher priority, best-fit placement
(the GPU left with the least free MiB, ties to the smaller id), fencing tokens that count up by one per
grant, and TTLs: every call first collects what expired (deadline <= now) and hands freed capacity to the
queue. Replies use the reply enums of :mod:`gpuboss.core` (the documented codes); lease and request
records are kept as plain dataclasses the test compares with the JSON records in Redis.

Time is the model's own ``now`` (ms); the test keeps it in step with what the scripts see.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from gpuboss.core import ReleaseReply, RenewStatus, Reply, RevokeReply

#: Expired entries one call collects, of each kind (lua/includes/state.lua). The tests stay far below it.
COLLECT_LIMIT = 64


@dataclass
class ModelLease:
    id: str
    gpu: str
    device: str
    vram_mib: int
    rank: int
    priority: str
    ttl_ms: int
    token: int | None  # None until the test learns the seed (a real Redis seeds it from its own clock)
    seq: int
    requested_at: int
    acquired_at: int
    expires_at: int


@dataclass
class ModelRequest:
    id: str
    vram_mib: int
    rank: int
    priority: str
    pin: str
    ttl_ms: int
    seq: int
    requested_at: int
    expires_at: int

    @property
    def order(self) -> tuple[int, int]:
        return (-self.rank, self.seq)


@dataclass
class ModelGpu:
    id: str
    index: int
    leasable_mib: int


@dataclass
class LeaseModel:
    gpus: dict[str, ModelGpu]
    now: int = 0
    #: Seeds the fencing-token counter from the time of the first grant; None: unknown (learned by the test).
    token_seed: Callable[[int], int] | None = None
    token: int | None = None
    seq: int = 0
    leases: dict[str, ModelLease] = field(default_factory=dict)
    queue: dict[str, ModelRequest] = field(default_factory=dict)
    #: Grants pushed to a waiter's wake list and not yet taken: request id -> lease ids.
    wake: dict[str, list[str]] = field(default_factory=dict)

    # ---------------------------------------------------------------- views

    def used(self, gpu: str) -> int:
        return sum(lease.vram_mib for lease in self.leases.values() if lease.gpu == gpu)

    def free(self, gpu: str) -> int:
        return self.gpus[gpu].leasable_mib - self.used(gpu)

    def ordered_queue(self) -> list[ModelRequest]:
        return sorted(self.queue.values(), key=lambda r: r.order)

    def live(self) -> set[str]:
        return set(self.leases) | set(self.queue)

    def empty(self) -> bool:
        return not self.leases and not self.queue

    def next_ms(self) -> int:
        deadlines = [x.expires_at for x in self.leases.values()] + [x.expires_at for x in self.queue.values()]
        if not deadlines:
            return -1
        return max(0, min(deadlines) - self.now)

    def adopt_token(self, lease_id: str, token: int) -> None:
        """Learn the seed of the token counter from the first grant (when the model could not know it)."""
        assert self.token is None or self.leases[lease_id].token is None
        self.leases[lease_id].token = token
        self.token = token

    # ---------------------------------------------------------------- pieces

    def place(self, need: int, pin: str) -> str | None:
        """Best fit: least free MiB left after the grant, ties to the smaller id; a pin allows only that GPU."""
        candidates = [pin] if pin else sorted(self.gpus)
        fits = [(self.free(g) - need, g) for g in candidates if g in self.gpus and self.free(g) >= need]
        return min(fits)[1] if fits else None

    def _grant(
        self, rid: str, need: int, rank: int, priority: str, ttl: int, seq: int, requested_at: int, gpu: str
    ) -> ModelLease:
        if self.token is None and self.token_seed is not None:
            self.token = self.token_seed(self.now)
        token = None if self.token is None else self.token + 1
        self.token = token
        lease = ModelLease(
            id=rid,
            gpu=gpu,
            device=f"cuda:{self.gpus[gpu].index}",
            vram_mib=need,
            rank=rank,
            priority=priority,
            ttl_ms=ttl,
            token=token,
            seq=seq,
            requested_at=requested_at,
            acquired_at=self.now,
            expires_at=self.now + ttl,
        )
        self.leases[rid] = lease
        return lease

    def _drop_lease(self, rid: str) -> ModelLease | None:
        self.wake.pop(rid, None)
        return self.leases.pop(rid, None)

    def _collect(self) -> tuple[list[str], list[str]]:
        """Remove what expired (deadline <= now); the ids, in the order of their deadlines (then id)."""
        leases = sorted((x.expires_at, x.id) for x in self.leases.values() if x.expires_at <= self.now)
        requests = sorted((x.expires_at, x.id) for x in self.queue.values() if x.expires_at <= self.now)
        lease_ids = [rid for _, rid in leases[:COLLECT_LIMIT]]
        request_ids = [rid for _, rid in requests[:COLLECT_LIMIT]]
        for rid in lease_ids:
            self._drop_lease(rid)
        for rid in request_ids:
            del self.queue[rid]
            self.wake.pop(rid, None)
        return lease_ids, request_ids

    def _grant_waiting(self) -> list[str]:
        """Grant the head of the queue for as long as it fits; a head that does not fit holds everyone."""
        granted = []
        while self.queue:
            head = self.ordered_queue()[0]
            gpu = self.place(head.vram_mib, head.pin)
            if gpu is None:
                break
            del self.queue[head.id]
            self._grant(head.id, head.vram_mib, head.rank, head.priority, head.ttl_ms, head.seq, head.requested_at, gpu)
            self.wake.setdefault(head.id, []).append(head.id)
            granted.append(head.id)
        return granted

    # ---------------------------------------------------------------- operations (one per script)

    def acquire(
        self, rid: str, need: int, rank: int, priority: str, pin: str, ttl: int, mode: str
    ) -> tuple[Reply, int | str | None, int | None]:
        """(code, detail, next_ms): GRANTED (lease id), QUEUED (position, next_ms), BUSY (next_ms),
        INSUFFICIENT (largest eligible MiB), UNKNOWN_GPU, NO_GPUS. The last three change nothing."""
        refused = self.refusal(need, pin)
        if refused is not None:
            return refused
        self._collect()
        self._grant_waiting()
        if rid in self.leases:
            return Reply.GRANTED, rid, None
        if rid in self.queue:
            return Reply.QUEUED, self._position(rid), self.next_ms()
        ordered = self.ordered_queue()
        if not ordered or ordered[0].rank < rank:  # never ahead of a waiter of the same or higher priority
            gpu = self.place(need, pin)
            if gpu is not None:
                self.seq += 1  # every request takes an arrival number, granted at once or not
                self._grant(rid, need, rank, priority, ttl, self.seq, self.now, gpu)
                return Reply.GRANTED, rid, None
        if mode != "wait":
            return Reply.BUSY, None, self.next_ms()
        self.seq += 1
        self.queue[rid] = ModelRequest(rid, need, rank, priority, pin, ttl, self.seq, self.now, self.now + ttl)
        return Reply.QUEUED, self._position(rid), self.next_ms()

    def refusal(self, need: int, pin: str) -> tuple[Reply, int | None, None] | None:
        """The answer to a request that can never be served (nothing is collected or written), or None."""
        if not self.gpus:
            return Reply.NO_GPUS, None, None
        if pin and pin not in self.gpus:
            return Reply.UNKNOWN_GPU, None, None
        largest = max(self.gpus[g].leasable_mib for g in ([pin] if pin else self.gpus))
        if need > largest:
            return Reply.INSUFFICIENT, largest, None
        return None

    def _position(self, rid: str) -> int:
        return [r.id for r in self.ordered_queue()].index(rid)

    def release(self, rid: str) -> tuple[ReleaseReply, int]:
        self._collect()
        code = ReleaseReply.NOT_FOUND
        if self._drop_lease(rid) is not None:
            code = ReleaseReply.RELEASED
        self.wake.pop(rid, None)
        if self.queue.pop(rid, None) is not None:
            code = ReleaseReply.WITHDRAWN
        return code, len(self._grant_waiting())

    def renew(self, items: Mapping[str, int]) -> tuple[int, list[RenewStatus]]:
        self._collect()
        self._grant_waiting()
        statuses = []
        for rid, ttl in items.items():
            if rid in self.leases:
                self.leases[rid].expires_at = self.now + ttl
                statuses.append(RenewStatus.LEASE)
            elif rid in self.queue:
                self.queue[rid].expires_at = self.now + ttl
                statuses.append(RenewStatus.QUEUED)
            else:
                statuses.append(RenewStatus.GONE)
        return self.next_ms(), statuses

    def collect(self) -> tuple[list[str], list[str], int, int]:
        """(expired lease ids, expired request ids, waiters granted, next_ms)."""
        leases, requests = self._collect()
        granted = len(self._grant_waiting())
        return leases, requests, granted, self.next_ms()

    def revoke(self, rid: str) -> tuple[RevokeReply, int]:
        """Force-release a lease: REVOKED, EXPIRED (its TTL had run out: collected as expired) or NOT_FOUND
        (a queued request is not revoked)."""
        expired, _ = self._collect()
        if rid in expired:
            return RevokeReply.EXPIRED, len(self._grant_waiting())
        if self._drop_lease(rid) is None:
            return RevokeReply.NOT_FOUND, len(self._grant_waiting())
        return RevokeReply.REVOKED, len(self._grant_waiting())

    def take(self, rid: str) -> str | None:
        """The waiter of ``rid`` pops its wake list (BLPOP): the lease id of the grant, or None."""
        pending = self.wake.get(rid)
        if not pending:
            return None
        taken = pending.pop(0)
        if not pending:
            del self.wake[rid]
        return taken
