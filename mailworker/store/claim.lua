-- Take the lease on a record; only the lease holder may talk SMTP for it.
-- KEYS: 1 record, 2 lease, 3 inflight, 4 dead
-- ARGV: 1 token, 2 lease ttl ms, 3 watchdog score (when the sweeper should look again),
--       4 id, 5 now
-- Returns {status, doc, raw, zraw, sending}: status is "ok", "missing", "quarantined" or
-- "locked"; the body is in raw or, compressed, in zraw (mailworker.store.body); sending is
-- "<token> <time>" left by an earlier holder that started a transaction window with this
-- record and never saved an outcome (it died mid-send), or false: a retry after such a
-- death may duplicate, and is flagged. Claiming does not mark the record as sending: the
-- holder does that just before the record's transaction window (mark.lua), so a worker
-- killed with a batch in hand flags only the records it may really have sent.
if redis.call("EXISTS", KEYS[1]) == 0 then
  redis.call("ZREM", KEYS[3], ARGV[4])
  return {"missing", false, false, false, false}
end
if redis.call("TYPE", KEYS[1])["ok"] ~= "hash" then
  -- Not a record at all (overwritten by hand or by another program): into the dead
  -- letters by id, so it is seen and purged, never woken again.
  redis.call("ZREM", KEYS[3], ARGV[4])
  redis.call("ZADD", KEYS[4], ARGV[5], ARGV[4])
  return {"wrongtype", false, false, false, false}
end
if redis.call("HEXISTS", KEYS[1], "poison") == 1 then
  -- Set aside (quarantine.lua): only an operator's `dlq retry` re-admits it.
  redis.call("ZREM", KEYS[3], ARGV[4])
  return {"quarantined", false, false, false, false}
end
if not redis.call("SET", KEYS[2], ARGV[1], "NX", "PX", ARGV[2]) then
  return {"locked", false, false, false, false}
end
if redis.call("ZSCORE", KEYS[3], ARGV[4]) then
  redis.call("ZADD", KEYS[3], ARGV[3], ARGV[4])
end
local v = redis.call("HMGET", KEYS[1], "doc", "raw", "zraw", "sending")
return {"ok", v[1], v[2], v[3], v[4]}
