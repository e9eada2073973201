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
    KEYS[15] usage     hash  "class:<priority>" -> active leases of that class, kept while a rule reads
                             it (sync_counters below), and the other counters of includes/drop.lua: a call
                             collects its changes in USAGE_DELTA and writes them when it returns; usage_of
                             and active_of add them to what they read
    KEYS[16] free      zset  gpu id by the MiB placement sees free on it: capacity - max(used, fresh observed)
    KEYS[17] free_host zset  "<host> <free MiB, 12 digits> <gpu id>", all scored 0: the same for the GPUs
                             that have a host, read as a lexicographic range (best fit within one host)
    KEYS[18] observed_exp  zset  gpu id by when its stored reading goes stale (ms): it is re-indexed then
    KEYS[19] head      hash  the state header (below): `due`, the flags `holds`, `offline`, `observed`,
                             `evictable`, `evict_rank`, and the queue's blocked head (`blocked`, `blocked_need`)
  and ARGV[1] = the wake-list prefix (a request id is appended to it). Scripts add their own KEYS after
  these; the two event KEYS (channel and log, includes/emit.lua) always come last, and the event log's
  cap is always the last ARGV.
]]
--- @per-call begin
local K_GPUS, K_CAPACITY, K_USED = KEYS[1], KEYS[2], KEYS[3]
local K_LEASES, K_LEASE_EXP = KEYS[4], KEYS[5]
local K_QUEUE, K_TICKETS, K_QUEUE_EXP = KEYS[6], KEYS[7], KEYS[8]
local K_TOKEN, K_SEQ = KEYS[9], KEYS[10]
local K_OBSERVED, K_OFFLINE, K_HOLDS = KEYS[11], KEYS[12], KEYS[13]
local K_POLICY, K_USAGE = KEYS[14], KEYS[15]
local K_FREE, K_FREE_HOST, K_OBSERVED_EXP, K_HEAD = KEYS[16], KEYS[17], KEYS[18], KEYS[19]
local WAKE_PREFIX = ARGV[1]
local USAGE_DELTA = {} -- usage hash field -> change not written yet (includes/drop.lua flush_usage)
local COUNTING = false -- whether this call keeps the rules' counters of the usage hash (sync_counters)
local LOAD_NOW = 0 -- the `now` of load_gpus: s.seen's readings are fresh or stale at that moment
local HEAD_WRITE = false -- the state whose full check writes the header when the call returns (flush_head)
-- The header's blocked head (grant.lua head_still_blocked): the id stored there, the id this call may trust
-- (none after a full check), and the change written as the call returns (nil: none, false: removed, or
-- {id, need}: set; an acquire that answers BUSY calls it off, like the header).
local BLOCKED_STORED, BLOCKED_ID, BLOCKED_NEXT = false, false, nil
--- @per-call end

-- Queue score = (RANK_BASE - rank) * SEQ_SPAN + seq: higher rank first, then arrival order.
local RANK_BASE = 1000
local SEQ_SPAN = 1099511627776 -- 2^40
-- Expired entries collected by one call; the rest go to the next call (bounded work per script). A string, as
-- redis.call takes it (see int() below).
local COLLECT_LIMIT_ARG = '64'
-- The longest the scripts go without a full check (see the state header below), ms.
local CHECK_EVERY_MS = 1000

-- Numbers handed to redis.call are formatted by hand: Lua's default "%.14g" would round big integers. An
-- integer (every number the scripts pass) is formatted as one ('%d': 64-bit), far cheaper than '%.0f'.
-- (redis.call formats a number argument itself, exactly but with glibc's float formatting: ~2k instructions
-- each; constants are therefore passed as strings, which cost nothing there.)
local function int(x)
  if x % 1 == 0 and x > -9e15 and x < 9e15 then
    return string.format('%d', x)
  end
  return string.format('%.0f', x)
end

