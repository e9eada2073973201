--[[
  hostbeat: a host says it is alive; the GPUs of hosts silent for too long go offline, and its own come back.

  Every process that registered GPUs discovered through NVML (`gpus: auto`) calls this once at its first
  request and then every sample interval. It records the host's beat (Redis time) in the hosts hash.
  GPUs of this host that were offline because the host had gone silent come back online (`gpu_online`),
  and the queue is served, since their capacity is usable again. Every other host whose last beat is
  older than the timeout has its GPUs (the declarations in `gpus` whose `host` is that host) marked
  offline with reason `host_timeout` (`gpu_offline`), and leaves the hosts hash, so a dead host is handled
  once: its next beat brings it back. Placement skips offline GPUs (includes/place.lua); leases on them
  expire by their TTL as usual. GPUs taken offline for another reason (an operator, say) are left alone.

  Events: `gpu_offline`, `gpu_online`; `expired` and `granted` when GPUs came back and the queue was served.

  Runs on a server that is out of memory (function flag allow-oom, see gpuboss/scripts.py): it rewrites
  records in place or gives memory back, so a full shared Redis does not cost holders their leases.

  Input:
    KEYS[1..19]  the state layout (includes/state.lua)
    KEYS[20]     hosts       hash  host -> last beat (ms, Redis time)
    KEYS[21]     events      pub/sub channel (includes/emit.lua)
    KEYS[22]     event_log   stream
    ARGV[1]      wake-list prefix
    ARGV[2]      this host's name
    ARGV[3]      timeout (ms): a host silent for longer has its GPUs marked offline
    ARGV[4]      event log cap (0: no log)

  Output:
    {now, offline, online, granted}
        Redis time (ms), GPUs marked offline (other hosts), GPUs of this host back online, queued requests
        granted because of them
]]
--- @flags allow-oom
--- @include "state"
--- @include "emit"
--- @include "place"
--- @include "drop"
--- @include "evict"
--- @include "grant"

local K_HOSTS = KEYS[20]
local HOST = ARGV[2]
local TIMEOUT = tonumber(ARGV[3])
local REASON = 'host_timeout'

local now = now_ms()
redis.call('HSET', K_HOSTS, HOST, int(now))

local function gpu_event(kind, gpu, fields)
  local ev = {lease = cjson.null, gpu = gpu, service = cjson.null, priority = cjson.null, vram_mib = cjson.null}
  for k, v in pairs(fields) do
    ev[k] = v
  end
  emit(kind, now, ev)
end

local function decode(raw)
  local ok, value = pcall(cjson.decode, raw)
  if ok and type(value) == 'table' then
    return value
  end
  return nil
end

-- This host's GPUs that went offline while it was silent come back.
local online = 0
for gpu, raw in pairs(hgetall(K_OFFLINE)) do
  local off = decode(raw)
  if off and off.host == HOST and off.reason == REASON then
    redis.call('HDEL', K_OFFLINE, gpu)
    online = online + 1
    gpu_event('gpu_online', gpu, {host = HOST, offline_ms = now - (tonumber(off.since) or now)})
  end
end

-- Other hosts silent for longer than the timeout: their GPUs go offline, once.
local stale, any = {}, false
for host, at in pairs(hgetall(K_HOSTS)) do
  local last = tonumber(at)
  if host ~= HOST and (last == nil or now - last > TIMEOUT) then
    stale[host] = last or 0
    any = true
  end
end
local offline = 0
if any then
  for gpu, raw in pairs(hgetall(K_GPUS)) do
    local decl = decode(raw)
    if decl and type(decl.host) == 'string' and stale[decl.host] and redis.call('HEXISTS', K_OFFLINE, gpu) == 0 then
      local last = stale[decl.host]
      redis.call('HSET', K_OFFLINE, gpu, cjson.encode({host = decl.host, since = now, reason = REASON, last_beat = last}))
      head_flag(nil, 'offline')
      offline = offline + 1
      gpu_event('gpu_offline', gpu, {host = decl.host, reason = REASON, last_beat = last, silent_ms = now - last})
    end
  end
  for host, _ in pairs(stale) do
    redis.call('HDEL', K_HOSTS, host)
  end
end

local granted = 0
if online > 0 and redis.call('ZCARD', K_QUEUE) > 0 then
  local s = load_gpus(now)
  collect_expired(s, now)
  granted = grant_waiting(s, now)
end
return {now, offline, online, granted}
