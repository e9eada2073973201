"""A consistent, read-only snapshot of a namespace (GPUs, leases, queue), for the CLI and the metrics.

One MULTI/EXEC of reads, so the numbers agree with each other; times are relative to the Redis clock.

Each GPU's ``free_mib`` is its *effective* free VRAM, as the scripts place requests (lua/includes/state.lua):
leasable (capacity - reserve) - max(leased, observed used) - the VRAM held for a queued request by an
eviction, where "observed used" is the NVML sampler's last reading while it is fresh (Redis now - sampled_at
<= max_age); an offline GPU (no new grants) has 0 free.

The snapshot also carries the namespace's scheduling rules (``policy``: the policy hash, decoded as
``load_policy`` in lua/includes/state.lua reads it) and the usage counters the rules are checked against
(``usage``), so that :func:`explain_queue` tells why a request waits as ``held_back`` and ``grant_waiting``
(lua/includes/grant.lua) decide it.

It also carries Redis's memory settings (``redis_memory``, from ``INFO memory`` where the user may read it), and
``warnings`` about them: a policy that may evict gpuboss's keys, or a server out of memory that refuses new
requests (docs/reliability.md).

Each lease and queued request carries ``holder_process``: ``"running"`` or ``"gone"`` where its process runs
on the machine that reads the snapshot (same boot, same pid namespace: procs.py), else None. A gone one is
revoked by the next request that waits on that machine, or by ``gpuboss gc`` there.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from typing import Any

import redis
from redis.exceptions import RedisError

from gpuboss.config import PRIORITIES
from gpuboss.errors import RedisOutOfMemory
from gpuboss.fmt import gb, seconds
from gpuboss.keys import Keys
from gpuboss.procs import holder_process, identity

#: The queue's score layout (see lua/includes/state.lua): (RANK_BASE - rank) * SEQ_SPAN + seq.
RANK_BASE = 1000
SEQ_SPAN = 2**40
RANK_NAMES = {0: "low", 1: "normal", 2: "high"}

log = logging.getLogger("gpuboss")


def as_json_object(raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        return {"unparsed": raw}
    return value if isinstance(value, dict) else {"unparsed": raw}


def as_int(value: object, default: int = 0) -> int:
    try:
        return int(float(str(value)))
    except ValueError:
        return default


def parse_observed(raw: str, now_ms: int) -> dict[str, Any] | None:
    """A sampler's reading ``"used_mib,sampled_at_ms,max_age_ms"``: used MiB, its age and whether it is
    fresh (age <= max_age); None when malformed."""
    parts = raw.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        return None
    used, sampled_at, max_age = (int(p) for p in parts)
    age = now_ms - sampled_at
    return {
        "used_mib": used,
        "sampled_at": sampled_at,
        "age_s": round(age / 1000, 3),
        "max_age_s": round(max_age / 1000, 3),
        "fresh": age <= max_age,
    }


def lease_gpus(rec: dict[str, Any]) -> list[str]:
    """The GPUs a lease holds: its ``gpus`` list (a lease over several GPUs), else its one ``gpu``."""
    many = rec.get("gpus")
    if isinstance(many, list) and many:
        return [str(g) for g in many]
    one = rec.get("gpu")
    return [str(one)] if one else []


def _hold(raw: str, now_ms: int) -> dict[str, Any]:
    hold = as_json_object(raw)
    victims = hold.get("victims")
    hold["victims"] = [str(v) for v in victims] if isinstance(victims, list) else []
    hold["vram_mib"] = as_int(hold.get("vram_mib", 0))
    if "deadline" in hold:
        hold["deadline_in_s"] = round((as_int(hold["deadline"], now_ms) - now_ms) / 1000, 3)
    return hold


def _lease_state(rec: dict[str, Any], now_ms: int) -> None:
    """Fill in ``state`` (``active`` unless the record says otherwise) and ``evictions`` (0 when absent),
    and the time left to an eviction's deadline."""
    if not isinstance(rec.get("state"), str) or not rec["state"]:
        rec["state"] = "active"
    rec["evictions"] = as_int(rec.get("evictions", 0))
    if rec.get("busy") is False and "idle_since" in rec:  # a warm model between requests (docs/warm.md)
        rec["idle_for_s"] = round((now_ms - as_int(rec["idle_since"], now_ms)) / 1000, 3)
    evict = rec.get("evict")
    if isinstance(evict, dict) and "deadline" in evict:
        evict["deadline_in_s"] = round((as_int(evict["deadline"], now_ms) - now_ms) / 1000, 3)


