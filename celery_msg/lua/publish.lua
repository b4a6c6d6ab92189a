-- publish: store a message and append it to its priority band (READY).
-- KEYS: the NK keys of one queue (celery_msg/keys.py).
-- ARGV[1] message id, ARGV[2] payload, ARGV[3] priority band (0 is served first).
-- Returns the message key: the id itself, or id/<n> when that id is already stored in this
-- queue (a Celery retry republishes the same task id while the old delivery is still leased).
--@include _queue.lua
local q = queue_keys(0)
local key = ARGV[1]
if redis.call('HEXISTS', q.body, key) == 1 then
  key = key .. '/' .. redis.call('INCR', q.seq)
end
redis.call('HSET', q.body, key, ARGV[2])
redis.call('HSET', q.prio, key, ARGV[3])
enqueue_back(q, key, tonumber(ARGV[3]))
count(q, 'published', 1)
signal(q)
return key
