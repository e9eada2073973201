"""Every Redis key and channel name gpuboss uses, built in this one module.

The schema (``docs/keys.md`` has the long version), for namespace ``ns`` (default ``gpuboss``):

==================  =====  ===============================================================
key                 type   contents
==================  =====  ===============================================================
``ns:gpus``         hash   gpu id -> JSON declaration (name, index, capacity/reserve MiB)
``ns:capacity``     hash   gpu id -> leasable MiB (capacity minus reserve)
``ns:used``         hash   gpu id -> MiB leased right now
``ns:leases``       hash   lease id -> JSON lease record
``ns:lease_exp``    zset   lease id, scored by expiry (ms, Redis time)
``ns:queue``        zset   ticket id, scored by priority then arrival
``ns:tickets``      hash   ticket id -> JSON request record
``ns:queue_exp``    zset   ticket id, scored by expiry (ms, Redis time)
``ns:token``        string the last fencing token handed out
``ns:seq``          string the last arrival number handed out
``ns:observed``     hash   gpu id -> "used_mib,sampled_at_ms,max_age_ms": the last NVML reading (sampler)
``ns:offline``      hash   gpu id -> JSON {host, since, reason}: GPUs that get no new grants
``ns:holds``        hash   gpu id -> JSON reservation: VRAM being freed by eviction for one request
``ns:policy``       hash   rule name -> JSON: scheduling rules every process obeys (pause rules, ...)
``ns:usage``        hash   counters the rules read: ``class:<name>`` and ``svc:<service>`` -> active leases of
                           that priority class or service, ``svcmib:<service>`` -> MiB of its leases (all their
                           GPUs) (these three only while a pause rule or a cap reads them: ``head`` field
                           ``counting``), ``pre:<rank>:<gpu>`` -> preemptible MiB of that rank on that GPU,
                           ``idle:<lease id>`` -> ``"<MiB> <gpu>[,<gpu>...]"``: an idle warm model's lease
``ns:free``         zset   gpu id, scored by the MiB placement sees free (capacity - max(leased, observed))
``ns:free_host``    zset   ``"<host> <free MiB, 12 digits> <gpu id>"``, all scored 0: the same by host
``ns:observed_exp`` zset   gpu id, scored by when its last NVML reading goes stale (ms, Redis time)
``ns:head``         hash   the scripts' summary of the rest: ``due`` (no expiry and no check is due before it,
                           ms, Redis time), flags ``holds``, ``offline``, ``observed``, ``evictable`` (0: none),
                           ``evict_rank`` (the lowest rank a preemptible lease may have; -1: an idle one),
                           ``blocked``/``blocked_need``: the queue's head that does not fit, and its need,
                           and ``counting`` (1: the rules' counters of ``usage`` are kept)
``ns:hosts``        hash   host -> last heartbeat (ms, Redis time) of that host's GPU inventory
``ns:sampler:<gpu>`` string the holder of the right to sample one GPU (expires by itself)
``ns:holder:<id>``  pubsub a holder's own channel: eviction notices for its leases (a channel, not a key)
``ns:wake:<id>``    list   a grant pushed to the one waiter that asked for ``<id>``
``ns:event_log``    stream every event, capped (``XADD MAXLEN ~``), for replay and audit
``ns:events``       pubsub the channel every event is published on (a channel, not a key)
==================  =====  ===============================================================

The fixed keys are ``gpus``, ``capacity``, ``used``, ``token``, ``seq``, ``event_log``, ``observed``,
``offline``, ``policy``, ``usage``, ``hosts``, ``free``, ``free_host``, ``observed_exp`` and ``head`` (each exists once
something wrote it); every other key exists
only while a lease, a waiting request, a reservation or a sampler's turn does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.{}\-]{1,64}$")

#: The KEYS every lease-state script takes, in the order their headers document (``Keys.state()``).
STATE_SUFFIXES = (
    "gpus",
    "capacity",
    "used",
    "leases",
    "lease_exp",
    "queue",
    "tickets",
    "queue_exp",
    "token",
    "seq",
    "observed",
    "offline",
    "holds",
    "policy",
    "usage",
    "free",
    "free_host",
    "observed_exp",
    "head",
)

#: Keys that stay once every lease is released: the GPU registry, the two counters and the event log.
FIXED_SUFFIXES = (
    "gpus",
    "capacity",
    "used",
    "token",
    "seq",
    "event_log",
    "observed",
    "offline",
    "policy",
    "usage",
    "hosts",
    "free",
    "free_host",
    "observed_exp",
    "head",
)


@dataclass(frozen=True)
class Keys:
    """Key and channel names of one namespace."""

    namespace: str
    #: The names every call uses, built once (the namespace never changes): see :meth:`state`.
    _state: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _events: tuple[str, str] = field(init=False, repr=False, compare=False)
    _wake_prefix: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        state = tuple(self._key(s) for s in STATE_SUFFIXES)
        object.__setattr__(self, "_state", state)
        object.__setattr__(self, "_events", (self._key("events"), self._key("event_log")))
        object.__setattr__(self, "_wake_prefix", self._key("wake:"))

    def _key(self, suffix: str) -> str:
        return f"{self.namespace}:{suffix}"

    @property
    def gpus(self) -> str:
        return self._key("gpus")

    @property
    def capacity(self) -> str:
        return self._key("capacity")

    @property
    def used(self) -> str:
        return self._key("used")

    @property
    def leases(self) -> str:
        return self._key("leases")

    @property
    def lease_exp(self) -> str:
        return self._key("lease_exp")

    @property
    def queue(self) -> str:
        return self._key("queue")

    @property
    def tickets(self) -> str:
        return self._key("tickets")

    @property
    def queue_exp(self) -> str:
        return self._key("queue_exp")

    @property
    def token(self) -> str:
        return self._key("token")

    @property
    def seq(self) -> str:
        return self._key("seq")

    @property
    def observed(self) -> str:
        return self._key("observed")

    @property
    def offline(self) -> str:
        return self._key("offline")

    @property
    def holds(self) -> str:
        return self._key("holds")

    @property
    def policy(self) -> str:
        return self._key("policy")

    @property
    def usage(self) -> str:
        return self._key("usage")

    @property
    def hosts(self) -> str:
        return self._key("hosts")

    @property
    def free(self) -> str:
        """The placement index: every GPU by the MiB placement sees free on it (kept by the scripts)."""
        return self._key("free")

    @property
    def free_host(self) -> str:
        """The placement index by host (lexicographic): best fit among one host's GPUs in one range read."""
        return self._key("free_host")

    @property
    def observed_exp(self) -> str:
        """GPUs by when their stored NVML reading goes stale: the scripts re-index them then."""
        return self._key("observed_exp")

    @property
    def head(self) -> str:
        """The state header: when the scripts next need to look for expiries, and which optional hashes hold
        anything (``lua/includes/state.lua``)."""
        return self._key("head")

    def sampler(self, gpu_id: str) -> str:
        """Who may sample ``gpu_id`` now (a short-lived string key)."""
        return self._key(f"sampler:{gpu_id}")

    def holder_channel(self, holder_id: str) -> str:
        """The pub/sub channel on which one holder (one boss) hears eviction notices for its leases."""
        return self._key(f"holder:{holder_id}")

    @property
    def events(self) -> str:
        """The pub/sub channel every event is published on (a channel name, not a key)."""
        return self._key("events")

    @property
    def event_log(self) -> str:
        """The stream every event is appended to, capped at about ``events_maxlen`` entries."""
        return self._key("event_log")

    def event_keys(self) -> list[str]:
        """The two KEYS every emitting script takes last (``lua/includes/emit.lua``): channel, then log."""
        return list(self._events)

    @property
    def wake_prefix(self) -> str:
        """Prefix of the per-request wake lists; scripts append the request id."""
        return self._wake_prefix

    def wake(self, request_id: str) -> str:
        return self._wake_prefix + request_id

    @property
    def pattern(self) -> str:
        """A SCAN pattern matching every key of the namespace."""
        return self._key("*")

    def fixed(self) -> frozenset[str]:
        return frozenset(self._key(s) for s in FIXED_SUFFIXES)

    def register(self) -> list[str]:
        """The KEYS of the register script: the registry, capacity, used and the placement index."""
        return [self.gpus, self.capacity, self.used, self.free, self.free_host]

    def state(self) -> list[str]:
        """The KEYS every lease-state script takes, in the order their headers document (:data:`STATE_SUFFIXES`)."""
        return list(self._state)
