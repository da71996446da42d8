-- Find in-flight records nobody is working on: queued with a lost broker message, or
-- whose worker died (lease expired). Bump their watchdog and return them for a new wake-up.
-- KEYS: 1 inflight.  ARGV: 1 now, 2 limit, 3 new watchdog score, 4 lease key prefix
local ids = redis.call("ZRANGEBYSCORE", KEYS[1], "-inf", ARGV[1], "LIMIT", 0, ARGV[2])
local out = {}
for _, id in ipairs(ids) do
  if redis.call("EXISTS", ARGV[4] .. id) == 0 then
    table.insert(out, id)
  end
  redis.call("ZADD", KEYS[1], ARGV[3], id)
end
return out