def read_namespace(client: redis.Redis, keys: Keys, shown_url: str, within: float) -> dict[str, Any]:
    """A consistent snapshot (one MULTI/EXEC of reads) of a namespace: GPUs (with the inventory's readings,
    offline marks and eviction holds), leases and the queue. A server out of memory refuses every command queued
    in a MULTI, reads too: there the same reads go as a plain pipeline (each read consistent, not all of them
    together), so the operator still sees the namespace, and the warning that says why requests fail."""
    from gpuboss.redis_io import retry_sync

    def fetch(transaction: bool = True) -> list[Any]:
        now = client.time()  # before the MULTI: a Redis Cluster routes a transaction by its keys, and TIME has none
        pipe = client.pipeline(transaction=transaction)
        pipe.hgetall(keys.gpus)
        pipe.hgetall(keys.capacity)
        pipe.hgetall(keys.used)
        pipe.hgetall(keys.leases)
        pipe.zrange(keys.queue, 0, -1, withscores=True)
        pipe.hgetall(keys.tickets)
        pipe.zrange(keys.queue_exp, 0, -1, withscores=True)
        pipe.hgetall(keys.observed)
        pipe.hgetall(keys.offline)
        pipe.hgetall(keys.holds)
        pipe.hgetall(keys.policy)
        pipe.hgetall(keys.usage)
        return [now, *pipe.execute()]

    try:
        reply = retry_sync(fetch, shown_url, within)
    except RedisOutOfMemory:
        reply = retry_sync(lambda: fetch(transaction=False), shown_url, within)
    now_t, gpus_raw, capacity, used, leases_raw, queue, tickets, queue_exp, observed, offline, holds = reply[:11]
    policy_raw, usage_raw = reply[11:]
    entry_expiry = {str(k): int(v) for k, v in queue_exp}
    policy = _policy(policy_raw)
    now_ms = int(now_t[0]) * 1000 + int(now_t[1]) // 1000

    gpus = []
    for gpu_id in sorted(set(gpus_raw) | set(capacity) | set(used)):
        decl = as_json_object(gpus_raw.get(gpu_id, "{}"))
        leasable = as_int(capacity.get(gpu_id, 0))
        reserve = as_int(decl.get("reserve_mib", 0))
        in_use = as_int(used.get(gpu_id, 0))
        reading = parse_observed(observed[gpu_id], now_ms) if gpu_id in observed else None
        seen = reading["used_mib"] if reading is not None and reading["fresh"] else None
        hold = _hold(holds[gpu_id], now_ms) if gpu_id in holds else None
        off = as_json_object(offline[gpu_id]) if gpu_id in offline else None
        free = leasable - max(in_use, seen or 0) - (hold["vram_mib"] if hold else 0)
        gpus.append(
            {
                "id": gpu_id,
                "name": str(decl.get("name", "")),
                "index": as_int(decl.get("index", 0)),
                "device": f"cuda:{as_int(decl.get('index', 0))}",
                "host": str(decl.get("host") or ""),
                "uuid": str(decl.get("uuid") or ""),
                "pci_bus_id": str(decl.get("pci_bus_id") or ""),
                "parent_uuid": str(decl.get("parent_uuid") or ""),
                "capacity_mib": as_int(decl.get("capacity_mib", leasable + reserve)),
                "reserve_mib": reserve,
                "leasable_mib": leasable,
                "used_mib": in_use,
                "observed_mib": seen,
                "observed": reading,
                "offline": off,
                "hold": hold,
                "free_mib": 0 if off is not None else free,
                "leases": 0,
            }
        )
    by_id = {g["id"]: g for g in gpus}

    me = identity()  # (a holder on this machine: whether its process still runs, holder_process)
    leases = []
    for lease_id, raw in leases_raw.items():
        rec = as_json_object(raw)
        rec.setdefault("id", lease_id)
        acquired = as_int(rec.get("acquired_at", now_ms), now_ms)
        expires = as_int(rec.get("expires_at", now_ms), now_ms)
        rec["age_s"] = round((now_ms - acquired) / 1000, 3)
        rec["expires_in_s"] = round((expires - now_ms) / 1000, 3)
        _lease_state(rec, now_ms)
        rec["holder_process"] = holder_process(rec, me)
        leases.append(rec)
        for gpu_id in dict.fromkeys(lease_gpus(rec)):  # a lease over several GPUs counts on each of them
            if gpu_id in by_id:
                by_id[gpu_id]["leases"] += 1
    leases.sort(key=lambda r: (str(r.get("gpu", "")), as_int(r.get("token", 0))))

    waiting = []
    for position, (ticket_id, score) in enumerate(queue, start=1):
        rec = as_json_object(tickets.get(ticket_id, "{}"))
        rec.setdefault("id", ticket_id)
        rank = RANK_BASE - math.floor(float(score) / SEQ_SPAN)
        rec.setdefault("priority", RANK_NAMES.get(rank, str(rank)))
        rec["position"] = position
        rec["waiting_s"] = round((now_ms - as_int(rec.get("requested_at", now_ms), now_ms)) / 1000, 3)
        if ticket_id in entry_expiry:  # the heartbeat renews the entry's expiry, not the record's copy
            rec["expires_at"] = entry_expiry[ticket_id]
        if "expires_at" in rec:
            rec["expires_in_s"] = round((as_int(rec["expires_at"]) - now_ms) / 1000, 3)
        rec["holder_process"] = holder_process(rec, me)
        waiting.append(rec)

    return {
        "namespace": keys.namespace,
        "time": now_ms / 1000,
        "inventory": bool(observed or offline),
        "gpus": gpus,
        "leases": leases,
        "queue": waiting,
        "classes": _classes(policy.get("classes")),
        "policy": policy,
        "usage": _usage(usage_raw),
        **memory_report(read_memory(client)),
    }


