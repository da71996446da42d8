-- Extend a lease we still hold (between chunks of a long batch).
-- KEYS: 1 lease.  ARGV: 1 token, 2 ttl ms.  Returns 1 if renewed, 0 if lost.
if redis.call("GET", KEYS[1]) ~= ARGV[1] then return 0 end
redis.call("PEXPIRE", KEYS[1], ARGV[2])
return 1
