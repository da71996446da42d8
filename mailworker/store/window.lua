-- Take one connection slot of a relay's fleet-wide concurrency window, if one is free.
-- The window (its size in the window hash, a float) adapts: see feedback.lua.
-- KEYS: 1 slots zset (token -> expiry), 2 window hash
-- While the relay is dead (a whole cohort of connection attempts failed, feedback.lua),
-- no slot is granted before probe_at, and the one granted then is the fleet's probe: it
-- moves probe_at one probe interval on, so the whole fleet probes once per interval.
-- ARGV: 1 token, 2 now, 3 slot ttl seconds, 4 ceiling, 5 initial size, 6 probe interval
-- Returns {1 taken | 0 full, slots in use, window size (string)}.
local now = tonumber(ARGV[2])
local ceiling = tonumber(ARGV[4])
redis.call("ZREMRANGEBYSCORE", KEYS[1], "-inf", now)
local w = redis.call("HMGET", KEYS[2], "size", "dead", "probe_at")
local size = math.max(1, math.min(tonumber(w[1]) or tonumber(ARGV[5]), ceiling))
local used = redis.call("ZCARD", KEYS[1])
if used >= math.floor(size) then
  return {0, used, tostring(size)}
end
if w[2] == "1" then
  if now < (tonumber(w[3]) or 0) then
    return {0, used, tostring(size)}
  end
  redis.call("HSET", KEYS[2], "probe_at", tostring(now + tonumber(ARGV[6])))
end
redis.call("ZADD", KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call("EXPIRE", KEYS[1], 3600)
return {1, used + 1, tostring(size)}
