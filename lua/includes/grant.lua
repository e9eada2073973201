--[[
  grant(s, id, req, gpu, now) -> the new (or grown) lease record (JSON)
  grant_waiting(s, now) -> number of queued requests granted

  grant writes the lease: a fresh fencing token, the MiB on `gpu`, the record and its expiry, and counts it
  in the usage hash. Tokens count up from Redis time (ms x 10) when the counter is missing, so they keep
  increasing even across a Redis restart that lost the counter, as long as the namespace averaged under 10
  grants per ms. A request that grows a lease (`grow_of`) adds its MiB to that lease instead. A reservation
  held for the request ends (its remaining victims may continue). A grant of a class that a pause rule
  with `evict` waits for asks the paused class's active leases to checkpoint.

  grant_waiting hands capacity to the queue in order (priority, then arrival) for as long as the first
  request that is not paused fits (strict order: a request that does not fit holds everyone behind it;
  requests of a paused class wait without blocking others), and pushes each grant onto that request's
  wake list so the one waiter it belongs to returns at once: no polling, no herd. Each grant emits
  `granted` (and `resumed` for a request that an eviction sent back to the queue).

  Needs the emit, drop and evict includes above it.
]]
local function grant(s, id, req, gpu, now)
  local token = redis.call('INCR', K_TOKEN)
  if token == 1 then -- the counter was missing: start it from Redis time
    token = now * 10 + 1
    redis.call('SET', K_TOKEN, int(token))
  end
  s.used[gpu] = redis.call('HINCRBY', K_USED, gpu, req.vram_mib)
  release_hold(s, id, now, 'granted')
  if req.grow_of then
    local raw = redis.call('HGET', K_LEASES, req.grow_of)
    local rec = cjson.decode(raw)
    rec.vram_mib = rec.vram_mib + req.vram_mib
    rec.token = token
    if rec.preemptible then
      redis.call('HINCRBY', K_USAGE, 'pre:' .. rec.rank, req.vram_mib)
    end
    raw = cjson.encode(rec)
    redis.call('HSET', K_LEASES, req.grow_of, raw)
    local ev = lease_fields(rec)
    ev.added_mib = req.vram_mib
    ev.waited_ms = now - req.requested_at
    emit('resized', now, ev)
    return raw
  end
  local index = 0
  local decl = redis.call('HGET', K_GPUS, gpu)
  if decl then
    index = cjson.decode(decl).index
  end
  local rec = {
    id = id, gpu = gpu, device = 'cuda:' .. index, vram_mib = req.vram_mib,
    priority = req.priority, rank = req.rank, service = req.service, host = req.host, pid = req.pid,
    requested_at = req.requested_at, acquired_at = now, expires_at = now + req.ttl_ms,
    ttl_ms = req.ttl_ms, token = token, seq = req.seq, preemptible = req.preemptible, notify = req.notify,
    state = 'active', evictions = req.evictions or 0, grace_ms = req.grace_ms, on_grace = req.on_grace,
  }
  local raw = cjson.encode(rec)
  redis.call('HSET', K_LEASES, id, raw)
  redis.call('ZADD', K_LEASE_EXP, int(now + req.ttl_ms), id)
  count_lease(rec, 1)
  s.active[rec.priority] = nil
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

-- The rank of the first queued request that is not paused, or nil when none waits.
local function first_waiting_rank(s)
  local i = 0
  while true do
    local head = redis.call('ZRANGE', K_QUEUE, i, i, 'WITHSCORES')
    if head[1] == nil then
      return nil
    end
    if #s.policy.pause == 0 then
      return rank_of_score(head[2])
    end
    local raw = redis.call('HGET', K_TICKETS, head[1])
    if not raw or not is_paused(s, cjson.decode(raw).priority) then
      return rank_of_score(head[2])
    end
    i = i + 1
  end
end

local function grant_waiting(s, now)
  local granted = 0
  local skip = 0 -- queue entries passed over because their class is paused
  local pausing = #s.policy.pause > 0
  while true do
    local head = redis.call('ZRANGE', K_QUEUE, skip, skip)[1]
    if not head then
      break
    end
    local raw = redis.call('HGET', K_TICKETS, head)
    if not raw then
      drop_request(head) -- a queue entry without its record: repair, never block on it
    else
      local req = cjson.decode(raw)
      if pausing and is_paused(s, req.priority) then
        skip = skip + 1
      elseif req.grow_of and redis.call('HEXISTS', K_LEASES, req.grow_of) == 0 then
        drop_request(head, s, now, 'lease_gone') -- the lease it would grow is gone
      else
        local gpu = place(s, req.vram_mib, req.pin, head)
        if not gpu then
          try_evict(s, req, now)
          break
        end
        drop_request(head)
        local lease = grant(s, head, req, gpu, now)
        local wake = WAKE_PREFIX .. head
        redis.call('RPUSH', wake, lease)
        redis.call('PEXPIRE', wake, int(req.ttl_ms * 2 + 10000))
        granted = granted + 1
      end
    end
  end
  return granted
end
