-- Take the leases on a batch of records; only a lease holder may talk SMTP for its record.
-- KEYS: 1 inflight, 2 dead
-- ARGV: 1 token, 2 lease ttl ms, 3 watchdog score (when the sweeper should look again),
--       4 now, 5 record key head, 6 lease key head (Keys.head: the record's and its
--       lease's keys are the head and the id), then per record its id
-- Returns per record 6 values {status, doc, raw, zraw, sending, in flight}: status is
-- "ok", "missing", "wrongtype", "quarantined" or "locked"; the body is in raw or,
-- compressed, in zraw (mailworker.store.body); in flight is 1 when the record was in the
-- in-flight set (so it is in no other set, and its commit need not look: commit.lua);
-- sending is
-- "<token> <time>" left by an earlier holder that started a transaction window with this
-- record and never saved an outcome (it died mid-send), or false: a retry after such a
-- death may duplicate, and is flagged. Claiming does not mark the record as sending: the
-- holder does that just before the record's transaction window (mark.lua), so a worker
-- killed with a batch in hand flags only the records it may really have sent.
-- One call for the batch, three commands per record on the common path (read, lease,
-- watchdog): one HMGET answers whether the record exists, is a hash and is set aside.
local out = {}
local function put(status, v, placed)
  if v then
    out[#out + 1], out[#out + 2], out[#out + 3] = status, v[1], v[2]
    out[#out + 1], out[#out + 2], out[#out + 3] = v[3], v[4], placed
  else
    out[#out + 1], out[#out + 2], out[#out + 3] = status, false, false
    out[#out + 1], out[#out + 2], out[#out + 3] = false, false, 0
  end
end
for i = 7, #ARGV do
  local id = ARGV[i]
  local rec, lease = ARGV[5] .. id, ARGV[6] .. id
  local v = redis.pcall("HMGET", rec, "doc", "raw", "zraw", "sending", "poison")
  if v["err"] then
    -- Not a record at all (overwritten by hand or by another program): into the dead
    -- letters by id, so it is seen and purged, never woken again.
    redis.call("ZREM", KEYS[1], id)
    redis.call("ZADD", KEYS[2], ARGV[4], id)
    put("wrongtype")
  elseif v[5] then
    -- Set aside (quarantine.lua): only an operator's `dlq retry` re-admits it.
    redis.call("ZREM", KEYS[1], id)
    put("quarantined")
  elseif not (v[1] or v[2] or v[3] or v[4]) and redis.call("EXISTS", rec) == 0 then
    redis.call("ZREM", KEYS[1], id)
    put("missing")
  elseif not redis.call("SET", lease, ARGV[1], "NX", "PX", ARGV[2])
         and redis.call("GET", lease) ~= ARGV[1] then
    -- (Held with our own token: this very claim run again by the client's retry after
    -- its reply was lost; it is ours, as the first run said.)
    put("locked")
  else
    -- CH: 1 when it was there (its watchdog moves); 0 also when the score was already
    -- this one, which only costs its commit the sets it then looks in.
    put("ok", v, redis.call("ZADD", KEYS[1], "XX", "CH", ARGV[3], id))
  end
end
return out
