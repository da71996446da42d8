-- Take up to the wanted number of messages from a relay's fleet-wide token bucket, at the
-- rate in force: the learned rate (feedback.lua), capped by the configured ceiling.
-- KEYS: 1 bucket hash, 2 window hash, 3 (optional) the relay's pause key
-- ARGV: 1 now, 2 rate ceiling (0: none), 3 messages wanted
-- Returns {messages granted, seconds to wait (string) when none were, rate (string, "0":
-- none in force)}; while the pause key (when given) is set, nothing is taken and it
-- returns {-1, seconds of the pause left (string), why it is paused}: a delivery pass
-- learns both in one round trip.
if KEYS[3] then
  local ms = redis.call("PTTL", KEYS[3])
  if ms > 0 then
    return {-1, tostring(ms / 1000), redis.call("GET", KEYS[3])}
  end
end
local now, ceiling, wanted = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local rate = tonumber(redis.call("HGET", KEYS[2], "rate"))
if ceiling > 0 and (not rate or rate > ceiling) then rate = ceiling end
if not rate then
  return {wanted, "0", "0"}
end
local burst = math.max(1, rate)
local b = redis.call("HMGET", KEYS[1], "tokens", "ts")
local tokens = tonumber(b[1]) or burst
local ts = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local granted = math.min(wanted, math.floor(tokens))
if granted < 1 then
  redis.call("HSET", KEYS[1], "tokens", tostring(tokens), "ts", tostring(now))
  redis.call("EXPIRE", KEYS[1], 3600)
  return {0, tostring((1 - tokens) / rate), tostring(rate)}
end
redis.call("HSET", KEYS[1], "tokens", tostring(tokens - granted), "ts", tostring(now))
redis.call("EXPIRE", KEYS[1], 3600)
return {granted, "0", tostring(rate)}
