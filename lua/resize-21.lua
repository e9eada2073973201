--[[
  resize: change the VRAM of a lease. Shrinking hands the difference to the queue in the same step (and,
  for a lease being evicted, counts against what it was asked for: asked enough, it is no longer being
  evicted). Growing is granted at once when the extra fits on the lease's GPU and nobody of the same or
  a higher priority waits (VRAM held for the eviction of a lower priority's request counts as free for it,
  as for a newcomer in acquire); otherwise a request for the extra (id `<lease id>:grow`, pinned to the lease's
  GPU) waits in the queue like a new request of the lease's priority while the current part stays held,
  and its grant adds to the lease. Calling again with the same size reports where that stands. The policy
  holds a growth back like a request (pause, window, the service's MiB cap), except for the caps on the
  number of leases (`max_leases` of its class or service): a growth adds no lease. A lease over several
  GPUs cannot be resized (INSUFFICIENT with max_mib 0, nothing written).

  Events: `resized` (with from_mib and to_mib, or added_mib when a queued growth is granted), `queued` (with
  grow_of, ahead, ttl_ms, and held_back when the policy holds it back), `granted` for waiters served,
  `evict_cancelled` when a shrink satisfied an eviction.

  Input:
    KEYS[1..19] the state layout (includes/state.lua)
    KEYS[20]    events       pub/sub channel (includes/emit.lua)
    KEYS[21]    event_log    stream
    ARGV[1]     wake-list prefix
    ARGV[2]     lease id
    ARGV[3]     new size, integer MiB > 0
    ARGV[4]     the holder's secret
    ARGV[5]     event log cap (0: no log)

  Output:
    {0}                         GONE: no lease under that id (or not the caller's: wrong secret)
    {1, lease}                  DONE: the lease has the new size now (record, JSON)
    {2, position, next_ms}      QUEUED: the growth waits at this 0-based queue position
    {-1, max_mib}               INSUFFICIENT: the lease's GPU can never hold that much; nothing written.
                                Also for a lease over several GPUs, which cannot be resized: {-1, 0}
]]
--- @include "state"
--- @include "emit"
--- @include "place"
--- @include "drop"
--- @include "evict"
--- @include "grant"

local id, want = ARGV[2], tonumber(ARGV[3])
local now = now_ms()
local s = load_gpus(now)
collect_expired(s, now)
grant_waiting(s, now) -- what the collection freed goes to the queue, whatever the answer below

local rec, raw = held_lease(id, ARGV[4])
if not rec then
  return {0}
end
local grow_id = id .. ':grow'
local diff = want - rec.vram_mib
if diff == 0 then
  if drop_request(grow_id, s, now, 'resized') then -- a growth still queued is no longer wanted
    grant_waiting(s, now)
  end
  return {1, raw}
end
if rec.gpus and #rec.gpus > 1 then
  return {-1, 0} -- a lease over several GPUs cannot be resized (the client refuses it before asking)
end
if want > (s.cap[rec.gpu] or 0) then
  return {-1, s.cap[rec.gpu] or 0}
end

local function apply(delta)
  rec.vram_mib = rec.vram_mib + delta
  s.used[rec.gpu] = redis.call('HINCRBY', K_USED, rec.gpu, delta)
  index_gpu(s, rec.gpu)
  count_mib(s, rec, delta)
  local ev = lease_fields(rec)
  ev.from_mib = rec.vram_mib - delta
  ev.to_mib = rec.vram_mib
  emit('resized', now, ev)
end

if diff < 0 then
  drop_request(grow_id, s, now, 'resized')
  apply(diff)
  if rec.state == 'evicting' and rec.evict then
    rec.evict.need_mib = rec.evict.need_mib + diff
    if rec.evict.need_mib <= 0 then
      local by = rec.evict.by
      rec.state = 'active'
      rec.evict = nil
      local hold = s.holds[rec.gpu]
      if hold then
        for i, victim in ipairs(hold.victims) do
          if victim == id then
            table.remove(hold.victims, i)
            save_hold(s, rec.gpu)
            break
          end
        end
      end
      local ev = lease_fields(rec)
      ev.by = by
      ev.reason = 'resized'
      emit('evict_cancelled', now, ev)
    end
  end
  raw = cjson.encode(rec)
  redis.call('HSET', K_LEASES, id, raw)
  grant_waiting(s, now)
  return {1, raw}
end

-- Growing.
if redis.call('HEXISTS', K_TICKETS, grow_id) == 1 then
  local ticket = cjson.decode(redis.call('HGET', K_TICKETS, grow_id))
  if ticket.vram_mib == diff then
    return {2, redis.call('ZRANK', K_QUEUE, grow_id), next_expiry(now)}
  end
  drop_request(grow_id, s, now, 'resized') -- another size was asked: ask again
  grant_waiting(s, now)
end
local first = first_waiting_rank(s)
s.newcomer = {id = id, rank = rec.rank} -- a hold for a request of a lower rank does not block the growth
local why = held_back(s, rec.priority, rec.service, diff, true) -- (a growth adds no lease)
if (first == nil or first < rec.rank) and free_for(s, rec.gpu, id) >= diff and why == '' then
  apply(diff)
  raw = cjson.encode(rec)
  redis.call('HSET', K_LEASES, id, raw)
  return {1, raw}
end
local req = {
  id = grow_id, grow_of = id, vram_mib = diff, rank = rec.rank, priority = rec.priority, pin = rec.gpu,
  ttl_ms = rec.ttl_ms, service = rec.service, host = rec.host, pid = rec.pid, requested_at = now,
  seq = redis.call('INCR', K_SEQ), expires_at = now + rec.ttl_ms,
}
redis.call('HSET', K_TICKETS, grow_id, cjson.encode(req))
redis.call('ZADD', K_QUEUE, int((RANK_BASE - rec.rank) * SEQ_SPAN + req.seq), grow_id)
s.queue_empty = nil
add_expiry(s, K_QUEUE_EXP, now + rec.ttl_ms, grow_id)
local position = redis.call('ZRANK', K_QUEUE, grow_id)
local ev = request_fields(req)
ev.ahead = position
ev.ttl_ms = req.ttl_ms
ev.grow_of = id
if why ~= '' then
  ev.held_back = why
end
emit('queued', now, ev)
return {2, position, next_expiry(now)}
