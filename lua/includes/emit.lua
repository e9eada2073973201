--[[
  Events: every state change a script makes is announced from inside that script.

  Every script that includes this takes the event channel and the event log as its LAST two KEYS, and the
  log's length cap as its LAST ARGV:
    KEYS[#KEYS - 1]  events     pub/sub channel: each event, live
    KEYS[#KEYS]      event_log  stream: each event, kept for replay (XADD MAXLEN ~ cap)
    ARGV[#ARGV]      cap, the approximate number of events the log keeps; 0 keeps no log (publish only)

  emit(kind, now, ev) stamps `ev` with v (schema version), type and time (Redis ms), appends it to the log
  as one field `event` (its JSON), and publishes the JSON with the log entry's id added as `id`: one XADD
  and one PUBLISH per event. docs/events.md documents every type and field.
  lease_fields(rec) / request_fields(rec) start an event from a lease or request record: the common fields
  lease, gpu, service, priority and vram_mib (null when not known). Events stay small on purpose (the
  JSON encoding is most of their cost): the lease record, read while the lease lives, has the rest.
]]
--- @per-call begin
local K_EVENTS, K_EVENT_LOG = KEYS[#KEYS - 1], KEYS[#KEYS]
local EVENT_LOG_CAP = tonumber(ARGV[#ARGV]) or 0
local EVENT_LOG_CAP_ARG = ARGV[#ARGV]
--- @per-call end
local EVENT_VERSION = 1

local function emit(kind, now, ev)
  ev.v = EVENT_VERSION
  ev.type = kind
  ev.time = now
  local json = cjson.encode(ev)
  if EVENT_LOG_CAP > 0 then
    local id = redis.call('XADD', K_EVENT_LOG, 'MAXLEN', '~', EVENT_LOG_CAP_ARG, '*', 'event', json)
    json = '{"id":"' .. id .. '",' .. string.sub(json, 2)
  end
  redis.call('PUBLISH', K_EVENTS, json)
end

local function or_null(x)
  if x == nil then
    return cjson.null
  end
  return x
end

local function lease_fields(rec)
  return {
    lease = or_null(rec.id), gpu = or_null(rec.gpu), service = or_null(rec.service), priority = or_null(rec.priority),
    vram_mib = or_null(rec.vram_mib),
  }
end

local function request_fields(rec)
  local ev = lease_fields(rec)
  if rec.pin ~= nil and rec.pin ~= '' then
    ev.gpu = rec.pin
  else
    ev.gpu = cjson.null
  end
  return ev
end
