-- Before a window of transactions starts: renew our lease and mark the record as being
-- sent, so that if this worker dies from here on, the next holder flags a possible
-- duplicate. Redis acknowledges this before the window's first MAIL FROM is written.
-- KEYS: 1 record, 2 lease.  ARGV: 1 token, 2 ttl ms, 3 now
-- Returns 1 when marked, 0 when the lease is no longer ours (do not send).
if redis.call("GET", KEYS[2]) ~= ARGV[1] then return 0 end
redis.call("PEXPIRE", KEYS[2], ARGV[2])
redis.call("HSET", KEYS[1], "sending", ARGV[1] .. " " .. ARGV[3])
return 1
