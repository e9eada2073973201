--[[
  pause: stop or restart grants of one priority class at once, in every process (`gpuboss pause CLASS`).

  Queued requests of a paused class wait (they do not fail, and they do not block other classes); active
  leases continue. Resuming serves the queue in the same step.

  Events: `paused` or `unpaused` (with `by`), and `granted` for what resuming served.

  Input:
    KEYS[1..19] the state layout (includes/state.lua)
    KEYS[20]    events       pub/sub channel (includes/emit.lua)
    KEYS[21]    event_log    stream
    ARGV[1]     wake-list prefix
    ARGV[2]     priority class
    ARGV[3]     '1' pause, '0' resume
    ARGV[4]     who (e.g. user@host), carried by the event
    ARGV[5]     event log cap (0: no log)

  Output:
    {changed, granted}   changed: 1 when the class's state changed, 0 when it already was so
]]
--- @include "state"
--- @include "emit"
--- @include "place"
--- @include "drop"
--- @include "evict"
--- @include "grant"

local class, pause, by = ARGV[2], ARGV[3] == '1', ARGV[4]
local now = now_ms()
local s = load_gpus(now)
collect_expired(s, now)
local paused = s.policy.paused
local changed = 0
if pause and not paused[class] then
  paused[class] = {by = by, at = now}
  changed = 1
elseif not pause and paused[class] then
  paused[class] = nil
  changed = 1
end
if changed == 1 then
  if next(paused) == nil then
    redis.call('HDEL', K_POLICY, 'paused')
  else
    redis.call('HSET', K_POLICY, 'paused', cjson.encode(paused))
  end
  s.policy.holds_back = #s.policy.pause > 0 or next(paused) ~= nil or #s.policy.windows > 0 or s.policy.caps ~= nil
  local kind = 'paused'
  if not pause then
    kind = 'unpaused'
  end
  emit(kind, now, {
    lease = cjson.null, gpu = cjson.null, service = cjson.null, priority = class, vram_mib = cjson.null, by = by,
  })
end
return {changed, grant_waiting(s, now)}
