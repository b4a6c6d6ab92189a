-- dead_letter: RESERVED -> DEAD. The body stays; the key moves to the queue's dead-letter store
-- with a reason (JSON built by the caller: reason, detail, time, ...).
-- KEYS: the NK keys of one queue.
-- ARGV[1] now (ms), ARGV[2] message key, ARGV[3] token, ARGV[4] reason (JSON), ARGV[5] the
-- reason as a word (counted as 'dead' and 'dead:<word>').
-- Returns OK, or LEASE_LOST (fenced like ack); an error, before any write, for a reason word
-- that is not one (lower-case letters, digits, '_' and '-', at most REASON_MAX).
--@include _queue.lua
local q = queue_keys(0)
local key = ARGV[2]
local reason = reason_word(ARGV[5])
if not reason then return redis.error_reply('dead_letter: ARGV[5] is not a reason word') end
if not holds(q, key, ARGV[3]) then
  count(q, STAT_LEASE_LOST, 1)
  return LEASE_LOST
end
release(q, key)
unlock(q, key) -- failed for good: the id may be published again
redis.call('ZADD', q.dead, tonumber(ARGV[1]), key)
redis.call('HSET', q.reason, key, ARGV[4])
count_dead(q, reason, 1)
return OK