-- A rank or an offset for redis.call: 0, by far the most common, as the constant string (see above); any other
-- as it is (exact, and no dearer than int()).
local function pos_arg(n)
  if n == 0 then
    return '0'
  end
  return n
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
    paused    {class -> {by, at}}: classes paused at runtime (`gpuboss pause`; lua/pause-21.lua)
    windows   list of {class, from, to}: `class` is not granted while Redis time is in [from, to)
    caps      {services = {name -> {leases, mib}}, classes = {name -> {leases}}}: a request that would
              exceed one waits
    aging     {every_ms, max_boost} (with `classes`, {name -> rank}): a waiting request rises one class
              per every_ms of waiting, at most max_boost classes
    queueing  'strict' (default) or 'backfill'
    overtake  how many times a request that does not fit may be passed by later ones (includes/grant.lua)
    max_hold  {class -> {ms, action}}: a lease held longer is asked to checkpoint ('evict') or revoked
  p.holds_back is true when any rule can keep a request waiting (pause, paused, windows, caps); p.counts when
  a rule reads the usage hash's counters of active leases (a pause rule, a cap: sync_counters).
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
  p.overtake = tonumber(p.overtake) or 0
  p.holds_back = #p.pause > 0 or next(p.paused) ~= nil or #p.windows > 0 or p.caps ~= nil
  local caps = p.caps or {}
  p.counts = #p.pause > 0 or next(caps.services or {}) ~= nil or next(caps.classes or {}) ~= nil
  return p
end

--[[
  The rules' counters: `class:<priority>` and `svc:<service>` (active leases) and `svcmib:<service>` (their MiB)
  in the usage hash (includes/drop.lua count_lease) are kept only while a rule reads them (p.counts: a pause
  rule or a cap). Without such a rule a grant and a release write none of them (three HINCRBY each, and an
  HDEL when they come back to 0: about 7% of the Redis instructions of an acquire + release). The header's
  `counting` field says whether they are kept: the first call that finds a rule reading them and the header
  not saying '1' sets them to what the lease records add up to (one read of every lease, once per change of
  the rules), and the first call that finds no such rule and the header saying '1' deletes them; either
  writes the field. A header without the field (new, deleted, lost) counts as not
  kept, so the counters are made again from the records, never added to stale ones.
]]
-- add(field, n) for each counter of a lease's class and service while they are kept: `leases` more (1: it comes,
-- -1: it goes, 0: it changes size) and `mib` more MiB. (A counter changed by 0 is not written: flush_usage.)
local function each_counter(rec, leases, mib, add)
  add('class:' .. rec.priority, leases)
  add('svc:' .. rec.service, leases)
  add('svcmib:' .. rec.service, mib)
end

local function is_counter(field)
  local kind = string.match(field, '^(%a+):')
  return kind == 'class' or kind == 'svc' or kind == 'svcmib'
end

