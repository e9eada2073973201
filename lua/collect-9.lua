--[[
  collect: reclaim expired leases and queued requests now, and hand the capacity to the queue.

  Every other state script does the same first; this one exists for `gpuboss gc` and for a waiter at
  the head of the queue that wakes at the next expiry.

  Input:
    KEYS[1..9]  the state layout (includes/state.lua)
    ARGV[1]     wake-list prefix

  Output:
    {leases, requests, granted, next_ms}   expired leases and requests collected, queued requests
                                           granted, ms until the next expiry (-1: none)
]]
--- @include "state"
--- @include "place"
--- @include "drop"
--- @include "grant"

local s = load_gpus()
local now = now_ms()
local leases, requests = collect_expired(s, now)
local granted = grant_waiting(s, now)
return {leases, requests, granted, next_expiry(now)}
