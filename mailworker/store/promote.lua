-- Move due deferred records to the in-flight set; the caller then publishes wake-ups.
-- If the caller dies before publishing, the sweeper finds them in inflight later.
-- KEYS: 1 deferred, 2 inflight.  ARGV: 1 now, 2 limit, 3 watchdog score
local ids = redis.call("ZRANGEBYSCORE", KEYS[1], "-inf", ARGV[1], "LIMIT", 0, ARGV[2])
for _, id in ipairs(ids) do
  redis.call("ZREM", KEYS[1], id)
  redis.call("ZADD", KEYS[2], ARGV[3], id)
end
return ids
