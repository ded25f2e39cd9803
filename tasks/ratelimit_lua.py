"""The limiter's Lua scripts: each acquire or release is one atomic call on Redis time.

State of one (provider, key fingerprint, model), in the hash ``keys.ratelimit_state``, all
times in microseconds of Redis ``TIME``:

- ``tr`` ``ti`` ``to``: GCRA theoretical arrival times of the requests, input-token and
  output-token buckets. Each is paced at ``share`` of its limit: T = 60 s / (limit * share)
  per unit. A request of ``n`` units may start once ``max(tat, now) + (n - cap) * T <=
  start``, with ``cap = max(burst / T, n, 1)``, and moves ``tat`` on by ``n * T``. With the
  default ``burst`` of 0 a request starts no earlier than the ones before it have been paced
  out: 600/min at share 0.985 sends one request every 101.5 ms, never two at once. A
  request bigger than the whole per-minute limit can never fit (answer 4).
- ``cd``: the cooldown, until when nobody sends (a 429 / 529 / overloaded answer set it).
- ``pace`` ``pend`` ``tp``: a pace the provider's own budget headers asked for (their
  ``remaining`` ran low): at most one request per ``pace`` µs until ``pend``.
- ``l0`` ``l1``: the waiting lines of the interactive and batch lanes: until when tickets
  have been handed out. A request that cannot start within ``horizon`` takes a ticket (its
  start time) at the end of its lane's line and comes back then; batch requests also queue
  behind the interactive line, interactive ones never behind the batch line. A request that
  comes back with its ticket skips the line.

Why this pacing, and these defaults (``DQ_RATE_LIMIT_SHARE`` 0.985, ``DQ_RATE_LIMIT_BURST_S``
0). Providers enforce a per-minute limit R (per second here) over windows much shorter than
the minute, allowing R*W in any window of W seconds: OpenAI "quantizes" (60,000/min "may be
enforced as 1,000 requests/second"), Alibaba's DashScope enforces RPM/60 per second, Anthropic
runs a token bucket and may enforce 60 RPM "as 1 request per second" (quotes and addresses in
``datus/testing/limits.py``, whose fake provider enforces each shape). The shortest window any
of them documents is W = 1 s, over fixed ("quantized") or, at worst, sliding windows.

The grants are spaced by T = 1 / (share * R), ahead by at most the burst tolerance
tau = max(0, burst - T) (cost-1 requests). The provider counts arrivals, not grants: each
request reaches it some time after its grant, and what matters is the spread J of those
delays (the sleep that overshoots, a busy event loop, a process the OS scheduled late). In any
half-open window of W seconds the provider then sees at most

    n < 1 + share * R * (W + J + tau)

arrivals (the first, then one per T of the window stretched by the spread and the tolerance).
It allows R*W, so — R*W a whole number, as quantized limits are — there is no 429 in any
window, fixed or sliding, when share * R * (W + J + tau) <= R * W, that is when

    J + tau <= W * (1 - share) / share.

A token bucket holding R*W is looser (it admits n(t) <= R*W + R*t over any t seconds, which
holds while 1 + share * R * (J + tau) <= R*W), so windows are the case to design for, and the
shortest one binds: the right side shrinks with W. The budget used is ``share``. So the slack
that absorbs the spread and any burst is W * (1 - share) / share: at share 0.985, 15.2 ms in a
1 s window (30.5 ms in the 2 s windows of issue 18); at 0.98, 20.4 ms but a fleet that uses
just under 98 %. The burst is therefore 0 by default: every microsecond of tolerance is taken
from the spread the fleet can absorb, and the old default (1 s: a second's worth at once) broke
any 1 s window outright (10 + 10 requests at 600/min) and any 2 s one as soon as the spread was
above zero. For token buckets the same holds with costs: with equal requests of cost c
dividing R*W. With mixed sizes pacing alone does not: a request starts once the ones before it
are paced out, and its own cost lands in that window on top (19 prompts of 50 tokens then one
of 400, at 1,000 a second: 1,350 in one second). So input tokens are also logged
(``keys.ratelimit_input_log``, a sorted set of what started when, ARGV[16] the window W): a
request starts only once what started in the window W / share before it, plus its own cost
(capped at R*W, as the providers let a request bigger than a window through alone), is at most
R*W. Arrivals spread by up to the slack then never put more than R*W in any window of W; the
throughput is the same share. Output tokens are counted by the providers as they are made and
reconciled after the answer, so they are paced only. A cooldown after a
429 restarts the request bucket empty, so the fleet does not stampede when it ends.

Concurrency: the sorted set ``keys.ratelimit_slots`` holds the slots taken, scored by when
their lease ends; expired ones are dropped on every acquire, so a dead worker's slots come
back within their lease (running calls renew theirs).

ACQUIRE answers ``{code, wait_us, ticket_us, detail}``: 0 go (``wait_us`` > 0: booked that far
ahead, ``ticket_us`` the start booked: acquire again with ``paid`` just before it, for the
cooldown check and a slot, and send at it), 1 cooldown, 2 no slot free (``wait_us`` until the
first lease ends), 3 ticket, 4 too large (``detail``: which bucket, 1 requests / 2 input /
3 output), 5 late (``paid``, and the start booked passed more than ``late_us`` ago: book again).
"""

