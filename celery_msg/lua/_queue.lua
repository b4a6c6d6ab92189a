-- Shared helpers, included at load time (see celery_msg/scripts.py); never run on its own.
-- The generated preamble before this file defines NK (keys per queue), PARTS (their names, in
-- KEYS order), PUBLISH_PARTS (the subset publish.lua takes), the return codes (OK, LEASE_LOST,
-- NOT_FOUND, GONE), the stats counters (STAT_*, celery_msg.keys.Counter), the dead-letter reasons the
-- scripts write (REASON_POISON, REASON_MISSING_BODY), the score constants (BAND, MID), the batch
-- sizes of publish's TTL and length enforcement (EXPIRE_BATCH, TRIM_BATCH) and the `args`
-- fields (ARG_*), taken from Python so the two never drift.
--
-- Ready scores: band * 2^44 + 2^43 + n for the back of a band (n, the publish sequence number,
-- grows), band * 2^44 + n for its front (a requeued or reclaimed message keeps its n), so
-- ZPOPMIN serves band 0 first, FIFO within a band, and messages that come back go before
-- everything else of their band, in the order they were first published (as RabbitMQ puts a
-- requeued message back at its place), whatever order they come back in. All values stay below
-- 2^53 (exact doubles).

-- Fail, before anything is written, if a key holds the wrong type or the sequence counter is
-- not a number: Redis does not roll back a script that fails half-way, so every script takes
-- its keys through keys_of (below) before its first write. The error names the key.
local function check(part, key)
  local kind = redis.call('TYPE', key)['ok']
  if kind ~= 'none' and kind ~= KIND[part] then
    error({err = 'WRONGTYPE celery-msg: ' .. key .. ' is a ' .. kind .. ', not a ' .. KIND[part]})
  end
  if part == 'seq' and kind ~= 'none' and not tonumber(redis.call('GET', key)) then
    error({err = 'ERR celery-msg: ' .. key .. ' is not a number'})
  end
end

-- The keys of group `group` (0-based) when each group passes `parts`, in that order, checked.
local function keys_of(parts, group)
  local q = {}
  local n = #parts
  local offset = group * n
  for i = 1, n do -- a numeric loop: cheaper than ipairs, on every call of every script
    local key = KEYS[offset + i]
    check(parts[i], key)
    q[parts[i]] = key
  end
  return q
end

