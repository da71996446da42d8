-- Find in-flight records nobody is working on: queued with a lost broker message, or
-- whose worker died (lease expired). Return them for a new wake-up and push their
-- watchdog out, further each time (stuck_after x 1, 2, 4 ... 32): a wake-up merely queued
-- behind a long backlog looks the same as a lost one, and must not be re-sent every tick.
-- KEYS: 1 inflight, 2 sweep-count hash.
-- ARGV: 1 now, 2 limit, 3 stuck_after seconds, 4 lease key prefix
local now, stuck = tonumber(ARGV[1]), tonumber(ARGV[3])
local ids = redis.call("ZRANGEBYSCORE", KEYS[1], "-inf", now, "LIMIT", 0, ARGV[2])
local out = {}
for _, id in ipairs(ids) do
  if redis.call("EXISTS", ARGV[4] .. id) == 0 then
    table.insert(out, id)
    local n = redis.call("HINCRBY", KEYS[2], id, 1)
    redis.call("ZADD", KEYS[1], now + stuck * math.min(2 ^ (n - 1), 32), id)
  else
    redis.call("ZADD", KEYS[1], now + stuck, id)
  end
end
return out
