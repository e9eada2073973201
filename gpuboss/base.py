"""What :class:`~gpuboss.GPUBoss` and :class:`~gpuboss.AsyncGPUBoss` share besides the core: settings,
the Redis URL, the heartbeat, and the book of leases this boss holds."""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any, NamedTuple, Self

from gpuboss.config import BossConfig, config_from_arguments, load_config
from gpuboss.core import CLEAN_ERRORS, Core, LeaseRequest, YieldOutcome, YieldReply, grow_request_id
from gpuboss.errors import BossClosed, InvalidRequest, LeaseEvicted, LeaseLost, RedisUnavailable
from gpuboss.fallback import Fallback
from gpuboss.heartbeat import Heartbeat
from gpuboss.lease import EvictNotice, Lease, LeaseState
from gpuboss.notices import NoticeListener
from gpuboss.registry import Inventory
from gpuboss.topology import redact_url
from gpuboss.urls import resolve_redis_url

log = logging.getLogger("gpuboss")

#: How long a release that could not be sent is retried when the lease's own TTL is unknown.
UNKNOWN_TTL_MS = 60_000


class Releasing(NamedTuple):
    """A release on its way (:meth:`BossBase._begin_release`): the id and TTL (ms) to send, and the Lease: one
    this boss does not hold, marked released once Redis accepts (``pending``), or the one it held (``own``)."""

    lease_id: str
    ttl_ms: int
    pending: Lease | None = None
    own: Lease | None = None


