"""A reference for the uncontended target: a minimal Lua VRAM lease, sent the way floor A is sent.

The target puts an uncontended ``acquire()`` + ``release()`` within 2.5x of two trivial ``EVALSHA`` round trips.
This measures what the least a correct Lua lease does costs against that floor: one GPU's capacity, leases
with a TTL that the next acquire reclaims, a fencing token, and a refusal while anybody waits (an empty queue
is read, never written). It has no priority queue or wake lists, no events, no policy, no placement over
several GPUs, no usage counters and no header: everything gpuboss's scripts do besides. Both scripts are
sent by ``EVALSHA`` through :func:`gpuboss.redis_io.direct_command`, as floor A is (gpuboss's own calls are
``FCALL`` of its library where the server has functions: the same cost for the call itself), so the ratio of
this pair to two floor-A round trips is what the scripts' own work adds.

Not a gpuboss operation, so not in ``lua/``: the scripts are here, each with its header.
"""

from __future__ import annotations

import time
import uuid

from gpuboss.config import gb_to_mib
from gpuboss.redis_io import direct_command

from bench.env import connect
from bench.handoff import EXCLUSIVE_GB
from bench.uncontended import WARMUP, Cycles

#: The lease each cycle takes: the whole GPU, as the other uncontended rows do.
MIB = gb_to_mib(EXCLUSIVE_GB)

#: Its row in the uncontended section (and how the targets name it).
ROW = "reference, not gpuboss: minimal Lua lease, acquire + release"

ACQUIRE = """
--[[
  minimal acquire: reclaim the expired leases, then grant `need` MiB if it fits and nobody waits.
  KEYS[1] gpu hash (cap, used)  KEYS[2] leases hash  KEYS[3] lease expiry zset  KEYS[4] queue zset
  KEYS[5] token counter
  ARGV[1] lease id  ARGV[2] MiB  ARGV[3] ttl ms  ARGV[4] service  ARGV[5] pid
  Reply: {1, lease JSON} granted; {0} does not fit now
]]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 16)) do
  local raw = redis.call('HGET', KEYS[2], id)
  if raw then
    redis.call('HINCRBY', KEYS[1], 'used', -cjson.decode(raw).vram_mib)
    redis.call('HDEL', KEYS[2], id)
  end
  redis.call('ZREM', KEYS[3], id)
end
local gpu = redis.call('HMGET', KEYS[1], 'cap', 'used')
local need, ttl = tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('ZCARD', KEYS[4]) > 0 or (tonumber(gpu[2]) or 0) + need > tonumber(gpu[1]) then
  return {0}
end
local token = redis.call('INCR', KEYS[5])
redis.call('HINCRBY', KEYS[1], 'used', need)
local rec = cjson.encode({id = ARGV[1], gpu = 'gpu0', device = 'cuda:0', vram_mib = need, token = token,
  acquired_at = now, expires_at = now + ttl, service = ARGV[4], pid = tonumber(ARGV[5])})
redis.call('HSET', KEYS[2], ARGV[1], rec)
redis.call('ZADD', KEYS[3], now + ttl, ARGV[1])
return {1, rec}
"""

RELEASE = """
--[[
  minimal release: remove the lease and give its MiB back.
  KEYS: as the minimal acquire's.  ARGV[1] lease id
  Reply: 1 released; 0 no such lease
]]
local raw = redis.call('HGET', KEYS[2], ARGV[1])
if not raw then
  return 0
end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'used', -cjson.decode(raw).vram_mib)
return 1
"""


class MinimalLease:
    """The minimal acquire and release of the whole GPU, one process, in a namespace of its own."""

    def __init__(self, url: str) -> None:
        self.client = connect(url)
        prefix = f"benchmin{uuid.uuid4().hex[:10]}"
        self.keys = [f"{prefix}:{name}" for name in ("gpu", "leases", "lease_exp", "queue", "token")]
        self.client.hset(self.keys[0], mapping={"cap": MIB, "used": 0})
        self.acquire_sha: str = self.client.script_load(ACQUIRE)
        self.release_sha: str = self.client.script_load(RELEASE)
        self.cycles = Cycles()
        self._loop(WARMUP, Cycles())

    def _loop(self, n: int, cycles: Cycles) -> None:
        client, keys, mono = self.client, self.keys, time.monotonic
        calls = [
            (
                ("EVALSHA", self.acquire_sha, len(keys), *keys, rid, MIB, 30_000, "bench-minimal", 1),
                ("EVALSHA", self.release_sha, len(keys), *keys, rid),
            )
            for rid in (uuid.uuid4().hex for _ in range(n))
        ]
        for acquire, release in calls:
            t0 = mono()
            granted = direct_command(client, acquire)
            t1 = mono()
            released = direct_command(client, release)
            t2 = mono()
            if granted is NotImplemented or int(granted[0]) != 1 or released != 1:
                raise RuntimeError(f"minimal lease: unexpected replies {granted!r}, {released!r}")
            cycles.add(t0, t1, t2)

    def sample(self, n: int) -> None:
        self._loop(n, self.cycles)

    def close(self) -> None:
        self.client.delete(*self.keys)  # (the leases and their expiry went with the last release)
        self.client.close()
