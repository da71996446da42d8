-- Take the lease on a record; only the lease holder may talk SMTP for it.
-- KEYS: 1 record, 2 lease, 3 inflight
-- ARGV: 1 token, 2 lease ttl ms, 3 watchdog score (when the sweeper should look again),
--       4 id, 5 now
-- Returns {status, doc, raw, sending}: status is "ok", "missing" or "locked"; sending is
-- "<token> <time>" of an earlier holder that started sending and never committed (it
-- died mid-send), or false: a retry after such a death may duplicate, and is flagged.
if redis.call("EXISTS", KEYS[1]) == 0 then
  redis.call("ZREM", KEYS[3], ARGV[4])
  return {"missing", false, false, false}
end
if not redis.call("SET", KEYS[2], ARGV[1], "NX", "PX", ARGV[2]) then
  return {"locked", false, false, false}
end
if redis.call("ZSCORE", KEYS[3], ARGV[4]) then
  redis.call("ZADD", KEYS[3], ARGV[3], ARGV[4])
end
local v = redis.call("HMGET", KEYS[1], "doc", "raw", "sending")
redis.call("HSET", KEYS[1], "sending", ARGV[1] .. " " .. ARGV[5])
return {"ok", v[1], v[2], v[3]}
