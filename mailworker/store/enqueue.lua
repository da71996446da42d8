-- Create a batch of message records atomically, honouring idempotency keys.
-- One script for the whole batch: Redis refuses a script under maxmemory only at its
-- first write, and never stops one midway, so a batch is written whole or not at all
-- (send_many is all-or-nothing even when Redis is full).
-- KEYS: per message, 3 keys: record, zset to place it in (inflight or deferred),
--       idempotency key (or the record key again when there is none)
-- ARGV: per message, 7 values: id, doc json, body field ("raw", or "zraw" for a body
--       compressed by mailworker.store.body), body bytes, score, route ("<queue> <relay>"),
--       idempotency ttl seconds (the message's lifetime plus retention: the key lasts as
--       long as a repeat could still meet the message pending or just finished).
-- Returns the ids: a message whose idempotency key was seen returns the first one's id.
local out = {}
for i = 0, #KEYS / 3 - 1 do
  local rec, zset, idem = KEYS[i * 3 + 1], KEYS[i * 3 + 2], KEYS[i * 3 + 3]
  local a = i * 7
  local id, doc, field, body, score, route =
    ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6]
  -- Clamped, so no write can fail after the first (a script's writes are never undone).
  local ttl = math.max(1, math.floor(tonumber(ARGV[a + 7]) or 1))
  local existing = false
  if idem ~= rec then
    existing = redis.call("GET", idem)
    if not existing then redis.call("SET", idem, id, "EX", ttl) end
  end
  if existing then
    out[#out + 1] = existing
  else
    redis.call("HSET", rec, "doc", doc, field, body, "route", route)
    redis.call("ZADD", zset, score, id)
    out[#out + 1] = id
  end
end
return out
