-- dead_letter: RESERVED -> DEAD. The body stays; the key moves to the queue's dead-letter store
-- with a reason (JSON built by the caller: reason, detail, time, ...).
-- KEYS: the NK keys of one queue.
-- ARGV[1] now (ms), ARGV[2] message key, ARGV[3] token, ARGV[4] reason (JSON).
-- Returns OK, or LEASE_LOST (fenced like ack).
--@include _queue.lua
local q = queue_keys(0)
local key = ARGV[2]
if not holds(q, key, ARGV[3]) then
  count(q, STAT_LEASE_LOST, 1)
  return LEASE_LOST
end
release(q, key)
unlock(q, key) -- failed for good: the id may be published again
redis.call('ZADD', q.dead, tonumber(ARGV[1]), key)
redis.call('HSET', q.reason, key, ARGV[4])
count(q, STAT_DEAD, 1)
return OK
