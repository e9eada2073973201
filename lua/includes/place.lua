--[[
  place(s, need, pin) -> gpu id or nil

  Best fit: the GPU left with the least free MiB after the grant (ties go to the smaller id, so every
  replica decides alike). `pin` (a gpu id, or '' for any) restricts the choice to one GPU.
]]
local function place(s, need, pin)
  if pin ~= '' then
    local cap = s.cap[pin]
    if cap and cap - (s.used[pin] or 0) >= need then
      return pin
    end
    return nil
  end
  local best, best_left = nil, nil
  for gpu, cap in pairs(s.cap) do
    local left = cap - (s.used[gpu] or 0) - need
    if left >= 0 and (best == nil or left < best_left or (left == best_left and gpu < best)) then
      best, best_left = gpu, left
    end
  end
  return best
end
