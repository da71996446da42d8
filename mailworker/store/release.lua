-- Give up a lease without an outcome (the record was not due, or its relay is paused).
-- KEYS: 1 record, 2 lease.  ARGV: 1 token
if redis.call("GET", KEYS[2]) ~= ARGV[1] then return 0 end
redis.call("HDEL", KEYS[1], "sending")
redis.call("DEL", KEYS[2])
return 1
