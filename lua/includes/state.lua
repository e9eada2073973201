--[[
  Shared state of every lease-state script: key handles, Redis time, GPU tables and numbers.

  Every script that includes this takes the state KEYS layout, in this order:
    KEYS[1] gpus       hash  gpu id -> JSON declaration
    KEYS[2] capacity   hash  gpu id -> leasable MiB (capacity - reserve)
    KEYS[3] used       hash  gpu id -> leased MiB
    KEYS[4] leases     hash  lease id -> JSON lease record
    KEYS[5] lease_exp  zset  lease id by expiry (ms)
    KEYS[6] queue      zset  request id by (priority, arrival)
    KEYS[7] tickets    hash  request id -> JSON request record
    KEYS[8] queue_exp  zset  request id by expiry (ms)
    KEYS[9]  token     string fencing-token counter
    KEYS[10] seq       string arrival counter (every request gets one; a resumed one keeps its own)
    KEYS[11] observed  hash  gpu id -> "used_mib,sampled_at_ms,max_age_ms" (the NVML sampler's last reading)
    KEYS[12] offline   hash  gpu id -> JSON: GPUs that get no new grants (their host stopped beating)
    KEYS[13] holds     hash  gpu id -> JSON reservation {id, vram_mib, victims, deadline}: VRAM being freed
                             by eviction for request `id`; nobody else may take it
    KEYS[14] policy    hash  rule -> JSON: rules every process obeys (see load_policy)
    KEYS[15] usage     hash  "class:<priority>" -> active leases of that class
  and ARGV[1] = the wake-list prefix (a request id is appended to it). Scripts add their own KEYS after
  these; the two event KEYS (channel and log, includes/emit.lua) always come last, and the event log's
  cap is always the last ARGV.
]]
local K_GPUS, K_CAPACITY, K_USED = KEYS[1], KEYS[2], KEYS[3]
local K_LEASES, K_LEASE_EXP = KEYS[4], KEYS[5]
local K_QUEUE, K_TICKETS, K_QUEUE_EXP = KEYS[6], KEYS[7], KEYS[8]
local K_TOKEN, K_SEQ = KEYS[9], KEYS[10]
local K_OBSERVED, K_OFFLINE, K_HOLDS = KEYS[11], KEYS[12], KEYS[13]
local K_POLICY, K_USAGE = KEYS[14], KEYS[15]
local WAKE_PREFIX = ARGV[1]

-- Queue score = (RANK_BASE - rank) * SEQ_SPAN + seq: higher rank first, then arrival order.
local RANK_BASE = 1000
local SEQ_SPAN = 1099511627776 -- 2^40
-- Expired entries collected by one call; the rest go to the next call (bounded work per script).
local COLLECT_LIMIT = 64

-- Numbers handed to redis.call are formatted by hand: Lua's default "%.14g" would round big integers.
local function int(x)
  return string.format('%.0f', x)
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function hgetall(key)
  local out, flat = {}, redis.call('HGETALL', key)
  for i = 1, #flat, 2 do
    out[flat[i]] = flat[i + 1]
  end
  return out
end

--[[
  The namespace's scheduling rules (the policy hash; gpuboss/policy.py documents each field):
    pause     list of {class, while = {class, ...}, evict}: `class` is not granted while any lease of a
              `while` class is active; with evict, its active leases are asked to checkpoint too.
    paused    {class -> {by, at}}: classes paused at runtime (`gpuboss pause`; lua/pause-17.lua)
    windows   list of {class, from, to}: `class` is not granted while Redis time is in [from, to)
    caps      {services = {name -> {leases, mib}}, classes = {name -> {leases}}}: a request that would
              exceed one waits
    aging     {every_ms, max_boost} (with `classes`, {name -> rank}): a waiting request rises one class
              per every_ms of waiting, at most max_boost classes
    queueing  'strict' (default) or 'backfill'
    max_hold  {class -> {ms, action}}: a lease held longer is asked to checkpoint ('evict') or revoked
  p.holds_back is true when any rule can keep a request waiting (pause, paused, windows, caps).
]]
local function load_policy()
  local p = {pause = {}, paused = {}, windows = {}, queueing = 'strict'}
  local flat = redis.call('HGETALL', K_POLICY)
  for i = 1, #flat, 2 do
    local name, value = flat[i], flat[i + 1]
    if name == 'queueing' then
      p.queueing = value
    else
      p[name] = cjson.decode(value)
    end
  end
  p.holds_back = #p.pause > 0 or next(p.paused) ~= nil or #p.windows > 0 or p.caps ~= nil
  return p
end

--[[
  The per-GPU numbers, read once per call and kept current as the script grants and frees:
    s.cap[gpu]      leasable MiB (capacity - reserve)
    s.used[gpu]     leased MiB
    s.seen[gpu]     observed used MiB from a fresh NVML sample (absent when none is fresh)
    s.off[gpu]      true when the GPU is offline (no new grants)
    s.holds[gpu]    the reservation on that GPU (decoded), if any
  Effective free MiB for a request = cap - max(used, seen) - (a hold of another request).
]]
local function load_gpus(now)
  local s = {cap = {}, used = {}, seen = {}, off = {}, holds = {}, now = now, active = {}}
  for gpu, v in pairs(hgetall(K_CAPACITY)) do
    s.cap[gpu] = tonumber(v)
  end
  for gpu, v in pairs(hgetall(K_USED)) do
    s.used[gpu] = tonumber(v)
  end
  for gpu, v in pairs(hgetall(K_OBSERVED)) do
    local mib, at, max_age = string.match(v, '^(%d+),(%d+),(%d+)$')
    if mib and now - tonumber(at) <= tonumber(max_age) then
      s.seen[gpu] = tonumber(mib)
    end
  end
  for gpu, _ in pairs(hgetall(K_OFFLINE)) do
    s.off[gpu] = true
  end
  for gpu, v in pairs(hgetall(K_HOLDS)) do
    s.holds[gpu] = cjson.decode(v)
  end
  s.policy = load_policy()
  return s
end

-- MiB in use on a GPU as placement sees it: the larger of what is leased and what NVML last read.
local function busy_mib(s, gpu)
  local used = s.used[gpu] or 0
  local seen = s.seen[gpu]
  if seen and seen > used then
    return seen
  end
  return used
end

local function rank_of_score(score)
  return RANK_BASE - math.floor(tonumber(score) / SEQ_SPAN)
end

-- The queue score of a request, or nil when it is not queued.
local function score_of(_, id)
  return tonumber(redis.call('ZSCORE', K_QUEUE, id))
end

-- True when request `id` is served before request `other`: queued ahead of it, or a newcomer (s.newcomer,
-- set by acquire) of a higher priority. A request that is not queued (any more) is served before nobody.
local function served_before(s, id, other)
  local theirs = score_of(s, other)
  if theirs == nil then
    return true
  end
  local mine = score_of(s, id)
  if mine == nil then
    return s.newcomer ~= nil and s.newcomer.id == id and s.newcomer.rank > rank_of_score(theirs)
  end
  return mine < theirs
end

-- MiB a request `id` may take on `gpu` now (negative when even less): a hold of another request counts as
-- taken, unless `id` is served before that request (a higher priority that came after the eviction began).
local function free_for(s, gpu, id)
  local free = s.cap[gpu] - busy_mib(s, gpu)
  local hold = s.holds[gpu]
  if hold and hold.id ~= id and not served_before(s, id, hold.id) then
    free = free - hold.vram_mib
  end
  return free
end


--[[
  Holder secrets: a lease (and its request) records the SHA1 of its holder's secret; release, renew, yield,
  resize and checkpoint act only for a caller that sends the secret (the admin path, revoke, needs none).
  Records without one (written before secrets existed) accept any caller. fakeredis has no sha1hex: there
  the secret is kept as it is (a test backend, not a shared server).
]]
local sha1hex = redis.sha1hex or function(text)
  return 'plain:' .. text
end

local function is_holder(rec, secret)
  return rec.secret == nil or rec.secret == sha1hex(secret)
end

-- Milliseconds until the earliest lease or queue entry expires, or -1 when nothing can expire.
local function next_expiry(now)
  local best = -1
  for _, key in ipairs({K_LEASE_EXP, K_QUEUE_EXP}) do
    local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if first[2] then
      local left = math.max(0, tonumber(first[2]) - now)
      if best < 0 or left < best then
        best = left
      end
    end
  end
  return best
end

--[[
  s.policy (read by load_gpus from the policy hash, written by policy-*.lua): the rules every process obeys.
    pause   list of {class, while = {class, ...}, evict}: `class` is not granted while any lease of a
            `while` class is active; with evict, its active leases are asked to checkpoint too.
]]

-- Active leases of one priority class (the usage hash), read once per call and cached in `s`.
local function active_of(s, class)
  s.active = s.active or {}
  local n = s.active[class]
  if n == nil then
    n = tonumber(redis.call('HGET', K_USAGE, 'class:' .. class) or '0')
    s.active[class] = n
  end
  return n
end

-- The usage hash counter `field` (active leases or MiB), read once per call and cached in `s`.
local function usage_of(s, field)
  s.usage = s.usage or {}
  local n = s.usage[field]
  if n == nil then
    n = tonumber(redis.call('HGET', K_USAGE, field) or '0')
    s.usage[field] = n
  end
  return n
end

-- Why a request of this class and service may not be granted now ('' when it may): a pause rule, a runtime
-- pause, a time window, or a cap. `need` is the MiB it would add.
local function held_back(s, class, service, need)
  local p = s.policy
  if not p.holds_back then
    return ''
  end
  if p.paused[class] then
    return 'paused'
  end
  for _, rule in ipairs(p.pause) do
    if rule.class == class then
      for _, other in ipairs(rule['while']) do
        if active_of(s, other) > 0 then
          return 'pause_rule'
        end
      end
    end
  end
  for _, w in ipairs(p.windows) do
    if w.class == class and s.now >= w.from and s.now < w.to then
      return 'window'
    end
  end
  if p.caps then
    local cap = p.caps.classes and p.caps.classes[class]
    if cap and cap.leases and active_of(s, class) >= cap.leases then
      return 'class_cap'
    end
    cap = p.caps.services and p.caps.services[service]
    if cap then
      if cap.leases and usage_of(s, 'svc:' .. service) >= cap.leases then
        return 'service_cap'
      end
      if cap.mib and usage_of(s, 'svcmib:' .. service) + need > cap.mib then
        return 'service_cap'
      end
    end
  end
  return ''
end

