"""The limiter's Lua scripts: each acquire or release is one atomic call on Redis time.

State of one (provider, key fingerprint, model), in the hash ``keys.ratelimit_state``, all
times in microseconds of Redis ``TIME``:

- ``tr`` ``ti`` ``to``: GCRA theoretical arrival times of the requests, input-token and
  output-token buckets. A bucket holds ``burst`` worth of its limit; a request of ``n`` units
  may start once ``max(tat, now) + (n - cap) * T <= start`` (T = µs per unit), and moves
  ``tat`` on by ``n * T``. So a limit of 600/min sends at most a second's worth (10) at once,
  then one every 100 ms: smooth, never 100 in the first second. A request bigger than the
  whole per-minute limit can never fit (answer 4).
- ``cd``: the cooldown, until when nobody sends (a 429 / 529 / overloaded answer set it).
- ``pace`` ``pend`` ``tp``: a pace the provider's own budget headers asked for (their
  ``remaining`` ran low): at most one request per ``pace`` µs until ``pend``.
- ``l0`` ``l1``: the waiting lines of the interactive and batch lanes: until when tickets
  have been handed out. A request that cannot start within ``horizon`` takes a ticket (its
  start time) at the end of its lane's line and comes back then; batch requests also queue
  behind the interactive line, interactive ones never behind the batch line. A request that
  comes back with its ticket skips the line.

Concurrency: the sorted set ``keys.ratelimit_slots`` holds the slots taken, scored by when
their lease ends; expired ones are dropped on every acquire, so a dead worker's slots come
back within their lease (running calls renew theirs).

ACQUIRE answers ``{code, wait_us, ticket_us, detail}``: 0 go (``wait_us`` > 0: booked that far
ahead, then acquire again with ``paid`` for the cooldown check and a slot), 1 cooldown, 2 no
slot free (``wait_us`` until the first lease ends), 3 ticket, 4 too large (``detail``: which
bucket, 1 requests / 2 input / 3 output).
"""

from __future__ import annotations

__all__ = ["ACQUIRE", "COOLDOWN", "GO", "NO_SLOT", "RELEASE", "RENEW", "TICKET", "TOO_LARGE"]

GO, COOLDOWN, NO_SLOT, TICKET, TOO_LARGE = 0, 1, 2, 3, 4
_STATE_TTL_MS = 7_200_000  # two hours: longer than any line a job waits on

# KEYS: state, slots
# ARGV: rpm itpm otpm max_concurrency n_in n_out lane ticket_us paid horizon_us burst_us slot_id lease_us
ACQUIRE = f"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local f = redis.call('HMGET', KEYS[1], 'cd', 'tr', 'ti', 'to', 'l0', 'l1', 'pace', 'pend', 'tp')
local function n(i, default)
  if f[i] then return tonumber(f[i]) end
  return default
end
local cd = n(1, 0)
if cd > now then return {{1, cd - now, 0, 0}} end
local lane = tonumber(ARGV[7])
local ticket = tonumber(ARGV[8])
local paid = ARGV[9] == '1'
local horizon = tonumber(ARGV[10])
local start = now
local limits = {{tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])}}
local costs = {{1, tonumber(ARGV[5]), tonumber(ARGV[6])}}
local fields = {{'tr', 'ti', 'to'}}
local emission = {{0, 0, 0}}
local step = 0
local pace, pend = n(7, 0), n(8, 0)
local pacing = pace > 0 and pend > now
if not paid then
  local burst = tonumber(ARGV[11])
  for i = 1, 3 do
    local limit, cost = limits[i], costs[i]
    if limit > 0 and cost > 0 then
      if cost > limit then return {{4, 0, 0, i}} end
      local T = 60000000 / limit
      emission[i] = T
      local cap = math.max(burst / T, cost, 1)
      local s = math.max(n(i + 1, now), now) + (cost - cap) * T
      if s > start then start = s end
      if cost * T > step then step = cost * T end
    end
  end
  if pacing then
    local s = n(9, 0)
    if s > start then start = s end
    if pace > step then step = pace end
  end
  if ticket > 0 then
    if ticket - now > horizon then return {{3, ticket - now, ticket, 0}} end
    if ticket > start then start = ticket end
  else
    local line = n(5, 0)
    if lane == 1 then line = math.max(line, n(6, 0)) end
    if line > start then start = line end
  end
  if start - now > horizon then
    local place = start
    if ticket > 0 then
      local line = n(5 + lane, 0)
      if lane == 1 then line = math.max(line, n(5, 0)) end
      if line > place then place = line end
    end
    redis.call('HSET', KEYS[1], 'l' .. lane, place + math.max(step, 1))
    redis.call('PEXPIRE', KEYS[1], {_STATE_TTL_MS})
    return {{3, place - now, place, 0}}
  end
