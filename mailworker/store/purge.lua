-- Delete a dead letter, but only while it is one (an operator's retry may have won).
-- KEYS: 1 dead zset, 2 record, 3 sweep counts.  ARGV: 1 id.  Returns 1 if deleted.
if not redis.call("ZSCORE", KEYS[1], ARGV[1]) then return 0 end
redis.call("ZREM", KEYS[1], ARGV[1])
redis.call("DEL", KEYS[2])
redis.call("HDEL", KEYS[3], ARGV[1])
return 1
