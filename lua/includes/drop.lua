--[[
  drop_lease(s, id) -> the removed lease record (JSON) or nil: frees its MiB on its GPU, and deletes a
    grant pushed to the id's wake list that its waiter never took.
  drop_request(id) -> true when a queued request was removed (its wake list goes too).
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
  return raw
end

local function drop_request(id)
  redis.call('ZREM', K_QUEUE_EXP, id)
  redis.call('DEL', WAKE_PREFIX .. id)
  local removed = redis.call('ZREM', K_QUEUE, id)
  return redis.call('HDEL', K_TICKETS, id) + removed > 0
end

-- Removes leases and queued requests whose TTL has run out, at most COLLECT_LIMIT of each.
local function collect_expired(s, now)
  local leases, requests = 0, 0
  local ids = redis.call('ZRANGEBYSCORE', K_LEASE_EXP, '-inf', int(now), 'LIMIT', 0, COLLECT_LIMIT)
  for _, id in ipairs(ids) do
    if drop_lease(s, id) then
      leases = leases + 1
    end
  end
  ids = redis.call('ZRANGEBYSCORE', K_QUEUE_EXP, '-inf', int(now), 'LIMIT', 0, COLLECT_LIMIT)
  for _, id in ipairs(ids) do
    if drop_request(id) then
      requests = requests + 1
    end
  end
  return leases, requests
end