-- Send `cmd key` with the arguments of `list` in batches (unpack takes a few thousand at most).
local function batched(cmd, key, list)
  for i = 1, #list, 512 do
    redis.call(cmd, key, unpack(list, i, math.min(i + 511, #list)))
  end
end

local function sync_counters(counting)
  local stale, flat = {}, redis.call('HGETALL', K_USAGE)
  for i = 1, #flat, 2 do
    if is_counter(flat[i]) then
      stale[#stale + 1] = flat[i]
    end
  end
  batched('HDEL', K_USAGE, stale)
  if counting then
    local sums, order = {}, {}
    local function add(field, n)
      if sums[field] == nil then
        order[#order + 1] = field
        sums[field] = 0
      end
      sums[field] = sums[field] + n
    end
    flat = redis.call('HGETALL', K_LEASES)
    for i = 2, #flat, 2 do
      -- (a record that is not one, written by hand, is passed over: it must not stop every call from here on)
      local ok, rec = pcall(cjson.decode, flat[i])
      if ok and type(rec) == 'table' and type(rec.priority) == 'string' and type(rec.service) == 'string'
        and type(rec.vram_mib) == 'number' then
        each_counter(rec, 1, rec.vram_mib, add)
      end
    end
    local pairs_ = {}
    for _, field in ipairs(order) do
      if sums[field] ~= 0 then
        pairs_[#pairs_ + 1] = field
        pairs_[#pairs_ + 1] = int(sums[field])
      end
    end
    batched('HSET', K_USAGE, pairs_)
  end
  redis.call('HSET', K_HEAD, 'counting', counting and '1' or '0')
end

--[[
  The per-GPU numbers. Each is read from Redis the first time a call asks for that GPU and kept current as the
  script grants and frees, so a call touches only the GPUs it places on or frees (the placement index below
  finds the best fit without reading every GPU); all_gpus(s) reads every GPU at once for the few paths that
  need them all (a request that fits nowhere now, eviction, backfill, several GPUs).
    s.cap[gpu]      leasable MiB (capacity - reserve); nil for a GPU that is not registered
    s.used[gpu]     leased MiB
    s.seen[gpu]     observed used MiB from a fresh NVML sample (false when none is fresh)
    s.off[gpu]      true when the GPU is offline (no new grants)
    s.holds[gpu]    the reservation on that GPU (decoded), if any (all read at once: there are few)
  Effective free MiB for a request = cap - max(used, seen) - (a hold of another request).
]]
-- A stored reading "used_mib,sampled_at_ms,max_age_ms" at `now`: its MiB while fresh (else false), and the
-- moment it goes stale (nil when it is not a reading).
local function parse_reading(v, now)
  local mib, at, max_age = string.match(v or '', '^(%d+),(%d+),(%d+)$')
  if not mib then
    return false, nil
  end
  local stale_at = tonumber(at) + tonumber(max_age)
  if now <= stale_at then
    return tonumber(mib), stale_at
  end
  return false, stale_at
end

-- A table that reads a GPU's value with `load(gpu)` on first use and keeps it (nil is not kept).
local function lazy(load)
  return {__index = function(t, gpu)
    local v = load(gpu)
    if v ~= nil then
      rawset(t, gpu, v)
    end
    return v
  end}
end
-- The metatables of s.cap, s.used, s.seen and s.off: made once (in a function library, once for every call;
-- they keep nothing, they read through the key handles and LOAD_NOW of the current call).
local CAP_MT = lazy(function(gpu)
  return tonumber(redis.call('HGET', K_CAPACITY, gpu))
end)
local USED_MT = lazy(function(gpu)
  return tonumber(redis.call('HGET', K_USED, gpu)) or 0
end)
local SEEN_MT = lazy(function(gpu)
  return (parse_reading(redis.call('HGET', K_OBSERVED, gpu), LOAD_NOW))
end)
local OFF_MT = lazy(function(gpu)
  return redis.call('HEXISTS', K_OFFLINE, gpu) == 1
end)

-- s.seen and s.off when the header says the observed or offline hash is empty: nothing to read.
local NONE_MT = lazy(function(_)
  return false
end)

-- A GPU's declaration (the gpus hash) as JSON, read once per call ('{}' for a GPU that is not registered).
local function raw_decl(s, gpu)
  local raw = s.raw_decls[gpu]
  if raw == nil then
    raw = redis.call('HGET', K_GPUS, gpu) or '{}'
    s.raw_decls[gpu] = raw
  end
  return raw
end

-- A GPU's declaration, decoded once per call (an empty table for a GPU that is not registered).
local function decl_of(s, gpu)
  local decl = s.decls[gpu]
  if decl == nil then
    decl = cjson.decode(raw_decl(s, gpu))
    s.decls[gpu] = decl
  end
  return decl
end

-- A GPU's device index (from its declaration): read from the JSON text when it is a plain integer (every grant
-- asks), else decoded; 0 when it has none. The key is found by a plain search, and the pattern is tried only
-- there (anchored): an unanchored pattern is tried at every position of the text, which cost more than the rest
-- of the lookup.
local function index_of(s, gpu)
  local raw = raw_decl(s, gpu)
  local at = string.find(raw, '"index"', 1, true)
  if at and not string.find(raw, '"index"', at + 1, true) then
    local index = string.match(raw, '^"index":%s*(%d+)%s*[,}]', at)
    if index then
      return tonumber(index)
    end
  end
  return decl_of(s, gpu).index or 0
end

-- The host of a GPU (from its declaration), or false for a GPU without one. A plain host name is read from
-- the JSON text (every grant and release asks, and decoding costs more); anything else is decoded.
local function host_of(s, gpu)
  local host = s.host_of[gpu]
  if host == nil then
    local raw = raw_decl(s, gpu)
    local at = string.find(raw, '"host":', 1, true) -- (plain, then anchored there: see index_of)
    if at then
      host = string.match(raw, '^"host":%s*"([%w%.%-_]+)"', at)
      if host == nil then
        host = decl_of(s, gpu).host
      end
    end
    if type(host) ~= 'string' then
      host = false
    end
    s.host_of[gpu] = host
  end
  return host
end

--[[
  The placement index: `free` scores every GPU by cap - max(used, fresh observed) (what free_for gives when
  no hold applies), `free_host` holds the same numbers as "<host> <MiB> <gpu>" for each GPU with a host, for a
  best fit within one host (ZCARD free - ZCARD free_host = the GPUs without a host).
  index_gpu(s, gpu) writes one GPU's entry; every change of used or of a reading calls it. A reading that goes
  stale (observed_exp) re-indexes its GPU at the next call. When the index does not cover the registry (a GPU
  registered since, a Redis that lost it, an older version's data), it is rebuilt from the hashes.
  s.indexed[gpu] is a GPU's score in `free` as this call last read or wrote it (an entry that is already right
  is not written again, and a GPU with a host needs no ZSCORE for it); s.first_batch caches the first batch of
  the index that placement read (place.lua free_batches), until the index changes.
]]
--- @include "index"

local function index_gpu(s, gpu)
  local cap = s.cap[gpu]
  if cap == nil then
    return
  end
  local used, seen = s.used[gpu] or 0, s.seen[gpu]
  local free = cap - ((seen and seen > used) and seen or used)
  local old = s.indexed[gpu]
  if old == free then
    return
  end
  s.indexed[gpu] = free
  s.first_batch = nil
  local host = host_of(s, gpu)
  if not host then
    redis.call('ZADD', K_FREE, int(free), gpu)
    return
  end
  if old == nil then
    old = tonumber(redis.call('ZSCORE', K_FREE, gpu))
    if old == free then
      return
    end
  end
  if old then
    redis.call('ZREM', K_FREE_HOST, host_member(host, old, gpu))
  end
  redis.call('ZADD', K_FREE, int(free), gpu)
  redis.call('ZADD', K_FREE_HOST, '0', host_member(host, free, gpu))
end

-- Every GPU's numbers, read at once (s.cap then lists every registered GPU); returns s.cap.
local function all_gpus(s)
  if s.all then
    return s.cap
  end
  s.all = true
  local flat = redis.call('HGETALL', K_CAPACITY)
  for i = 1, #flat, 2 do
    rawset(s.cap, flat[i], tonumber(flat[i + 1]))
  end
  flat = redis.call('HGETALL', K_USED)
  for i = 1, #flat, 2 do
    rawset(s.used, flat[i], tonumber(flat[i + 1]))
  end
  flat = redis.call('HGETALL', K_OBSERVED)
  s.stale_at = {}
  for i = 1, #flat, 2 do
    local mib, stale_at = parse_reading(flat[i + 1], s.now)
    rawset(s.seen, flat[i], mib)
    s.stale_at[flat[i]] = stale_at
  end
  for gpu, _ in pairs(s.cap) do
    if rawget(s.used, gpu) == nil then
      rawset(s.used, gpu, 0)
    end
    if rawget(s.seen, gpu) == nil then
      rawset(s.seen, gpu, false)
    end
    if rawget(s.off, gpu) == nil then
      rawset(s.off, gpu, false)
    end
  end
  for gpu, _ in pairs(hgetall(K_OFFLINE)) do
    rawset(s.off, gpu, true)
  end
  return s.cap
end

-- Forget the GPU tables this call has read (the registry changed under it: lua/reregister-21.lua): what is asked
-- next is read from Redis again.
local function reload_gpus(s)
  s.all, s.gpu_count, s.first_batch = nil, nil, nil
  s.cap, s.used = setmetatable({}, CAP_MT), setmetatable({}, USED_MT)
  s.seen, s.off = setmetatable({}, SEEN_MT), setmetatable({}, OFF_MT)
  s.host_of, s.decls, s.raw_decls, s.indexed = {}, {}, {}, {}
end

local function rebuild_index(s)
  redis.call('DEL', K_FREE, K_FREE_HOST, K_OBSERVED_EXP)
  s.indexed, s.first_batch = {}, nil
  for gpu, _ in pairs(all_gpus(s)) do
    index_gpu(s, gpu)
    if s.seen[gpu] then -- a fresh reading: re-indexed when it goes stale
      redis.call('ZADD', K_OBSERVED_EXP, int(s.stale_at[gpu]), gpu)
    end
  end
end

--[[
  The state header (KEYS head, one small hash read by every call) spares a call the reads that would find
  nothing to do:
    due       Redis ms before which no lease or queue entry expires, no reading goes stale, and no check of
              the index is due: until then a call skips those checks (five reads). A full check sets it to the
              earliest of those expiries, at most CHECK_EVERY_MS ahead; every script that adds an earlier
              expiry lowers it (add_expiry).
    holds, offline, observed
              '0' when that hash was empty at the last full check and nothing was added since: a call then
              does not read it (nor, per GPU, the offline mark and the reading). A script that adds to one
              sets its flag to '1' (head_flag).
    evictable '0' when the usage hash counts no preemptible MiB (`pre:<rank>:<gpu>`) and no idle lease
              (`idle:<id>`) and none was granted or marked since: a request that does not fit asks nobody to
              checkpoint without reading that hash (includes/evict.lua room_to_make).
    evict_rank
              the lowest rank a preemptible lease may have ('-1' when an idle lease may exist: those are
              candidates for any rank): a request of that rank or lower has nobody to ask to checkpoint, told
              without reading the usage hash (includes/evict.lua room_to_make). Set by the full check, lowered
              by every grant of a preemptible lease of a lower rank and by every lease marked idle; never
              raised in between.
    blocked, blocked_need
              the queue's head when a call last found that it does not fit (strict queueing), and what it
              needs: "<MiB> <rank> <node> <pinned GPU>". While it stays at the head, the next calls tell
              from the placement index alone that it still does not fit, without reading and decoding its
              record (includes/grant.lua head_still_blocked). Removed with the request (drop_request) and
              at every full check; what it describes never changes while the request is queued.
  A missing header or field counts as "check everything", so data written before the header existed, a
  deleted header, or a Redis that lost it is checked at the next call. A key changed by anything but these
  scripts (by hand, or by an older gpuboss sharing the namespace) is seen at the next full check, within
  CHECK_EVERY_MS; delete the header to have the next call check at once.
]]

-- ZADD `member` to an expiry zset (lease_exp, queue_exp, observed_exp) at `at` ms, and lower the header's `due`
-- to `at` when it is later.
local function add_expiry(s, key, at, member)
  redis.call('ZADD', key, int(at), member)
  if at < s.due then
    redis.call('HSET', K_HEAD, 'due', int(at))
    s.due = at
  end
end

-- Note in the header that `name` ('holds', 'offline', 'observed': that hash) has entries now.
local function head_flag(s, name)
  if s == nil or s.flags[name] ~= '1' then
    redis.call('HSET', K_HEAD, name, '1')
    if s then
      s.flags[name] = '1'
    end
  end
end

-- Note in the header that a preemptible lease of `rank` (or, with rank -1, an idle lease) may exist now: the
-- `evictable` flag, and `evict_rank` lowered to `rank` (left alone when it is not known).
local function note_evictable(s, rank)
  local known = tonumber(s.flags.evict_rank)
  local lower = known ~= nil and rank < known
  if s.flags.evictable ~= '1' or lower then
    if lower then
      redis.call('HSET', K_HEAD, 'evictable', '1', 'evict_rank', int(rank))
      s.flags.evict_rank = int(rank)
    else
      redis.call('HSET', K_HEAD, 'evictable', '1')
    end
    s.flags.evictable = '1'
  end
end

-- The number of registered GPUs (read once per call, when asked).
local function gpu_count(s)
  if s.gpu_count == nil then
    s.gpu_count = redis.call('HLEN', K_CAPACITY)
  end
  return s.gpu_count
end

-- Sum of preemptible MiB held by ranks below `rank`, plus the MiB of idle leases (usage hash, with the changes
-- this call has not written yet: USAGE_DELTA), to skip a scan that cannot succeed; whether any
-- `idle:<lease id>` field is there; the lowest rank with preemptible MiB (nil: none); and, per GPU, the MiB
-- there that a request of `rank` may ask for: preemptible of a lower rank (`pre:<rank>:<gpu>`) and idle
-- (`idle:<lease id>` -> "<MiB> <gpu>[,<gpu>...]"), or nil when the hash cannot tell (a `pre:<rank>` field or
-- an idle hint without its GPU, written by an older gpuboss, or a sum below 0). (includes/evict.lua asks
-- before it scans; the full check, with any rank.)
local function preemptible_below(rank)
  local total, idle, lowest, flat = 0, false, nil, redis.call('HGETALL', K_USAGE)
  local on_gpu = {}
  local pending = {}
  for field, delta in pairs(USAGE_DELTA) do
    pending[field] = delta
  end
  local function place(gpu, value)
    if gpu == nil or value < 0 then
      on_gpu = nil -- (where that MiB is cannot be told)
    elseif on_gpu then
      on_gpu[gpu] = (on_gpu[gpu] or 0) + value
    end
  end
  local function add(field, value)
    local r, gpu = string.match(field, '^pre:(%d+):(.+)$')
    if not r then
      r = string.match(field, '^pre:(%d+)$') -- (an older gpuboss's sum, without its GPU)
    end
    r = tonumber(r)
    if r == nil then
      return
    end
    if r < rank then
      total = total + value
      place(gpu, value)
    end
    if value > 0 and (lowest == nil or r < lowest) then
      lowest = r
    end
  end
  for i = 1, #flat, 2 do
    local field = flat[i]
    if string.sub(field, 1, 5) == 'idle:' then
      local mib, gpus = string.match(flat[i + 1], '^(%d+) ?(.*)$')
      mib = tonumber(mib) or 0
      idle = true
      if gpus == nil or gpus == '' then
        total = total + mib
        place(nil, mib)
      else
        for gpu in string.gmatch(gpus, '[^,]+') do -- (a lease over several GPUs: the same MiB on each)
          total = total + mib
          place(gpu, mib)
        end
      end
    elseif string.sub(field, 1, 4) == 'pre:' then
      add(field, tonumber(flat[i + 1]) + (pending[field] or 0))
      pending[field] = nil
    end
  end
  for field, delta in pairs(pending) do
    if delta ~= 0 then
      add(field, delta) -- (fields other than `pre:` are passed over there)
    end
  end
  return total, idle, lowest, on_gpu
end

-- True when the header tells that a request of `rank` has nobody to ask to checkpoint: no preemptible or idle
-- lease, or none that such a request may ask (`evict_rank`).
local function header_says_nobody(s, rank)
  local lowest = tonumber(s.flags.evict_rank)
  return s.flags.evictable == '0' or (lowest ~= nil and rank <= lowest)
end

-- Request `id` leaves the queue: when it is the header's blocked head, that goes at once (a later request of
-- the same id may need something else).
local function forget_blocked(id)
  if id == BLOCKED_STORED then
    redis.call('HDEL', K_HEAD, 'blocked', 'blocked_need')
    BLOCKED_STORED, BLOCKED_ID = false, false
    if BLOCKED_NEXT == false then
      BLOCKED_NEXT = nil
    end
  end
  if BLOCKED_NEXT and BLOCKED_NEXT.id == id then
    BLOCKED_NEXT, BLOCKED_ID = nil, false
  end
end

-- The full check: the index against the registry (rebuilt if they differ), readings gone stale, and the
-- header's fields worked out again (written as the call returns: flush_head).
local function full_check(s, now)
  if redis.call('ZCARD', K_FREE) ~= gpu_count(s) then
    rebuild_index(s)
  elseif redis.call('ZCARD', K_OBSERVED_EXP) > 0 then
    -- Readings gone stale since the last call: their GPUs are indexed without them now.
    local stale = redis.call('ZRANGEBYSCORE', K_OBSERVED_EXP, '-inf', '(' .. int(now), 'LIMIT', '0', COLLECT_LIMIT_ARG)
    for _, gpu in ipairs(stale) do
      redis.call('ZREM', K_OBSERVED_EXP, gpu)
      index_gpu(s, gpu)
    end
  end
  local due = now + CHECK_EVERY_MS
  for _, key in ipairs({K_LEASE_EXP, K_QUEUE_EXP, K_OBSERVED_EXP}) do
    local first = redis.call('ZRANGE', key, '0', '0', 'WITHSCORES')[2]
    if first then
      due = math.min(due, tonumber(first))
    end
  end
  s.due = due
  local evictable, idle, lowest = preemptible_below(math.huge)
  s.flags = {
    holds = next(s.holds) and '1' or '0',
    offline = redis.call('HLEN', K_OFFLINE) > 0 and '1' or '0',
    observed = redis.call('HLEN', K_OBSERVED) > 0 and '1' or '0',
    evictable = evictable > 0 and '1' or '0',
    evict_rank = idle and '-1' or int(lowest or RANK_BASE),
  }
  if gpu_count(s) > 0 then -- (a namespace without GPUs keeps no header: a call there writes nothing)
    HEAD_WRITE = s
  end
  -- (the queue may have been changed by hand: its head is examined again, and the note goes)
  BLOCKED_ID = false
  if BLOCKED_STORED and BLOCKED_NEXT == nil then
    BLOCKED_NEXT = false
  end
end

-- The header of this call's full check, written as the call returns (with what the call changed since: an
-- earlier expiry, a flag), and the blocked head it noted. A call that answers without changing anything
-- (acquire's BUSY) calls both off by setting HEAD_WRITE to false and BLOCKED_NEXT to nil: the next call checks
-- again and writes them.
--- @on-return flush_head()
local function flush_head()
  local s = HEAD_WRITE
  if s then
    redis.call('HSET', K_HEAD, 'due', int(s.due), 'holds', s.flags.holds, 'offline', s.flags.offline,
      'observed', s.flags.observed, 'evictable', s.flags.evictable, 'evict_rank', s.flags.evict_rank)
  end
  if BLOCKED_NEXT then
    redis.call('HSET', K_HEAD, 'blocked', BLOCKED_NEXT.id, 'blocked_need', BLOCKED_NEXT.need)
  elseif BLOCKED_NEXT == false then
    redis.call('HDEL', K_HEAD, 'blocked', 'blocked_need')
  end
end

-- The state of one call at Redis time `now`. s.check is true when this call makes the full check (`full` asks
-- for one whatever the header says): collect_expired looks for expired entries only then. With `later`, the
-- check (which writes) is left to the caller: acquire answers its replies that write nothing first.
local function load_gpus(now, full, later)
  local s = {now = now, holds = {}, host_of = {}, decls = {}, raw_decls = {}, indexed = {}}
  LOAD_NOW = now
  local head = redis.call('HMGET', K_HEAD, 'due', 'holds', 'offline', 'observed', 'evictable', 'evict_rank',
    'blocked', 'blocked_need', 'counting')
  s.due = tonumber(head[1]) or 0
  s.flags = {holds = head[2], offline = head[3], observed = head[4], evictable = head[5], evict_rank = head[6]}
  BLOCKED_STORED, BLOCKED_ID, s.blocked_need = head[7] or false, head[7] or false, head[8]
  -- (a `due` further ahead than a check ever sets it means Redis time went back: a failover to a replica whose
  -- clock is behind, a clock step; check now rather than wait for it)
  s.check = full or now >= s.due or s.due > now + CHECK_EVERY_MS
  s.cap, s.used = setmetatable({}, CAP_MT), setmetatable({}, USED_MT)
  s.seen = setmetatable({}, (s.check or s.flags.observed ~= '0') and SEEN_MT or NONE_MT)
  s.off = setmetatable({}, (s.check or s.flags.offline ~= '0') and OFF_MT or NONE_MT)
  if s.check or s.flags.holds ~= '0' then
    for gpu, v in pairs(hgetall(K_HOLDS)) do
      s.holds[gpu] = cjson.decode(v)
    end
  end
  s.policy = load_policy()
  COUNTING = s.policy.counts
  -- (the rules' counters made or dropped when the rules changed: sync_counters; a namespace without GPUs keeps
  -- no header, and has no lease to count)
  if COUNTING ~= (head[9] == '1') and (COUNTING or head[9]) and gpu_count(s) > 0 then
    sync_counters(COUNTING)
  end
  if s.check and not later then
    full_check(s, now)
  end
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
local function sha1hex(text)
  local hex = redis.sha1hex -- looked up per call: a function library is loaded without the redis API
  if hex then
    return hex(text)
  end
  return 'plain:' .. text
end

local function is_holder(rec, secret)
  return rec.secret == nil or rec.secret == sha1hex(secret)
end

-- The lease record `id` (decoded) and its JSON when the caller (by its `secret`) holds it; nil otherwise.
local function held_lease(id, secret)
  local raw = redis.call('HGET', K_LEASES, id)
  if not raw then
    return nil
  end
  local rec = cjson.decode(raw)
  if not is_holder(rec, secret) then
    return nil
  end
  return rec, raw
end

-- Milliseconds until the earliest lease or queue entry expires, or -1 when nothing can expire.
local function next_expiry(now)
  local best = -1
  for _, key in ipairs({K_LEASE_EXP, K_QUEUE_EXP}) do
    local first = redis.call('ZRANGE', key, '0', '0', 'WITHSCORES')
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

-- The usage hash counter `field` (active leases or MiB): the stored value, read once per call and cached in
-- `s`, plus the changes this call made so far (USAGE_DELTA, written when it returns: includes/drop.lua).
local function usage_of(s, field)
  s.usage = s.usage or {}
  local n = s.usage[field]
  if n == nil then
    n = tonumber(redis.call('HGET', K_USAGE, field) or '0')
    s.usage[field] = n
  end
  return n + (USAGE_DELTA[field] or 0)
end

-- Active leases of one priority class (the usage hash).
local function active_of(s, class)
  return usage_of(s, 'class:' .. class)
end

-- The MiB a request adds to its service's leases: its size on each GPU times its GPUs (a lease over several
-- GPUs holds the same MiB on each, and its record counts them all).
local function request_mib(req)
  return req.vram_mib * (tonumber(req.count) or 1)
end

-- Why a request of this class and service may not be granted now ('' when it may): a pause rule, a runtime
-- pause, a time window, or a cap. `need` is the MiB it would add (request_mib: on all its GPUs). `grow`: the request grows a lease (resize)
-- and adds no lease, so the caps on the number of leases (class and service max_leases) do not hold it back;
-- the service's MiB cap still does.
local function held_back(s, class, service, need, grow)
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
    if cap and cap.leases and not grow and active_of(s, class) >= cap.leases then
      return 'class_cap'
    end
    cap = p.caps.services and p.caps.services[service]
    if cap then
      if cap.leases and not grow and usage_of(s, 'svc:' .. service) >= cap.leases then
        return 'service_cap'
      end
      if cap.mib and usage_of(s, 'svcmib:' .. service) + need > cap.mib then
        return 'service_cap'
      end
    end
  end
  return ''
end

