"""A consistent, read-only snapshot of a namespace (GPUs, leases, queue), for the CLI and the metrics.

One MULTI/EXEC of reads, so the numbers agree with each other; times are relative to the Redis clock.
"""

from __future__ import annotations

import json
import math
from typing import Any

import redis

from gpuboss.fmt import gb
from gpuboss.keys import Keys

#: The queue's score layout (see lua/includes/state.lua): (RANK_BASE - rank) * SEQ_SPAN + seq.
RANK_BASE = 1000
SEQ_SPAN = 2**40
RANK_NAMES = {0: "low", 1: "normal", 2: "high"}


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


def read_namespace(client: redis.Redis, keys: Keys, shown_url: str, within: float) -> dict[str, Any]:
    """A consistent snapshot (one MULTI/EXEC of reads) of a namespace: GPUs, leases and the queue."""
    from gpuboss.redis_io import retry_sync

    def fetch() -> list[Any]:
        pipe = client.pipeline(transaction=True)
        pipe.time()
        pipe.hgetall(keys.gpus)
        pipe.hgetall(keys.capacity)
        pipe.hgetall(keys.used)
        pipe.hgetall(keys.leases)
        pipe.zrange(keys.queue, 0, -1, withscores=True)
        pipe.hgetall(keys.tickets)
        pipe.zrange(keys.queue_exp, 0, -1, withscores=True)
        return pipe.execute()

    now_t, gpus_raw, capacity, used, leases_raw, queue, tickets, queue_exp = retry_sync(fetch, shown_url, within)
    entry_expiry = {str(k): int(v) for k, v in queue_exp}
    now_ms = int(now_t[0]) * 1000 + int(now_t[1]) // 1000

    gpus = []
    for gpu_id in sorted(set(gpus_raw) | set(capacity) | set(used)):
        decl = as_json_object(gpus_raw.get(gpu_id, "{}"))
        leasable = as_int(capacity.get(gpu_id, 0))
        reserve = as_int(decl.get("reserve_mib", 0))
        in_use = as_int(used.get(gpu_id, 0))
        gpus.append(
            {
                "id": gpu_id,
                "name": str(decl.get("name", "")),
                "index": as_int(decl.get("index", 0)),
                "device": f"cuda:{as_int(decl.get('index', 0))}",
                "capacity_mib": as_int(decl.get("capacity_mib", leasable + reserve)),
                "reserve_mib": reserve,
                "leasable_mib": leasable,
                "used_mib": in_use,
                "free_mib": leasable - in_use,
                "leases": 0,
            }
        )
    by_id = {g["id"]: g for g in gpus}

    leases = []
    for lease_id, raw in leases_raw.items():
        rec = as_json_object(raw)
        rec.setdefault("id", lease_id)
        acquired = as_int(rec.get("acquired_at", now_ms), now_ms)
        expires = as_int(rec.get("expires_at", now_ms), now_ms)
        rec["age_s"] = round((now_ms - acquired) / 1000, 3)
        rec["expires_in_s"] = round((expires - now_ms) / 1000, 3)
        leases.append(rec)
        if rec.get("gpu") in by_id:
            by_id[rec["gpu"]]["leases"] += 1
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
        waiting.append(rec)

    return {
        "namespace": keys.namespace,
        "time": now_ms / 1000,
        "gpus": gpus,
        "leases": leases,
        "queue": waiting,
    }


def explain_queue(snap: dict[str, Any]) -> None:
    """Add ``why`` to each queue entry of a snapshot: what the head waits for; the rest wait behind it."""
    gpus = {g["id"]: g for g in snap["gpus"]}
    for entry in snap["queue"]:
        need = as_int(entry.get("vram_mib", 0))
        pin = str(entry.get("pin") or "")
        if entry["position"] > 1:
            entry["why"] = "behind #1 (strict order)"
            continue
        eligible = [gpus[pin]] if pin in gpus else ([] if pin else list(gpus.values()))
        if not eligible:
            entry["why"] = f"GPU {pin!r} is not registered" if pin else "no GPU registered"
            continue
        best = max(eligible, key=lambda g: (g["free_mib"], g["id"]))
        if best["free_mib"] >= need:
            entry["why"] = f"fits on {best['id']} now: granted by the next call"
        else:
            free = gb(max(0, best["free_mib"]))
            if pin:
                entry["why"] = f"needs {gb(need)}, {pin} has {free} free"
            else:
                entry["why"] = f"needs {gb(need)}, at most {free} free (on {best['id']})"


def health_report(snap: dict[str, Any], min_free_mib: int | None = None) -> dict[str, Any]:
    """``{"gpu_available", "vram_total", "vram_free"}`` (MiB): available when a GPU is registered (with at
    least ``min_free_mib`` free, if given)."""
    gpus = snap["gpus"]
    total = sum(g["capacity_mib"] for g in gpus)
    free = sum(max(0, g["free_mib"]) for g in gpus)
    usable = [g for g in gpus if g["leasable_mib"] > 0]
    if min_free_mib is not None:
        usable = [g for g in usable if g["free_mib"] >= min_free_mib]
    return {"gpu_available": bool(usable), "vram_total": total, "vram_free": free}
