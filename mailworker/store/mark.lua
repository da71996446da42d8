-- Renew leases we still hold and, before a window of transactions starts, mark the records
-- as being sent, so that if this worker dies from here on, the next holder flags a possible
-- duplicate. Redis acknowledges the mark before the window's first MAIL FROM is written.
-- The heartbeat calls it without a time (renew only). One call for all of a pass's
-- records (they share its token).
-- KEYS: per record, 2 keys: record, lease.  ARGV: 1 token, 2 ttl ms, 3 now ("" = renew only)
-- Returns one 1 (renewed, and marked) or 0 (the lease is no longer ours: do not send).
local out = {}
for i = 1, #KEYS, 2 do
  if redis.call("GET", KEYS[i + 1]) == ARGV[1] then
    redis.call("PEXPIRE", KEYS[i + 1], ARGV[2])
    if ARGV[3] ~= "" then
      redis.call("HSET", KEYS[i], "sending", ARGV[1] .. " " .. ARGV[3])
    end
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
