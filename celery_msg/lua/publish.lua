-- publish: store a message and append it to its priority band (READY).
-- KEYS: the NK keys of one queue (celery_msg/keys.py).
-- ARGV[1] message id, ARGV[2] payload, ARGV[3] priority band (0 is served first).
-- Returns the message key: the id itself, or a free id/<n> when that id is already stored in
-- this queue (a Celery retry republishes the same task id while the old delivery is still
-- leased); such keys are mapped back to their id in `dups`. The score goes to `order` too:
-- it keeps the band (for a requeue) and the publish order (for look-ups). The hot path of
-- every publisher: six commands.
--@include _queue.lua
local q = queue_keys(0)
local id = ARGV[1]
local key = id
local seq = redis.call('INCR', q.seq)
while redis.call('HSETNX', q.body, key, ARGV[2]) == 0 do
  key = id .. '/' .. seq
  seq = redis.call('INCR', q.seq)
end
if key ~= id then redis.call('HSET', q.dups, key, id) end
local score = tonumber(ARGV[3]) * BAND + MID + seq
redis.call('HSET', q.order, key, score)
redis.call('ZADD', q.ready, score, key)
count(q, 'published', 1)
signal(q)
return key
