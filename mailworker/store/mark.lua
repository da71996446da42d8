-- Renew leases we still hold and, before a window of transactions starts, mark the records
-- as being sent, so that if this worker dies from here on, the next holder flags a possible
-- duplicate. Redis acknowledges the mark before the window's first MAIL FROM is written.
-- The heartbeat calls it without a time (renew only). One call for all of a pass's
-- records (they share its token).
-- KEYS: none (built from the heads).  ARGV: 1 token, 2 ttl ms, 3 now ("" = renew only),
-- 4 record key head, 5 lease key head (Keys.head), then the records' ids
-- Returns one 1 (renewed, and marked) or 0 (the lease is no longer ours: do not send).
-- Each record stands alone: a record key that is no hash any more (overwritten while
-- leased) gets 0 (not to be sent; its commit sets it aside), never an error that would
-- leave the window's other records marked but unknown to the caller.
local out = {}
for i = 6, #ARGV do
  local lease = ARGV[5] .. ARGV[i]
  local ok = redis.pcall("GET", lease) == ARGV[1]
  if ok and ARGV[3] ~= "" then
    ok = type(redis.pcall("HSET", ARGV[4] .. ARGV[i], "sending",
                          ARGV[1] .. " " .. ARGV[3])) == "number"
  end
  if ok then
    redis.call("PEXPIRE", lease, ARGV[2])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
