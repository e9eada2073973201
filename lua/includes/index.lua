--[[
  host_member(host, free, gpu) -> the entry of `gpu` in the by-host placement index (KEYS `free_host`):
  "<host> <free MiB, 12 digits> <gpu id>", scored 0, so that one lexicographic range read finds the best fit
  among one host's GPUs (GPUs without a host are not in it; a negative free is written as 0).
  host_range(host, need) -> the lexicographic bounds of that host's entries with at least `need` MiB free.
]]
local function host_member(host, free, gpu)
  return (host or '') .. ' ' .. string.format('%012d', math.max(free, 0)) .. ' ' .. gpu
end

-- The ZRANGEBYLEX bounds of the entries of `host`'s GPUs with at least `need` MiB free.
local function host_range(host, need)
  return '[' .. host_member(host, need, ''), '(' .. host .. '!'
end