-- The one key a caller may pass after a single group's keys (publish: the bindings version),
-- or nil when it passed none.
local function key_after(parts)
  return KEYS[#parts + 1]
end

local function queue_keys(group)
  return keys_of(PARTS, group)
end

-- Add n to a field of a counter hash; a field that is not a number (written by hand) starts
-- again from n rather than failing the script half-way.
local function add(hash, field, n)
  local total = redis.pcall('HINCRBY', hash, field, n)
  if type(total) == 'table' then
    redis.call('HSET', hash, field, n)
    return n
  end
  return total
end

local function count(q, field, n)
  add(q.stats, field, n)
end

-- A dead-letter reason as the caller passed it, checked (before any write) to be a short word
-- that can name a counter ('dead:<reason>') and a metrics label; nil when it is not one.
local function reason_word(raw)
  if raw and #raw <= REASON_MAX and string.find(raw, '^[a-z][a-z0-9_%-]*$') then return raw end
  return nil
end

-- Count one dead-lettering of q: in all and for its reason.
local function count_dead(q, reason, n)
  count(q, STAT_DEAD, n)
  count(q, STAT_DEAD .. ':' .. reason, n)
end

-- A dead-letter record written by a script itself (reserve's poison and missing-body), in the
-- shape Python writes (celery_msg/keys.py failure_record; field names from the preamble): this
-- failure is its first and its last.
local function failure_record(reason, detail, now)
  return cjson.encode({
    [RECORD_REASON] = reason,
    [RECORD_DETAIL] = detail,
    [RECORD_TIME] = now,
    [RECORD_FIRST_FAILURE] = now,
    [RECORD_LAST_FAILURE] = now,
  })
end

-- Store key of q as dead now, with a record the script writes, and count it.
local function dead_with_record(q, key, now, reason, detail)
  redis.call('ZADD', q.dead, now, key)
  redis.call('HSET', q.reason, key, failure_record(reason, detail, now))
  count_dead(q, reason, 1)
end

-- The marker list holds at most one element: pushed only when empty. On a Redis Cluster
-- (SHARD_SIGNAL) a sharded pub/sub message on the channel named like the list instead: a
-- consumer listens to the channels of queues on several slots (see celery_msg/shardwait.py).
local function signal(q)
  if SHARD_SIGNAL then
    redis.call('SPUBLISH', q.signal, '1')
  elseif redis.call('LLEN', q.signal) == 0 then
    redis.call('LPUSH', q.signal, '1')
  end
end

-- `order` holds the band and publish sequence number n of every stored message that is not
-- READY (band * BAND + MID + n: the score publish gives it at the back of its band), so that a
-- requeue, reclaim, promotion or replay puts it back in its band. A READY message carries both
-- in its `ready` score, so it has no entry: reserve.lua writes one when it takes the message
-- out of `ready`, enqueue_front and enqueue_back drop it when they put it back. A READY message
-- stored by an older version still has one: nothing reads it while the message is ready, and
-- reserve overwrites it with the same number.

-- The band and n of an `order` entry or a `ready` score (back: MID + n; front: n). A missing
-- or garbage one (not a number, no band 0..255: written by hand) gives band 0, n 0: the first
-- of band 0, so the message stays served rather than failing the script half-way.
local function band_and_n(score)
  score = tonumber(score)
  if not score then return 0, 0 end
  local band = math.floor(score / BAND)
  local n = score - band * BAND
  if n >= MID then n = n - MID end
  if band ~= band or band < 0 or band > 255 or n ~= n then return 0, 0 end
  return band, n
end

-- Back to the front of its band, at its publish position among the others that came back.
local function enqueue_front(q, key)
  local band, n = band_and_n(redis.call('HGET', q.order, key))
  redis.call('HDEL', q.order, key)
  redis.call('ZADD', q.ready, band * BAND + n, key)
end

-- Append key to the back of its band with a fresh sequence number (a scheduled message that
-- became due, a replayed one: FIFO by the time it became ready, within its band).
local function enqueue_back(q, key)
  local band = band_and_n(redis.call('HGET', q.order, key))
  redis.call('HDEL', q.order, key)
  redis.call('ZADD', q.ready, band * BAND + MID + redis.call('INCR', q.seq), key)
end

-- For each priority band present in `ready` (at most 256, two O(log n) look-ups each), its first
-- message at the front (came back) and at the back (published, promoted, replayed): f(key,
-- score, at_back) for each that exists. Never the whole queue; garbage scores (no band) end
-- the walk instead of looping.
local function each_band_head(q, f)
  local from = '-inf'
  for _ = 0, 256 do
    local head = redis.call('ZRANGEBYSCORE', q.ready, from, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    if #head == 0 then return end
    local score = tonumber(head[2])
    local band = math.floor(score / BAND)
    local back_start = band * BAND + MID
    if score < back_start then -- a front: the first of the back may be older
      f(head[1], score, false)
      local lo = string.format('%.0f', back_start)
      local hi = '(' .. string.format('%.0f', back_start + MID)
      local first = redis.call('ZRANGEBYSCORE', q.ready, lo, hi, 'WITHSCORES', 'LIMIT', 0, 1)
      if #first > 0 then f(first[1], tonumber(first[2]), true) end
    else
      f(head[1], score, true)
    end
    if band ~= band or band < 0 or band >= 255 then return end -- the last band, or not a band
    from = string.format('%.0f', (band + 1) * BAND)
  end
end

-- The queue's clock (`clock`): ticks, sequence number (score) -> time in ms (member), written
-- by publish.lua at most once per CLOCK_MS: when a publish finds the last tick CLOCK_MS old or
-- more, its own sequence number and now become a tick. A message waiting at the back of its
-- band has no `born` entry: it was enqueued at the time of the last tick at or before its
-- sequence number n, or up to CLOCK_MS later (a later publish would have written a tick).
-- Messages with an enqueue time the clock cannot give keep a `born` entry: a promoted one (its
-- due time), a leased one (reserve copies its time from the clock as it takes it, so that it
-- keeps it when it comes back to the front, leased for however long), a dead one (its lease's,
-- or bury's) and those of an older version.

-- The time (ms) the clock gives sequence number n, the tick's n and the next tick's n (or
-- +inf): every n in [lo, hi) has that time. nil when no tick lies at or before n (trimmed, or
-- none written yet) or its member is not a number (written by hand).
local function clock_at(q, n)
  -- By rank (ZCOUNT, ZRANGE): the commands the README's ACL allows, and O(log n) each.
  local before = redis.call('ZCOUNT', q.clock, '-inf', string.format('%.17g', n))
  if before == 0 then return nil end
  local ticks = redis.call('ZRANGE', q.clock, before - 1, before, 'WITHSCORES')
  local hi = math.huge
  if #ticks > 2 then hi = tonumber(ticks[4]) end
  return tonumber(ticks[1]), tonumber(ticks[2]), hi
end

-- Drop the ticks no message waiting at the back of a band needs: every tick before the one the
-- oldest of them maps to (the newest tick always stays: the next publishes map to it).
local function trim_clock(q)
  local oldest = nil
  each_band_head(q, function(_, score, at_back)
    if not at_back then return end
    local _, n = band_and_n(score)
    if not oldest or n < oldest then oldest = n end
  end)
  local upto = oldest and string.format('%.17g', oldest) or '+inf'
  local before = redis.call('ZCOUNT', q.clock, '-inf', upto) -- the one it maps to is the last
  if before > 1 then
    local keep = redis.call('ZRANGE', q.clock, before - 1, before - 1, 'WITHSCORES')
    redis.call('ZREMRANGEBYSCORE', q.clock, '-inf', '(' .. keep[2])
  end
end

-- Publish's tick: sequence number seq, enqueued at now (ms). A last tick in the future (a
-- caller's clock behind the others') writes nothing; one that is not a number is replaced.
local function tick(q, seq, now)
  local last = redis.call('ZRANGE', q.clock, -1, -1, 'WITHSCORES')
  if #last > 0 then
    local at = tonumber(last[1])
    if at and now < at + CLOCK_MS then return end
  end
  redis.call('ZADD', q.clock, seq, string.format('%.0f', now))
  trim_clock(q)
end

-- Store payload under a free key for id: the id itself, or id/<n> when that id is already
-- stored in q (mapped back to id in `dups`; `alias` maps id to its newest such key). Returns
-- the key and the sequence number it used.
local function store_new(q, id, payload)
  local key = id
  local seq = redis.call('INCR', q.seq)
  while redis.call('HSETNX', q.body, key, payload) == 0 do
    key = id .. '/' .. seq
    seq = redis.call('INCR', q.seq)
  end
  if key ~= id then
    redis.call('HSET', q.dups, key, id)
    redis.call('HSET', q.alias, id, key)
  end
  return key, seq
end

-- Whether key is stored and not dead: ready, scheduled or reserved.
local function pending(q, key)
  return redis.call('HEXISTS', q.body, key) == 1 and not redis.call('ZSCORE', q.dead, key)
end

local function holds(q, key, token)
  return redis.call('HGET', q.token, key) == token
end

-- End the current lease of key (whoever holds it).
local function release(q, key)
  redis.call('ZREM', q.leased, key)
  redis.call('HDEL', q.token, key)
  redis.call('HDEL', q.owner, key)
end

-- Remove every trace of key but its lease and its dead-letter entry (and its place in `ready`,
-- which the callers remove or have popped). Touches only keys publish.lua has too.
local function erase(q, key)
  redis.call('HDEL', q.body, key)
  redis.call('HDEL', q.order, key)
  redis.call('HDEL', q.deliv, key)
  redis.call('HDEL', q.born, key)
  local owner = redis.call('HGET', q.dups, key)
  if owner then
    redis.call('HDEL', q.dups, key)
    if redis.call('HGET', q.alias, owner) == key then redis.call('HDEL', q.alias, owner) end
  end
  redis.call('ZREM', q.sched, key)
  redis.call('ZREM', q.ttl, key)
end

-- Let a unique publish of key's message id through again (before erase: it reads `dups`).
local function unlock(q, key)
  redis.call('ZREM', q.uniq, redis.call('HGET', q.dups, key) or key)
end

-- Remove every trace of key but its dead-letter entry (the caller removes that), including
-- the record of a replayed message's earlier death.
local function forget(q, key)
  release(q, key)
  erase(q, key)
  redis.call('HDEL', q.reason, key) -- a replayed message keeps its earlier death's record
end

-- A queue argument as stored in `args` (see celery_msg/queueargs.py): an integer in
-- least..ARG_MAX, else nil. A garbage value (written by hand, or by another version) means
-- "not set": the queue keeps working without that limit rather than failing every call.
local function queue_arg(raw, least)
  local n = tonumber(raw)
  if n and n >= least and n <= ARG_MAX and n == math.floor(n) then return n end
  return nil
end

-- Remove up to limit messages whose TTL deadline lies before now (older than the queue's
-- message TTL: never delivered), oldest deadline first; count them as expired. Only READY and
-- SCHEDULED messages that were never delivered are in `ttl` (reserve removes a delivered one),
-- so nothing leased is touched. Returns how many.
local function drop_expired(q, now, limit)
  local old = redis.call('ZRANGEBYSCORE', q.ttl, '-inf', '(' .. now, 'LIMIT', 0, limit)
  for _, key in ipairs(old) do
    redis.call('ZREM', q.ready, key)
    unlock(q, key)
    erase(q, key)
  end
  if #old > 0 then count(q, STAT_EXPIRED, #old) end
  return #old
end

-- Drop READY messages from the head (the next to be served: RabbitMQ's drop-head overflow)
-- while more than max_length are ready, at most TRIM_BATCH; count them as dropped.
local function trim_to(q, max_length)
  local excess = redis.call('ZCARD', q.ready) - max_length
  if excess <= 0 then return 0 end
  local head = redis.call('ZRANGE', q.ready, 0, math.min(excess, TRIM_BATCH) - 1)
  for _, key in ipairs(head) do
    redis.call('ZREM', q.ready, key)
    unlock(q, key)
    erase(q, key)
  end
  count(q, STAT_DROPPED, #head)
  return #head
end

-- Move up to limit expired leases (earliest deadline first) back to the front of the queue.
-- Returns how many moved. Atomic with respect to every other script, so each expired lease is
-- reclaimed exactly once.
local function reclaim_expired(q, now, limit)
  local expired = redis.call('ZRANGEBYSCORE', q.leased, '-inf', now, 'LIMIT', 0, limit)
  for i = 1, #expired do
    release(q, expired[i])
    enqueue_front(q, expired[i])
  end
  if #expired > 0 then
    count(q, STAT_RECLAIMED, #expired)
    signal(q)
  end
  return #expired
end

-- Move up to limit scheduled messages that are due (due time <= now) to the back of their band,
-- earliest due first. Atomic like reclaim_expired: each is moved exactly once, and a process
-- that dies around this call leaves every message either scheduled or ready, never neither.
local function promote_due(q, now, limit)
  local due = redis.call('ZRANGEBYSCORE', q.sched, '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
  for i = 1, #due, 2 do
    local key = due[i]
    redis.call('ZREM', q.sched, key)
    enqueue_back(q, key)
    redis.call('HSET', q.born, key, due[i + 1]) -- ready since its due time: its age
  end
  local n = #due / 2
  if n > 0 then
    count(q, STAT_PROMOTED, n)
    signal(q)
  end
  return n
end

-- The earliest due time of q's scheduled messages (ms), or nil when none waits.
local function next_due(q)
  local first = redis.call('ZRANGE', q.sched, 0, 0, 'WITHSCORES')
  if #first == 0 then return nil end
  return tonumber(first[2])
end

-- The fenced pairs of ack and extend: settle(key) for every (message key, token) of ARGV from
-- index first on whose token still holds the lease, at once (a key twice in a batch is settled
-- once: its second token no longer holds). Returns one code per pair and how many were
-- settled: OK; GONE when the key is no longer stored in q at all (acked already, by a prefork
-- pool child that wrote the ack itself, see celery_msg/childack.py; or purged): nothing to
-- settle and nobody else holds it, not counted; LEASE_LOST when it is stored but this token
-- does not hold it (reclaimed, requeued, leased to another, dead): counted (lease_lost).
-- Only reads (HGET, HEXISTS) before each settle: no write can come before a failing check.
local function settle_held(q, first, settle)
  local codes = {}
  local done = 0
  local lost = 0
  for i = first, #ARGV, 2 do
    local key = ARGV[i]
    if holds(q, key, ARGV[i + 1]) then
      settle(key)
      codes[#codes + 1] = OK
      done = done + 1
    elseif redis.call('HEXISTS', q.body, key) == 0 then
      codes[#codes + 1] = GONE
    else
      codes[#codes + 1] = LEASE_LOST
      lost = lost + 1
    end
  end
  if lost > 0 then count(q, STAT_LEASE_LOST, lost) end
  return codes, done
end

-- The dead message keys of replay and discard: take(key) for every key of ARGV still in q's
-- dead-letter store (taken out of it first). Returns one code per key (OK, or NOT_FOUND: not
-- dead any more, replayed or purged by someone else) and how many were taken.
local function take_dead(q, take)
  local codes = {}
  local taken = 0
  for i = 1, #ARGV do
    local key = ARGV[i]
    if redis.call('ZREM', q.dead, key) == 1 then
      take(key)
      codes[i] = OK
      taken = taken + 1
    else
      codes[i] = NOT_FOUND
    end
  end
  return codes, taken
end