def read_memory(client: redis.Redis) -> dict[str, Any] | None:
    """Redis's memory settings: ``used_memory``, ``maxmemory`` (bytes, 0: no limit) and ``maxmemory_policy``, from
    ``INFO memory``; None where they cannot be read (an ACL without INFO, as the minimal one in docs/security.md;
    a Redis Cluster, whose INFO answers per node)."""
    try:
        info = client.info("memory")
    except RedisError as err:
        log.debug("gpuboss: INFO memory not read (%s)", err)
        return None
    if not isinstance(info, dict) or "maxmemory_policy" not in info:
        return None
    return {
        "used_memory": as_int(info.get("used_memory")),
        "maxmemory": as_int(info.get("maxmemory")),
        "maxmemory_policy": str(info["maxmemory_policy"]),
    }


def _used_of(memory: dict[str, Any]) -> str:
    return f"{memory['used_memory'] / 2**20:.1f} MiB used of maxmemory {memory['maxmemory'] / 2**20:.1f} MiB"


def eviction_risk(memory: dict[str, Any] | None) -> str | None:
    """What to say when Redis may evict any of gpuboss's keys (a ``maxmemory`` with an ``allkeys-*`` policy: a
    lease record or the ``used`` counter gone, a GPU over-committed), else None."""
    if memory is None or memory["maxmemory"] <= 0 or not memory["maxmemory_policy"].startswith("allkeys-"):
        return None
    return (
        f"Redis may evict any key when full (maxmemory-policy {memory['maxmemory_policy']}; {_used_of(memory)}): it "
        "could drop gpuboss's records and over-commit a GPU; set maxmemory-policy noeviction (docs/reliability.md)"
    )


