--[[
  drop_lease(s, id) -> the removed lease record (decoded) and its JSON, or nil: frees its MiB on its GPU,
    and deletes a grant pushed to the id's wake list that its waiter never took.
  drop_request(id) -> true when a queued request was removed (its wake list goes too).
  collect_expired(s, now, out) -> leases, requests: removes leases and queued requests whose TTL has run
    out (at most COLLECT_LIMIT of each), emitting `expired` for each; with a table `out`, their records
    (JSON) are appended to out.leases and out.requests.

  Needs the emit include above it.
]]
local function drop_lease(s, id)
  local raw = redis.call('HGET', K_LEASES, id)
  redis.call('ZREM', K_LEASE_EXP, id)
  redis.call('DEL', WAKE_PREFIX .. id) -- a grant its waiter never took (the waiter died)
  if not raw then
    return nil
  end
  local rec = cjson.decode(raw)
  redis.call('HDEL', K_LEASES, id)
  local left = redis.call('HINCRBY', K_USED, rec.gpu, -rec.vram_mib)
  if left < 0 then
    -- Never expected; repaired rather than left to poison every later placement.
    redis.call('HSET', K_USED, rec.gpu, 0)
    left = 0
  end
  s.used[rec.gpu] = left
  return rec, raw
end

local function drop_request(id)
  redis.call('ZREM', K_QUEUE_EXP, id)
  redis.call('DEL', WAKE_PREFIX .. id)
  local removed = redis.call('ZREM', K_QUEUE, id)
  return redis.call('HDEL', K_TICKETS, id) + removed > 0
end

-- Milliseconds between two record times, or null when the record lacks the first.
local function since_ms(now, t)
  if t == nil then
    return cjson.null
  end
  return now - t
end

local function collect_expired(s, now, out)
  local leases, requests = 0, 0
  local ids = redis.call('ZRANGEBYSCORE', K_LEASE_EXP, '-inf', int(now), 'LIMIT', 0, COLLECT_LIMIT)
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
  ids = redis.call('ZRANGEBYSCORE', K_QUEUE_EXP, '-inf', int(now), 'LIMIT', 0, COLLECT_LIMIT)
  for _, id in ipairs(ids) do
    local raw = redis.call('HGET', K_TICKETS, id)
    if drop_request(id) then
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
  return leases, requests
end
