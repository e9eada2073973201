--[[
  revoke: force-release a lease from outside its holder (an operator's `gpuboss release`, or a waiter that
  found the holder's process gone: gpuboss/procs.py), and hand its capacity to the queue in the same step.

  The holder is not told directly: its next heartbeat finds the lease gone (renew answers GONE) and fires
  its on_lost. A queued request is left alone (its waiter would queue again), unless ARGV[5] asks to
  withdraw it: a waiter does so for a request whose own process is gone.

  Events: `revoked` (with `by` and `reason`), or `withdrawn` for a queued request (with `by` and `reason`);
  `granted` for each waiter served, `expired` for what was collected first (a lease whose TTL had already
  run out is collected as expired, not revoked).

  Runs on a server that is out of memory (function flag allow-oom, see gpuboss/scripts.py): it rewrites
  records in place or gives memory back, so a full shared Redis does not cost holders their leases.

  Input:
    KEYS[1..19]  the state layout (includes/state.lua)
    KEYS[20]    events       pub/sub channel (includes/emit.lua)
    KEYS[21]    event_log    stream
    ARGV[1]     wake-list prefix
    ARGV[2]     lease id
    ARGV[3]     who revokes it (e.g. user@host), carried by the event
    ARGV[4]     why ('' for no reason given), carried by the event
    ARGV[5]     '1': withdraw the id's queued request when it has no lease; '0': leave it queued
    ARGV[6]     event log cap (0: no log)

  Output:
    {1, granted, lease}   REVOKED: the lease record (JSON) removed; `granted` queued requests were granted
    {2, granted, lease}   EXPIRED: its TTL had run out; it was collected as expired (record as JSON)
    {3, granted, request} WITHDRAWN: (ARGV[5] '1') the queued request's record (JSON) removed
    {0, granted}          NOT_FOUND: no lease has that id (released, collected before, or only queued and
                          ARGV[5] is '0'), nor a queued request (ARGV[5] '1')
]]
--- @flags allow-oom
--- @include "state"
--- @include "emit"
--- @include "place"
--- @include "drop"
--- @include "evict"
--- @include "grant"

local id = ARGV[2]
local now = now_ms()
local s = load_gpus(now)
local out = {leases = {}, requests = {}}
collect_expired(s, now, out)
for _, raw in ipairs(out.leases) do
  if cjson.decode(raw).id == id then
    return {2, grant_waiting(s, now), raw}
  end
end

-- The event of what was removed, with who removed it and why.
local function emit_removed(kind, ev)
  ev.by = ARGV[3]
  ev.reason = ARGV[4]
  emit(kind, now, ev)
end

local rec, raw = drop_lease(s, id)
if not rec then
  local ticket = ARGV[5] == '1' and redis.call('HGET', K_TICKETS, id)
  if ticket and drop_request(id, s, now, 'revoked') then
    local req = cjson.decode(ticket)
    local ev = request_fields(req)
    ev.waited_ms = since_ms(now, req.requested_at)
    emit_removed('withdrawn', ev)
    return {3, grant_waiting(s, now), ticket}
  end
  return {0, grant_waiting(s, now)}
end
local ev = lease_fields(rec)
ev.held_ms = since_ms(now, rec.acquired_at)
emit_removed('revoked', ev)
return {1, grant_waiting(s, now), raw}
