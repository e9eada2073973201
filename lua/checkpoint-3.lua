--[[
  checkpoint: a holder says it has started the checkpoint its lease was asked for (for the event stream:
  operators see how long checkpoints take). Changes nothing else.

  Events: `checkpoint_started` (with `by` and `since_request_ms`), once per eviction request.

  Runs on a server that is out of memory (function flag allow-oom, see gpuboss/scripts.py): it rewrites
  records in place or gives memory back, so a full shared Redis does not cost holders their leases.

  Input:
    KEYS[1]     leases       hash lease id -> JSON lease record
    KEYS[2]     events       pub/sub channel (includes/emit.lua)
    KEYS[3]     event_log    stream
    ARGV[1]     lease id
    ARGV[2]     the holder's secret
    ARGV[3]     event log cap (0: no log)

  Output:
    {1}   NOTED
    {0}   NOT_EVICTING: no lease under that id, or it is not being evicted (or was noted already), or it is
          not the caller's (wrong secret)
]]
--- @flags allow-oom
--- @include "emit"

local id = ARGV[1]
local raw = redis.call('HGET', KEYS[1], id)
if not raw then
  return {0}
end
local rec = cjson.decode(raw)
local sha1hex = redis.sha1hex or function(text)
  return 'plain:' .. text
end
if (rec.secret ~= nil and rec.secret ~= sha1hex(ARGV[2])) or rec.state ~= 'evicting' or not rec.evict
    or rec.evict.started_at then
  return {0}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
rec.evict.started_at = now
redis.call('HSET', KEYS[1], id, cjson.encode(rec))
emit('checkpoint_started', now, {
  lease = id, gpu = rec.gpu, service = rec.service, priority = rec.priority, vram_mib = rec.vram_mib,
  by = rec.evict.by, since_request_ms = now - rec.evict.at,
})
return {1}