def memory_report(memory: dict[str, Any] | None) -> dict[str, Any]:
    """``redis_memory`` (None: not read), ``redis_full`` (a server at its ``maxmemory`` that does not evict, so
    it refuses new requests: ``RedisOutOfMemory``) and the ``warnings`` they call for (:func:`eviction_risk`)."""
    if memory is None:
        return {"redis_memory": None, "redis_full": False, "warnings": []}
    risk = eviction_risk(memory)
    full = risk is None and 0 < memory["maxmemory"] <= memory["used_memory"]
    warnings = [risk] if risk is not None else []
    if full:
        warnings.append(
            f"Redis is out of memory ({_used_of(memory)}): new requests are refused (RedisOutOfMemory) until memory "
            "is freed or maxmemory raised; leases already granted are still renewed and released"
        )
    return {"redis_memory": memory, "redis_full": full, "warnings": warnings}


def _policy(raw: dict[str, str]) -> dict[str, Any]:
    """The policy hash as the scripts read it (``load_policy``): ``queueing`` as it is, every other rule
    decoded from its JSON (one that is not JSON is left out: the scripts would fail on it)."""
    out: dict[str, Any] = {}
    for name, value in sorted(raw.items()):
        if name == "queueing":
            out[name] = value
            continue
        try:
            out[name] = json.loads(value)
        except ValueError:
            continue
    return out


#: The usage hash counters that the policy's rules read (lua/includes/drop.lua): active leases per class and
#: per service, and the MiB of each service's leases.
USAGE_COUNTERS = ("class:", "svc:", "svcmib:")


def _usage(raw: dict[str, str]) -> dict[str, int]:
    return {k: as_int(v) for k, v in sorted(raw.items()) if k.startswith(USAGE_COUNTERS)}


def _classes(value: object) -> dict[str, int]:
    """The namespace's priority classes as its policy stores them (``{class: rank}``, written by a boss with
    ``aging``; decoded by :func:`_policy`); empty when it stores none."""
    return {str(k): as_int(v) for k, v in _dict(value).items()}


def priority_classes(snap: dict[str, Any], configured: Iterable[str] = ()) -> list[str]:
    """The priority classes known for a snapshot: the default ones, the ``configured`` ones, the namespace's
    (its policy), and any a lease or a queued request carries; in that order, without repeats."""
    names = [*PRIORITIES, *configured, *snap.get("classes", {})]
    names += [str(r["priority"]) for r in [*snap["leases"], *snap["queue"]] if r.get("priority")]
    return list(dict.fromkeys(names))


def _leases(n: int) -> str:
    return f"{n} lease{'' if n == 1 else 's'}"


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _window_end(windows: list[Any], cls: str, now_ms: int) -> int | None:
    """The end (ms) of the time window that pauses ``cls`` at ``now_ms``, followed through the windows of that
    class that begin before it ends (adjacent days); None when none pauses it now."""
    spans = [
        (as_int(w.get("from")), as_int(w.get("to")))
        for w in windows
        if isinstance(w, dict) and w.get("class") == cls and "from" in w and "to" in w
    ]
    end = None
    for begin, to in spans:
        if begin <= now_ms < to:
            end = to if end is None else max(end, to)
    while end is not None:
        later = max((to for begin, to in spans if begin <= end < to), default=None)
        if later is None:
            break
        end = later
    return end


