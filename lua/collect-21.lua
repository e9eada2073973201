--[[
  collect: reclaim expired leases and queued requests now, and hand the capacity to the queue.

  Every other state script does the same first; this one exists for `gpuboss gc` and for a waiter at
  the head of the queue that wakes at the next expiry.

  Events: `expired` for each lease and queued request collected, `granted` for each waiter served.

  Runs on a server that is out of memory (function flag allow-oom, see gpuboss/scripts.py): it rewrites
  records in place or gives memory back, so a full shared Redis does not cost holders their leases.

  Input:
    KEYS[1..19]  the state layout (includes/state.lua)
    KEYS[20]    events       pub/sub channel (includes/emit.lua)
    KEYS[21]    event_log    stream
    ARGV[1]     wake-list prefix
    ARGV[2]     event log cap (0: no log)

  Output:
    {leases, requests, granted, next_ms, lease_records, request_records}
        expired leases and requests collected, queued requests granted, ms until the next expiry
        (-1: none), and the records (JSON) of the leases and requests collected
]]
--- @flags allow-oom
--- @include "state"
--- @include "emit"
--- @include "place"
--- @include "drop"
--- @include "evict"
--- @include "grant"

local now = now_ms()
local s = load_gpus(now, true) -- (a full check, whatever the state header says)
local out = {leases = {}, requests = {}}
local leases, requests = collect_expired(s, now, out)
local granted = grant_waiting(s, now)
return {leases, requests, granted, next_expiry(now), out.leases, out.requests}
