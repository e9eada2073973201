--[[
  A GPU's registration, shared by register (first declarations) and reregister (new sizes).

  same_sizes(old, gpu) -> whether two declarations agree on capacity and reserve (what a registration fixes;
  name, index, host and bus id are descriptive).
  write_gpu(k_gpus, k_capacity, k_used, gpu, json) -> leasable MiB: stores the declaration (`json`, as given)
  and its leasable MiB (capacity - reserve), and starts its leased MiB at 0 when it has none. The caller
  indexes it for placement.
  gpu_fields(gpu) -> the fields of a `gpu_registered` or `gpu_resized` event about `gpu` (a declaration).
  resized(old, gpu, json) -> the declaration (table, JSON) a GPU registered as `old` is stored with when it takes
  the sizes of `gpu` (JSON `json`): `gpu` as given when it describes the GPU as `old` does, else `old` with the
  new sizes: the first registration's name, index, host and ids stay (a container that names its host
  otherwise must not move the GPU to that host: docs/inventory.md, Limits).
]]
local function same_sizes(old, gpu)
  return old.capacity_mib == gpu.capacity_mib and old.reserve_mib == gpu.reserve_mib
end

local function write_gpu(k_gpus, k_capacity, k_used, gpu, json)
  local leasable = gpu.capacity_mib - gpu.reserve_mib
  redis.call('HSET', k_gpus, gpu.id, json)
  redis.call('HSET', k_capacity, gpu.id, string.format('%.0f', leasable))
  redis.call('HSETNX', k_used, gpu.id, '0')
  return leasable
end

local function gpu_fields(gpu)
  return {
    lease = cjson.null, gpu = gpu.id, service = cjson.null, priority = cjson.null, vram_mib = cjson.null,
    name = gpu.name or '', index = gpu.index,
    capacity_mib = gpu.capacity_mib, reserve_mib = gpu.reserve_mib,
    host = gpu.host or cjson.null, uuid = gpu.uuid or cjson.null,
  }
end

local function resized(old, gpu, json)
  local function same_but_sizes(a, b)
    for k, v in pairs(a) do
      if k ~= 'capacity_mib' and k ~= 'reserve_mib' and b[k] ~= v then
        return false
      end
    end
    return true
  end
  if same_but_sizes(old, gpu) and same_but_sizes(gpu, old) then
    return gpu, json
  end
  old.capacity_mib, old.reserve_mib = gpu.capacity_mib, gpu.reserve_mib
  return old, cjson.encode(old)
end
