--[[
  place(s, need, pin, id, avoid, node) -> gpu id or nil

  Best fit over the GPUs that are online: the GPU left with the least free MiB after the grant (ties go
  to the smaller id, so every replica decides alike). Free MiB is effective free (includes/state.lua
  free_for): capacity - reserve - max(leased, observed used), less any VRAM held for another request.
  `pin` (a gpu id, or '' for any) restricts the choice to one GPU; `id` is the request being placed;
  `avoid` (optional) is a set of GPU ids kept for requests ahead in the queue (backfill); `node`
  ('any', or a host name; nil: any) limits it to the GPUs of that host and the GPUs without a host.

  place_multi(s, need, count, id, avoid, node) -> list of `count` gpu ids on one host, or nil: all or
  nothing, each with `need` MiB free (GPUs without a host count as one host). Within a host the best fits
  are taken; the host left with the least free MiB in them wins (ties to the smaller host name).
  place_req(s, req, id, avoid) -> what req asks: a gpu id (place) or, for `count` > 1, a list (place_multi).

  target(s, need, pin, id, node) -> the GPU a request that does not fit waits for: its pin, else the eligible GPU
  closest to fitting (most free MiB; ties to the smaller id), or nil when no GPU can ever hold it.

  could_hold(s, caps, need, node, count) -> whether `count` GPUs of one host that `node` may use (GPUs without a
  host count as one host) each lease out at least `need` MiB in all, by `caps` (gpu id -> leasable MiB, a
  number or its text), free or not; and the most any GPU `node` may use leases out. (Whether a request can
  ever be served: acquire answers INSUFFICIENT when not, reregister keeps every waiting request servable.)
]]
-- Every GPU's host (false for a GPU without one), for the paths that group GPUs by host.
local function load_hosts(s)
  for gpu, _ in pairs(all_gpus(s)) do
    host_of(s, gpu)
  end
  return s.host_of
end

-- Whether a request for `node` ('any', or a host name) may use `gpu`: GPUs without a host (declared ones)
-- are everybody's.
local function on_node(s, gpu, node)
  if node == nil or node == 'any' then
    return true
  end
  local host = host_of(s, gpu)
  return not host or host == node
end

local function could_hold(s, caps, need, node, count)
  local largest, per_host, most = 0, {}, 0
  for gpu, cap in pairs(caps) do
    cap = tonumber(cap)
    if on_node(s, gpu, node) then
      largest = math.max(largest, cap)
      if count > 1 and cap >= need then -- (hosts are read only for several GPUs: a read per GPU)
        local host = host_of(s, gpu) or ''
        per_host[host] = (per_host[host] or 0) + 1
        most = math.max(most, per_host[host])
      end
    end
  end
  if count > 1 then
    return most >= count, largest
  end
  return largest >= need, largest
end

-- Whether `gpu` may take a request now at all: registered, online, not kept for a request ahead, on its node.
local function eligible(s, gpu, avoid, node)
  return s.cap[gpu] ~= nil and not s.off[gpu] and not (avoid and avoid[gpu]) and on_node(s, gpu, node)
end

-- The better of two fits (MiB left after the grant, then the smaller id).
local function better(gpu, left, best, best_left)
  return best == nil or left < best_left or (left == best_left and gpu < best)
end

--[[
  Best fit from the index: the GPUs with at least `need` MiB free, fewest first (ties in id order, as Redis
  sorts equal scores), read a few at a time. The first eligible GPU without a hold is the best of all GPUs
  without one (the index holds their exact free MiB); a GPU with a hold has less free than its entry says, so
  those are weighed apart (there are few).
]]
local PLACE_BATCH = 4
local PLACE_BATCH_ARG = '4' -- (PLACE_BATCH as redis.call takes it: see int() in includes/state.lua)

-- Walk index entries ({gpu, indexed free MiB}, fewest first) that `read(offset)` returns a batch at a time
-- (with whether the batch was full), keeping the best fit; it ends at the first entry that cannot beat it.
local function scan(s, need, id, avoid, node, best, best_left, read)
  local offset = 0
  while true do
    local batch, full = read(offset)
    for _, entry in ipairs(batch) do
      local gpu, indexed = entry[1], entry[2]
      if indexed >= need then
        if not better(gpu, indexed - need, best, best_left) then
          return best, best_left
        end
        if not s.holds[gpu] and eligible(s, gpu, avoid, node) then
          local left = free_for(s, gpu, id) - need
          if left >= 0 and better(gpu, left, best, best_left) then
            return gpu, left
          end
        end
      end
    end
    if not full then
      return best, best_left
    end
    offset = offset + PLACE_BATCH
  end
end

