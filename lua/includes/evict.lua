--[[
  Cooperative eviction: choosing victims, reserving what they free, and asking them to checkpoint.

  try_evict(s, req, now) -> true when victims were asked for `req` (a queued request that does not fit).
    Candidates are the leases not already being evicted that are idle (`busy` false: a warm model between
    requests, docs/warm.md), whatever their rank, and those of a strictly lower rank that are preemptible.
    On each GPU the request could use, idle candidates are taken first (lowest rank, then idle the longest),
    then the others lowest rank first, then most recently granted, until they free enough; then any whose VRAM is not needed is dropped again, and the last one is asked
    for only the part still missing (a holder that can shrink may resize instead of releasing). The GPU
    needing the fewest busy (not idle) victims wins, then the fewest victims (then the fewest MiB, then the
    smaller id). The request's need is then
    reserved on that GPU (the holds hash: nobody else may take it, and no second eviction is started for
    it); each victim's record goes to state `evicting` with {by, need_mib, at, deadline}, an
    `evict_requested` event is emitted and an `evict` notice is published on the holder's channel. A
    holder that missed the notice learns it from its next heartbeat (renew answers EVICTING). When no GPU
    can be freed enough, nobody is asked and the request waits as usual.
  pause_evict(s, class, now): a lease of `class` was granted; pause rules with `evict` whose `while`
    names it ask every active lease of their paused class to checkpoint (no reservation: the paused class
    is not granted again until the rule lifts).

  Needs the emit and drop includes above it.
]]

local function ask_to_checkpoint(rec, by, need, now, deadline, reason)
  rec.state = 'evicting'
  rec.evict = {by = by, need_mib = need, at = now, deadline = deadline, reason = reason}
  redis.call('HSET', K_LEASES, rec.id, cjson.encode(rec))
  local ev = lease_fields(rec)
  ev.by = by
  ev.need_mib = need
  ev.deadline = deadline
  ev.reason = reason
  emit('evict_requested', now, ev)
  notify(rec, {type = 'evict', by = by, need_mib = need, at = now, deadline = deadline, reason = reason})
end

-- A lease its holder marked idle (lua/activity-21.lua): the first candidate, whatever its rank.
local function is_idle(rec)
  return rec.busy == false
end

local function victim_order(x, y)
  local a, b = x.rec, y.rec
  if is_idle(a) ~= is_idle(b) then
    return is_idle(a)
  end
  if is_idle(a) and a.rank == b.rank and a.idle_since ~= b.idle_since then
    return (a.idle_since or 0) < (b.idle_since or 0)
  end
  if a.rank ~= b.rank then
    return a.rank < b.rank
  end
  if a.acquired_at ~= b.acquired_at then
    return a.acquired_at > b.acquired_at
  end
  return a.id < b.id
end

-- True when victims on `gpu` may be asked for request `req`: a registered GPU, online, large enough, the
-- request's pin and node, and no reservation there for another request.
local function may_evict_on(s, req, gpu)
  local hold = s.holds[gpu]
  return s.cap[gpu] ~= nil and not s.off[gpu] and s.cap[gpu] >= req.vram_mib and (req.pin == '' or req.pin == gpu)
    and not (hold and hold.id ~= req.id) and on_node(s, gpu, req.node)
end

-- Whether victims might be found for request `req` (its vram_mib, rank, pin, node and id) without reading
-- the leases, and whether any idle hint is there: false when the header or the usage hash tells that no GPU
-- it may use has enough idle MiB, or preemptible MiB of a lower rank, with its free MiB to make room.
local function room_to_make(s, req)
  if header_says_nobody(s, req.rank) then
    return false, false -- no idle lease, and no preemptible one of a lower rank (the state header)
  end
  local evictable, any_idle, _, on_gpu = preemptible_below(req.rank)
  if evictable == 0 then
    return false, any_idle -- nothing to ask (it does not fit, so no GPU has its whole need free either)
  end
  if on_gpu then -- (per GPU: the leases are not read, nor any GPU without such MiB)
    for gpu, mib in pairs(on_gpu) do
      if may_evict_on(s, req, gpu) and free_for(s, gpu, req.id) + mib >= req.vram_mib then
        return true, any_idle
      end
    end
    return false, any_idle
  end
  local best_free = 0 -- (sums the hash cannot place: their MiB may be on any GPU it may use)
  for gpu in pairs(all_gpus(s)) do
    if may_evict_on(s, req, gpu) then
      best_free = math.max(best_free, free_for(s, gpu, req.id))
    end
  end
  return evictable + best_free >= req.vram_mib, any_idle
