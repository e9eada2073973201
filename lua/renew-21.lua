--[[
  renew: heartbeat a batch of leases and queued requests of one process.

  Expired entries are collected first, so an entry whose TTL ran out is lost even if its renewal
  arrives a moment later: a lease past its deadline never comes back. Then each live id gets a new
  deadline of now + its ttl, and freed capacity goes to the queue. A lease held longer than its class's
  `max_hold` (policy) is asked to checkpoint (`evict_requested`, reason `max_hold`) or revoked (`revoked`,
  reason `max_hold`; it answers GONE), once. A lease idle (lua/activity-21.lua) for longer than its
  `idle_timeout_ms` is asked to unload (`evict_requested`, by and reason `idle_timeout`; docs/warm.md).

  Events: a renewal is not an event; `lost` for an id its holder renews that is gone; `expired` and
  `granted` for what was collected and served.

  Runs on a server that is out of memory (function flag allow-oom, see gpuboss/scripts.py): it rewrites
  records in place or gives memory back, so a full shared Redis does not cost holders their leases.

  Input:
    KEYS[1..19]       the state layout (includes/state.lua)
    KEYS[20]         events       pub/sub channel (includes/emit.lua)
    KEYS[21]         event_log    stream
    ARGV[1]          wake-list prefix
    ARGV[2]          the holder's secret (an id whose record has another holder's answers GONE)
    ARGV[2k+1], ARGV[2k+2] (k >= 1, 2k+2 < #ARGV)   an id and its ttl in ms
    ARGV[#ARGV]      event log cap (0: no log)

  Output:
    {next_ms, now_ms, st_1, ...} next_ms: ms until the next expiry (-1: none); now_ms: Redis time;
                                 st_k for the k-th id:
                                 1 LEASE (renewed; its new expires_at is now + ttl)
                                 2 QUEUED (request renewed, still waiting)
                                 0 GONE (nothing under that id: lost, expired or released)
                                 3 EVICTING (renewed, and asked to checkpoint: its notice follows)
    after the n statuses, one JSON notice {lease, type: 'evict', by, need_mib, at, deadline, reason} per
    EVICTING lease, in the same order: a holder that missed the pub/sub notice learns it here.
]]
--- @flags allow-oom
--- @include "state"
--- @include "emit"
--- @include "place"
--- @include "drop"
--- @include "evict"
--- @include "grant"

local now = now_ms()
local s = load_gpus(now)
collect_expired(s, now)
grant_waiting(s, now)

local reply = {0, now}
local notices = {}
local secret = ARGV[2]
for k = 3, #ARGV - 2, 2 do
  local id, ttl = ARGV[k], tonumber(ARGV[k + 1])
  local st = 0
  local raw = redis.call('HGET', K_LEASES, id)
  local rec = raw and cjson.decode(raw)
  if rec and not is_holder(rec, secret) then
    rec, raw = nil, nil
  end
  if rec and rec.hold_until and now >= rec.hold_until and rec.state ~= 'evicting' then
    -- Held longer than its class's max_hold: revoked, or asked to checkpoint (below).
    rec.hold_until = nil
    if rec.hold_action == 'revoke' then
      drop_lease(s, id)
      local ev = lease_fields(rec)
      ev.held_ms = since_ms(now, rec.acquired_at)
      ev.by = 'policy'
      ev.reason = 'max_hold'
      emit('revoked', now, ev)
      rec = nil
    else
      ask_to_checkpoint(rec, 'policy', rec.vram_mib, now, now + (tonumber(rec.grace_ms) or 30000), 'max_hold')
    end
  end
  if rec and rec.busy == false and rec.idle_timeout_ms and rec.idle_since and rec.state ~= 'evicting'
      and now - rec.idle_since >= rec.idle_timeout_ms then
    -- Idle longer than its idle timeout (lua/activity-21.lua): asked to unload, even without contention.
    ask_to_checkpoint(rec, 'idle_timeout', rec.vram_mib, now, now + (tonumber(rec.grace_ms) or 30000),
      'idle_timeout')
  end
  if rec then
    rec.expires_at = now + ttl
    redis.call('HSET', K_LEASES, id, cjson.encode(rec))
    add_expiry(s, K_LEASE_EXP, now + ttl, id)
    st = 1
    if rec.state == 'evicting' and rec.evict then
      st = 3
      local e = rec.evict
      notices[#notices + 1] = cjson.encode({
        lease = id, type = 'evict', by = e.by, need_mib = e.need_mib, at = e.at, deadline = e.deadline,
        reason = e.reason,
      })
    end
  elseif redis.call('ZSCORE', K_QUEUE_EXP, id) and is_holder(cjson.decode(redis.call('HGET', K_TICKETS, id) or '{}'), secret) then
    add_expiry(s, K_QUEUE_EXP, now + ttl, id)
    st = 2
  end
  if st == 0 then
    -- Its holder still counts on it, and it is gone (expired, revoked, or lost with Redis): say so once,
    -- from here, where it is found out.
    emit('lost', now, {
      lease = id, gpu = cjson.null, service = cjson.null, priority = cjson.null, vram_mib = cjson.null,
    })
  end
  reply[#reply + 1] = st
end
grant_waiting(s, now) -- what a revocation above freed
reply[1] = next_expiry(now)
for _, notice in ipairs(notices) do
  reply[#reply + 1] = notice
end
return reply
