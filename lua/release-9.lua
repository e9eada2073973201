--[[
  release: give up a lease or withdraw a queued request, and hand the capacity to the queue.

  Used for a normal release, for a request that timed out or was cancelled (if it was granted in the
  meantime, that grant is released: never leaked), and on shutdown. Releasing an id that is already gone
  is harmless. Any grant pushed for the id but not yet taken by its waiter is deleted.

  Input:
    KEYS[1..9]  the state layout (includes/state.lua)
    ARGV[1]     wake-list prefix
    ARGV[2]     lease or request id

  Output:
    {1, granted}    RELEASED: the lease was removed; `granted` queued requests were granted
    {2, granted}    WITHDRAWN: the queued request was removed
    {0, granted}    NOT_FOUND: the id holds nothing (released before, or expired)
]]
--- @include "state"
--- @include "place"
--- @include "drop"
--- @include "grant"

local id = ARGV[2]
local s = load_gpus()
local now = now_ms()
collect_expired(s, now)

local code = 0
if drop_lease(s, id) then
  code = 1
end
redis.call('DEL', WAKE_PREFIX .. id)
if drop_request(id) then
  code = 2
end
return {code, grant_waiting(s, now)}
