-- Fleet-wide limits for one relay, shared by every worker: a connection slot and a
-- token bucket of messages per second.
-- KEYS: 1 slots zset (token -> expiry), 2 bucket hash
-- ARGV: 1 token, 2 now, 3 slot ttl seconds, 4 max slots (0 = no limit),
--       5 rate per second (0 = no limit), 6 burst, 7 messages wanted
-- Returns {messages granted, seconds to wait (string) when nothing was granted}.
local now = tonumber(ARGV[2])
local max_slots = tonumber(ARGV[4])
local rate = tonumber(ARGV[5])
if max_slots > 0 then
  redis.call("ZREMRANGEBYSCORE", KEYS[1], "-inf", now)
  if redis.call("ZCARD", KEYS[1]) >= max_slots then
    return {0, "0.5"}
  end
end
local granted = tonumber(ARGV[7])
if rate > 0 then
  local burst = tonumber(ARGV[6])
  local b = redis.call("HMGET", KEYS[2], "tokens", "ts")
  local tokens = tonumber(b[1]) or burst
  local ts = tonumber(b[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
  granted = math.min(granted, math.floor(tokens))
  if granted < 1 then
    redis.call("HSET", KEYS[2], "tokens", tostring(tokens), "ts", tostring(now))
    return {0, tostring((1 - tokens) / rate)}
  end
  redis.call("HSET", KEYS[2], "tokens", tostring(tokens - granted), "ts", tostring(now))
  redis.call("EXPIRE", KEYS[2], 3600)
end
if max_slots > 0 then
  redis.call("ZADD", KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
  redis.call("EXPIRE", KEYS[1], 3600)
end
return {granted, "0"}
