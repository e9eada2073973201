--[[
  place(s, need, pin, id) -> gpu id or nil

  Best fit over the GPUs that are online: the GPU left with the least free MiB after the grant (ties go
  to the smaller id, so every replica decides alike). Free MiB is effective free (includes/state.lua
  free_for): capacity - reserve - max(leased, observed used), less any VRAM held for another request.
  `pin` (a gpu id, or '' for any) restricts the choice to one GPU; `id` is the request being placed.
]]
local function place(s, need, pin, id)
  if pin ~= '' then
    if s.cap[pin] and not s.off[pin] and free_for(s, pin, id) >= need then
      return pin
    end
    return nil
  end
  local best, best_left = nil, nil
  for gpu, _ in pairs(s.cap) do
    if not s.off[gpu] then
      local left = free_for(s, gpu, id) - need
      if left >= 0 and (best == nil or left < best_left or (left == best_left and gpu < best)) then
        best, best_left = gpu, left
      end
    end
  end
  return best
end
