--[[
  Shared state of every lease-state script: key handles, Redis time, GPU tables and numbers.

  Every script that includes this takes the state KEYS layout, in this order:
    KEYS[1] gpus       hash  gpu id -> JSON declaration
    KEYS[2] capacity   hash  gpu id -> leasable MiB (capacity - reserve)
    KEYS[3] used       hash  gpu id -> leased MiB
    KEYS[4] leases     hash  lease id -> JSON lease record
    KEYS[5] lease_exp  zset  lease id by expiry (ms)
    KEYS[6] queue      zset  request id by (priority, arrival)
    KEYS[7] tickets    hash  request id -> JSON request record
    KEYS[8] queue_exp  zset  request id by expiry (ms)
    KEYS[9] token      string fencing-token counter
  and ARGV[1] = the wake-list prefix (a request id is appended to it). Scripts add their own KEYS after
  these; the two event KEYS (channel and log, includes/emit.lua) always come last, and the event log's
  cap is always the last ARGV.
]]
local K_GPUS, K_CAPACITY, K_USED = KEYS[1], KEYS[2], KEYS[3]
local K_LEASES, K_LEASE_EXP = KEYS[4], KEYS[5]
local K_QUEUE, K_TICKETS, K_QUEUE_EXP = KEYS[6], KEYS[7], KEYS[8]
local K_TOKEN = KEYS[9]
local WAKE_PREFIX = ARGV[1]

-- Queue score = (RANK_BASE - rank) * SEQ_SPAN + seq: higher rank first, then arrival order.
local RANK_BASE = 1000
local SEQ_SPAN = 1099511627776 -- 2^40
-- Expired entries collected by one call; the rest go to the next call (bounded work per script).
local COLLECT_LIMIT = 64

-- Numbers handed to redis.call are formatted by hand: Lua's default "%.14g" would round big integers.
local function int(x)
  return string.format('%.0f', x)
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The per-GPU numbers, read once per call and kept current as the script grants and frees.
local function load_gpus()
  local s = {cap = {}, used = {}}
  local flat = redis.call('HGETALL', K_CAPACITY)
  for i = 1, #flat, 2 do
    s.cap[flat[i]] = tonumber(flat[i + 1])
  end
  flat = redis.call('HGETALL', K_USED)
  for i = 1, #flat, 2 do
    s.used[flat[i]] = tonumber(flat[i + 1])
  end
  return s
end

local function rank_of_score(score)
  return RANK_BASE - math.floor(tonumber(score) / SEQ_SPAN)
end

-- Milliseconds until the earliest lease or queue entry expires, or -1 when nothing can expire.
local function next_expiry(now)
  local best = -1
  for _, key in ipairs({K_LEASE_EXP, K_QUEUE_EXP}) do
    local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if first[2] then
      local left = math.max(0, tonumber(first[2]) - now)
      if best < 0 or left < best then
        best = left
      end
    end
  end
  return best
end
