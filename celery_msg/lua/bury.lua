-- bury: store a copy of a message straight into the queue's dead-letter store (DEAD), for a
-- message that is no longer leased: acked on receipt (ack mode `early`), or acked because its
-- task timed out. Allocates its key like publish.lua (id, or id/<n> when id is stored).
-- KEYS: the NK keys of one queue.
-- ARGV[1] now (ms), ARGV[2] message id, ARGV[3] payload, ARGV[4] priority band,
-- ARGV[5] delivery count, ARGV[6] reason (JSON), ARGV[7] the reason as a word (counted as
-- 'dead' and 'dead:<word>').
-- Returns the key the copy was stored under; an error, before any write, for a reason word
-- that is not one (see dead_letter.lua).
--@include _queue.lua
local q = queue_keys(0)
local reason = reason_word(ARGV[7])
if not reason then return redis.error_reply('bury: ARGV[7] is not a reason word') end
local now = tonumber(ARGV[1])
local id = ARGV[2]
local key, seq = store_new(q, id, ARGV[3])
redis.call('HSET', q.order, key, tonumber(ARGV[4]) * BAND + MID + seq)
redis.call('HSET', q.deliv, key, ARGV[5])
redis.call('HSET', q.born, key, now)
redis.call('ZADD', q.dead, now, key)
redis.call('HSET', q.reason, key, ARGV[6])
unlock(q, key) -- failed for good: the id may be published again
count_dead(q, reason, 1)
return key
