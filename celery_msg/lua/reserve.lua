-- reserve: READY -> RESERVED for up to ARGV[3] messages across one or more queues. The fetch *is*
-- the lease: there is no moment where a message is neither in its queue nor leased.
-- First reclaims expired leases of every queue (back to the front of their band), then moves
-- due scheduled messages to the back of theirs.
-- KEYS: NK keys per queue, queue after queue (group g = KEYS[g*NK+1 .. g*NK+NK]).
-- ARGV[1] now (ms), ARGV[2] lease (ms), ARGV[3] most messages to reserve, ARGV[4] consumer id,
-- ARGV[5] 'strict' (queue order) or 'fair' (round-robin), ARGV[6] group to start at (fair),
-- ARGV[7] most expired leases to reclaim (and due messages to promote) per queue,
-- ARGV[8] max deliveries (0 = unlimited).
-- Returns a flat array, five entries per reserved message:
--   group (0-based), message key, fencing token, delivery count, payload;
-- (group MISSING, key, 0, 0, '') for a ready id whose body was gone: now dead, 'missing-body';
-- then one last entry: the earliest due time (ms) still scheduled in these queues, or 0.
-- A message delivered max-deliveries times already is dead-lettered as 'poison' instead (the
-- rule: celery_msg/poison.py; the record: celery_msg/keys.py failure_record).
-- Counts (stats): delivered (every delivery), redelivered (deliveries after the first),
-- dead and dead:poison / dead:missing-body, expired, reclaimed, promoted.
-- A message taken out of `ready` gets its `order` entry (band and publish sequence number, for a
-- requeue or a reclaim) and, unless it has one, its `born` entry (enqueue time, from the
-- queue's clock): a READY message has neither (see _queue.lua).
-- A message past its message-TTL deadline (`ttl`) is never delivered: it is removed and counted
-- as expired (the oldest up to ARGV[7] per queue first, then any that come up to be served);
-- a delivered message leaves `ttl`: the TTL bounds only the wait for a first delivery.
--@include _queue.lua
local now = tonumber(ARGV[1])
local lease_ms = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local consumer = ARGV[4]
local mode = ARGV[5]
local start = tonumber(ARGV[6])
local reclaim_limit = tonumber(ARGV[7])
local max_deliveries = tonumber(ARGV[8])
local groups = #KEYS / NK

local queues = {}
local has_ttl = {}
for g = 0, groups - 1 do -- every queue's keys checked before the first write
  queues[g] = queue_keys(g)
end
for g = 0, groups - 1 do
  reclaim_expired(queues[g], now, reclaim_limit)
  promote_due(queues[g], now, reclaim_limit)
  has_ttl[g] = redis.call('EXISTS', queues[g].ttl) == 1
  if has_ttl[g] then drop_expired(queues[g], now, reclaim_limit) end
end

local out = {}
local got = 0

-- The clock's time of sequence number n in group g, from one look-up per span of sequence
-- numbers between two ticks (a batch taken from one band mostly falls in one).
local spans = {}
local function enqueued(g, n)
  local span = spans[g]
  if not (span and n >= span[2] and n < span[3]) then
    local t, lo, hi = clock_at(queues[g], n)
    if not t then return nil end
    span = {t, lo, hi}
    spans[g] = span
  end
  return span[1]
end

local function deliver(g, key, score)
  local q = queues[g]
  local payload = redis.call('HGET', q.body, key)
  if not payload then
    -- An id without a body (deleted by hand, a bad migration): nothing to deliver. Its
    -- leftovers go; its id is recorded as dead ('missing-body') and reported to the caller.
    unlock(q, key)
    forget(q, key)
    dead_with_record(q, key, now, REASON_MISSING_BODY, 'listed as ready but its body is gone')
    out[#out + 1] = MISSING
    out[#out + 1] = key
    out[#out + 1] = 0
    out[#out + 1] = 0
    out[#out + 1] = ''
    return
  end
  if has_ttl[g] then
    local deadline = tonumber(redis.call('ZSCORE', q.ttl, key))
    if deadline and deadline < now then
      unlock(q, key)
      erase(q, key)
      count(q, STAT_EXPIRED, 1)
      return
    end
    redis.call('ZREM', q.ttl, key)
  end
  -- Out of `ready`: its band and publish order go to `order`, its enqueue time from the clock
  -- to `born` unless it has one (leased or dead, it keeps them; see _queue.lua).
  local band, n = band_and_n(score) -- front (came back) or back: the numbers it was published with
  redis.call('HSET', q.order, key, band * BAND + MID + n)
  local born = enqueued(g, n)
  if born then redis.call('HSETNX', q.born, key, born) end
  local delivered = tonumber(redis.call('HGET', q.deliv, key)) or 0
  -- The poison rule (celery_msg/poison.py is_poison and detail: the same numbers and words).
  if max_deliveries > 0 and delivered >= max_deliveries then
    unlock(q, key)
    dead_with_record(q, key, now, REASON_POISON, string.format(POISON_DETAIL, delivered))
    return
  end
  delivered = add(q.deliv, key, 1)
  count(q, STAT_DELIVERED, 1)
  if delivered > 1 then count(q, STAT_REDELIVERED, 1) end
  local token = redis.call('INCR', q.seq)
  redis.call('ZADD', q.leased, now + lease_ms, key)
  redis.call('HSET', q.token, key, token)
  redis.call('HSET', q.owner, key, consumer)
  out[#out + 1] = g
  out[#out + 1] = key
  out[#out + 1] = token
  out[#out + 1] = delivered
  out[#out + 1] = payload
  got = got + 1
end

-- Pops up to n keys of group g; returns how many were popped (delivered or not).
local function take(g, n)
  local popped = redis.call('ZPOPMIN', queues[g].ready, n)
  for i = 1, #popped, 2 do
    deliver(g, popped[i], popped[i + 1])
  end
  return #popped / 2
end

if mode == 'strict' then
  for g = 0, groups - 1 do
    while got < want do
      if take(g, want - got) == 0 then break end
    end
  end
else
  local empty = {}
  local active = groups
  local g = start % groups
  while got < want and active > 0 do
    if not empty[g] then
      if take(g, 1) == 0 then
        empty[g] = true
        active = active - 1
      end
    end
    g = (g + 1) % groups
  end
end

-- Wake another consumer for whatever is left; tell the caller when the next message is due.
local soonest = 0
for g = 0, groups - 1 do
  if redis.call('ZCARD', queues[g].ready) > 0 then signal(queues[g]) end
  local due = next_due(queues[g])
  if due and (soonest == 0 or due < soonest) then soonest = due end
end
out[#out + 1] = soonest
return out
