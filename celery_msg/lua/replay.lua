-- replay: DEAD -> READY (back of its band, delivery count reset) for the given message keys.
-- Atomic and at most once: a key is re-enqueued only if it is still in the dead-letter store,
-- so two operators replaying the same messages at once enqueue each of them once. The record
-- of why it died stays until the message is acked (look-ups show the replay in its history)
-- or dies again (replaced).
-- KEYS: the NK keys of one queue.
-- ARGV: message key, message key, ...
-- Returns one code per key: OK (replayed), or NOT_FOUND (not dead any more: replayed, purged).
--@include _queue.lua
local q = queue_keys(0)
local codes, replayed = take_dead(q, function(key)
  redis.call('HDEL', q.deliv, key)
  enqueue_back(q, key)
end)
if replayed > 0 then
  count(q, STAT_REPLAYED, replayed)
  signal(q)
end
return codes