-- One batch of the whole index: GPUs with at least `need` MiB free, from `offset` on; the first batch is kept
-- in s.first_batch until the index changes (free_now reads it, placement then needs no second read).
local function free_batch(s, need, offset)
  local first = s.first_batch
  if offset == 0 and first and first.need == need then
    return first.out, first.full
  end
  local flat = redis.call('ZRANGEBYSCORE', K_FREE, need, '+inf', 'WITHSCORES', 'LIMIT', pos_arg(offset),
    PLACE_BATCH_ARG)
  local out = {}
  for i = 1, #flat, 2 do
    local gpu, free = flat[i], tonumber(flat[i + 1])
    out[#out + 1] = {gpu, free}
    s.indexed[gpu] = free
  end
  local full = #flat == 2 * PLACE_BATCH
  if offset == 0 then
    s.first_batch = {need = need, out = out, full = full}
  end
  return out, full
end

-- Batches of the whole index: GPUs with at least `need` MiB free.
local function free_batches(s, need)
  return function(offset)
    return free_batch(s, need, offset)
  end
end

-- Batches of one host's GPUs with at least `need` MiB free, from the by-host index.
local function host_batches(host, need)
  local from, to = host_range(host, need)
  return function(offset)
    local members = redis.call('ZRANGEBYLEX', K_FREE_HOST, from, to, 'LIMIT', pos_arg(offset), PLACE_BATCH_ARG)
    local out = {}
    for _, member in ipairs(members) do
      local mib, gpu = string.match(member, ' (%d+) (.*)$', #host + 1)
      if mib then
        out[#out + 1] = {gpu, tonumber(mib)}
      end
    end
    return out, #members == PLACE_BATCH
  end
end

-- Whether some GPUs have no host (every GPU is in the index, only those with a host in the by-host one).
local function hostless_gpus(s)
  return gpu_count(s) > redis.call('ZCARD', K_FREE_HOST)
end

-- Whether some GPU of `node` has at least `need` MiB free now, by the index (a cheap "not too large"); false
-- also when that cannot be told cheaply (GPUs with and without hosts in one namespace, a node asked).
local function free_now(s, need, node)
  if node == nil or node == 'any' then
    return #free_batch(s, need, 0) > 0
  end
  if hostless_gpus(s) then
    return false
  end
  local from, to = host_range(node, need)
  return redis.call('ZLEXCOUNT', K_FREE_HOST, from, to) > 0
end

-- A GPU's entry in the placement index, read once per call (nil: not indexed): the most a request may take
-- there (a hold only takes more).
local function indexed_free(s, gpu)
  local indexed = s.indexed[gpu]
  if indexed == nil then
    indexed = tonumber(redis.call('ZSCORE', K_FREE, gpu))
    s.indexed[gpu] = indexed
  end
  return indexed
end

local function place(s, need, pin, id, avoid, node)
  if pin ~= '' then
    -- One read tells a pinned request that waits for more, as the head of a queue often does.
    local indexed = indexed_free(s, pin)
    if indexed and indexed < need then
      return nil
    end
    if eligible(s, pin, avoid, node) and free_for(s, pin, id) >= need then
      return pin
    end
    return nil
  end
  local best, best_left = nil, nil
  for gpu, _ in pairs(s.holds) do
    if eligible(s, gpu, avoid, node) then
      local left = free_for(s, gpu, id) - need
      if left >= 0 and better(gpu, left, best, best_left) then
        best, best_left = gpu, left
      end
    end
  end
  if node == nil or node == 'any' or hostless_gpus(s) then
    -- (with GPUs both with and without hosts, a request for one host skips the other hosts' GPUs here)
    best, best_left = scan(s, need, id, avoid, node, best, best_left, free_batches(s, need))
  else
    best, best_left = scan(s, need, id, avoid, node, best, best_left, host_batches(node, need))
  end
  return best
end

local function target(s, need, pin, id, node)
  if pin ~= '' then
    return pin
  end
  local best, best_free = nil, nil
  for gpu, cap in pairs(all_gpus(s)) do
    if not s.off[gpu] and cap >= need and on_node(s, gpu, node) then
      local free = free_for(s, gpu, id)
      if best == nil or free > best_free or (free == best_free and gpu < best) then
        best, best_free = gpu, free
      end
    end
  end
  return best
end

local function place_multi(s, need, count, id, avoid, node)
  local hosts = load_hosts(s)
  local groups = {}
  for gpu, _ in pairs(all_gpus(s)) do
    if not s.off[gpu] and not (avoid and avoid[gpu]) and on_node(s, gpu, node) then
      local left = free_for(s, gpu, id) - need
      if left >= 0 then
        local host = hosts[gpu] or ''
        groups[host] = groups[host] or {}
        table.insert(groups[host], {gpu = gpu, left = left})
      end
    end
  end
  local best, best_left, best_host = nil, nil, nil
  for host, list in pairs(groups) do
    if #list >= count then
      table.sort(list, function(a, b)
        if a.left ~= b.left then
          return a.left < b.left
        end
        return a.gpu < b.gpu
      end)
      local picked, left = {}, 0
      for i = 1, count do
        picked[i] = list[i].gpu
        left = left + list[i].left
      end
      if best == nil or left < best_left or (left == best_left and host < best_host) then
        best, best_left, best_host = picked, left, host
      end
    end
  end
  return best
end

local function place_req(s, req, id, avoid)
  local count = tonumber(req.count) or 1
  if count > 1 then
    return place_multi(s, req.vram_mib, count, id, avoid, req.node)
  end
  return place(s, req.vram_mib, req.pin, id, avoid, req.node)
end
