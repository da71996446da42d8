-- What a chunk of transactions told us about a relay, folded into its window and rate
-- (Postfix qmgr's positive and negative feedback, fleet-wide).
-- KEYS: 1 slots zset, 2 window hash, 3 relayfail string
-- ARGV: 1 kind ("ok" | "fail" | "slow"), 2 now, 3 transactions accepted (ok),
--       4 window ceiling, 5 initial window, 6 seconds without growth after a "fail",
--       7 rate ceiling (0: none), 8 rate floor, 9 probe interval
-- (The throughput is measured over periods of 2 s, and a period's first second counts
-- as a whole second, so that a first burst reads as one second's worth.)
-- ok:   the failure streak ends; the window grows by n/size, at most 1 (one per window's
--       worth of transactions) while every slot is in use and no "fail" came lately; a learned rate
--       creeps up by its step per second (and is forgotten at the ceiling or at twice the
--       rate it was cut from).
-- fail: a connection attempt failed (421 at greeting, refused, reset): the window shrinks
--       to the slots still held (at least one less); the streak grows; when it reaches the
--       window the streak began with, the whole cohort failed: the window drops to 1.
-- slow: a "slow down" reply: the rate is cut to 0.7 x (the learned rate, else the measured
--       throughput, else the ceiling, else 10/s), at most once a second; it then
--       creeps up by 5% of the rate it was cut from per second.
-- Returns {old size, new size, streak, cohort failed 0|1, old rate, new rate} (sizes and
-- rates as strings; a rate of "0" means none learned).
local kind, now, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local ceiling, initial = tonumber(ARGV[4]), tonumber(ARGV[5])
local regrow, rate_ceiling, floor = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local probe = tonumber(ARGV[9])
local w = redis.call("HMGET", KEYS[2], "size", "streak", "cohort", "hold_until", "rate",
                     "rate_ts", "step", "top", "cut_at", "t0", "sent", "measured")
local size = math.max(1, math.min(tonumber(w[1]) or initial, ceiling))
local old_size = size
local streak, cohort = tonumber(w[2]) or 0, tonumber(w[3]) or 0
local hold_until = tonumber(w[4]) or 0
local rate, rate_ts, step = tonumber(w[5]), tonumber(w[6]) or now, tonumber(w[7]) or 1
local top, cut_at = tonumber(w[8]) or 0, tonumber(w[9]) or 0
local t0, sent, measured = tonumber(w[10]), tonumber(w[11]) or 0, tonumber(w[12]) or 0
local old_rate = rate or 0
local failed = 0
redis.call("ZREMRANGEBYSCORE", KEYS[1], "-inf", now)
if kind == "ok" then
  streak = 0
  redis.call("HSET", KEYS[2], "dead", "0")
  redis.call("DEL", KEYS[3])
  if not t0 then t0 = now end  -- the throughput is measured from the first chunk on
  sent = sent + n
  if now - t0 >= 2 then
    measured = sent / (now - t0)
    t0, sent = now, 0
  end
  if now >= hold_until and redis.call("ZCARD", KEYS[1]) >= math.floor(size) then
    size = math.min(ceiling, size + math.min(1, n / size))
  end
  if rate then
    rate = rate + step * math.max(0, now - rate_ts)
    rate_ts = now
    if (rate_ceiling > 0 and rate >= rate_ceiling) or (rate_ceiling == 0 and rate >= 2 * top) then
      rate = nil
    end
  end
elseif kind == "fail" then
  if streak == 0 then cohort = math.floor(size) end
  streak = streak + 1
  local held = redis.call("ZCARD", KEYS[1])
  local new = size - 1
  if held > 0 and held < new then new = held end
  size = math.max(1, new)
  hold_until = now + regrow
  if streak >= math.max(1, cohort) then
    failed = 1
    size = 1
    redis.call("HSET", KEYS[2], "dead", "1", "probe_at", tostring(now + probe))
  end
elseif kind == "slow" then
  if now - cut_at >= 1 then
    local base = rate
    if not base then
      base = measured
      if t0 then base = math.max(base, sent / math.max(1, now - t0)) end
      if base < floor then base = rate_ceiling > 0 and rate_ceiling or 10 end
      if rate_ceiling > 0 then base = math.min(base, rate_ceiling) end
    end
    base = math.max(base, floor)
    top = base
    rate = math.max(floor, base * 0.7)
    step = math.max(0.1, base * 0.05)
    rate_ts, cut_at = now, now
  end
end
redis.call("HSET", KEYS[2], "size", tostring(size), "streak", streak, "cohort", cohort,
           "hold_until", tostring(hold_until), "rate_ts", tostring(rate_ts),
           "step", tostring(step), "top", tostring(top), "cut_at", tostring(cut_at),
           "t0", tostring(t0 or now), "sent", tostring(sent), "measured", tostring(measured))
if rate then
  redis.call("HSET", KEYS[2], "rate", tostring(rate))
else
  redis.call("HDEL", KEYS[2], "rate")
end
redis.call("EXPIRE", KEYS[2], 3600)
return {tostring(old_size), tostring(size), streak, failed, tostring(old_rate),
        tostring(rate or 0)}
