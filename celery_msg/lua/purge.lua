-- purge: READY and SCHEDULED -> gone, for up to ARGV[1] messages (the caller loops until fewer
-- are returned, so one call never blocks Redis for long). Leased and dead messages are left
-- alone. Scheduled messages are waiting tasks too (kombu's redis transport would hold them in
-- a worker's memory, out of reach of a purge).
-- KEYS: the NK keys of one queue.
-- ARGV[1] most messages to remove.
-- Returns how many were removed.
--@include _queue.lua
local q = queue_keys(0)
local limit = tonumber(ARGV[1])
local popped = redis.call('ZPOPMIN', q.ready, limit)
for i = 1, #popped, 2 do
  unlock(q, popped[i])
  forget(q, popped[i])
end
local removed = #popped / 2
if removed < limit then
  local waiting = redis.call('ZPOPMIN', q.sched, limit - removed)
  for i = 1, #waiting, 2 do
    unlock(q, waiting[i])
    forget(q, waiting[i])
  end
  removed = removed + #waiting / 2
end
return removed
