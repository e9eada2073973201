--[[
  policy: store the namespace's scheduling rules, which every process's scripts then obey.

  A rule stored with the same JSON is left alone; a different one replaces it (the last process started
  with a changed configuration wins) and is announced.

  Events: `policy_changed` (with the rule's name and its new value).

  Input:
    KEYS[1]     policy       hash rule -> JSON
    KEYS[2]     events       pub/sub channel (includes/emit.lua)
    KEYS[3]     event_log    stream
    ARGV[2k-1], ARGV[2k]  (2k < #ARGV) a rule's name and its JSON value ('' removes the rule)
    ARGV[#ARGV] event log cap (0: no log)

  Output:
    {changed}   how many rules were changed
]]
--- @include "emit"

local changed = 0
local now = nil
for k = 1, #ARGV - 1, 2 do
  local name, value = ARGV[k], ARGV[k + 1]
  local old = redis.call('HGET', KEYS[1], name)
  if (old or '') ~= value then
    if value == '' then
      redis.call('HDEL', KEYS[1], name)
    else
      redis.call('HSET', KEYS[1], name, value)
    end
    if now == nil then
      local t = redis.call('TIME')
      now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    end
    emit('policy_changed', now, {
      lease = cjson.null, gpu = cjson.null, service = cjson.null, priority = cjson.null, vram_mib = cjson.null,
      rule = name, value = value,
    })
    changed = changed + 1
  end
end
return {changed}
