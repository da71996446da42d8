-- Take one connection slot of a relay's fleet-wide concurrency window, if one is free.
-- The window (its size in the window hash, a float) adapts: see feedback.lua.
-- KEYS: 1 slots zset (token -> expiry), 2 window hash
-- ARGV: 1 token, 2 now, 3 slot ttl seconds, 4 ceiling, 5 initial size
-- Returns {1 taken | 0 full, slots in use, window size (string)}.
local now = tonumber(ARGV[2])
local ceiling = tonumber(ARGV[4])
redis.call("ZREMRANGEBYSCORE", KEYS[1], "-inf", now)
local size = tonumber(redis.call("HGET", KEYS[2], "size")) or tonumber(ARGV[5])
size = math.max(1, math.min(size, ceiling))
local used = redis.call("ZCARD", KEYS[1])
if used >= math.floor(size) then
  return {0, used, tostring(size)}
end
redis.call("ZADD", KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call("EXPIRE", KEYS[1], 3600)
return {1, used + 1, tostring(size)}