end

local function try_evict(s, req, now)
  local id = req.id
  for _, hold in pairs(s.holds) do
    if hold.id == id then
      return false -- already being served by an eviction
    end
  end
  if req.grow_of or (tonumber(req.count) or 1) > 1 then
    return false -- (a request for several GPUs waits; it does not evict)
  end
  local possible, any_idle = room_to_make(s, req)
  if not possible then
    return false
  end
  local idle_seen = {}
  local by_gpu = {}
  local flat = redis.call('HGETALL', K_LEASES)
  for i = 2, #flat, 2 do
    local rec = cjson.decode(flat[i])
    if is_idle(rec) then
      idle_seen[rec.id] = true
    end
    if rec.state ~= 'evicting' and rec.id ~= id and (is_idle(rec) or (rec.preemptible and rec.rank < req.rank)) then
      for _, gpu in ipairs(rec.gpus or {rec.gpu}) do
        by_gpu[gpu] = by_gpu[gpu] or {}
        table.insert(by_gpu[gpu], {rec = rec, mib = rec.per_gpu_mib or rec.vram_mib})
      end
    end
  end
  if any_idle then -- a lease released while idle left its hint behind: remove it
    local usage = redis.call('HGETALL', K_USAGE)
    for i = 1, #usage, 2 do
      if string.sub(usage[i], 1, 5) == 'idle:' and not idle_seen[string.sub(usage[i], 6)] then
        redis.call('HDEL', K_USAGE, usage[i])
      end
    end
  end
  local best = nil
  for gpu, cands in pairs(by_gpu) do
    if may_evict_on(s, req, gpu) then
      local short = req.vram_mib - free_for(s, gpu, id)
      table.sort(cands, victim_order)
      local taken, sum, busy = {}, 0, 0
      for _, cand in ipairs(cands) do
        if sum >= short then
          break
        end
        taken[#taken + 1] = cand
        sum = sum + cand.mib
      end
      if sum >= short then
        -- Drop victims whose VRAM is not needed after all (a later, larger one covers it).
        local i = 1
        while i <= #taken do
          if sum - taken[i].mib >= short then
            sum = sum - taken[i].mib
            table.remove(taken, i)
          else
            i = i + 1
          end
        end
        for _, cand in ipairs(taken) do
          if not is_idle(cand.rec) then
            busy = busy + 1
          end
        end
        local better = best == nil or busy < best.busy or (busy == best.busy and (#taken < #best.victims
          or (#taken == #best.victims and (sum < best.mib or (sum == best.mib and gpu < best.gpu)))))
        if better then
          best = {gpu = gpu, victims = taken, mib = sum, short = short, busy = busy}
        end
      end
    end
  end
  if best == nil then
    return false
  end
  local grace = tonumber(req.grace_ms) or 30000
  local deadline = now + grace
  local hold = {
    id = id, vram_mib = req.vram_mib, priority = req.priority, victims = {}, at = now, deadline = deadline,
    on_grace = req.on_grace or 'wait',
  }
  local missing = best.short
  for _, cand in ipairs(best.victims) do
    local need = math.min(cand.mib, missing)
    missing = missing - need
    hold.victims[#hold.victims + 1] = cand.rec.id
    ask_to_checkpoint(cand.rec, id, need, now, deadline, is_idle(cand.rec) and 'idle' or 'priority')
  end
  s.holds[best.gpu] = hold
  save_hold(s, best.gpu)
  return true
end

local function pause_evict(s, class, now)
  local paused = {}
  for _, rule in ipairs(s.policy.pause) do
    if rule.evict then
      for _, other in ipairs(rule['while']) do
        if other == class then
          paused[rule.class] = true
        end
      end
    end
  end
  if next(paused) == nil then
    return
  end
  local flat = redis.call('HGETALL', K_LEASES)
  for i = 2, #flat, 2 do
    local rec = cjson.decode(flat[i])
    if paused[rec.priority] and rec.state ~= 'evicting' then
      ask_to_checkpoint(rec, 'pause:' .. class, rec.vram_mib, now, now + (tonumber(rec.grace_ms) or 30000), 'pause')
    end
  end
end
