-- Extend leases we still hold (the heartbeat, while a batch runs); one call for all of a
-- pass's leases (they share its token).
-- KEYS: leases.  ARGV: 1 token, 2 ttl ms.  Returns one 1 (renewed) or 0 (lost) per lease.
local out = {}
for i = 1, #KEYS do
  if redis.call("GET", KEYS[i]) == ARGV[1] then
    redis.call("PEXPIRE", KEYS[i], ARGV[2])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
