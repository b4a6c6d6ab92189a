-- unlock: let unique publishes of these message ids through again (their task started or
-- succeeded, as its policy's Unique.until says). Idempotent: an id not locked is left alone.
-- KEYS: the NK keys of one queue.
-- ARGV: message id, message id, ...
-- Returns how many ids were locked.
--@include _queue.lua
local q = queue_keys(0)
if #ARGV == 0 then return 0 end
return redis.call('ZREM', q.uniq, unpack(ARGV))
