--[[
  register: declare GPUs in the namespace's shared registry, all or nothing.

  A GPU already registered with the same capacity and reserve is left as it is (the first declaration's
  name, index, host and bus id stay); one registered with a different capacity or reserve is a conflict,
  and then nothing is written. A GPU discovered through NVML (`gpus: auto`) is declared by its UUID and
  also carries `host`, `uuid`, `pci_bus_id` and, for a MIG instance, `parent_uuid`: the declaration is
  stored as given, so those fields live in the `gpus` hash for placement (host), the sampler and people.

  Events: `gpu_registered` for each GPU that was new.

  Input:
    KEYS[1]   gpus       hash  gpu id -> JSON declaration
    KEYS[2]   capacity   hash  gpu id -> leasable MiB
    KEYS[3]   used       hash  gpu id -> leased MiB
    KEYS[4]   free       zset  the placement index (includes/state.lua): each new GPU is entered
    KEYS[5]   free_host  zset  the same by host, for a GPU with a host (includes/index.lua)
    KEYS[6]   events     pub/sub channel (includes/emit.lua)
    KEYS[7]   event_log  stream
    ARGV[k]   (1 <= k < #ARGV) one GPU as JSON: {"id", "name", "index", "capacity_mib", "reserve_mib"},
              and for a discovered GPU also "host", "uuid", "pci_bus_id", "parent_uuid" (MIG only)
    ARGV[#ARGV]  event log cap (0: no log)

  Output:
    {1, added}                    OK: `added` GPUs were new
    {-1, gpu_id, registered}      CONFLICT: `gpu_id` is registered with other sizes (its JSON)
]]
--- @include "emit"
--- @include "index"
--- @include "registration"

local decls = {}
for k = 1, #ARGV - 1 do
  local gpu = cjson.decode(ARGV[k])
  local raw = redis.call('HGET', KEYS[1], gpu.id)
  if raw then
    local old = cjson.decode(raw)
    if not same_sizes(old, gpu) then
      return {-1, gpu.id, raw}
    end
  else
    decls[#decls + 1] = {gpu, ARGV[k]}
  end
end
if #decls == 0 then
  return {1, 0}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, d in ipairs(decls) do
  local gpu = d[1]
  write_gpu(KEYS[1], KEYS[2], KEYS[3], gpu, d[2])
  local free = gpu.capacity_mib - gpu.reserve_mib - tonumber(redis.call('HGET', KEYS[3], gpu.id))
  redis.call('ZADD', KEYS[4], string.format('%.0f', free), gpu.id)
  if type(gpu.host) == 'string' then
    redis.call('ZADD', KEYS[5], 0, host_member(gpu.host, free, gpu.id))
  end
  emit('gpu_registered', now, gpu_fields(gpu))
end
return {1, #decls}
