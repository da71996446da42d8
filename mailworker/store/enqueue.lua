-- Create a batch of message records atomically, honouring idempotency keys.
-- One script for the whole batch: Redis refuses a script under maxmemory only at its
-- first write, and never stops one midway, so a batch is written whole or not at all
-- (send_many is all-or-nothing even when Redis is full).
-- KEYS: per message, 3 keys: record, zset to place it in (inflight or deferred),
--       idempotency key (or the record key again when there is none)
-- ARGV: per message, 6 values: id, doc json, raw bytes, score, route ("<queue> <relay>"),
--       idempotency ttl seconds (the message's lifetime plus retention: the key lasts as
--       long as a repeat could still meet the message pending or just finished).
-- Returns the ids: a message whose idempotency key was seen returns the first one's id.
local out = {}
for i = 0, #KEYS / 3 - 1 do
  local rec, zset, idem = KEYS[i * 3 + 1], KEYS[i * 3 + 2], KEYS[i * 3 + 3]
  local id, doc, raw, score, route =
    ARGV[i * 6 + 1], ARGV[i * 6 + 2], ARGV[i * 6 + 3], ARGV[i * 6 + 4], ARGV[i * 6 + 5]
  -- Clamped, so no write can fail after the first (a script's writes are never undone).
  local ttl = math.max(1, math.floor(tonumber(ARGV[i * 6 + 6]) or 1))
  local existing = false
  if idem ~= rec then
    existing = redis.call("GET", idem)
    if not existing then redis.call("SET", idem, id, "EX", ttl) end
  end
  if existing then
    out[#out + 1] = existing
  else
    redis.call("HSET", rec, "doc", doc, "raw", raw, "route", route)
    redis.call("ZADD", zset, score, id)
    out[#out + 1] = id
  end
end
return out
