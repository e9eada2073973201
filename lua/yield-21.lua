--[[
  yield: a lease asked to checkpoint hands its VRAM back, and (with resume) goes back to the queue at its
  original arrival position within its priority, pinned to the same GPU, in the same step.

  Called by the holder once its checkpoint is done. The freed VRAM goes to the queue at once (the
  request that caused the eviction holds a reservation on it, so it is served first). If the eviction was
  called off meanwhile (the requester was granted elsewhere, timed out or was cancelled), nothing changes
  and the holder keeps its lease.

  Events: `evicted` (with `by`, `resume`, `checkpoint_ms`: from the request to the hand-back), `queued`
  (the resumed request), `granted`/`resumed` for what the queue was given, `expired` for what was
  collected first.

  Runs on a server that is out of memory (function flag allow-oom, see gpuboss/scripts.py): it rewrites
  records in place or gives memory back, so a full shared Redis does not cost holders their leases.

  Input:
    KEYS[1..19] the state layout (includes/state.lua)
    KEYS[20]    events       pub/sub channel (includes/emit.lua)
    KEYS[21]    event_log    stream
    ARGV[1]     wake-list prefix
    ARGV[2]     lease id
    ARGV[3]     resume: '1' queue again (same id, same arrival number), '0' end the lease
    ARGV[4]     the holder's secret
    ARGV[5]     event log cap (0: no log)

  Output:
    {0}                         GONE: no lease under that id (expired, revoked or released), or not the
                                caller's (wrong secret)
    {1, lease}                  GRANTED: resumed and granted again at once (the new lease record, JSON)
    {2, position, next_ms}      QUEUED: resumed; waiting at this 0-based queue position
    {3, lease}                  CONTINUE: the lease is not being evicted (any more); it stays (record)
    {4, granted}                ENDED: the lease was given back for good; `granted` waiters were served
]]
--- @flags allow-oom
--- @include "state"
--- @include "emit"
--- @include "place"
--- @include "drop"
--- @include "evict"
--- @include "grant"

local id, resume = ARGV[2], ARGV[3] == '1'
local now = now_ms()
local s = load_gpus(now)
collect_expired(s, now)
grant_waiting(s, now) -- what the collection freed goes to the queue, whatever the answer below

local rec, raw = held_lease(id, ARGV[4])
if not rec then
  return {0}
end
if rec.state ~= 'evicting' then
  return {3, raw}
end
drop_lease(s, id)
local ev = lease_fields(rec)
ev.by = rec.evict.by
ev.resume = resume
ev.held_ms = since_ms(now, rec.acquired_at)
ev.checkpoint_ms = since_ms(now, rec.evict.at)
emit('evicted', now, ev)
if not resume then
  return {4, grant_waiting(s, now)}
end

local req = {
  id = id, vram_mib = rec.per_gpu_mib or rec.vram_mib, count = rec.gpus and #rec.gpus or 1,
  rank = rec.rank, priority = rec.priority, pin = rec.gpus and '' or rec.gpu,
  ttl_ms = rec.ttl_ms, service = rec.service, host = rec.host, pid = rec.pid, requested_at = now,
  seq = rec.seq, expires_at = now + rec.ttl_ms, preemptible = rec.preemptible, notify = rec.notify,
  grace_ms = rec.grace_ms, on_grace = rec.on_grace, evictions = (rec.evictions or 0) + 1, node = rec.node,
  secret = rec.secret,
}
redis.call('HSET', K_TICKETS, id, cjson.encode(req))
redis.call('ZADD', K_QUEUE, int((RANK_BASE - rec.rank) * SEQ_SPAN + rec.seq), id)
add_expiry(s, K_QUEUE_EXP, now + rec.ttl_ms, id)
local qv = request_fields(req)
qv.ahead = redis.call('ZRANK', K_QUEUE, id)
qv.ttl_ms = rec.ttl_ms
qv.resume = true
emit('queued', now, qv)
local lease = granted_now(s, id, now)
if lease then
  return {1, lease}
end
return {2, redis.call('ZRANK', K_QUEUE, id), next_expiry(now)}