from __future__ import annotations

__all__ = ["ACQUIRE", "COOLDOWN", "GO", "LATE", "NO_SLOT", "RELEASE", "RENEW", "TICKET", "TOO_LARGE"]

GO, COOLDOWN, NO_SLOT, TICKET, TOO_LARGE, LATE = 0, 1, 2, 3, 4, 5
_STATE_TTL_MS = 7_200_000  # two hours: longer than any line a job waits on

# KEYS: state, slots[, input-token log]
# ARGV: rpm itpm otpm max_concurrency n_in n_out lane ticket_us paid horizon_us burst_us slot_id lease_us share late_us
#       [log_window_us]
# (paid: ticket_us is the start booked; late_us < 0: no lateness check; log_window_us 0 or absent: no log)
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
local share = tonumber(ARGV[14])
if paid then
  local late = tonumber(ARGV[15])
  if late >= 0 and now - ticket > late then return {{5, now - ticket, 0, 0}} end
end
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
      local T = 60000000 / (limit * share)
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
  -- the input-token log (KEYS[3], ARGV[16] the window in µs): what started in any window
  -- stretched by the slack stays within what one window allows, whatever the sizes' mix
  local logw = tonumber(ARGV[16] or '0')
  if logw > 0 and KEYS[3] and costs[2] > 0 and limits[2] > 0 then
    local cap = limits[2] * logw / 60000000
    local cost = math.min(costs[2], cap)
    local span = math.ceil(logw / share)
    redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - span)
    -- the bound as a whole µs rounded down (%.0f alone rounds half up: it dropped an entry
    -- half a µs inside the window), so an entry on the edge counts, never one inside is missed
    local log = redis.call('ZRANGEBYSCORE', KEYS[3], string.format('(%.0f', math.floor(start - span)), '+inf', 'WITHSCORES')
    local total = 0
    for j = 1, #log, 2 do total = total + tonumber(string.match(log[j], ':([%d.]+)$')) end
    local j = 1
    while total + cost > cap and j < #log do
      total = total - tonumber(string.match(log[j], ':([%d.]+)$'))
      local s = math.ceil(tonumber(log[j + 1])) + span
      if s > start then start = s end
      j = j + 2
    end
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
  if tonumber(ARGV[16] or '0') > 0 and KEYS[3] and costs[2] > 0 and limits[2] > 0 then
    local seq = redis.call('HINCRBY', KEYS[1], 'ls', 1)
    redis.call('ZADD', KEYS[3], start, seq .. ':' .. math.min(costs[2], limits[2] * tonumber(ARGV[16]) / 60000000))
    redis.call('PEXPIRE', KEYS[3], {_STATE_TTL_MS})
  end
  if #writes > 0 then
    redis.call('HSET', KEYS[1], unpack(writes))
    redis.call('PEXPIRE', KEYS[1], {_STATE_TTL_MS})
  end
end
if paid then return {{0, ticket - now, ticket, 0}} end
return {{0, start - now, start, 0}}
"""

# KEYS: state, slots
# ARGV: slot_id ('' none) rpm itpm otpm d_in d_out cooldown_us pace_us pace_for_us burst_us share
RELEASE = f"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[2], ARGV[1]) end
local burst = tonumber(ARGV[10])
local share = tonumber(ARGV[11])
local function adjust(field, limit, delta)
  if limit <= 0 or delta == 0 then return end
  local T = 60000000 / (limit * share)
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
      local T = 60000000 / (rpm * share)
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