end
local maxc = tonumber(ARGV[4])
if maxc > 0 and start <= now then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= maxc then
    local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    return {{2, tonumber(first[2]) - now, 0, 0}}
  end
  local lease = tonumber(ARGV[13])
  redis.call('ZADD', KEYS[2], now + lease, ARGV[12])
  redis.call('PEXPIRE', KEYS[2], math.ceil(lease / 1000) * 4)
end
if not paid then
  local writes = {{}}
  for i = 1, 3 do
    if emission[i] > 0 then
      writes[#writes + 1] = fields[i]
      writes[#writes + 1] = math.max(n(i + 1, now), start) + costs[i] * emission[i]
    end
  end
  if pacing then
    writes[#writes + 1] = 'tp'
    writes[#writes + 1] = math.max(n(9, 0), start) + pace
  end
  if #writes > 0 then
    redis.call('HSET', KEYS[1], unpack(writes))
    redis.call('PEXPIRE', KEYS[1], {_STATE_TTL_MS})
  end
end
return {{0, start - now, 0, 0}}
"""

# KEYS: state, slots
# ARGV: slot_id ('' none) rpm itpm otpm d_in d_out cooldown_us pace_us pace_for_us burst_us
RELEASE = f"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[2], ARGV[1]) end
local burst = tonumber(ARGV[10])
local function adjust(field, limit, delta)
  if limit <= 0 or delta == 0 then return end
  local T = 60000000 / limit
  local tat = tonumber(redis.call('HGET', KEYS[1], field) or now)
  if delta > 0 then
    tat = math.max(tat, now) + delta * T
  elseif tat > now then
    tat = math.max(now, tat + delta * T)
  else
    return
  end
  redis.call('HSET', KEYS[1], field, tat)
end
adjust('ti', tonumber(ARGV[3]), tonumber(ARGV[5]))
adjust('to', tonumber(ARGV[4]), tonumber(ARGV[6]))
local cooldown = tonumber(ARGV[7])
if cooldown > 0 then
  local till = now + cooldown
  if till > tonumber(redis.call('HGET', KEYS[1], 'cd') or 0) then
    redis.call('HSET', KEYS[1], 'cd', till)
    -- restart smoothly: the request bucket is empty, not full, when the cooldown ends
    local rpm = tonumber(ARGV[2])
    if rpm > 0 then
      local T = 60000000 / rpm
      local tat = till + math.max(burst / T, 1) * T
      if tat > tonumber(redis.call('HGET', KEYS[1], 'tr') or 0) then redis.call('HSET', KEYS[1], 'tr', tat) end
    end
  end
end
local pace = tonumber(ARGV[8])
if pace > 0 then
  redis.call('HSET', KEYS[1], 'pace', pace, 'pend', now + tonumber(ARGV[9]))
end
redis.call('PEXPIRE', KEYS[1], {_STATE_TTL_MS})
return 1
"""

# KEYS: slots; ARGV: lease_us, slot ids...
RENEW = """
local t = redis.call('TIME')
local till = tonumber(t[1]) * 1000000 + tonumber(t[2]) + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', till, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1]) / 1000) * 4)
return #ARGV - 1
"""