def describe_rules(policy: dict[str, Any], now_ms: int) -> list[str]:
    """The scheduling rules in force, one line each, for people (``gpuboss status``); empty: the defaults (strict
    order; nothing paused, capped, windowed, aged or limited in time). A rule the scripts would read as
    absent (a wrong shape) is left out, as :func:`held_back` leaves it out."""
    out: list[str] = []
    if policy.get("queueing") == "backfill":
        out.append("queueing backfill: a later request may use a GPU that none of the blocked ones ahead waits for")
    overtake = as_int(policy.get("overtake", 0))
    if overtake > 0:
        out.append(f"overtake {overtake}: a request that does not fit may be passed {overtake} times")
    for cls, info in sorted(_dict(policy.get("paused")).items()):
        if info is False:  # (as held_back: any other value pauses the class)
            continue
        by = _dict(info).get("by")
        out.append(f"class {cls} paused by gpuboss pause" + (f" ({by})" if by else ""))
    for rule in _list(policy.get("pause")):
        rule = _dict(rule)
        if rule.get("class") and _list(rule.get("while")):
            evict = ", evicting its leases" if rule.get("evict") else ""
            out.append(f"class {rule['class']} paused while {' or '.join(map(str, rule['while']))} is active{evict}")
    windows = [w for w in _list(policy.get("windows")) if isinstance(w, dict) and w.get("class")]
    for cls in sorted({str(w["class"]) for w in windows}):
        end = _window_end(windows, cls, now_ms)
        state = f"paused now, for {seconds((end - now_ms) / 1000)} more" if end is not None else "not paused now"
        out.append(f"class {cls} paused in time windows ({state})")
    caps = _dict(policy.get("caps"))
    for kind, who in (("services", "service"), ("classes", "class")):
        for name, cap in sorted(_dict(caps.get(kind)).items()):
            cap = _dict(cap)
            limits = [_leases(as_int(cap["leases"]))] if "leases" in cap else []
            limits += [gb(as_int(cap["mib"]))] if "mib" in cap else []
            if limits:
                out.append(f"{who} {name} capped at {', '.join(limits)}")
    for cls, hold in sorted(_dict(policy.get("max_hold")).items()):
        hold = _dict(hold)
        if "ms" in hold:
            then = "revoked" if hold.get("action") == "revoke" else "asked to checkpoint (evict)"
            out.append(f"class {cls} leases held at most {seconds(as_int(hold['ms']) / 1000)}, then {then}")
    aging = _dict(policy.get("aging"))
    if "every_ms" in aging:
        every = seconds(as_int(aging["every_ms"]) / 1000)
        out.append(f"aging: a waiting request moves up a class per {every} waited, at most {aging.get('max_boost')}")
    return out


def _at_cap(who: str, limit: int, active: int) -> str:
    if active == limit:
        return f"{who} at its cap of {_leases(limit)}"
    return f"{who} over its cap of {_leases(limit)} ({active} active)"


def held_back(snap: dict[str, Any], entry: dict[str, Any]) -> str:
    """Why the policy keeps a queued request waiting, with the rule's names and figures (``""`` when it does
    not): the checks of ``held_back`` in lua/includes/state.lua, in its order, on the snapshot's policy and
    usage counters. A runtime pause of the class, a pause rule (a class paused while another has active
    leases), a time window, the class's lease cap, the service's lease cap, then its VRAM cap. A growth of a
    lease (``grow_of``) adds no lease, so the lease caps do not hold it back."""
    policy: dict[str, Any] = snap.get("policy") or {}
    usage: dict[str, int] = snap.get("usage") or {}
    cls = str(entry.get("priority", ""))
    service = entry.get("service")
    need = as_int(entry.get("vram_mib", 0)) * max(1, as_int(entry.get("count", 1)))  # (request_mib: all its GPUs)
    grow = entry.get("grow_of") is not None
    now_ms = round(float(snap["time"]) * 1000)

    paused = _dict(policy.get("paused"))
    if cls in paused and paused[cls] is not False:  # (any value but false pauses it in Lua, {} and null too)
        who = _dict(paused[cls])
        text = f"class {cls} paused"
        if who.get("by"):
            text += f" by {who['by']}"
        if "at" in who:
            text += f" {seconds((now_ms - as_int(who['at'], now_ms)) / 1000)} ago"
        return text
    for rule in _list(policy.get("pause")):
        if isinstance(rule, dict) and rule.get("class") == cls:
            for other in _list(rule.get("while")):
                active = usage.get(f"class:{other}", 0)
                if active > 0:
                    return f"class {cls} paused while class {other} has {_leases(active)} (pause rule)"
    end = _window_end(_list(policy.get("windows")), cls, now_ms)
    if end is not None:
        return f"class {cls} paused by a time window, for {seconds((end - now_ms) / 1000)} more"
    caps = _dict(policy.get("caps"))
    if caps:
        cap = _dict(_dict(caps.get("classes")).get(cls))
        if cap.get("leases") is not None and not grow:
            limit, active = as_int(cap["leases"]), usage.get(f"class:{cls}", 0)
            if active >= limit:
                return _at_cap(f"class {cls}", limit, active)
        cap = _dict(_dict(caps.get("services")).get(str(service))) if service is not None else {}
        if cap.get("leases") is not None and not grow:
            limit, active = as_int(cap["leases"]), usage.get(f"svc:{service}", 0)
            if active >= limit:
                return _at_cap(f"service {service}", limit, active)
        if cap.get("mib") is not None:
            limit, held = as_int(cap["mib"]), usage.get(f"svcmib:{service}", 0)
            if held + need > limit:
                return f"service {service} would exceed its {gb(limit)} cap ({gb(held)} held + {gb(need)})"
    return ""


