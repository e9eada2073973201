--[[
  unload: the holder of a warm model has unloaded it; its lease is handed back in the same step, and the
  freed VRAM goes to the queue (the request that caused the unload holds a reservation on it, so it is served
  first). The lease ends whatever its state: once the model is out of memory there is nothing left to keep.

  `model_unloaded` says why: `idle_timeout` (the renew script asked it: idle longer than its idle timeout),
  `reclaimed` (asked to unload for another request: `by` is that request, `for_service` and `for_priority`
  its service and class when known, `evict_reason` `idle` when it was taken because it was idle, else the
  eviction's reason), or the holder's own reason (`closed`: its keep_warm block ended; `lost`: the lease was
  already gone, then only the event is written, from the fields the holder sends).

  Events: `evicted` (a lease asked to unload: `by`, `resume` false, `held_ms`, `checkpoint_ms`) or `released`
  (`reason` `release`), then `model_unloaded` (`model`, `reason`, `by`, `for_service`, `for_priority`,
  `evict_reason`, `held_ms`, `idle_ms`: how long it had been idle, or null); `granted` for waiters served,
  `expired` for what was collected first.

  Runs on a server that is out of memory (function flag allow-oom, see gpuboss/scripts.py): it rewrites
  records in place or gives memory back, so a full shared Redis does not cost holders their leases.

  Input:
    KEYS[1..19] the state layout (includes/state.lua)
    KEYS[20]    events       pub/sub channel (includes/emit.lua)
    KEYS[21]    event_log    stream
    ARGV[1]     wake-list prefix
    ARGV[2]     lease id
    ARGV[3]     the holder's secret
    ARGV[4]     reason when the lease is not being evicted: 'closed' or 'lost'
    ARGV[5]     JSON {model, gpu, vram_mib, service, priority}: the event's fields when the lease is gone
    ARGV[6]     event log cap (0: no log)

  Output:
    {0}             GONE: no lease under that id (or not the caller's); `model_unloaded` was still written
    {1, granted}    UNLOADED: the lease was handed back; `granted` queued requests were granted
]]
--- @flags allow-oom
--- @include "state"
--- @include "emit"
--- @include "place"
--- @include "drop"
--- @include "evict"
--- @include "grant"

local id, secret, why = ARGV[2], ARGV[3], ARGV[4]
local now = now_ms()
local s = load_gpus(now)
collect_expired(s, now)
redis.call('HDEL', K_USAGE, 'idle:' .. id)

local raw = redis.call('HGET', K_LEASES, id)
local rec = raw and cjson.decode(raw)
if rec and not is_holder(rec, secret) then
  return {0}
end
if not rec then
  local known = cjson.decode(ARGV[5])
  local mv = {
    lease = id, gpu = known.gpu or cjson.null, service = known.service or cjson.null,
    priority = known.priority or cjson.null, vram_mib = known.vram_mib or cjson.null,
    model = known.model or cjson.null, reason = why, by = cjson.null, held_ms = cjson.null, idle_ms = cjson.null,
  }
  emit('model_unloaded', now, mv)
  return {0}
end

drop_lease(s, id)
local ev = lease_fields(rec)
ev.held_ms = since_ms(now, rec.acquired_at)
local mv = lease_fields(rec)
mv.model = rec.model or cjson.null
mv.held_ms = ev.held_ms
mv.by = cjson.null
mv.reason = why
if rec.busy == false and rec.idle_since then
  mv.idle_ms = now - rec.idle_since
else
  mv.idle_ms = cjson.null
end
local e = rec.state == 'evicting' and rec.evict
if e then
  ev.by = e.by
  ev.resume = false
  ev.checkpoint_ms = since_ms(now, e.at)
  emit('evicted', now, ev)
  mv.by = e.by
  if e.reason == 'idle_timeout' then
    mv.reason = 'idle_timeout'
  else
    mv.reason = 'reclaimed'
    mv.evict_reason = e.reason
    local other = redis.call('HGET', K_TICKETS, e.by) or redis.call('HGET', K_LEASES, e.by)
    if other then
      local o = cjson.decode(other)
      mv.for_service = o.service
      mv.for_priority = o.priority
    end
  end
else
  ev.reason = 'release'
  emit('released', now, ev)
end
emit('model_unloaded', now, mv)
return {1, grant_waiting(s, now)}
