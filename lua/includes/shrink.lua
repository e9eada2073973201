--[[
  Before the registry loses capacity (reregister shrinks a GPU, unregister removes one), shared by both.

  refusal(s, now, collected) -> refuse(reply): returns `reply` after undoing nothing, since nothing was written
  but the collection of expired entries that came first (`collected` of them): the queue is then served;
  without any, the call writes nothing at all (not even the header its full check worked out).
  first_stranded(s, before, after) -> request id, MiB it needs on a GPU, its pinned GPU ('' for none), or nil:
  a waiting request that a GPU could hold by `before` (gpu id -> leasable MiB) and none could by `after` (a
  request would then wait in vain), or one pinned to a GPU that `after` lacks. A request that grows a lease
  needs its GPU to hold the lease as it will be.
  The whole queue is read: an operator's call, made rarely.
]]
local function refusal(s, now, collected)
  return function(reply)
    if collected > 0 then
      grant_waiting(s, now)
    else
      HEAD_WRITE, BLOCKED_NEXT = false, nil
    end
    return reply
  end
end

local function first_stranded(s, before, after)
  local flat = redis.call('HGETALL', K_TICKETS)
  for i = 1, #flat, 2 do
    local req = cjson.decode(flat[i + 1])
    local need, pin, count = req.vram_mib, req.pin or '', req.count or 1
    if req.grow_of then
      local rec = redis.call('HGET', K_LEASES, req.grow_of)
      need = need + (rec and cjson.decode(rec).vram_mib or 0)
    end
    local held_before, held_after
    if pin ~= '' then -- (pinned to a GPU that goes: stranded, whatever it needs)
      held_before, held_after = after[pin] == nil or (before[pin] or 0) >= need, (after[pin] or 0) >= need
    else
      held_before = could_hold(s, before, need, req.node, count)
      held_after = could_hold(s, after, need, req.node, count)
    end
    if held_before and not held_after then
      return flat[i], need, pin
    end
  end
  return nil
end
