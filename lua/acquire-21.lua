--[[
  acquire: grant a VRAM lease now, or queue the request by priority and arrival (and, when it cannot be
  placed, ask lower-priority preemptible leases to checkpoint: includes/evict.lua).

  First collects expired leases and requests and hands freed capacity to the queue, so the queue is
  served before the newcomer. The newcomer is granted at once only when it fits, the policy does not hold
  it back (paused class, time window, cap), and no waiting request (not held back) has the same or a
  higher priority; otherwise (mode "wait") it is queued: with `queueing: backfill` or `overtake` the queue
  is then served again and may grant it on a GPU nobody ahead waits for, or past requests ahead that do not
  fit (includes/grant.lua); else, first in line and not fitting, it asks lower priorities to make room
  (eviction).
  Calling again with the same id is harmless: it reports the lease or the queue entry that id already has.

  Events: `granted` (the newcomer, or waiters served first), `queued`, `expired` (what was collected),
  `evict_requested` (victims asked to checkpoint).

  Input:
    KEYS[1..19] the state layout (includes/state.lua)
    KEYS[20]    events       pub/sub channel (includes/emit.lua)
    KEYS[21]    event_log    stream
    ARGV[1]     wake-list prefix
    ARGV[2]     request id (becomes the lease id)
    ARGV[3]     vram, integer MiB > 0
    ARGV[4]     priority rank, integer 0..999 (higher is served first)
    ARGV[5]     priority name
    ARGV[6]     pinned gpu id, or '' for any GPU
    ARGV[7]     ttl, ms: lease TTL, and the queue entry's TTL while it waits
    ARGV[8]     mode: 'wait' queues when nothing fits, 'try' does not
    ARGV[9]     service name
    ARGV[10]    host name
    ARGV[11]    pid
    ARGV[12]    preemptible: '1' (may be asked to checkpoint for a higher priority) or '0'
    ARGV[13]    the holder's notice channel ('' for none): eviction notices for this lease go there
    ARGV[14]    eviction grace, ms: how long victims of this request's evictions get to checkpoint
    ARGV[15]    after the grace: 'wait' (keep waiting) or 'revoke' (remove the victims' leases)
    ARGV[16]    node: 'any', or the host whose GPUs it may use (GPUs without a host are everybody's)
    ARGV[17]    GPUs: 1, or N > 1 for one lease of ARGV[3] MiB on each of N GPUs of one host (all or nothing;
                never pinned; it does not evict)
    ARGV[18]    the holder's secret (its SHA1 is kept: release, renew, yield, resize need the secret)
    ARGV[19]    event log cap (0: no log)

  Output:
    {1, lease}                  GRANTED: the lease record (JSON)
    {2, position, next_ms}      QUEUED: 0-based queue position, ms until the next expiry (-1: none)
    {0, next_ms}                BUSY: mode 'try' and it does not fit now; nothing queued
    {-1, max_mib}               INSUFFICIENT: larger than any eligible GPU can ever hold; nothing written
    {-2}                        UNKNOWN_GPU: the pinned gpu is not registered; nothing written
    {-3}                        NO_GPUS: no GPU is registered in this namespace; nothing written
]]
--- @include "state"
--- @include "emit"
--- @include "place"
--- @include "drop"
--- @include "evict"
--- @include "grant"

local id, need, rank = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local pin, ttl, mode, node, count = ARGV[6], tonumber(ARGV[7]), ARGV[8], ARGV[16], tonumber(ARGV[17])

local now = now_ms()
local s = load_gpus(now, false, true) -- (the full check, if due, after the replies that write nothing)
local largest = 0
if pin ~= '' then
  if s.cap[pin] == nil then
    return {gpu_count(s) == 0 and -3 or -2}
  end
  largest = s.cap[pin]
  if need > largest then
    return {-1, largest}
  end
elseif count > 1 or not free_now(s, need, node) then
  if gpu_count(s) == 0 then
    return {-3}
  end
  -- Nothing has that much free now (or it needs several GPUs): is there a GPU large enough at all, or enough on
  -- one host? (every GPU's capacity is read only here)
  local fits
  fits, largest = could_hold(s, count > 1 and all_gpus(s) or hgetall(K_CAPACITY), need, node, count)
  if not fits then
    return {-1, largest}
  end
end

if s.check then
  full_check(s, now)
end
collect_expired(s, now)
grant_waiting(s, now)

local existing = redis.call('HGET', K_LEASES, id)
if existing then
  return {1, existing}
end
if redis.call('HEXISTS', K_TICKETS, id) == 1 then
  return {2, redis.call('ZRANK', K_QUEUE, id), next_expiry(now)}
end

local req = {
  id = id, vram_mib = need, rank = rank, priority = ARGV[5], pin = pin, ttl_ms = ttl,
  service = ARGV[9], host = ARGV[10], pid = tonumber(ARGV[11]), requested_at = now,
  preemptible = ARGV[12] == '1', notify = ARGV[13], grace_ms = tonumber(ARGV[14]), on_grace = ARGV[15],
  evictions = 0, node = node, count = count, secret = sha1hex(ARGV[18]),
}
s.newcomer = {id = id, rank = rank}
local first = first_waiting_rank(s)
local why = held_back(s, req.priority, req.service, request_mib(req))
if (first == nil or first < rank) and why == '' then
  local gpu = place_req(s, req, id, nil)
  if gpu then
    req.seq = redis.call('INCR', K_SEQ)
    return {1, grant(s, id, req, gpu, now)}
  end
end

if mode ~= 'wait' then
  HEAD_WRITE, BLOCKED_NEXT = false, nil -- (a try that does not fit changes nothing of its own, not even the header)
  return {0, next_expiry(now)}
end

req.seq = redis.call('INCR', K_SEQ)
req.expires_at = now + ttl
redis.call('HSET', K_TICKETS, id, cjson.encode(req))
redis.call('ZADD', K_QUEUE, int((RANK_BASE - rank) * SEQ_SPAN + req.seq), id)
s.queue_empty = nil
add_expiry(s, K_QUEUE_EXP, now + ttl, id)
local position = redis.call('ZRANK', K_QUEUE, id)
local ev = request_fields(req)
ev.ahead = position
ev.ttl_ms = ttl
if why ~= '' then
  ev.held_back = why
end
emit('queued', now, ev)
if s.policy.queueing == 'backfill' or s.policy.overtake > 0 then
  -- It may fit on a GPU that nobody ahead of it waits for, or pass the requests ahead that do not fit.
  local lease = granted_now(s, id, now)
  if lease then
    return {1, lease}
  end
  position = redis.call('ZRANK', K_QUEUE, id)
elseif why == '' and (first == nil or first < rank) then
  -- First in line and it does not fit: ask lower priorities to make room.
  try_evict(s, req, now)
end
return {2, position, next_expiry(now)}
