-- publish: store a message and append it to its priority band (READY).
-- KEYS: the NK keys of one queue (celery_msg/keys.py).
-- ARGV[1] message id, ARGV[2] payload, ARGV[3] priority band (0 is served first).
-- Returns the message key: the id itself, or a free id/<n> when that id is already stored in
-- this queue (a Celery retry republishes the same task id while the old delivery is still
-- leased); such keys are mapped back to their id in `dups`. `born` orders the instances.
--@include _queue.lua
local q = queue_keys(0)
local id = ARGV[1]
local key = id
local born = redis.call('INCR', q.seq)
while redis.call('HEXISTS', q.body, key) == 1 do
  key = id .. '/' .. born
  born = redis.call('INCR', q.seq)
end
if key ~= id then redis.call('HSET', q.dups, key, id) end
redis.call('HSET', q.born, key, born)
redis.call('HSET', q.body, key, ARGV[2])
redis.call('HSET', q.prio, key, ARGV[3])
enqueue_back(q, key, tonumber(ARGV[3]))
count(q, 'published', 1)
signal(q)
return key
