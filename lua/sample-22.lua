--[[
  sample: store one NVML reading of a GPU's used memory, if this caller holds the right to sample it; announce
  holders that use more than they leased.

  Only one process per GPU samples at a time: the sampler key holds the id of the one that may, and lapses by
  itself (SET NX PX). The holder renews it with every reading; when it lapses (the holder died or stopped),
  the next caller takes it over. The holder's reading goes to the observed hash as
  "used_mib,sampled_at_ms,max_age_ms" (sampled_at from Redis TIME); placement reads it as long as it is
  younger than max_age (includes/state.lua: effective free = capacity - reserve - max(leased, observed)).
  A reading lower than the one it replaces, or replacing one that had gone stale, may have freed capacity:
  then expired entries are collected and the queue is served, like collect.

  A reading out of turn (ARGV[8] = '1') is stored whoever holds the right, which it neither takes nor
  renews: a process of the GPU's host sends one right after it released a lease there, so that memory its
  holder gave back is seen at once instead of at the holder's next round (up to a sample interval later),
  and the queue is served.

  Every caller (holder or not) may pass alerts about its own process: each becomes a `vram_alert` event,
  provided one of its leases still exists. A caller with no reading (used = '') only passes alerts.

  Events: `vram_alert` for each alert; `expired` and `granted` when a lower reading served the queue.

  Input:
    KEYS[1..19]  the state layout (includes/state.lua)
    KEYS[20]     sampler     string  who may sample this GPU now (expires by itself)
    KEYS[21]     events      pub/sub channel (includes/emit.lua)
    KEYS[22]     event_log   stream
    ARGV[1]      wake-list prefix
    ARGV[2]      gpu id
    ARGV[3]      the caller's sampler id (unique per process and boss)
    ARGV[4]      used MiB read by NVML (an integer), or '' for none
    ARGV[5]      max age (ms) of the reading: after it, placement ignores it
    ARGV[6]      how long (ms) the right to sample lasts without a new reading
    ARGV[7]      alerts: JSON list of {leases: [ids], pid, host, leased_mib, used_mib}, or ''
    ARGV[8]      '1': a reading out of turn (stored whoever samples the GPU); else ''
    ARGV[9]      event log cap (0: no log; the last ARGV, as includes/emit.lua reads it)

  Output:
    {1, granted, holder, now}   the caller samples this GPU: its reading (if any) was stored
    {2, granted, holder, now}   OUT_OF_TURN: the reading was stored; `holder` (maybe another) still samples it
    {0, 0, holder, now}         another process samples it (`holder` is its id): the reading was dropped
    {-1, 0, '', now}            UNKNOWN_GPU: the GPU is not registered; nothing was written
]]
--- @include "state"
--- @include "emit"
--- @include "place"
--- @include "drop"
--- @include "evict"
--- @include "grant"

local K_SAMPLER = KEYS[20]
local GPU, ME, USED = ARGV[2], ARGV[3], tonumber(ARGV[4])
local MAX_AGE, LEASE_MS = tonumber(ARGV[5]), tonumber(ARGV[6])
local OUT_OF_TURN = ARGV[8] == '1'
local MAX_ALERTS = 16

local now = now_ms()
if redis.call('HEXISTS', K_CAPACITY, GPU) == 0 then
  return {-1, 0, '', now}
end

local mine, holder = false, ME
if OUT_OF_TURN then
  holder = redis.call('GET', K_SAMPLER) or ''
else
  mine = redis.call('SET', K_SAMPLER, ME, 'NX', 'PX', int(LEASE_MS))
  if not mine then
    holder = redis.call('GET', K_SAMPLER) or ''
    if holder == ME then
      redis.call('PEXPIRE', K_SAMPLER, int(LEASE_MS))
      mine = true
    end
  end
end

local granted = 0
if (mine or OUT_OF_TURN) and USED then
  local s = load_gpus(now)
  local old = redis.call('HGET', K_OBSERVED, GPU)
  redis.call('HSET', K_OBSERVED, GPU, int(USED) .. ',' .. int(now) .. ',' .. int(MAX_AGE))
  head_flag(s, 'observed')
  add_expiry(s, K_OBSERVED_EXP, now + MAX_AGE, GPU)
  s.seen[GPU] = USED
  index_gpu(s, GPU)
  local freed = false
  if old then
    local mib, at, max_age = string.match(old, '^(%d+),(%d+),(%d+)$')
    freed = mib == nil or USED < tonumber(mib) or now - tonumber(at) > tonumber(max_age)
  end
  if freed and redis.call('ZCARD', K_QUEUE) > 0 then
    collect_expired(s, now)
    granted = grant_waiting(s, now)
  end
end

if ARGV[7] ~= '' then
  local ok, alerts = pcall(cjson.decode, ARGV[7])
  if ok and type(alerts) == 'table' then
    for i, a in ipairs(alerts) do
      if i > MAX_ALERTS then
        break
      end
      local rec, leased, used = nil, nil, nil
      if type(a) == 'table' and type(a.leases) == 'table' then
        leased, used = tonumber(a.leased_mib), tonumber(a.used_mib)
        for _, id in ipairs(a.leases) do
          local raw = redis.call('HGET', K_LEASES, tostring(id))
          if raw then
            rec = cjson.decode(raw)
            break
          end
        end
      end
      if rec and rec.gpu == GPU and leased and used then
        local ev = lease_fields(rec)
        ev.leases = a.leases
        ev.host = tostring(a.host or rec.host or '')
        ev.pid = tonumber(a.pid) or rec.pid
        ev.leased_mib = leased
        ev.used_mib = used
        ev.over_mib = used - leased
        emit('vram_alert', now, ev)
      end
    end
  end
end

if OUT_OF_TURN then
  return {2, granted, holder, now}
end
if mine then
  return {1, granted, holder, now}
end
return {0, 0, holder, now}
