-- Shared helpers, included at load time (see celery_msg/scripts.py); never run on its own.
-- The generated preamble before this file defines NK (keys per queue), PARTS (their names, in
-- KEYS order), PUBLISH_PARTS (the subset publish.lua takes), the return codes (OK, LEASE_LOST,
-- NOT_FOUND) and the score constants (BAND, MID), taken from Python so the two never drift.
--
-- Ready scores: band * 2^44 + 2^43 + n for the back of a band (n, the publish sequence number,
-- grows), band * 2^44 + n for its front (a requeued or reclaimed message keeps its n), so
-- ZPOPMIN serves band 0 first, FIFO within a band, and messages that come back go before
-- everything else of their band, in the order they were first published (as RabbitMQ puts a
-- requeued message back at its place), whatever order they come back in. All values stay below
-- 2^53 (exact doubles).

-- The keys of group `group` (0-based) when each group passes `parts`, in that order.
local function keys_of(parts, group)
  local q = {}
  local n = #parts
  local offset = group * n
  for i = 1, n do -- a numeric loop: cheaper than ipairs, on every call of every script
    q[parts[i]] = KEYS[offset + i]
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

local function count(q, field, n)
  redis.call('HINCRBY', q.stats, field, n)
end

-- The marker list holds at most one element: pushed only when empty.
local function signal(q)
  if redis.call('LLEN', q.signal) == 0 then redis.call('LPUSH', q.signal, '1') end
end

-- Back to the front of its band, at its publish position among the others that came back.
local function enqueue_front(q, key)
  local published = tonumber(redis.call('HGET', q.order, key)) or 0
  local band = math.floor(published / BAND)
  local n = published - band * BAND - MID
  if n < 0 or n >= MID then n = 0 end -- no (or a garbage) order entry: first of its band
  redis.call('ZADD', q.ready, band * BAND + n, key)
end

-- Append key to the back of its band with a fresh sequence number (a scheduled message that
-- became due: FIFO by due time within its band). `order` follows, so look-ups stay in order.
local function enqueue_back(q, key)
  local band = math.floor((tonumber(redis.call('HGET', q.order, key)) or 0) / BAND)
  local score = band * BAND + MID + redis.call('INCR', q.seq)
  redis.call('HSET', q.order, key, score)
  redis.call('ZADD', q.ready, score, key)
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

-- Remove every trace of key but its dead-letter entry (the caller removes that), including
-- the record of a replayed message's earlier death.
local function forget(q, key)
  release(q, key)
  redis.call('HDEL', q.body, key)
  redis.call('HDEL', q.order, key)
  redis.call('HDEL', q.deliv, key)
  redis.call('HDEL', q.reason, key)
  local owner = redis.call('HGET', q.dups, key)
  if owner then
    redis.call('HDEL', q.dups, key)
    if redis.call('HGET', q.alias, owner) == key then redis.call('HDEL', q.alias, owner) end
  end
  redis.call('ZREM', q.sched, key)
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
    count(q, 'reclaimed', #expired)
    signal(q)
  end
  return #expired
end

-- Move up to limit scheduled messages that are due (due time <= now) to the back of their band,
-- earliest due first. Atomic like reclaim_expired: each is moved exactly once, and a process
-- that dies around this call leaves every message either scheduled or ready, never neither.
local function promote_due(q, now, limit)
  local due = redis.call('ZRANGEBYSCORE', q.sched, '-inf', now, 'LIMIT', 0, limit)
  for _, key in ipairs(due) do
    redis.call('ZREM', q.sched, key)
    enqueue_back(q, key)
  end
  if #due > 0 then
    count(q, 'promoted', #due)
    signal(q)
  end
  return #due
end

-- The earliest due time of q's scheduled messages (ms), or nil when none waits.
local function next_due(q)
  local first = redis.call('ZRANGE', q.sched, 0, 0, 'WITHSCORES')
  if #first == 0 then return nil end
  return tonumber(first[2])
end
