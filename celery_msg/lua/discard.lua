-- discard: DEAD -> gone, for the given message keys (dead-letter purge, one batch at a time).
-- KEYS: the NK keys of one queue.
-- ARGV: message key, message key, ...
-- Returns one code per key: OK (removed), or NOT_FOUND (not dead any more).
--@include _queue.lua
local q = queue_keys(0)
local codes = {}
for i = 1, #ARGV do
  local key = ARGV[i]
  if redis.call('ZREM', q.dead, key) == 1 then
    redis.call('HDEL', q.reason, key)
    forget(q, key)
    codes[i] = OK
  else
    codes[i] = NOT_FOUND
  end
end
return codes
