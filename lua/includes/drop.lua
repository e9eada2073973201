--[[
  drop_lease(s, id, known, known_raw) -> the removed lease record (decoded) and its JSON, or nil: frees its MiB
    on its GPU (`known` and `known_raw`: the record and its JSON, when the caller read it already),
    counts it out of the usage hash, takes it off any reservation's victim list, and deletes a grant pushed
    to the id's wake list that its waiter never took.
  drop_request(id, s, now, why) -> true when a queued request was removed (its wake list goes too). With
    `s`, a reservation held for it is released and its victims are told they may continue (`why`).
  release_hold(s, id, now, why) -> releases the reservation held for request `id`, if any: victims still
    evicting for it go back to active, get an `evict_cancelled` event and a `continue` notice.
  collect_expired(s, now, out) -> leases, requests: removes leases and queued requests whose TTL has run
    out (at most COLLECT_LIMIT_ARG of each), emitting `expired` for each; with a table `out`, their records
    (JSON) are appended to out.leases and out.requests. Then enforces eviction grace (enforce_holds).

  Needs the emit include above it.
]]

-- Tell a lease's holder something about it on the holder's own channel (eviction notices).
local function notify(rec, notice)
  if rec.notify and rec.notify ~= '' then
    notice.lease = rec.id
    redis.call('PUBLISH', rec.notify, cjson.encode(notice))
  end
end

--[[
  The usage hash: `class:<priority>` and `svc:<service>` count active leases, `svcmib:<service>` sums their
  MiB (these three only while a rule reads them: includes/state.lua sync_counters), `pre:<rank>:<gpu>` sums
  the MiB that preemptible ones of that rank hold on that GPU. count_lease adds
  (delta 1) or removes (-1) a lease; count_mib changes a lease's size by `mib`. A call collects these
  changes in USAGE_DELTA (includes/state.lua: usage_of and active_of count them) and flush_usage writes them
  once, when the script returns: a release that grants the waiting head changes nothing there, and one that
  frees a lease writes its fields at once.
  A field that comes to 0 is deleted (no field kept per service ever seen).
]]
local function bump(field, delta)
  USAGE_DELTA[field] = (USAGE_DELTA[field] or 0) + delta
end

