"""A small pure-Python reference model of the lease scripts in ``lua/``, for ``tests/test_model.py``.

It is written from the specification (issues 2 and 4, the script headers), not from the Lua: integer MiB per
GPU, a queue ordered by priority then arrival, strict order (a head that does not fit holds everyone behind
it), a newcomer that never jumps a waiting request of the same or a higher priority, best-fit placement
(the GPU left with the least free MiB, ties to the smaller id), fencing tokens that count up by one per
grant and never fall to Redis time (ms x 10) or below, and TTLs: every call first collects what expired
(deadline <= now), then enforces eviction grace, and hands freed capacity to the queue.

Cooperative eviction (issue 4, lua/includes/evict.lua): when the first request in line does not fit, the
leases of a strictly lower rank that are preemptible and not already being evicted are candidates; on each GPU
the request may use (its pin, no reservation of another request there), they are sorted lowest rank first,
then most recently granted, then id, taken until they free enough, then pruned from the front (a victim whose
MiB is not needed after all is dropped); the GPU needing the fewest victims wins (then the fewest MiB, then the
smaller id). The request's whole need is then held on that GPU (the holds hash: free for another request is
capacity - leased - hold), each victim goes to ``evicting`` (the last one asked only for the missing part),
and the hold goes when its request is granted, withdrawn or expires (victims back to ``active``). A hold past
its deadline with victims left revokes them (``revoke``) or is marked overdue once (``wait``). ``yield`` hands
an evicting lease back (and, with resume, queues it again at its arrival number, pinned to its GPU);
``resize`` shrinks at once (counting against what an eviction asked) or grows at once or through a queued
``<id>:grow`` request. Not modelled: pause rules and the rest of the policy hash (none is set), idle leases
(lua/activity-21.lua), NVML observations, offline GPUs, nodes and leases over several GPUs.

Replies use the reply enums of :mod:`gpuboss.core` (the documented codes); lease, request and hold records
are kept as plain dataclasses the test compares with the JSON records in Redis.

Time is the model's own ``now`` (ms); the test keeps it in step with what the scripts see. With an inexact
clock (a real redis-server, whose clock the test cannot stop) tokens are learned from the scripts, and leases
granted at the same model time are told apart by the call that granted them (the test makes sure the real
clock moves between two calls).

``known`` names script behaviours that differ from the intended semantics (see KNOWN_DIVERGENCES): by default
the model follows the intended semantics, so a script with such a bug fails the test; naming a divergence
there makes the model reproduce the script's behaviour instead (to look for other bugs meanwhile).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from gpuboss.core import ReleaseReply, RenewStatus, Reply, ResizeReply, RevokeReply, YieldReply

#: Expired entries one call collects, of each kind (lua/includes/state.lua). The tests stay far below it.
COLLECT_LIMIT = 64
#: An eviction's grace when the request carries none (lua/includes/evict.lua).
DEFAULT_GRACE_MS = 30_000

#: Differences between the scripts and the intended semantics found by this model; each name, when given to
#: the model, makes it follow the script's old behaviour instead. All four below are fixed in the scripts now
#: (tests/test_model.py replays each one as a regression test).
KNOWN_DIVERGENCES: dict[str, str] = {
    "collect-no-serve": (
        "lua/yield-21.lua and lua/resize-21.lua collect expired entries (and enforce eviction grace) but do not "
        "serve the queue on most of their answers: what the collection freed stays free while the head fits"
    ),
    "hold-blocks-head": (
        "VRAM held for a request (includes/evict.lua) counts as taken for the head of the queue even when the "
        "holder waits behind it (a request of a higher priority came after the eviction started): the head "
        "cannot be placed there nor evict there, the holder waits behind the head; both wait on a free GPU"
    ),
    "resize-drop-no-grant": (
        "lua/resize-21.lua withdraws a queued growth (same size again, or another growth size) without serving "
        "the queue: a request behind the withdrawn head that fits is not granted"
    ),
    "grow-wake-leak": (
        "drop_lease (lua/includes/drop.lua) deletes the wake list of the lease id but not the one of its growth "
        "(<id>:grow): a growth grant nobody took outlives the lease"
    ),
}


@dataclass
class Evict:
    """A lease's eviction request (the record's ``evict``)."""

    by: str
    need_mib: int
    at: int
    deadline: int
    reason: str = "priority"

    def as_record(self) -> dict[str, object]:
        return {
            "by": self.by,
            "need_mib": self.need_mib,
            "at": self.at,
            "deadline": self.deadline,
            "reason": self.reason,
        }


@dataclass
class ModelLease:
    id: str
    gpu: str
    device: str
    vram_mib: int
    rank: int
    priority: str
    ttl_ms: int
    token: int | None  # None until the test learns it (a real Redis draws it from its own clock)
    seq: int
    requested_at: int
    acquired_at: int
    expires_at: int
    service: str = "model"
    preemptible: bool | None = False
    state: str = "active"
    evict: Evict | None = None
    evictions: int = 0
    grace_ms: int | None = None
    on_grace: str | None = None
    #: Which model call granted it: orders leases granted at the same model time on an inexact clock.
    call: int = 0


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
    service: str = "model"
    preemptible: bool | None = False
    evictions: int | None = 0
    grace_ms: int | None = None
    on_grace: str | None = None
    grow_of: str | None = None  # the lease a growth (`<id>:grow`) adds to
    passed: int = 0  # later requests granted while it did not fit (overtake)

    @property
    def order(self) -> tuple[int, int]:
        return (-self.rank, self.seq)


@dataclass
class Hold:
    """A reservation (the holds hash, per GPU): ``vram_mib`` being freed by eviction for request ``id``."""

    id: str
    vram_mib: int
    priority: str
    victims: list[str]
    at: int
    deadline: int
    on_grace: str
    overdue: bool = False


@dataclass
class ModelGpu:
    id: str
    index: int
    leasable_mib: int


@dataclass
class LeaseModel:
    gpus: dict[str, ModelGpu]
    now: int = 0
    #: True when ``now`` is exactly the scripts' Redis time (tokens follow it); False: learned from the scripts.
    exact: bool = True
    #: The fencing-token counter (None: missing, or unknown on an inexact clock).
    token: int | None = None
    seq: int = 0
    leases: dict[str, ModelLease] = field(default_factory=dict)
    queue: dict[str, ModelRequest] = field(default_factory=dict)
    holds: dict[str, Hold] = field(default_factory=dict)
    #: Grants pushed to a waiter's wake list and not yet taken: request id -> lease ids.
    wake: dict[str, list[str]] = field(default_factory=dict)
    #: Known script divergences the model reproduces (KNOWN_DIVERGENCES); empty: the intended semantics.
    known: frozenset[str] = frozenset()
    #: The policy's ``overtake``: how many times a request that does not fit may be passed (0: strict order).
    overtake: int = 0
    calls: int = 0
    #: The request an acquire is placing (id, rank), for holds; None outside acquire.
    newcomer: tuple[str, int] | None = None
    #: The name of a known divergence that left the queue unserved since the last time it was served (the
    #: head may fit and wait until then), or None.
    unserved: str | None = None

    # ---------------------------------------------------------------- views

    def used(self, gpu: str) -> int:
        return sum(lease.vram_mib for lease in self.leases.values() if lease.gpu == gpu)

    def free(self, gpu: str) -> int:
        return self.gpus[gpu].leasable_mib - self.used(gpu)

    def free_for(self, gpu: str, rid: str) -> int:
        """Free MiB for request ``rid``: a hold of another request counts as taken, unless ``rid`` is served
        before that request (lua/includes/state.lua served_before)."""
        hold = self.holds.get(gpu)
        if hold is None or hold.id == rid or self.served_before(rid, hold.id):
            return self.free(gpu)
        return self.free(gpu) - hold.vram_mib

    def served_before(self, rid: str, other: str) -> bool:
        """Queued ahead of ``other``, or the newcomer being placed with a higher rank; True when ``other`` is not
        queued."""
        theirs = self.queue.get(other)
        if theirs is None:
            return True
        mine = self.queue.get(rid)
        if mine is None:
            return self.newcomer is not None and self.newcomer[0] == rid and self.newcomer[1] > theirs.rank
        return mine.order < theirs.order

    def ordered_queue(self) -> list[ModelRequest]:
        return sorted(self.queue.values(), key=lambda r: r.order)

    def live(self) -> set[str]:
        return set(self.leases) | set(self.queue)

    def empty(self) -> bool:
        return not self.leases and not self.queue

    def evicting(self) -> set[str]:
        return {rid for rid, lease in self.leases.items() if lease.state == "evicting"}

    def usage(self) -> dict[str, int]:
        """The usage hash: preemptible MiB per rank and GPU (no rule reads the other counters: none is set)."""
        return usage_of(self.leases.values(), counting=False)

    def next_ms(self) -> int:
        deadlines = [x.expires_at for x in self.leases.values()] + [x.expires_at for x in self.queue.values()]
        if not deadlines:
            return -1
        return max(0, min(deadlines) - self.now)

    def adopt_token(self, lease_id: str, token: int) -> None:
        """Learn a token the model could not know (inexact clock): it must be above every earlier one."""
        lease = self.leases[lease_id]
        assert lease.token is None and not self.exact
        assert self.token is None or token > self.token, f"token {token} of {lease_id} not above {self.token}"
        lease.token = token
        self.token = token

    # ---------------------------------------------------------------- pieces

    def place(self, need: int, pin: str, rid: str = "") -> str | None:
        """Best fit: least free MiB left after the grant, ties to the smaller id; a pin allows only that GPU."""
        candidates = [pin] if pin else sorted(self.gpus)
        fits = [(self.free_for(g, rid) - need, g) for g in candidates if g in self.gpus]
        fits = [(left, g) for left, g in fits if left >= 0]
        return min(fits)[1] if fits else None

    def _next_token(self) -> int | None:
        if not self.exact:
            return None  # drawn from the real clock: learned from the script
        token = (self.token or 0) + 1
        token = max(token, self.now * 10 + 1)  # never at or below Redis time (ms x 10)
        self.token = token
        return token

    def _grant(self, req: ModelRequest, gpu: str) -> ModelLease:
        token = self._next_token()
        self._release_hold(req.id)
        if req.grow_of is not None:
            lease = self.leases[req.grow_of]
            lease.vram_mib += req.vram_mib
            lease.token = token
            return lease
        lease = ModelLease(
            id=req.id,
            gpu=gpu,
            device=f"cuda:{self.gpus[gpu].index}",
            vram_mib=req.vram_mib,
            rank=req.rank,
            priority=req.priority,
            ttl_ms=req.ttl_ms,
            token=token,
            seq=req.seq,
            requested_at=req.requested_at,
            acquired_at=self.now,
            expires_at=self.now + req.ttl_ms,
            service=req.service,
            preemptible=req.preemptible,
            evictions=req.evictions or 0,
            grace_ms=req.grace_ms,
            on_grace=req.on_grace,
            call=self.calls,
        )
        self.leases[req.id] = lease
        return lease

    def _drop_lease(self, rid: str) -> ModelLease | None:
        self.wake.pop(rid, None)
        if "grow-wake-leak" not in self.known:
            self.wake.pop(rid + ":grow", None)  # a growth granted and never taken goes with its lease
        lease = self.leases.pop(rid, None)
        if lease is not None and lease.state == "evicting":
            hold = self.holds.get(lease.gpu)
            if hold is not None and rid in hold.victims:
                hold.victims.remove(rid)
        return lease

    def _drop_request(self, rid: str, release_hold: bool) -> bool:
        self.wake.pop(rid, None)
        dropped = self.queue.pop(rid, None) is not None
        if dropped and release_hold:
            self._release_hold(rid)
        return dropped

    def _release_hold(self, rid: str) -> None:
        """The reservation of request ``rid`` ends: its victims still evicting for it are active again."""
        for gpu, hold in list(self.holds.items()):
            if hold.id != rid:
                continue
            del self.holds[gpu]
            for victim in hold.victims:
                lease = self.leases.get(victim)
                if lease is not None and lease.state == "evicting" and lease.evict and lease.evict.by == rid:
                    lease.state, lease.evict = "active", None

    def _enforce_holds(self) -> None:
        """Grace: a hold past its deadline with victims left revokes them, or (wait) is marked overdue once."""
        for gpu in sorted(self.holds):
            hold = self.holds.get(gpu)
            if hold is None:
                continue
            if hold.id not in self.queue:
                self._release_hold(hold.id)
            elif self.now >= hold.deadline and hold.victims:
                if hold.on_grace == "revoke":
                    victims, hold.victims = hold.victims, []
                    for victim in victims:
                        self._drop_lease(victim)
                elif not hold.overdue:
                    hold.overdue = True

    def _collect(self) -> tuple[list[str], list[str]]:
        """Remove what expired (deadline <= now); the ids, in the order of their deadlines (then id)."""
        self.calls += 1
        self.newcomer = None  # each script call starts without one
        leases = sorted((x.expires_at, x.id) for x in self.leases.values() if x.expires_at <= self.now)
        lease_ids = [rid for _, rid in leases[:COLLECT_LIMIT]]
        for rid in lease_ids:
            self._drop_lease(rid)
        requests = sorted((x.expires_at, x.id) for x in self.queue.values() if x.expires_at <= self.now)
        request_ids = [rid for _, rid in requests[:COLLECT_LIMIT]]
        for rid in request_ids:
            self._drop_request(rid, release_hold=True)
        if self.holds:
            self._enforce_holds()
        return lease_ids, request_ids

    def _grant_waiting(self) -> list[str]:
        """Grant the queue in order for as long as requests fit; the first that does not fit may ask lower
        priorities to make room, and holds everyone behind it, unless it has been passed fewer than
        ``overtake`` times: then the ones behind it that fit are granted, each a pass against every such
        request ahead of it."""
        granted = []
        self.unserved = None
        passable: list[ModelRequest] = []
        evicting = False
        for req in self.ordered_queue():  # (only the request at hand leaves the queue in this loop)
            if req.grow_of is not None and req.grow_of not in self.leases:
                self._drop_request(req.id, release_hold=True)  # the lease it would grow is gone
                continue
            gpu = self.place(req.vram_mib, req.pin, req.id)
            if gpu is None:
                if not evicting:
                    evicting = True
                    self._try_evict(req)
                if req.passed < self.overtake:
                    passable.append(req)
                    continue
                break
            self._drop_request(req.id, release_hold=False)
            lease = self._grant(req, gpu)
            self.wake.setdefault(req.id, []).append(lease.id)
            granted.append(req.id)
            for ahead in passable:
                ahead.passed += 1
            if any(ahead.passed >= self.overtake for ahead in passable):
                break  # one ahead has been passed as often as it may: everyone after it waits
        return granted

    def _serve(self, divergence: str) -> None:
        """Serve the queue, as the intended semantics say; unless the script's known divergence is followed."""
        if divergence in self.known:
            head = self.ordered_queue()[0] if self.queue else None
            dead = head is not None and head.grow_of is not None and head.grow_of not in self.leases
            if head is not None and (dead or self.place(head.vram_mib, head.pin, head.id) is not None):
                self.unserved = self.unserved or divergence  # the head fits and waits: the script's bug
        else:
            self._grant_waiting()

    def _victim_key(self, lease: ModelLease) -> tuple[int, int, int, str]:
        """Lowest rank first, then the most recently granted, then the smaller id."""
        later = lease.call if not self.exact else 0  # same model time, later call: later on a real clock
        return (lease.rank, -lease.acquired_at, -later, lease.id)

    def _try_evict(self, req: ModelRequest) -> bool:
        if any(hold.id == req.id for hold in self.holds.values()) or req.grow_of is not None:
            return False
        by_gpu: dict[str, list[ModelLease]] = {}
        for lease in self.leases.values():
            if lease.state != "evicting" and lease.id != req.id and lease.preemptible and lease.rank < req.rank:
                by_gpu.setdefault(lease.gpu, []).append(lease)
        best: tuple[tuple[int, int, str], int, list[ModelLease]] | None = None
        for gpu, candidates in by_gpu.items():
            hold = self.holds.get(gpu)
            if (
                gpu not in self.gpus
                or self.gpus[gpu].leasable_mib < req.vram_mib
                or (req.pin and req.pin != gpu)
                or (hold is not None and hold.id != req.id)
            ):
                continue
            short = req.vram_mib - self.free_for(gpu, req.id)
            taken: list[ModelLease] = []
            total = 0
            for lease in sorted(candidates, key=self._victim_key):
                if total >= short:
                    break
                taken.append(lease)
                total += lease.vram_mib
            if total < short:
                continue
            i = 0
            while i < len(taken):  # a victim whose VRAM is not needed after all is let go
                if total - taken[i].vram_mib >= short:
                    total -= taken[i].vram_mib
                    del taken[i]
                else:
                    i += 1
            key = (len(taken), total, gpu)
            if best is None or key < best[0]:
                best = (key, short, taken)
        if best is None:
            return False
        (_, _, gpu), missing, victims = best
        deadline = self.now + (req.grace_ms if req.grace_ms is not None else DEFAULT_GRACE_MS)
        hold = Hold(req.id, req.vram_mib, req.priority, [], self.now, deadline, req.on_grace or "wait")
        for lease in victims:
            need = min(lease.vram_mib, missing)
            missing -= need
            hold.victims.append(lease.id)
            lease.state = "evicting"
            lease.evict = Evict(req.id, need, self.now, deadline)
        self.holds[gpu] = hold
        return True

    # ---------------------------------------------------------------- operations (one per script)

    def acquire(
        self,
        rid: str,
        need: int,
        rank: int,
        priority: str,
        pin: str,
        ttl: int,
        mode: str,
        preemptible: bool = False,
        grace_ms: int = DEFAULT_GRACE_MS,
        on_grace: str = "wait",
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
        req = ModelRequest(
            rid, need, rank, priority, pin, ttl, 0, self.now, self.now + ttl,
            preemptible=preemptible, evictions=0, grace_ms=grace_ms, on_grace=on_grace,
        )  # fmt: skip
        ordered = self.ordered_queue()
        first = ordered[0].rank if ordered else None
        self.newcomer = (rid, rank)  # placed against holds as a request of its rank (acquire's s.newcomer)
        if first is None or first < rank:  # never ahead of a waiter of the same or higher priority
            gpu = self.place(need, pin, rid)
            if gpu is not None:
                self.seq += 1  # every request takes an arrival number, granted at once or not
                req.seq = self.seq
                self._grant(req, gpu)
                return Reply.GRANTED, rid, None
        if mode != "wait":
            return Reply.BUSY, None, self.next_ms()
        self.seq += 1
        req.seq = self.seq
        self.queue[rid] = req
        if self.overtake > 0:  # it may pass the requests ahead that do not fit
            self._grant_waiting()
            if rid in self.leases:
                self.wake.pop(rid, None)  # answered with the lease itself, not through its wake list
                return Reply.GRANTED, rid, None
        elif first is None or first < rank:
            self._try_evict(req)  # first in line and it does not fit: ask lower priorities to make room
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
        if self._drop_request(rid, release_hold=True):
            code = ReleaseReply.WITHDRAWN
        return code, len(self._grant_waiting())

    def renew(self, items: Mapping[str, int]) -> tuple[int, list[RenewStatus], list[dict[str, object]]]:
        """(next_ms, a status per id, the eviction notice of each EVICTING lease in the same order)."""
        self._collect()
        self._grant_waiting()
        statuses, notices = [], []
        for rid, ttl in items.items():
            if rid in self.leases:
                lease = self.leases[rid]
                lease.expires_at = self.now + ttl
                statuses.append(RenewStatus.LEASE)
                if lease.state == "evicting" and lease.evict is not None:
                    statuses[-1] = RenewStatus.EVICTING
                    notices.append({"lease": rid, "type": "evict", **lease.evict.as_record()})
            elif rid in self.queue:
                self.queue[rid].expires_at = self.now + ttl
                statuses.append(RenewStatus.QUEUED)
            else:
                statuses.append(RenewStatus.GONE)
        self._grant_waiting()
        return self.next_ms(), statuses, notices

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

    def yield_(self, rid: str, resume: bool) -> tuple[YieldReply, object, int | None]:
        """Hand back an evicting lease: (GONE, None), (CONTINUE, lease copy), (ENDED, waiters granted),
        with resume (GRANTED, lease id) or (QUEUED, position, next_ms)."""
        self._collect()
        self._serve("collect-no-serve")
        lease = self.leases.get(rid)
        if lease is None:
            return YieldReply.GONE, None, None
        if lease.state != "evicting":
            return YieldReply.CONTINUE, copy.deepcopy(lease), None
        self._drop_lease(rid)
        if not resume:
            return YieldReply.ENDED, len(self._grant_waiting()), None
        self.queue[rid] = ModelRequest(
            rid, lease.vram_mib, lease.rank, lease.priority, lease.gpu, lease.ttl_ms, lease.seq, self.now,
            self.now + lease.ttl_ms, service=lease.service, preemptible=lease.preemptible,
            evictions=lease.evictions + 1, grace_ms=lease.grace_ms, on_grace=lease.on_grace,
        )  # fmt: skip
        self._grant_waiting()
        if rid in self.leases:
            self.wake.pop(rid, None)  # handed back in the reply instead
            return YieldReply.GRANTED, rid, None
        return YieldReply.QUEUED, self._position(rid), self.next_ms()

    def resize(self, rid: str, want: int) -> tuple[ResizeReply, object, int | None]:
        """(GONE, None), (DONE, copy of the lease as the reply carries it), (QUEUED, position, next_ms) or
        (INSUFFICIENT, the GPU's leasable MiB)."""
        self._collect()
        self._serve("collect-no-serve")
        lease = self.leases.get(rid)
        if lease is None:
            return ResizeReply.GONE, None, None
        grow_id = rid + ":grow"
        diff = want - lease.vram_mib
        if diff == 0:
            if self._drop_request(grow_id, release_hold=True):  # a growth still queued is not wanted
                self._serve("resize-drop-no-grant")
            return ResizeReply.DONE, copy.deepcopy(lease), None
        leasable = self.gpus[lease.gpu].leasable_mib
        if want > leasable:
            return ResizeReply.INSUFFICIENT, leasable, None
        if diff < 0:
            self._drop_request(grow_id, release_hold=True)
            lease.vram_mib += diff
            if lease.state == "evicting" and lease.evict is not None:
                lease.evict.need_mib += diff
                if lease.evict.need_mib <= 0:  # it gave what it was asked for: no longer evicted
                    lease.state, lease.evict = "active", None
                    hold = self.holds.get(lease.gpu)
                    if hold is not None and rid in hold.victims:
                        hold.victims.remove(rid)
            done = copy.deepcopy(lease)
            self._grant_waiting()
            return ResizeReply.DONE, done, None
        ticket = self.queue.get(grow_id)
        if ticket is not None:
            if ticket.vram_mib == diff:
                return ResizeReply.QUEUED, self._position(grow_id), self.next_ms()
            self._drop_request(grow_id, release_hold=True)  # another size: ask again
            self._serve("resize-drop-no-grant")
        ordered = self.ordered_queue()
        self.newcomer = (rid, lease.rank)  # a hold for a lower rank does not block the growth (resize's newcomer)
        if (not ordered or ordered[0].rank < lease.rank) and self.free_for(lease.gpu, rid) >= diff:
            lease.vram_mib += diff
            return ResizeReply.DONE, copy.deepcopy(lease), None
        self.seq += 1
        self.queue[grow_id] = ModelRequest(
            grow_id, diff, lease.rank, lease.priority, lease.gpu, lease.ttl_ms, self.seq, self.now,
            self.now + lease.ttl_ms, service=lease.service, preemptible=None, evictions=None, grow_of=rid,
        )  # fmt: skip
        return ResizeReply.QUEUED, self._position(grow_id), self.next_ms()

    def take(self, rid: str) -> str | None:
        """The waiter of ``rid`` pops its wake list (BLPOP): the lease id of the grant, or None."""
        pending = self.wake.get(rid)
        if not pending:
            return None
        taken = pending.pop(0)
        if not pending:
            del self.wake[rid]
        return taken


def usage_of(leases: object, *, counting: bool) -> dict[str, int]:
    """The usage hash for these leases (records or ModelLease): no field for a zero. The rules' counters (active
    leases per class and service, MiB per service) are there only while a rule reads them (``counting``:
    lua/includes/state.lua sync_counters); the preemptible MiB per rank and GPU always."""
    out: Counter[str] = Counter()
    for lease in leases:  # type: ignore[attr-defined]
        get = lease.get if isinstance(lease, dict) else lambda name, lease=lease: getattr(lease, name)
        if counting:
            out[f"class:{get('priority')}"] += 1
            out[f"svc:{get('service')}"] += 1
            out[f"svcmib:{get('service')}"] += get("vram_mib")
        if get("preemptible"):
            gpus = (lease.get("gpus") if isinstance(lease, dict) else None) or [get("gpu")]
            for gpu in gpus:
                out[f"pre:{get('rank')}:{gpu}"] += get("vram_mib") // len(gpus)
    return {k: v for k, v in out.items() if v != 0}
