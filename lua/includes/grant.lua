--[[
  grant(s, id, req, gpu, now) -> the new (or grown) lease record (JSON)
  grant_waiting(s, now) -> number of queued requests granted
  granted_now(s, id, now) -> serves the queue; the lease JSON when that granted `id` (its pushed grant deleted)
  first_waiting_rank(s) -> the rank of the first queued request not held back by the policy, or nil

  grant writes the lease: a fresh fencing token, the MiB on `gpu`, the record and its expiry, and counts it
  in the usage hash. A token is the counter plus one, but never below Redis time in ms x 10 (+1), so tokens
  keep increasing across a Redis restart that lost the counter and across a failover to a replica that had
  not received the last grants (as long as the namespace averaged under 10 grants per ms; Redis clocks of the
  primary and its replicas are assumed close). A request that grows a lease (`grow_of`) adds its MiB to that lease instead. A reservation
  held for the request ends (its remaining victims may continue). A grant of a class that a pause rule
  with `evict` waits for asks the paused class's active leases to checkpoint.

  grant_waiting hands capacity to the queue in order (priority, then arrival), and pushes each grant onto
  that request's wake list so the one waiter it belongs to returns at once: no polling, no herd. Requests
  held back by the policy (paused class, time window, cap) wait without blocking others. With `queueing:
  strict` the first request that does not fit holds everyone behind it (and eviction is tried for it);
  with `backfill` later requests may be granted on GPUs that the blocked ones ahead are not waiting for
  (target() in includes/place.lua), so the head's wait is bounded. With `overtake: N`, a request that does not
  fit may be passed by later requests that fit, at most N times (each grant behind it counts one against it, in
  its ticket's `passed`); once passed N times it holds everyone behind it (strict) or keeps its GPU (backfill)
  as above. Eviction is tried for the first request that does not fit. With `aging`, waiting requests are first
  moved up a class per `every_ms` waited (age_queue, event `aged`). Each grant emits `granted` (and
  `resumed` for a request that an eviction sent back to the queue).

  Needs the emit, drop and evict includes above it.
]]
-- Queued requests of a band examined for aging per call (the oldest ones; the band is in arrival order). The
-- requests already aged into the band are skipped but count against it, so the work per call stays bounded.
local AGING_PEEK = 16
-- Blocked requests a backfill pass looks past before it stops.
local BACKFILL_LIMIT = 64

local function grant(s, id, req, where, now)
  -- max(counter + 1, Redis time (ms x 10) + 1), see the header: one INCR, and a SET only when the counter is
  -- behind the clock (the first grant of a Redis ms: under load, when grants come several per ms, one call).
  -- A counter that INCR cannot take (not an integer: written by hand) is started again from the clock.
  local token = redis.pcall('INCR', K_TOKEN)
  local floor = now * 10 + 1
  if type(token) ~= 'number' or token < floor then
    token = floor
    redis.call('SET', K_TOKEN, int(token))
  end
  local gpus = where
  if type(where) ~= 'table' then
    gpus = {where}
  end
  local gpu = gpus[1]
  for _, g in ipairs(gpus) do
    s.used[g] = redis.call('HINCRBY', K_USED, g, req.vram_mib)
    index_gpu(s, g)
  end
  release_hold(s, id, now, 'granted')
  if req.grow_of then
    local rec = cjson.decode(redis.call('HGET', K_LEASES, req.grow_of))
    rec.vram_mib = rec.vram_mib + req.vram_mib
    rec.token = token
    count_mib(s, rec, req.vram_mib)
    local raw = cjson.encode(rec)
    redis.call('HSET', K_LEASES, req.grow_of, raw)
    local ev = lease_fields(rec)
    ev.added_mib = req.vram_mib
    ev.waited_ms = now - req.requested_at
    emit('resized', now, ev)
    return raw
  end
  local devices = {}
  for i, g in ipairs(gpus) do
    devices[i] = 'cuda:' .. index_of(s, g)
  end
  local rec = {
    id = id, gpu = gpu, device = devices[1], vram_mib = req.vram_mib * #gpus,
    priority = req.priority, rank = req.rank, service = req.service, host = req.host, pid = req.pid,
    requested_at = req.requested_at, acquired_at = now, expires_at = now + req.ttl_ms,
    ttl_ms = req.ttl_ms, token = token, seq = req.seq, preemptible = req.preemptible, notify = req.notify,
    state = 'active', evictions = req.evictions or 0, grace_ms = req.grace_ms, on_grace = req.on_grace,
    node = req.node, secret = req.secret,
  }
  if #gpus > 1 then -- one lease over several GPUs of one host: the same MiB on each
    rec.gpus, rec.devices, rec.per_gpu_mib = gpus, devices, req.vram_mib
  end
  local max_hold = s.policy.max_hold and s.policy.max_hold[rec.priority]
  if max_hold then
    rec.hold_until = now + max_hold.ms
    rec.hold_action = max_hold.action
  end
  local raw = cjson.encode(rec)
  redis.call('HSET', K_LEASES, id, raw)
  add_expiry(s, K_LEASE_EXP, now + req.ttl_ms, id)
  count_lease(s, rec, 1)
  local ev = lease_fields(rec)
  ev.waited_ms = now - req.requested_at
  ev.token = token
  ev.ttl_ms = req.ttl_ms
  emit('granted', now, ev)
  if (req.evictions or 0) > 0 then
    local rv = lease_fields(rec)
    rv.evictions = rec.evictions
    rv.waited_ms = now - req.requested_at
    emit('resumed', now, rv)
  end
  if #s.policy.pause > 0 then
    pause_evict(s, rec.priority, now)
  end
  return raw
end

-- Aging: move the oldest waiting requests of each class up as many classes as their wait earns. A band (the
-- requests waiting at one rank) holds the class's own requests and those aged into it, in arrival order. The
-- first of the class's own requests that has not waited long enough ends the look at its band (the own ones
-- after it waited less); a request aged into the band that earns no more (at its max_boost, or not yet
-- waited long enough for the next class), or one of a rank that is not a configured class, is passed over.
-- At most AGING_PEEK requests of a band are looked at per call, the passed-over ones included.
local function age_queue(s, now)
  local aging, classes = s.policy.aging, s.policy.classes
  if not aging or not classes then
    return
  end
  local ranks, index = {}, {}
  for _, rank in pairs(classes) do
    ranks[#ranks + 1] = rank
  end
  table.sort(ranks)
  for i, rank in ipairs(ranks) do
    index[rank] = i
  end
  for i = 1, #ranks - 1 do
    local band = RANK_BASE - ranks[i]
    local ids = redis.call('ZRANGEBYSCORE', K_QUEUE, int(band * SEQ_SPAN), '(' .. int((band + 1) * SEQ_SPAN),
      'LIMIT', '0', AGING_PEEK)
    for _, id in ipairs(ids) do
      local raw = redis.call('HGET', K_TICKETS, id)
      if raw then
        local req = cjson.decode(raw)
        local base = index[req.rank]
        -- (nil: a rank that is not a configured class, left alone and passed over)
        if base ~= nil then
          local boost = math.min(aging.max_boost, math.floor((now - req.requested_at) / aging.every_ms))
          local rank = ranks[math.min(#ranks, base + boost)]
          if rank > ranks[i] then
            redis.call('ZADD', K_QUEUE, int((RANK_BASE - rank) * SEQ_SPAN + req.seq), id)
            local ev = request_fields(req)
            ev.rank = rank
            ev.waited_ms = now - req.requested_at
            emit('aged', now, ev)
          elseif base == i then
            break -- one of the class's own, in arrival order: its own ones after it waited less
          end -- (else aged into this band already and earns no more now: passed over)
        end
      end
    end
  end
end

-- The rank of the first queued request that is not held back by the policy, or nil when none waits.
local function first_waiting_rank(s)
  if s.queue_empty then -- (grant_waiting left the queue empty, and nothing was queued since)
    return nil
  end
  local i = 0
  while true do
    local head = redis.call('ZRANGE', K_QUEUE, i, i, 'WITHSCORES')
    if head[1] == nil then
      return nil
    end
    if not s.policy.holds_back then
      return rank_of_score(head[2])
    end
    local raw = redis.call('HGET', K_TICKETS, head[1])
    if not raw then
      return rank_of_score(head[2])
    end
    local req = cjson.decode(raw)
    if held_back(s, req.priority, req.service, request_mib(req), req.grow_of ~= nil) == '' then
      return rank_of_score(head[2])
    end
    i = i + 1
  end
end

-- Whether the queue's head, found blocked by an earlier call (the header's `blocked`), still does not fit and
-- has nobody to ask to checkpoint: told from the placement index (an entry is the most a request may take on
-- its GPU; holds and offline GPUs only take more), and from the header or the usage hash (no GPU it may use
-- can be freed enough: includes/evict.lua room_to_make), without its record. False when that cannot be told
-- so cheaply: the caller then examines the head as usual.
local function head_still_blocked(s)
  local need, rank, node, pin = string.match(s.blocked_need or '', '^(%d+) (%-?%d+) (%S+) (.*)$')
  if not need then
    return false
  end
  need = tonumber(need)
  if pin ~= '' then
    local indexed = indexed_free(s, pin)
    if not indexed or indexed >= need then
      return false
    end
  elseif node ~= 'any' or #free_batch(s, need, 0) > 0 then
    return false
  end
  rank = tonumber(rank)
  return header_says_nobody(s, rank) -- (the header alone, before a request table is made for the rest)
    or not room_to_make(s, {id = BLOCKED_ID, vram_mib = need, rank = rank, pin = pin, node = node})
end

-- Note the queue's head as blocked in the header, as the call returns (a single-GPU request of strict
-- queueing that did not fit).
local function remember_blocked(s, id, req)
  if id ~= BLOCKED_ID and not req.grow_of and (tonumber(req.count) or 1) == 1 then
    local need = int(req.vram_mib) .. ' ' .. int(req.rank) .. ' ' .. (req.node or 'any') .. ' ' .. (req.pin or '')
    BLOCKED_NEXT, BLOCKED_ID, s.blocked_need = {id = id, need = need}, id, need
  end
end

-- (backfill) Keep the GPU that blocked request `id` waits for (none for one over several GPUs) out of the
-- placement of the requests behind it; returns `avoid`, the set of kept GPUs (made on first use).
local function keep_gpu(s, avoid, id, req)
  avoid = avoid or {}
  local gpu_wanted = (tonumber(req.count) or 1) == 1 and target(s, req.vram_mib, req.pin, id, req.node)
  if gpu_wanted then
    avoid[gpu_wanted] = true
  end
  return avoid
end

-- A grant went ahead of the blocked requests in `passable` (overtake): count it against each (its ticket's
-- `passed`). One passed `limit` times leaves the list and, with backfill, keeps its GPU from now on. Returns
-- whether the queue must stop behind it (strict), and `avoid`.
local function count_passes(s, passable, limit, backfill, avoid)
  local stop = false
  for i = #passable, 1, -1 do
    local entry = passable[i]
    local req = entry.req
    req.passed = (tonumber(req.passed) or 0) + 1
    redis.call('HSET', K_TICKETS, entry.id, cjson.encode(req))
    if req.passed >= limit then
      table.remove(passable, i)
      if backfill then
        avoid = keep_gpu(s, avoid, entry.id, req)
      else
        stop = true
      end
    end
  end
  return stop, avoid
end

local function grant_waiting(s, now)
  age_queue(s, now)
  local granted = 0
  local skip = 0 -- queue entries passed over: held back by the policy, or blocked (backfill, overtake)
  local backfill = s.policy.queueing == 'backfill'
  local overtake = s.policy.overtake
  local avoid = nil -- GPUs kept for blocked requests ahead (backfill)
  local passable = nil -- blocked requests ahead that later ones may still pass: {id, req} (overtake)
  local evicting = false -- eviction was tried for the first request that does not fit
  local blocked = 0
  -- The header's blocked-head note is used and written only for the head of strict queueing without policy
  -- holds or overtaking (head_still_blocked, remember_blocked).
  local noting = not backfill and not s.policy.holds_back and overtake <= 0
  -- No count first: the entry at `skip` is read until there is none (a blocked head costs one read then, and
  -- serving the queue to its end one read more than a count would, which it saves: never more in all).
  local empty = false
  while true do
    local at = pos_arg(skip)
    local head = redis.call('ZRANGE', K_QUEUE, at, at)[1]
    if not head then
      empty = skip == 0
      break
    end
    if noting and skip == 0 and head == BLOCKED_ID and head_still_blocked(s) then
      break
    end
    local raw = redis.call('HGET', K_TICKETS, head)
    if not raw then
      drop_request(head) -- a queue entry without its record: repair, never block on it
    else
      local req = cjson.decode(raw)
      if held_back(s, req.priority, req.service, request_mib(req), req.grow_of ~= nil) ~= '' then
        skip = skip + 1
      elseif req.grow_of and redis.call('HEXISTS', K_LEASES, req.grow_of) == 0 then
        drop_request(head, s, now, 'lease_gone') -- the lease it would grow is gone
      else
        local gpu = place_req(s, req, head, avoid)
        if gpu then
          drop_request(head)
          local lease = grant(s, head, req, gpu, now)
          local wake = WAKE_PREFIX .. head
          redis.call('RPUSH', wake, lease)
          redis.call('PEXPIRE', wake, int(req.ttl_ms * 2 + 10000))
          granted = granted + 1
          if passable and #passable > 0 then
            local stop
            stop, avoid = count_passes(s, passable, overtake, backfill, avoid)
            if stop then
              break
            end
          end
        else
          if not evicting then
            evicting = true
            try_evict(s, req, now) -- the first request in line that does not fit
          end
          if overtake > (tonumber(req.passed) or 0) then
            passable = passable or {}
            passable[#passable + 1] = {id = head, req = req} -- later requests that fit may still pass it
          elseif not backfill then
            if noting and skip == 0 then
              remember_blocked(s, head, req)
            end
            break
          else
            avoid = keep_gpu(s, avoid, head, req)
          end
          skip = skip + 1
          blocked = blocked + 1
          if blocked >= BACKFILL_LIMIT then
            break
          end
        end
      end
    end
  end
  s.queue_empty = empty -- (first_waiting_rank needs no read then)
  return granted
end

-- Serve the queue; when that granted request `id`, its lease (JSON), taken off its wake list: the caller
-- answers with it instead.
local function granted_now(s, id, now)
  grant_waiting(s, now)
  local lease = redis.call('HGET', K_LEASES, id)
  if lease then
    redis.call('DEL', WAKE_PREFIX .. id)
  end
  return lease
end