#: Blocked requests a backfill pass looks past before it stops (BACKFILL_LIMIT, lua/includes/grant.lua).
BACKFILL_LIMIT = 64


def explain_queue(snap: dict[str, Any]) -> None:
    """Add ``why`` to each queue entry of a snapshot, as the scripts serve the queue (``grant_waiting``,
    lua/includes/grant.lua): a request the policy holds back (:func:`held_back`) waits without blocking
    anyone and says which rule holds it; the first request that is not held back is the one the queue waits
    for (what it waits for: VRAM, a GPU, an eviction). With strict queueing the requests after it wait behind
    it; with backfill each one may take a GPU that no blocked request ahead of it waits for (the GPU with the
    most free VRAM that is large enough, or its pinned one, is kept for each), and says which GPUs are kept
    for whom; past 64 blocked requests the pass looks no further. With ``overtake``, a blocked request that
    has been passed fewer times than that neither holds the ones behind it nor keeps a GPU, and says how
    many more times it may be passed."""
    gpus = {g["id"]: g for g in snap["gpus"]}
    policy = snap.get("policy") or {}
    backfill = policy.get("queueing") == "backfill"
    overtake = as_int(policy.get("overtake", 0))
    barrier: int | None = None  # (strict) the position of the blocked request the ones after it wait behind
    kept: dict[str, int] = {}  # GPU -> the position of the blocked request it is kept for (backfill)
    blocked = 0
    for entry in snap["queue"]:
        reason = held_back(snap, entry)
        if reason:
            entry["why"] = reason
            continue
        if barrier is not None:
            entry["why"] = f"behind #{barrier} (strict order)"
            continue
        if blocked >= BACKFILL_LIMIT:
            looks = "backfill" if backfill else "the queue"
            entry["why"] = f"behind {BACKFILL_LIMIT} blocked requests: {looks} looks no further"
            continue
        left = overtake - as_int(entry.get("passed", 0))
        if not _explain_one(entry, gpus, kept if backfill else None, keep=left <= 0):
            if not backfill:  # (it fits: strict order looks at the next one after granting it)
                barrier = entry["position"]
            continue
        blocked += 1
        if left > 0:
            entry["why"] += f"; later requests may pass it {left} more time{'' if left == 1 else 's'}"
        elif not backfill:
            barrier = entry["position"]


