-- publish: store a message and append it to its priority band (READY), or, with a due time in
-- the future, keep it in the queue's schedule (SCHEDULED) until a consumer promotes it.
-- KEYS: the keys of one queue it touches, in PUBLISH_PARTS order (PUBLISH_KEY_PARTS in
-- celery_msg/keys.py): every publisher sends them, so no more than needed.
-- ARGV[1] message id, ARGV[2] payload, ARGV[3] priority band (0 is served first),
-- ARGV[4] due time (ms; 0 = now), ARGV[5] '1' for a unique publish, ARGV[6] the bindings
-- version of a routed publish (see below; '' otherwise), ARGV[7] now (ms), ARGV[8] (a unique
-- publish) until when (ms) its id stays locked, or 0, ARGV[9] '1' for a Celery retry (counted
-- as 'retried' too; absent: not a retry).
-- Returns {message key, 1} for a new message: the id itself, or a free id/<n> when that id is
-- already stored in this queue (a Celery retry republishes the same task id while the old
-- delivery is still leased); such keys are mapped back to their id in `dups`.
-- Routed through an exchange, the caller adds one key after those: the exchange's bindings
-- version (a counter every change of its bindings increments), and ARGV[6], the version of the
-- binding table it routed with. When they differ, nothing is written and it returns
-- {'', STALE_ROUTE}: the caller reads the table again and routes anew, so a publish never
-- routes with a stale table, however long a publisher caches it.
-- A unique publish stores nothing and returns {id, 0} when its id is locked (`uniq`: a unique
-- publish with ARGV[8] locked it until then, and nothing has unlocked it since: see
-- celery_msg.policy.Unique), or, with no lock asked for, while the id is still pending here
-- (ready, reserved or scheduled, not dead: under the id itself or its newest id/<n> key).
-- A READY message's score keeps its band and publish order; a SCHEDULED one's is its due time,
-- so its band goes to `order` (see _queue.lua), which promotion reads. The hot path of every
-- publisher: seven commands.
-- The queue's arguments (`args`, see celery_msg/queueargs.py) are honoured here, so a queue
-- nobody consumes stays bounded: with a message TTL the message's deadline (enqueue time + TTL;
-- its due time for a scheduled one) goes to `ttl`, and up to EXPIRE_BATCH messages past theirs
-- are removed (counted as expired); with a max length, READY messages beyond it are dropped
-- from the head (counted as dropped), possibly this very message. A garbage argument is
-- ignored (read and checked before the first write).
--@include _queue.lua
local version_key = key_after(PUBLISH_PARTS)
if version_key and (redis.call('GET', version_key) or '0') ~= ARGV[6] then
  return {'', STALE_ROUTE}
end
local q = keys_of(PUBLISH_PARTS, 0)
local id = ARGV[1]
local due = tonumber(ARGV[4]) or 0
local now = tonumber(ARGV[7])
local lock_until = tonumber(ARGV[8]) or 0
if ARGV[5] == '1' then
  local duplicate
  if lock_until > 0 then
    local held = tonumber(redis.call('ZSCORE', q.uniq, id))
    duplicate = held ~= nil and now ~= nil and held > now
  else
    local newest = redis.call('HGET', q.alias, id)
    duplicate = pending(q, id) or (newest and pending(q, newest))
  end
  if duplicate then
    count(q, STAT_DUPLICATES, 1)
    return {id, 0}
  end
end
local limits = redis.call('HMGET', q.args, ARG_MESSAGE_TTL, ARG_MAX_LENGTH)
local ttl = queue_arg(limits[1], 0)
local max_length = queue_arg(limits[2], 0)
if ttl and not now then return redis.error_reply('publish: ARGV[7] (now) is not a number') end
local key, seq = store_new(q, id, ARGV[2])
if ARGV[5] == '1' and lock_until > 0 then redis.call('ZADD', q.uniq, lock_until, id) end
local score = tonumber(ARGV[3]) * BAND + MID + seq
count(q, STAT_PUBLISHED, 1)
if ARGV[9] == '1' then count(q, STAT_RETRIED, 1) end
if ttl then
  drop_expired(q, now, EXPIRE_BATCH)
  redis.call('ZADD', q.ttl, math.max(now, due) + ttl, key)
end
if due > 0 then
  redis.call('HSET', q.order, key, score)
  redis.call('ZADD', q.sched, due, key)
  -- Wake a consumer only if this is now the earliest due time: it must shorten its sleep.
  if next_due(q) == due then signal(q) end
else
  redis.call('ZADD', q.ready, score, key)
  if now then tick(q, seq, now) end -- its age, by the clock (a scheduled one: when due)
  signal(q)
  if max_length then trim_to(q, max_length) end
end
return {key, 1}
