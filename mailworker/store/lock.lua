-- Take or extend a lock that one holder at a time may keep (the scheduler's tick).
-- KEYS: 1 lock.  ARGV: 1 holder id, 2 ttl ms
-- Returns 1 when the caller holds the lock (taken now, or extended: it was ours), else 0.
local v = redis.call("GET", KEYS[1])
if v == ARGV[1] then return redis.call("PEXPIRE", KEYS[1], ARGV[2]) end
if v then return 0 end
return redis.call("SET", KEYS[1], ARGV[1], "PX", ARGV[2]) and 1 or 0
