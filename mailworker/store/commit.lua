-- Save an attempt's outcome and move the record to its next place, if we still hold the lease.
-- KEYS: 1 record, 2 lease, 3 inflight, 4 deferred, 5 dead, 6 stats hash, 7 sweep counts
-- ARGV: 1 token, 2 id, 3 doc json, 4 state, 5 score (for "dead": the dead-lettered time),
--       6 retention seconds of a delivered record, 7 retention seconds of a dead letter
--       (0 = keep), 8.. stats field/increment pairs
-- A record that is live again (a dead letter retried) loses any expiry it had. A delivered
-- record loses its body (raw, zraw): nothing sends it again, and it was most of its memory.
-- Returns 1 when saved, 0 when another worker has claimed the record since.
-- The lease may have expired during a long attempt; the outcome still stands if nobody
-- claimed the record since (the "sending" marker is still ours).
local lease = redis.call("GET", KEYS[2])
if lease ~= ARGV[1] then
  if lease then return 0 end
  local sending = redis.call("HGET", KEYS[1], "sending")
  if not sending or string.sub(sending, 1, #ARGV[1] + 1) ~= ARGV[1] .. " " then return 0 end
end
local id, state, score = ARGV[2], ARGV[4], ARGV[5]
redis.call("HSET", KEYS[1], "doc", ARGV[3])
if state == "delivered" then
  redis.call("HDEL", KEYS[1], "sending", "raw", "zraw")
else
  redis.call("HDEL", KEYS[1], "sending")
end
-- Out of the sets it leaves (the ZADD below moves it within the one it stays in).
if state ~= "queued" then redis.call("ZREM", KEYS[3], id) end
if state ~= "deferred" then redis.call("ZREM", KEYS[4], id) end
redis.call("HDEL", KEYS[7], id)
if state == "deferred" then
  redis.call("ZADD", KEYS[4], score, id)
elseif state == "queued" then
  redis.call("ZADD", KEYS[3], score, id)
elseif state == "dead" then
  redis.call("ZADD", KEYS[5], score, id)
end
if state ~= "dead" then
  redis.call("ZREM", KEYS[5], id)
end
local dead_ttl = tonumber(ARGV[7])
if state == "delivered" and tonumber(ARGV[6]) > 0 then
  redis.call("EXPIRE", KEYS[1], ARGV[6])
elseif state == "dead" and dead_ttl > 0 then
  redis.call("EXPIRE", KEYS[1], dead_ttl)
  -- Dead letters whose records have expired leave the set too (bounded like them).
  redis.call("ZREMRANGEBYSCORE", KEYS[5], "-inf", "(" .. (tonumber(score) - dead_ttl))
else
  redis.call("PERSIST", KEYS[1])
end
for i = 8, #ARGV, 2 do
  redis.call("HINCRBY", KEYS[6], ARGV[i], ARGV[i + 1])
end
redis.call("DEL", KEYS[2])
return 1