class BossBase:
    def __init__(self, redis_url: str | None, config: BossConfig | None, settings: dict[str, Any]) -> None:
        self._core = Core(config if config is not None else config_from_arguments(redis_url=redis_url, **settings))
        self.url = resolve_redis_url(self._core.config)
        self._shown_url = redact_url(self.url)
        self._fallback = Fallback(self._core, self.url, self.held)  # on_redis_down (fallback.py)
        self._heartbeat = Heartbeat(self._core, self.url, self._lost, self._on_notice, self._fallback)
        self._notices = NoticeListener(
            self.url, self._core.notify_channel, self._on_notice, self._core.config.connect_timeout
        )
        self._leases: dict[str, Lease] = {}
        self._closed = False  # set by close(): nothing more is granted (the heartbeat is stopped)
        self._inventory = Inventory(self._core, self.url, self.held)  # GPU discovery, sampler (registry.py)
        log.info("gpuboss: namespace %r on Redis %s", self._core.config.namespace, self._shown_url)
        _BOSSES.add(self)

    def _after_fork(self) -> None:
        """In a forked child: a lease belongs to the process that acquired it (its pid is in the record), so the
        child holds none of its parent's. It takes a holder identity of its own, which Redis tells from the
        parent's (it cannot renew, release or resize the parent's leases), and starts with nothing held: its
        heartbeat, its exit and close() leave the parent's leases alone, and so does the end of an inherited
        ``with boss.lease()`` block (see :meth:`_begin_release`). What it acquires itself is its own."""
        self._core.new_holder()
        self._leases = {}
        self._heartbeat.after_fork()
        self._notices.after_fork(self._core.notify_channel)
        self._fallback.after_fork()
        self._inventory.after_fork()

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None, **overrides: Any) -> Self:
        """Build from a YAML file (``GPUBOSS_CONFIG`` wins over ``path``; ``GPUBOSS_REDIS_URL`` over its URL)."""
        return cls(config=load_config(path, **overrides))  # type: ignore[call-arg]

    @property
    def config(self) -> BossConfig:
        return self._core.config

    @property
    def namespace(self) -> str:
        return self._core.config.namespace

    def _check_open(self) -> None:
        """:class:`BossClosed` once ``close()`` ran: a lease granted now would never be renewed."""
        if self._closed:
            raise BossClosed(f"this {type(self).__name__} is closed: create a new one to get leases")

    def held(self) -> list[Lease]:
        """The leases this boss holds now."""
        return list(self._leases.values())

    def _granted(self, lease: Lease) -> Lease:
        self._inventory.localize(lease)  # uuid, and this process's cuda:N for it
        lease._driver = self
        lease.local = self._fallback.is_local(lease.id)  # granted by the in-process store (on_redis_down: local)
        self._leases[lease.id] = lease
        self._heartbeat.hold(lease)
        return lease

    @staticmethod
    def _wants_model(vram_gb: object, model: object, quantizations: object) -> bool:
        """Whether the size comes from the model registry (``model=``); checks the two are not mixed."""
        if model is None:
            if quantizations is not None:
                raise InvalidRequest("quantizations", quantizations, "only goes with model=...")
            if vram_gb is None:
                raise InvalidRequest("vram_gb", None, "must be a number (GB), or leave it out and give model='<name>'")
            return False
        if vram_gb is not None:
            raise InvalidRequest("model", model, "give vram_gb or model, not both")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("model", model, "must be a model name from the registry, e.g. 'gemma3:12b'")
        if quantizations is not None and (
            not isinstance(quantizations, list | tuple) or not all(isinstance(q, str) for q in quantizations)
        ):
            raise InvalidRequest("quantizations", quantizations, "must be a list of quantization names")
        return True

    def _may_be_evicted(self, req: LeaseRequest) -> bool:
        """Whether a lease of this request may get eviction notices (then the listener runs first)."""
        return req.preemptible or req.on_evict is not None or bool(self._core.config.pause)

    # -- eviction: notices, and what a hand-back did

    def _on_notice(self, notice: dict[str, Any]) -> None:
        """From the notice listener or the heartbeat thread: an eviction notice for one of our leases."""
        lease = self._leases.get(str(notice.get("lease")))
        if lease is None:
            return
        kind = notice.get("type")
        if kind == "evict":
            try:
                parsed = EvictNotice.from_json(notice)
            except (KeyError, TypeError, ValueError):
                log.warning("gpuboss: ignoring a malformed eviction notice %r", notice)
                return
            if lease._take_notice(parsed):
                log.info(
                    "gpuboss: lease %s on %s is asked to checkpoint (%d MiB for %s)",
                    lease.id,
                    lease.gpu,
                    parsed.need_mib,
                    parsed.by,
                )
                if lease.on_evict is not None:
                    self._start_eviction(lease)
        elif kind == "continue" and lease._move_if("continue"):
            log.info("gpuboss: eviction of lease %s was called off (%s)", lease.id, notice.get("reason"))

    def _start_eviction(self, lease: Lease) -> None:
        """Run the lease's checkpoint and hand-back in the background (a thread, or a task)."""
        raise NotImplementedError

    def _before_yield(self, lease: Lease) -> None:
        """The checkpoint is done: stop renewing the lease, which is about to be handed back."""
        self._heartbeat.forget(lease.id)
        if lease.resume:
            lease._move_if("suspended")
        self._inventory.released(lease)  # its GPUs are read now: the memory the checkpoint freed is seen at once

    def _after_yield(self, lease: Lease, outcome: YieldOutcome) -> None:
        """Apply what the hand-back (and the wait to resume) did to ``lease``."""
        if outcome.code in (YieldReply.CONTINUE, YieldReply.GRANTED) and outcome.record is not None:
            lease.apply_record(outcome.record)
            self._inventory.localize(lease)  # this process's cuda:N for the (possibly other) GPU
            if lease._move_if("granted") or lease._move_if("continue"):
                self._heartbeat.hold(lease)
                if lease.state is LeaseState.RELEASED:
                    # Released between the move and hold(): its release forgot it before hold() (it forgets
                    # again after the move, so one of the two forgets comes after hold()).
                    self._heartbeat.forget(lease.id)
                elif outcome.code is YieldReply.GRANTED:
                    log.info("gpuboss: lease %s resumed on %s (eviction %d)", lease.id, lease.gpu, lease.evictions)
            elif lease.state is LeaseState.RELEASED:
                # The block ended while the lease resumed. Its release forgot the id, but the resume may have
                # asked again after that release landed: Redis then took it for a new request (queued, and
                # watched, or granted at once), and the grant here belongs to nobody. Release it from the
                # heartbeat (it stops any watch of the id too); a second release of an id is harmless.
                if self._leases.get(lease.id) is lease:
                    del self._leases[lease.id]
                self._heartbeat.release_later(lease.id, int(lease.ttl * 1000))
        elif outcome.code is YieldReply.ENDED and outcome.parked:
            lease._parked = True  # suspended with no queue entry until its next busy() (docs/warm.md)
            self._leases.pop(lease.id, None)
        elif outcome.code is YieldReply.ENDED:
            lease._move_if("evicted")
            self._leases.pop(lease.id, None)
        elif outcome.code is YieldReply.GONE:
            self._leases.pop(lease.id, None)
            # Gone, or the resume gave up (Redis could not be reached): a request it had queued (and the
            # heartbeat watches) must not stay, to be granted to nobody. The heartbeat withdraws it once Redis
            # answers (an id with nothing left under it: a harmless NOT_FOUND).
            self._heartbeat.release_later(lease.id, int(lease.ttl * 1000))
            if lease._move_if("lost") and lease.on_lost is not None:
                self._dispatch_on_lost(lease)

    def _stop_waiting(self, lease: Lease) -> bool:
        """For a resume: True once the lease was released meanwhile (its block ended); the resume then withdraws
        its request. The id is forgotten here too: the release forgot it, but the resume's wait may have
        started watching it after that."""
        if lease.state is not LeaseState.RELEASED:
            return False
        self._heartbeat.forget(lease.id)
        return True

    def _begin_release(self, lease: Lease | str) -> Releasing | None:
        """Stop renewing a lease and, if this boss holds it, mark it released; its id, its TTL (ms) for the
        release call, and the Lease object to mark released once Redis accepted the release (one this boss
        does not hold: it may be another holder's, which Redis refuses; see :meth:`_end_release`), or the one
        this boss held. None for a lease this boss's process was forked from holds: nothing to send."""
        if not isinstance(lease, str | Lease):
            raise InvalidRequest("lease", lease, "must be a Lease or a lease id (str)")
        lease_id = lease if isinstance(lease, str) else lease.id
        if (
            isinstance(lease, Lease)
            and lease._driver is self
            and lease_id not in self._leases  # (a lease this process holds: no getpid() on the release path)
            and lease.pid != self._core.pid
        ):
            # Acquired by the process this one was forked from, which still holds it: not this process's to
            # give back (an inherited block ending here, say). Its parent releases it; nothing is sent.
            log.debug("gpuboss: lease %s is held by process %d, not this one: left to it", lease_id, lease.pid)
            return None
        # Forget it first: interrupted after this line, the lease is at worst left to its TTL, never renewed.
        self._heartbeat.forget(lease_id)
        obj = self._leases.pop(lease_id, None) or (lease if isinstance(lease, Lease) else None)
        if obj is None:
            return Releasing(lease_id, UNKNOWN_TTL_MS)
        if obj._driver is not self:  # another boss's: Redis may refuse (NOT_HOLDER), which must leave it alone
            return Releasing(lease_id, int(obj.ttl * 1000), pending=obj)
        obj._move("released")  # ours, at once: a resume waiting for it stops (_stop_waiting)
        # And forget it again: a resume granted meanwhile may have handed it to the heartbeat after the first
        # forget (_after_yield looks at the state after it did; see there).
        self._heartbeat.forget(lease_id)
        return Releasing(lease_id, int(obj.ttl * 1000), own=obj)

    def _end_release(self, reply: list[Any], releasing: Releasing) -> bool:
        """What a release call answered (:class:`InvalidRequest` for another holder's lease, which is then left
        as it was); ``pending`` is marked released only after Redis accepted the release. When requests still
        wait, the GPUs of a lease this boss held are read now (out of turn), so that the memory its holder gave
        back is seen by the queue at once, not at the sampler's next round (sampler.py)."""
        released = self._core.released(reply, releasing.lease_id)
        if releasing.pending is not None:
            releasing.pending._move("released")
        if releasing.own is not None and self._core.still_waiting(reply):
            self._inventory.released(releasing.own)
        return released

    def _abandon(self, lease: Lease, request_id: str) -> None:
        """A lease granted but never handed to the caller (interrupted in between): forget it, before the
        caller releases ``request_id``."""
        self._heartbeat.forget(request_id)
        self._heartbeat.forget(lease.id)
        self._leases.pop(lease.id, None)
        lease._move_if("released")

    def _close_leases(self) -> list[Lease]:
        """For close(): no more grants; the leases held, each dropped and marked released (the caller releases
        them, or the heartbeat does as it stops)."""
        self._closed = True
        leases = list(self._leases.values())
        self._leases.clear()
        for lease in leases:
            lease._move("released")
        return leases

    @staticmethod
    def _resized(lease: Lease, record: dict[str, Any]) -> Lease:
        lease.apply_record(record)
        if record.get("state") == "active":
            lease._move_if("continue")
        return lease

    def _grow_withdrawn(self, lease: Lease, error: BaseException) -> str | None:
        """A resize failed with ``error``: the ``<id>:grow`` request to release (reason ``cancel``) when ``error``
        interrupted it midway (Ctrl-C, a cancelled task). None after a clean refusal, whose flow withdrew the
        request itself, and with Redis down, where the heartbeat withdraws it once Redis is back."""
        grow_id = grow_request_id(lease.id)
        self._heartbeat.forget(grow_id)
        if isinstance(error, RedisUnavailable):
            self._heartbeat.release_later(grow_id, int(lease.ttl * 1000))
            return None
        if isinstance(error, (*CLEAN_ERRORS, LeaseLost)):
            return None
        return grow_id

    @staticmethod
    def _check_block_end(lease: Lease, on_lost: object) -> None:
        """At the end of a ``lease()`` block: a lease lost meanwhile, with nobody told, is an error; so is
        one handed back for good after an eviction request, unless the block has seen LeaseEvicted."""
        if lease.lost and on_lost is None:
            raise LeaseLost(f"lease {lease.id} on {lease.gpu} was lost while its block ran")
        if lease.evicted and not lease._evicted_seen:
            raise LeaseEvicted(f"lease {lease.id} on {lease.gpu} was handed back after an eviction request")

    def _lost(self, lease: Lease) -> None:
        """From the heartbeat thread: the lease is gone."""
        self._leases.pop(lease.id, None)
        if lease.on_lost is not None:
            self._dispatch_on_lost(lease)

    def _dispatch_on_lost(self, lease: Lease) -> None:
        raise NotImplementedError


#: Every boss of this process, for :func:`_after_fork_in_child`.
_BOSSES: weakref.WeakSet[BossBase] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for boss in list(_BOSSES):
        boss._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
