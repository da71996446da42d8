-- Save attempts' outcomes and move each record to its next place, if we still hold its
-- lease. One call for a chunk of records (the records of a delivery chunk, or a dlq retry).
-- KEYS: 1 inflight, 2 deferred, 3 dead, 4 sweep counts, 5... the stats hashes (of the
--       records' relays)
-- ARGV: 1 retention seconds of a delivered record, 2 retention seconds of a dead letter
--       (0 = keep), 3 record key head, 4 lease key head (Keys.head), then per record 8
--       values: token, id, doc json, state, score (for "dead": the dead-lettered time),
--       its stats hash (a KEYS index), its counters ("field\nincrement\n..." pairs),
--       1 when its claim found it in the in-flight set (then it is in no other: only
--       the lease holder moves it) else 0
-- A record that is live again (a dead letter retried) loses any expiry it had. A delivered
-- record loses its body (raw becomes empty, zraw goes): nothing sends it again, and it was
-- most of its memory.
-- Returns per record 1 when saved (or found saved by this same call before), 0 when another worker has claimed it since, or when
-- its key is no record any more (deleted, or overwritten by another program: then it goes
-- into the dead letters by id, as claim.lua does, to be seen and purged).
-- The lease may have expired during a long attempt; the outcome still stands if nobody
-- claimed the record since (the "sending" marker is still ours).
-- Each record stands alone: a script's writes are never undone, so an error at one record
-- would leave those before it saved and those after it not (delivered mail retried as a
-- possible duplicate). Its reads and first write are pcall'd; nothing is written to a
-- record before the key is known to be a hash that still has its document.
local retention, dead_ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
-- Counters are summed per stats hash and written once per field at the end; the sweep
-- counts are only looked at when there are any.
local sums, order = {}, {}
local swept = redis.call("EXISTS", KEYS[4]) == 1
for a = 5, #ARGV, 8 do
  local token, id, doc, state, score = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3],
                                       ARGV[a + 4]
  local stats, counters = KEYS[tonumber(ARGV[a + 5])], ARGV[a + 6]
  local elsewhere = ARGV[a + 7] ~= "1"
  local rec, lease_key = ARGV[3] .. id, ARGV[4] .. id
  local ours, saved = true, false
  local lease = redis.pcall("GET", lease_key)
  if type(lease) == "table" then  -- an error: the lease key is not a lease (not ours)
    ours = false
  elseif lease ~= token then
    if lease then
      ours = false
    else
      local sending = redis.pcall("HGET", rec, "sending")
      ours = type(sending) == "string" and string.sub(sending, 1, #token + 1) == token .. " "
      -- This very commit run again by the client's retry after its reply was lost: saved
      -- already (no other pass writes the same document, and it left the in-flight set),
      -- so say so again. (A requeue stays in flight: a re-run of it says 0, harmless.)
      saved = not ours and state ~= "queued" and redis.pcall("HGET", rec, "doc") == doc
        and not redis.call("ZSCORE", KEYS[1], id)
    end
  end
  local added = ours and redis.pcall("HSET", rec, "doc", doc)
  if type(added) == "table" then
    -- Not a hash (overwritten while we sent): set aside by id, never woken again.
    ours = false
    redis.call("DEL", lease_key)  -- ours (else the HSET was not tried)
    redis.call("ZREM", KEYS[1], id)
    redis.call("ZREM", KEYS[2], id)
    redis.call("ZADD", KEYS[3], redis.call("TIME")[1], id)
  elseif added == 1 then
    -- The document was not there: the record was deleted while we sent. Gone it stays
    -- (not a stub with a document and no body).
    ours = false
    redis.call("DEL", rec, lease_key)
    redis.call("ZREM", KEYS[1], id)
    redis.call("ZREM", KEYS[2], id)
  end
  if ours then
    if state == "delivered" then
      -- An empty raw, not none: a worker of the previous version (rolling deploy) reads
      -- raw to claim a stale wake-up, and would set aside a record without one.
      redis.call("HDEL", rec, "sending", "zraw")
      redis.call("HSET", rec, "raw", "")
    else
      redis.call("HDEL", rec, "sending")
    end
    -- Out of the sets it leaves (the ZADD below moves it within the one it stays in).
    if state ~= "queued" then redis.call("ZREM", KEYS[1], id) end
    if state ~= "deferred" and elsewhere then redis.call("ZREM", KEYS[2], id) end
    if swept then redis.call("HDEL", KEYS[4], id) end
    if state == "deferred" then
      redis.call("ZADD", KEYS[2], score, id)
    elseif state == "queued" then
      redis.call("ZADD", KEYS[1], score, id)
    elseif state == "dead" then
      redis.call("ZADD", KEYS[3], score, id)
    end
    if state ~= "dead" and elsewhere then
      redis.call("ZREM", KEYS[3], id)
    end
    if state == "delivered" and retention > 0 then
      redis.call("EXPIRE", rec, retention)
    elseif state == "dead" and dead_ttl > 0 then
      redis.call("EXPIRE", rec, dead_ttl)
      -- Dead letters whose records have expired leave the set too (bounded like them).
      redis.call("ZREMRANGEBYSCORE", KEYS[3], "-inf", "(" .. (tonumber(score) - dead_ttl))
    else
      redis.call("PERSIST", rec)
    end
    if counters ~= "" and not sums[stats] then
      sums[stats] = {}
      order[#order + 1] = stats
    end
    for field, by in string.gmatch(counters, "([^\n]+)\n([^\n]+)") do
      sums[stats][field] = (sums[stats][field] or 0) + tonumber(by)
    end
    redis.call("DEL", lease_key)
    out[#out + 1] = 1
  elseif saved then
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
for _, stats in ipairs(order) do
  for field, by in pairs(sums[stats]) do
    redis.pcall("HINCRBY", stats, field, by)  -- a counter is never worth an outcome
  end
end
return out
