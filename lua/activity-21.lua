--[[
  activity: the holder says whether it uses its lease right now (busy), not (idle: a warm model kept loaded
  between requests), or that an idle lease is still wanted (touch); and, for a warm model, that it was
  (re)loaded (docs/warm.md).

  An idle lease is the first candidate whenever a request cannot be placed (includes/evict.lua), whatever
  its priority; a busy one is treated by its priority as usual. With an idle timeout, the renew script asks
  a lease idle for that long to unload (reason `idle_timeout`). The record keeps `busy` (true/false),
  `idle_since` (ms, Redis time; refreshed by touch), `idle_timeout_ms` and `model`; the usage hash keeps
  `idle:<lease id>` -> MiB while the lease is idle (a hint that lets eviction skip a scan that cannot
  succeed; a field left by a lease released while idle is removed by the next scan).

  busy on a lease being asked to unload because it was idle (reason `idle` or `idle_timeout`), whose holder
  has not started the checkpoint, calls that off: the lease continues, busy (`evict_cancelled` with reason
  `busy`), and a reservation made for the requester is released so that its eviction is planned again
  without this lease. Once the checkpoint started, or for any other eviction, busy is refused (EVICTING):
  the holder hands the lease back first. idle hands freed chances to the queue at once: the first request
  in line that does not fit may ask this lease to unload in the same step.

  Events: `model_loaded` (the first load of a warm model) or `model_reloaded` (a later one), with `model`,
  `waited_ms` (request to grant) and `load_ms` (grant to now: the time the load took); `evict_cancelled`;
  `evict_requested`, `granted`, `expired` for what serving the queue did. busy, idle and touch are not events.

  Runs on a server that is out of memory (function flag allow-oom, see gpuboss/scripts.py): it rewrites
  records in place or gives memory back, so a full shared Redis does not cost holders their leases.

  Input:
    KEYS[1..19] the state layout (includes/state.lua)
    KEYS[20]    events       pub/sub channel (includes/emit.lua)
    KEYS[21]    event_log    stream
    ARGV[1]     wake-list prefix
    ARGV[2]     lease id
    ARGV[3]     op: 'busy', 'idle' or 'touch'
    ARGV[4]     the holder's secret
    ARGV[5]     idle timeout, ms: '' leaves it, '0' removes it, N > 0 sets it
    ARGV[6]     model label ('' leaves it)
    ARGV[7]     load event: '' none, 'loaded' (model_loaded) or 'reloaded' (model_reloaded)
    ARGV[8]     reloads so far (carried by model_reloaded)
    ARGV[9]     event log cap (0: no log)

  Output:
    {0}             GONE: no lease under that id (expired, revoked or released), or not the caller's
    {1, lease, at}  DONE: the lease record after the change (JSON); `at` is the time (ms) of the eviction request
                    this busy called off, 0 when none (a holder applies only that: a later request stands)
    {2, notice}     EVICTING: busy refused: the lease is being handed back first; the notice (JSON, as renew's)
]]
--- @flags allow-oom
--- @include "state"
--- @include "emit"
--- @include "place"
--- @include "drop"
--- @include "evict"
--- @include "grant"

local id, op, secret = ARGV[2], ARGV[3], ARGV[4]
local timeout, model, load_event = ARGV[5], ARGV[6], ARGV[7]
local now = now_ms()
local s = load_gpus(now)
collect_expired(s, now)

local raw = redis.call('HGET', K_LEASES, id)
if not raw then
  redis.call('HDEL', K_USAGE, 'idle:' .. id)
  return {0}
end
local rec = cjson.decode(raw)
if not is_holder(rec, secret) then
  return {0}
end

local replan, called_off = false, 0
if op == 'busy' and rec.state == 'evicting' and rec.evict then
  local e = rec.evict
  if (e.reason == 'idle' or e.reason == 'idle_timeout') and not e.started_at then
    -- Asked to unload because it was idle, and not started yet: busy again, it stays. (Its holder learns
    -- that from this reply: no `continue` notice, which could arrive after a later eviction's notice.)
    rec.state = 'active'
    rec.evict = nil
    called_off = e.at
    redis.call('HSET', K_LEASES, id, cjson.encode(rec))
    local ev = lease_fields(rec)
    ev.by = e.by
    ev.reason = 'busy'
    emit('evict_cancelled', now, ev)
    if e.reason == 'idle' then
      -- The reservation goes (other victims back to active); the requester's eviction is planned again below.
      for gpu, hold in pairs(s.holds) do
        if hold.id == e.by then
          for i, victim in ipairs(hold.victims) do
            if victim == id then
              table.remove(hold.victims, i)
              break
            end
          end
          save_hold(s, gpu)
        end
      end
      release_hold(s, e.by, now, 'busy')
      replan = true
    end
  else
    return {2, cjson.encode({
      lease = id, type = 'evict', by = e.by, need_mib = e.need_mib, at = e.at, deadline = e.deadline,
      reason = e.reason,
    })}
  end
end

if op == 'busy' then
  rec.busy = true
  rec.idle_since = nil
  redis.call('HDEL', K_USAGE, 'idle:' .. id)
elseif op == 'idle' then
  rec.busy = false
  rec.idle_since = now
  local hint = int(rec.per_gpu_mib or rec.vram_mib) .. ' ' .. table.concat(rec.gpus or {rec.gpu}, ',')
  redis.call('HSET', K_USAGE, 'idle:' .. id, hint) -- (its MiB and GPU: includes/state.lua preemptible_below)
  note_evictable(s, -1) -- (an idle lease is a candidate for a request of any rank)
elseif rec.busy == false then -- touch: still wanted; the idle timeout starts again
  rec.idle_since = now
end
if timeout ~= '' then
  local ms = tonumber(timeout)
  if ms > 0 then
    rec.idle_timeout_ms = ms
  else
    rec.idle_timeout_ms = nil
  end
end
if model ~= '' then
  rec.model = model
end
raw = cjson.encode(rec)
redis.call('HSET', K_LEASES, id, raw)

if load_event == 'loaded' or load_event == 'reloaded' then
  local ev = lease_fields(rec)
  ev.model = rec.model or cjson.null
  ev.waited_ms = rec.acquired_at - rec.requested_at
  ev.load_ms = now - rec.acquired_at
  if load_event == 'reloaded' then
    ev.reloads = tonumber(ARGV[8]) or 0
  end
  emit('model_' .. load_event, now, ev)
end
if op == 'idle' or replan then
  grant_waiting(s, now) -- the first request in line may ask an idle lease (this one, when idle) to unload, now
  raw = redis.call('HGET', K_LEASES, id) or raw
end
return {1, raw, called_off}