def _explain_one(
    entry: dict[str, Any], gpus: dict[str, dict[str, Any]], kept: dict[str, int] | None, keep: bool = True
) -> bool:
    """Set ``entry["why"]`` for a request the queue tries to place now; True when it stays blocked (then, with
    backfill and ``keep``, the GPU it waits for is kept for it in ``kept``; a GPU being freed for it always is)."""
    if kept is None:  # strict: nothing is kept (only the first blocked request gets here, or with overtake)
        kept = {}
    need = as_int(entry.get("vram_mib", 0))
    pin = str(entry.get("pin") or "")
    held = [g for g in gpus.values() if g["hold"] and g["hold"].get("id") == entry.get("id")]
    if held:
        hold = held[0]["hold"]
        victims = len(hold["victims"])
        entry["why"] = (
            f"{held[0]['id']} is being freed for it: {gb(hold['vram_mib'])} held, "
            f"evicting {victims} lease{'' if victims == 1 else 's'}"
        )
        kept.setdefault(held[0]["id"], entry["position"])
        return True
    eligible = [gpus[pin]] if pin in gpus else ([] if pin else list(gpus.values()))
    if not eligible:
        entry["why"] = f"GPU {pin!r} is not registered" if pin else "no GPU registered"
        return True
    online = [g for g in eligible if g["offline"] is None]
    if not online:
        entry["why"] = f"{pin} is offline" if pin else "every GPU is offline"
        return True
    usable = [g for g in online if g["id"] not in kept]
    count = max(1, as_int(entry.get("count", 1)))
    if count > 1:
        return _explain_several(entry, need, count, usable)
    best = max(usable or online, key=lambda g: (g["free_mib"], g["id"]))
    if usable and best["free_mib"] >= need:
        entry["why"] = f"fits on {best['id']} now: granted by the next call"
        return False
    free = gb(max(0, best["free_mib"]))
    if not usable:
        entry["why"] = f"needs {gb(need)}; " + ", ".join(
            f"{g['id']} ({gb(max(0, g['free_mib']))} free) is kept for #{kept[g['id']]}"
            for g in sorted(online, key=lambda g: g["id"])
        )
    elif pin:
        entry["why"] = f"needs {gb(need)}, {pin} has {free} free"
    else:
        entry["why"] = f"needs {gb(need)}, at most {free} free (on {best['id']})"
        roomy = sorted(g["id"] for g in online if g["id"] in kept and g["free_mib"] >= need)
        if roomy:
            entry["why"] += "; " + ", ".join(f"{g} is kept for #{kept[g]}" for g in roomy)
    large = [g for g in online if g["leasable_mib"] >= need]
    if large and keep:
        wanted = pin or min(large, key=lambda g: (-g["free_mib"], g["id"]))["id"]  # (lua: target())
        kept.setdefault(wanted, entry["position"])
    return True


def _explain_several(entry: dict[str, Any], need: int, count: int, usable: list[dict[str, Any]]) -> bool:
    """A request over ``count`` GPUs of one host (lua place_multi): it fits when one host has that many GPUs
    with ``need`` free each (not kept for a request ahead); it keeps none while it waits."""
    roomy: dict[str, list[str]] = {}
    for g in usable:
        if g["free_mib"] >= need:
            roomy.setdefault(str(g.get("host") or ""), []).append(g["id"])
    ready = sorted(h for h, ids in roomy.items() if len(ids) >= count)
    if ready:
        entry["why"] = f"fits on {', '.join(sorted(roomy[ready[0]])[:count])} now: granted by the next call"
        return False
    most = max(roomy.items(), key=lambda item: (len(item[1]), item[0]), default=("", []))
    where = f" (on {most[0]})" if most[0] else ""
    entry["why"] = f"needs {count} GPUs of one host with {gb(need)} free each: at most {len(most[1])}{where}"
    return True


def health_report(snap: dict[str, Any], min_free_mib: int | None = None) -> dict[str, Any]:
    """``{"gpu_available", "vram_total", "vram_free"}`` (MiB): available when a GPU is registered and online
    (with at least ``min_free_mib`` effectively free, if given), and Redis is not out of memory (it would refuse
    every new request: then ``"redis_full": true`` too)."""
    gpus = snap["gpus"]
    total = sum(g["capacity_mib"] for g in gpus)
    free = sum(max(0, g["free_mib"]) for g in gpus)
    usable = [g for g in gpus if g["leasable_mib"] > 0 and g["offline"] is None]
    if min_free_mib is not None:
        usable = [g for g in usable if g["free_mib"] >= min_free_mib]
    report: dict[str, Any] = {"gpu_available": bool(usable), "vram_total": total, "vram_free": free}
    if snap.get("redis_full"):
        report.update(gpu_available=False, redis_full=True)
    return report
