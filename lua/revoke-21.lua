--[[
  revoke: force-release a lease from outside its holder (an operator's `gpuboss release`), and hand its
  capacity to the queue in the same step.

  The holder is not told directly: its next heartbeat finds the lease gone (renew answers GONE) and fires
  its on_lost. Only leases are revoked; a queued request is left alone (its waiter would queue again).

  Events: `revoked` (with `by` and `reason`); `granted` for each waiter served, `expired` for what was
  collected first (a lease whose TTL had already run out is collected as expired, not revoked).

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
    ARGV[5]     event log cap (0: no log)

  Output:
    {1, granted, lease}   REVOKED: the lease record (JSON) removed; `granted` queued requests were granted
    {2, granted, lease}   EXPIRED: its TTL had run out; it was collected as expired (record as JSON)
    {0, granted}          NOT_FOUND: no lease has that id (released, collected before, or only queued)
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

local rec, raw = drop_lease(s, id)
if not rec then
  return {0, grant_waiting(s, now)}
end
local ev = lease_fields(rec)
ev.held_ms = since_ms(now, rec.acquired_at)
ev.by = ARGV[3]
ev.reason = ARGV[4]
emit('revoked', now, ev)
return {1, grant_waiting(s, now), raw}
