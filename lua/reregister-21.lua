--[[
  reregister: register GPUs with the sizes declared now, all or nothing (an operator's `gpuboss gpus register
  --update`, after a change of `reserve_gb`, of `auto_reserve_gb`, or of what a card reports).

  A GPU registered with another capacity or reserve takes the declared ones (its first registration's name,
  index, host and ids stay, as with register: includes/registration.lua resized); a GPU not registered yet is
  registered as register does; one registered with the same sizes is left alone. A GPU may shrink only while it still holds what is leased on it now and every
  waiting request that could be served before could still be served by some GPU it may use (a request no GPU
  can ever hold would wait in vain): otherwise nothing is written and the reply says what is in the way. The
  capacity a GPU gains goes to the queue in the same step. Expired leases and requests are collected first (and
  their memory handed to the queue, refusal or not).

  Events: `gpu_resized` for each GPU whose sizes changed, `gpu_registered` for each new one, then `expired`
  and `granted` as the queue is served.

  Input:
    KEYS[1..19] the state layout (includes/state.lua)
    KEYS[20]    events       pub/sub channel (includes/emit.lua)
    KEYS[21]    event_log    stream
    ARGV[1]     wake-list prefix
    ARGV[k]     (2 <= k < #ARGV) one GPU as JSON, as register takes it
    ARGV[#ARGV] event log cap (0: no log)

  Output:
    {1, added, resized, granted}           OK: GPUs new, GPUs resized, queued requests granted
    {-1, gpu_id, leased_mib, leasable_mib}  LEASED: `gpu_id` would lease out less than is leased on it now
    {-2, gpu_id, request_id, need_mib}      STRANDED: shrinking `gpu_id` leaves no GPU for that waiting request
                                            (`need_mib` on each of the GPUs it asks for)
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
local added, changed, after, shrunk = {}, {}, {}, nil
for gpu, cap in pairs(caps) do
  after[gpu] = cap
end
for k = 2, #ARGV - 1 do
  local gpu = cjson.decode(ARGV[k])
  local raw = redis.call('HGET', K_GPUS, gpu.id)
  local old = raw and cjson.decode(raw)
  if not old then
    added[#added + 1] = {gpu, ARGV[k]}
    after[gpu.id] = gpu.capacity_mib - gpu.reserve_mib
    s.host_of[gpu.id] = type(gpu.host) == 'string' and gpu.host or false -- (not in the gpus hash yet)
  elseif not same_sizes(old, gpu) then
    local leasable, leased = gpu.capacity_mib - gpu.reserve_mib, s.used[gpu.id] or 0
    if leasable < leased then
      return refuse({-1, gpu.id, leased, leasable})
    end
    if leasable < (caps[gpu.id] or 0) then
      shrunk = shrunk or {}
      shrunk[gpu.id] = true
    end
    changed[#changed + 1] = {gpu, ARGV[k], old}
    after[gpu.id] = leasable
  end
end

if shrunk then
  local request, need, pin = first_stranded(s, caps, after)
  if request then
    return refuse({-2, shrunk[pin] and pin or next(shrunk), request, need})
  end
end

for _, r in ipairs(changed) do
  local old = r[3]
  local old_capacity, old_reserve = old.capacity_mib, old.reserve_mib
  local gpu, json = resized(old, r[1], r[2])
  write_gpu(K_GPUS, K_CAPACITY, K_USED, gpu, json)
  local ev = gpu_fields(gpu)
  ev.old_capacity_mib, ev.old_reserve_mib = old_capacity, old_reserve
  ev.leased_mib = s.used[gpu.id] or 0
  emit('gpu_resized', now, ev)
end
for _, a in ipairs(added) do
  write_gpu(K_GPUS, K_CAPACITY, K_USED, a[1], a[2])
  emit('gpu_registered', now, gpu_fields(a[1]))
end
if #changed + #added == 0 then
  return {1, 0, 0, grant_waiting(s, now)}
end
-- The GPU tables of this call read again, and the placement index rebuilt from what was just written.
reload_gpus(s)
rebuild_index(s)
return {1, #added, #changed, grant_waiting(s, now)}
