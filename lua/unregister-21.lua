--[[
  unregister: take GPUs out of the namespace's registry, all or nothing (an operator's `gpuboss gpus remove`,
  for a card or a host that is gone for good: otherwise its GPUs stay, offline, and a request pinned to one
  waits for it).

  Refused, with nothing written, while a GPU has MiB leased on it, while memory is held on it for a request
  that evicts, or when a waiting request that some GPU could hold before could then be held by none (one
  pinned to the GPU, or one that only it is large enough for). Everything the scripts keep about a removed GPU
  goes: its declaration, capacity, leased MiB, NVML reading, offline mark and placement index entries.
  Expired leases and requests are collected first, and the queue is served.

  Events: `gpu_unregistered` for each GPU removed; `expired` and `granted` as usual.

  Input:
    KEYS[1..19] the state layout (includes/state.lua)
    KEYS[20]    events       pub/sub channel (includes/emit.lua)
    KEYS[21]    event_log    stream
    ARGV[1]     wake-list prefix
    ARGV[k]     (2 <= k < #ARGV) a GPU id
    ARGV[#ARGV] event log cap (0: no log)

  Output:
    {1, removed}                       OK: `removed` GPUs taken out
    {-1, gpu_id, registered...}        UNKNOWN: `gpu_id` is not registered (the ids that are follow)
    {-2, gpu_id, leased_mib}           LEASED: leases hold MiB on `gpu_id`
    {-3, gpu_id, request_id}           HELD: memory on `gpu_id` is held for that request (an eviction)
    {-4, gpu_id, request_id, need_mib} STRANDED: that waiting request would have no GPU left to hold it
]]
--- @include "state"
--- @include "emit"
--- @include "place"
--- @include "drop"
--- @include "evict"
--- @include "grant"
--- @include "registration"
--- @include "shrink"

local now = now_ms()
local s = load_gpus(now, true)
local expired_leases, expired_requests = collect_expired(s, now)
local refuse = refusal(s, now, expired_leases + expired_requests)
local caps = all_gpus(s)
local gone, after, ids = {}, {}, {}
for k = 2, #ARGV - 1 do
  local gpu = ARGV[k]
  if caps[gpu] == nil then
    local reply = {-1, gpu}
    for id, _ in pairs(caps) do
      reply[#reply + 1] = id
    end
    return refuse(reply)
  end
  if (s.used[gpu] or 0) > 0 then
    return refuse({-2, gpu, s.used[gpu]})
  end
  if s.holds[gpu] then
    return refuse({-3, gpu, s.holds[gpu].id})
  end
  if not gone[gpu] then
    gone[gpu] = true
    ids[#ids + 1] = gpu
  end
end
for gpu, cap in pairs(caps) do
  if not gone[gpu] then
    after[gpu] = cap
  end
end
local request, need, pin = first_stranded(s, caps, after)
if request then
  return refuse({-4, gone[pin] and pin or ids[1], request, need})
end

for _, gpu in ipairs(ids) do
  local decl = decl_of(s, gpu)
  decl.id = gpu
  for _, key in ipairs({K_GPUS, K_CAPACITY, K_USED, K_OBSERVED, K_OFFLINE}) do
    redis.call('HDEL', key, gpu)
  end
  emit('gpu_unregistered', now, gpu_fields(decl))
end
-- The GPU tables read again, and the placement index (and the readings' expiries) rebuilt without them.
reload_gpus(s)
rebuild_index(s)
grant_waiting(s, now)
return {1, #ids}
