-- Before a window of transactions starts: renew our leases and mark the records as being
-- sent, so that if this worker dies from here on, the next holder flags a possible
-- duplicate. Redis acknowledges this before the window's first MAIL FROM is written.
-- One call for the whole window (every claim of a pass shares its token).
-- KEYS: per record, 2 keys: record, lease.  ARGV: 1 token, 2 ttl ms, 3 now
-- Returns one 1 (marked) or 0 (the lease is no longer ours: do not send) per record.
local out = {}
for i = 1, #KEYS, 2 do
  if redis.call("GET", KEYS[i + 1]) == ARGV[1] then
    redis.call("PEXPIRE", KEYS[i + 1], ARGV[2])
    redis.call("HSET", KEYS[i], "sending", ARGV[1] .. " " .. ARGV[3])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
