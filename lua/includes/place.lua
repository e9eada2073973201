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
]]
-- Whether a request for `node` ('any', or a host name) may use `gpu`: GPUs without a host (declared ones)
-- are everybody's. The GPUs' hosts are read from the registry once per call, and only when needed.
local function load_hosts(s)
  if s.hosts == nil then
    s.hosts = {}
    for g, raw in pairs(hgetall(K_GPUS)) do
      local host = cjson.decode(raw).host
      s.hosts[g] = (host ~= nil and host ~= cjson.null) and host or false
    end
  end
  return s.hosts
end

local function on_node(s, gpu, node)
  if node == nil or node == 'any' then
    return true
  end
  local host = load_hosts(s)[gpu]
  return not host or host == node
end

local function place(s, need, pin, id, avoid, node)
  if pin ~= '' then
    if s.cap[pin] and not s.off[pin] and not (avoid and avoid[pin]) and on_node(s, pin, node)
        and free_for(s, pin, id) >= need then
      return pin
    end
    return nil
  end
  local best, best_left = nil, nil
  for gpu, _ in pairs(s.cap) do
    if not s.off[gpu] and not (avoid and avoid[gpu]) and on_node(s, gpu, node) then
      local left = free_for(s, gpu, id) - need
      if left >= 0 and (best == nil or left < best_left or (left == best_left and gpu < best)) then
        best, best_left = gpu, left
      end
    end
  end
  return best
end

local function target(s, need, pin, id, node)
  if pin ~= '' then
    return pin
  end
  local best, best_free = nil, nil
  for gpu, cap in pairs(s.cap) do
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
  for gpu, _ in pairs(s.cap) do
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
