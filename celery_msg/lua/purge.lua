-- purge: READY -> gone, for up to ARGV[1] messages (the caller loops until 0 is returned, so
-- one call never blocks Redis for long). Leased and dead messages are left alone.
-- KEYS: the NK keys of one queue.
-- ARGV[1] most messages to remove.
-- Returns how many were removed.
--@include _queue.lua
local q = queue_keys(0)
local popped = redis.call('ZPOPMIN', q.ready, tonumber(ARGV[1]))
for i = 1, #popped, 2 do
  forget(q, popped[i])
end
return #popped / 2