--- @on-return flush_usage()
local function flush_usage()
  local gone = nil -- (one HINCRBY per changed field measured cheaper than HMGET + HSET)
  for field, delta in pairs(USAGE_DELTA) do
    if delta ~= 0 and redis.call('HINCRBY', K_USAGE, field, delta) == 0 then
      gone = gone or {}
      gone[#gone + 1] = field
    end
  end
  if gone then
    redis.call('HDEL', K_USAGE, unpack(gone))
  end
end

-- The preemptible MiB of a lease on each of its GPUs (`pre:<rank>:<gpu>`, kept always: eviction reads it) changes
-- by `mib` in all.
local function count_pre(s, rec, mib)
  if rec.preemptible then
    if mib > 0 then
      note_evictable(s, rec.rank)
    end
    local gpus = rec.gpus or {rec.gpu}
    for _, gpu in ipairs(gpus) do -- (a lease over several GPUs holds the same MiB on each)
      bump('pre:' .. rec.rank .. ':' .. gpu, mib / #gpus)
    end
  end
end

-- A lease comes (`delta` 1) or goes (-1) with `mib` MiB, or changes size by `mib` (`delta` 0: a growth, a shrink).
local function count_change(s, rec, delta, mib)
  if COUNTING then
    each_counter(rec, delta, mib, bump)
  end
  count_pre(s, rec, mib)
end

local function count_mib(s, rec, mib)
  count_change(s, rec, 0, mib)
end

local function count_lease(s, rec, delta)
  count_change(s, rec, delta, delta * rec.vram_mib)
end

local function save_hold(s, gpu)
  local hold = s.holds[gpu]
  if hold then
    redis.call('HSET', K_HOLDS, gpu, cjson.encode(hold))
    head_flag(s, 'holds')
  else
    redis.call('HDEL', K_HOLDS, gpu)
  end
end

local function drop_lease(s, id, known, known_raw)
  local raw = known_raw or redis.call('HGET', K_LEASES, id)
  redis.call('ZREM', K_LEASE_EXP, id)
  redis.call('DEL', WAKE_PREFIX .. id, WAKE_PREFIX .. id .. ':grow') -- grants their waiters never took
  if not raw then
    return nil
  end
  local rec = known or cjson.decode(raw)
  redis.call('HDEL', K_LEASES, id)
  local gpus, each = rec.gpus or {rec.gpu}, rec.per_gpu_mib or rec.vram_mib
  for _, gpu in ipairs(gpus) do
    local left = redis.call('HINCRBY', K_USED, gpu, -each)
    if left < 0 then
      -- Never expected; repaired rather than left to poison every later placement.
      redis.call('HSET', K_USED, gpu, 0)
      left = 0
    end
    s.used[gpu] = left
    index_gpu(s, gpu)
  end
  count_lease(s, rec, -1)
  for _, gpu in ipairs(gpus) do
    local hold = s.holds[gpu]
    if hold and rec.state == 'evicting' then
      for i, victim in ipairs(hold.victims) do
        if victim == id then
          table.remove(hold.victims, i)
          save_hold(s, gpu)
          break
        end
      end
    end
  end
  return rec, raw
end

local function release_hold(s, id, now, why)
  for gpu, hold in pairs(s.holds) do
    if hold.id == id then
      s.holds[gpu] = nil
      redis.call('HDEL', K_HOLDS, gpu)
      for _, victim in ipairs(hold.victims) do
        local raw = redis.call('HGET', K_LEASES, victim)
        if raw then
          local rec = cjson.decode(raw)
          if rec.state == 'evicting' and rec.evict and rec.evict.by == id then
            rec.state = 'active'
            rec.evict = nil
            redis.call('HSET', K_LEASES, victim, cjson.encode(rec))
            local ev = lease_fields(rec)
            ev.by = id
            ev.reason = why
            emit('evict_cancelled', now, ev)
            notify(rec, {type = 'continue', by = id, reason = why})
          end
        end
      end
    end
  end
end

local function drop_request(id, s, now, why)
  forget_blocked(id)
  redis.call('ZREM', K_QUEUE_EXP, id)
  redis.call('DEL', WAKE_PREFIX .. id)
  local removed = redis.call('ZREM', K_QUEUE, id)
  local dropped = redis.call('HDEL', K_TICKETS, id) + removed > 0
  if s and dropped then
    release_hold(s, id, now, why)
  end
  return dropped
end

-- Milliseconds between two record times, or null when the record lacks the first.
local function since_ms(now, t)
  if t == nil then
    return cjson.null
  end
  return now - t
end

--[[
  Eviction grace: a reservation whose deadline has passed while victims still hold VRAM is settled by its
  policy: 'revoke' removes those victims (their fencing tokens die; their heartbeats report them lost),
  'wait' keeps waiting and says so once with `evict_overdue`. A reservation whose request is gone is
  released.
]]
local function enforce_holds(s, now)
  for gpu, hold in pairs(s.holds) do
    if redis.call('HEXISTS', K_TICKETS, hold.id) == 0 then
      release_hold(s, hold.id, now, 'requester_gone')
    elseif now >= hold.deadline and #hold.victims > 0 then
      if hold.on_grace == 'revoke' then
        local victims = hold.victims
        hold.victims = {}
        for _, victim in ipairs(victims) do
          local rec = drop_lease(s, victim)
          if rec then
            local ev = lease_fields(rec)
            ev.held_ms = since_ms(now, rec.acquired_at)
            ev.by = hold.id
            ev.reason = 'evict_grace'
            emit('revoked', now, ev)
          end
        end
        save_hold(s, gpu)
      elseif not hold.overdue then
        hold.overdue = true
        save_hold(s, gpu)
        emit('evict_overdue', now, {
          lease = cjson.null, gpu = gpu, service = cjson.null, priority = cjson.null, vram_mib = hold.vram_mib,
          by = hold.id, victims = hold.victims, overdue_ms = now - hold.deadline,
        })
      end
    end
  end
end

local function collect_expired(s, now, out)
  local leases, requests = 0, 0
  local ids = {}
  if s.check and redis.call('ZCOUNT', K_LEASE_EXP, '-inf', int(now)) > 0 then -- (a count is cheaper than an empty range)
    ids = redis.call('ZRANGEBYSCORE', K_LEASE_EXP, '-inf', int(now), 'LIMIT', '0', COLLECT_LIMIT_ARG)
  end
  for _, id in ipairs(ids) do
    local rec, raw = drop_lease(s, id)
    if rec then
      leases = leases + 1
      local ev = lease_fields(rec)
      ev.entry = 'lease'
      ev.held_ms = since_ms(now, rec.acquired_at)
      emit('expired', now, ev)
      if out then
        out.leases[#out.leases + 1] = raw
      end
    end
  end
  ids = {}
  if s.check and redis.call('ZCOUNT', K_QUEUE_EXP, '-inf', int(now)) > 0 then
    ids = redis.call('ZRANGEBYSCORE', K_QUEUE_EXP, '-inf', int(now), 'LIMIT', '0', COLLECT_LIMIT_ARG)
  end
  for _, id in ipairs(ids) do
    local raw = redis.call('HGET', K_TICKETS, id)
    if drop_request(id, s, now, 'requester_expired') then
      requests = requests + 1
      local rec = {id = id}
      if raw then
        rec = cjson.decode(raw)
      end
      local ev = request_fields(rec)
      ev.entry = 'request'
      ev.waited_ms = since_ms(now, rec.requested_at)
      emit('expired', now, ev)
      if out then
        out.requests[#out.requests + 1] = raw or cjson.encode(rec)
      end
    end
  end
  if next(s.holds) ~= nil then
    enforce_holds(s, now)
  end
  return leases, requests
end
