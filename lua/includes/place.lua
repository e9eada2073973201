--[[
  place(s, need, pin, id, avoid) -> gpu id or nil

  Best fit over the GPUs that are online: the GPU left with the least free MiB after the grant (ties go
  to the smaller id, so every replica decides alike). Free MiB is effective free (includes/state.lua
  free_for): capacity - reserve - max(leased, observed used), less any VRAM held for another request.
  `pin` (a gpu id, or '' for any) restricts the choice to one GPU; `id` is the request being placed;
  `avoid` (optional) is a set of GPU ids kept for requests ahead in the queue (backfill).

  target(s, need, pin, id) -> the GPU a request that does not fit waits for: its pin, else the eligible GPU
  closest to fitting (most free MiB; ties to the smaller id), or nil when no GPU can ever hold it.
]]
local function place(s, need, pin, id, avoid)
  if pin ~= '' then
    if s.cap[pin] and not s.off[pin] and not (avoid and avoid[pin]) and free_for(s, pin, id) >= need then
      return pin
    end
    return nil
  end
  local best, best_left = nil, nil
  for gpu, _ in pairs(s.cap) do
    if not s.off[gpu] and not (avoid and avoid[gpu]) then
      local left = free_for(s, gpu, id) - need
      if left >= 0 and (best == nil or left < best_left or (left == best_left and gpu < best)) then
        best, best_left = gpu, left
      end
    end
  end
  return best
end

local function target(s, need, pin, id)
  if pin ~= '' then
    return pin
  end
  local best, best_free = nil, nil
  for gpu, cap in pairs(s.cap) do
    if not s.off[gpu] and cap >= need then
      local free = free_for(s, gpu, id)
      if best == nil or free > best_free or (free == best_free and gpu < best) then
        best, best_free = gpu, free
      end
    end
  end
  return best
end
