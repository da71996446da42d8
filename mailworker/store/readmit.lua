-- An operator re-admits a quarantined record (`mailworker dlq retry` after fixing it, or
-- after upgrading the workers that could not read it): out of the dead letters, back in
-- flight. A worker validates it again when it claims it, and sets it aside again if it is
-- still bad. A "sending" mark that parses is kept, so a message a worker may have sent
-- before it was set aside comes back flagged as a possible duplicate.
-- KEYS: 1 record, 2 inflight, 3 dead.  ARGV: 1 id, 2 watchdog score
-- Returns 1 when re-admitted, 0 when the record is not quarantined (or gone).
if redis.call("HEXISTS", KEYS[1], "poison") == 0 then return 0 end
redis.call("HDEL", KEYS[1], "poison")
redis.call("PERSIST", KEYS[1])
local sending = redis.call("HGET", KEYS[1], "sending")
if sending and not string.match(sending, "^%S+ [%d%.]+$") then
  redis.call("HDEL", KEYS[1], "sending")
end
redis.call("ZREM", KEYS[3], ARGV[1])
redis.call("ZADD", KEYS[2], ARGV[2], ARGV[1])
return 1
