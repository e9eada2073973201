--[[
  release: give up a lease or withdraw a queued request, and hand the capacity to the queue.

  Used for a normal release, for a request that timed out or was cancelled (if it was granted in the
  meantime, that grant is released: never leaked), and on shutdown. Releasing an id that is already gone
  is harmless. Any grant pushed for the id but not yet taken by its waiter is deleted.

  Events: `released` (a lease), `timed_out` (a queued request withdrawn with reason 'timeout') or
  `withdrawn` (one withdrawn for any other reason); `granted` for each waiter served, `expired` for what
  was collected first.

  Runs on a server that is out of memory (function flag allow-oom, see gpuboss/scripts.py): it rewrites
  records in place or gives memory back, so a full shared Redis does not cost holders their leases.

  Input:
    KEYS[1..19]  the state layout (includes/state.lua)
    KEYS[20]    events       pub/sub channel (includes/emit.lua)
    KEYS[21]    event_log    stream
    ARGV[1]     wake-list prefix
    ARGV[2]     lease or request id
    ARGV[3]     reason: 'release', 'timeout', 'cancel' or 'close' (carried by the event)
    ARGV[4]     the holder's secret
    ARGV[5]     event log cap (0: no log)

  Output:
    {1, granted, waiting}    RELEASED: the lease was removed; `granted` queued requests were granted
    {2, granted, waiting}    WITHDRAWN: the queued request was removed
    {0, granted, waiting}    NOT_FOUND: the id holds nothing (released before, or expired)
    {-1, granted, waiting}   NOT_HOLDER: the lease or request is another holder's (wrong secret); nothing changed
    `waiting` is 1 when requests still wait after the queue was served, else 0 (the releasing process then
    reads its GPU at once, if it samples one: sampler.py).
]]
--- @flags allow-oom
--- @include "state"
--- @include "emit"
--- @include "place"
--- @include "drop"
--- @include "evict"
--- @include "grant"

local id, reason = ARGV[2], ARGV[3]
local now = now_ms()
local s = load_gpus(now)
collect_expired(s, now)
local lease_raw = redis.call('HGET', K_LEASES, id)
local ticket = nil
if not lease_raw then
  ticket = redis.call('HGET', K_TICKETS, id)
end
local held = nil
if lease_raw or ticket then
  held = cjson.decode(lease_raw or ticket)
  if not is_holder(held, ARGV[4]) then
    local granted = grant_waiting(s, now)
    return {-1, granted, s.queue_empty and 0 or 1}
  end
end

local code = 0
local rec = drop_lease(s, id, lease_raw and held, lease_raw)
if rec then
  code = 1
  local ev = lease_fields(rec)
  ev.held_ms = since_ms(now, rec.acquired_at)
  ev.reason = reason
  if rec.state == 'evicting' and rec.evict then
    ev.evict_by = rec.evict.by
  end
  emit('released', now, ev)
end
-- (drop_lease deleted any grant pushed for the id that its waiter never took)
if code == 1 and redis.call('HEXISTS', K_TICKETS, id) == 1 then
  ticket = redis.call('HGET', K_TICKETS, id) -- never expected: a lease and a queued request of one id
end
if (code == 0 or ticket) and drop_request(id, s, now, reason) then
  code = 2
  local req = {id = id}
  if ticket then
    req = cjson.decode(ticket)
  end
  local ev = request_fields(req)
  ev.waited_ms = since_ms(now, req.requested_at)
  ev.reason = reason
  if reason == 'timeout' then
    emit('timed_out', now, ev)
  else
    emit('withdrawn', now, ev)
  end
end
local granted = grant_waiting(s, now)
return {code, granted, s.queue_empty and 0 or 1}
