-- Set aside a record that cannot be read or validated: into the dead letters, raw bytes
-- and stored document untouched for the operator, with the reason; never retried by
-- itself (an operator fixes or purges it). Only the lease holder may do this.
-- KEYS: 1 record, 2 lease, 3 inflight, 4 deferred, 5 dead, 6 sweep counts
-- ARGV: 1 token, 2 id, 3 reason, 4 now, 5 retention seconds of a dead letter (0 = keep)
if redis.call("GET", KEYS[2]) ~= ARGV[1] then return 0 end
redis.call("HSET", KEYS[1], "poison", ARGV[3])
-- The "sending" mark stays: if the record is re-admitted, a possible send is flagged.
if tonumber(ARGV[5]) > 0 then
  redis.call("EXPIRE", KEYS[1], ARGV[5])
  redis.call("ZREMRANGEBYSCORE", KEYS[5], "-inf", "(" .. (tonumber(ARGV[4]) - tonumber(ARGV[5])))
else
  redis.call("PERSIST", KEYS[1])
end
redis.call("ZREM", KEYS[3], ARGV[2])
redis.call("ZREM", KEYS[4], ARGV[2])
redis.call("HDEL", KEYS[6], ARGV[2])
redis.call("ZADD", KEYS[5], ARGV[4], ARGV[2])
redis.call("DEL", KEYS[2])
return 1
