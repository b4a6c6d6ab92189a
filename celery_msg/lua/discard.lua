-- discard: DEAD -> gone, for the given message keys (dead-letter purge, one batch at a time).
-- KEYS: the NK keys of one queue.
-- ARGV: message key, message key, ...
-- Returns one code per key: OK (removed), or NOT_FOUND (not dead any more).
--@include _queue.lua
local q = queue_keys(0)
local codes = take_dead(q, function(key)
  redis.call('HDEL', q.reason, key)
  forget(q, key)
end)
return codes
