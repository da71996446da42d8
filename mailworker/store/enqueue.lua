-- Create a message record atomically, honouring an idempotency key.
-- KEYS: 1 record, 2 zset to place it in (inflight or deferred), 3 idempotency key or ""
-- ARGV: 1 id, 2 doc json, 3 raw bytes, 4 score, 5 idempotency ttl seconds,
--       6 route ("<queue> <relay>": what the scheduler needs, without parsing the doc)
if KEYS[3] ~= "" then
  local existing = redis.call("GET", KEYS[3])
  if existing then return existing end
  redis.call("SET", KEYS[3], ARGV[1], "EX", ARGV[5])
end
redis.call("HSET", KEYS[1], "doc", ARGV[2], "raw", ARGV[3], "route", ARGV[6])
redis.call("ZADD", KEYS[2], ARGV[4], ARGV[1])
return ARGV[1]
