--[[
  grant(s, id, req, gpu, now) -> the new lease record (JSON)
  grant_waiting(s, now) -> number of queued requests granted

  grant writes the lease: a fresh fencing token, the MiB on `gpu`, the record and its expiry. Tokens
  count up from Redis time (ms x 10) when the counter is missing, so they keep increasing even across a
  Redis restart that lost the counter, as long as the namespace averaged under 10 grants per ms.
  grant_waiting hands capacity to the head of the queue for as long as the head fits (strict order: a
  head that does not fit holds everyone behind it), and pushes each grant onto that request's wake list
  so the one waiter it belongs to returns at once: no polling, no herd. Each grant emits `granted`.

  Needs the emit and drop includes above it.
]]
local function grant(s, id, req, gpu, now)
  local token = redis.call('INCR', K_TOKEN)
  if token == 1 then -- the counter was missing: start it from Redis time
    token = now * 10 + 1
    redis.call('SET', K_TOKEN, int(token))
  end
  s.used[gpu] = redis.call('HINCRBY', K_USED, gpu, req.vram_mib)
  local index = 0
  local decl = redis.call('HGET', K_GPUS, gpu)
  if decl then
    index = cjson.decode(decl).index
  end
  local rec = {
    id = id, gpu = gpu, device = 'cuda:' .. index, vram_mib = req.vram_mib,
    priority = req.priority, rank = req.rank, service = req.service, host = req.host, pid = req.pid,
    requested_at = req.requested_at, acquired_at = now, expires_at = now + req.ttl_ms,
    ttl_ms = req.ttl_ms, token = token, seq = req.seq,
  }
  local raw = cjson.encode(rec)
  redis.call('HSET', K_LEASES, id, raw)
  redis.call('ZADD', K_LEASE_EXP, int(now + req.ttl_ms), id)
  local ev = lease_fields(rec)
  ev.waited_ms = now - req.requested_at
  ev.token = token
  ev.ttl_ms = req.ttl_ms
  emit('granted', now, ev)
  return raw
end

local function grant_waiting(s, now)
  local granted = 0
  while true do
    local head = redis.call('ZRANGE', K_QUEUE, 0, 0)[1]
    if not head then
      break
    end
    local raw = redis.call('HGET', K_TICKETS, head)
    if not raw then
      drop_request(head) -- a queue entry without its record: repair, never block on it
    else
      local req = cjson.decode(raw)
      local gpu = place(s, req.vram_mib, req.pin)
      if not gpu then
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
  return granted
end
