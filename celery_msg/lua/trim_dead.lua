-- trim_dead: enforce a dead-letter store's retention: drop the oldest dead messages beyond
-- ARGV[2] entries and those dead-lettered before ARGV[1] - ARGV[3], at most ARGV[4] per call.
-- KEYS: the NK keys of one queue.
-- ARGV[1] now (ms), ARGV[2] most entries kept (0 = no bound), ARGV[3] most age (ms, 0 = no
-- bound), ARGV[4] most entries dropped by this call.
-- Returns how many were dropped.
--@include _queue.lua
local q = queue_keys(0)
local now = tonumber(ARGV[1])
local max_len = tonumber(ARGV[2])
local max_age = tonumber(ARGV[3])
local limit = tonumber(ARGV[4])
local victims = {}
if max_age > 0 then
  victims = redis.call('ZRANGEBYSCORE', q.dead, '-inf', '(' .. (now - max_age), 'LIMIT', 0, limit)
end
if max_len > 0 then
  local excess = redis.call('ZCARD', q.dead) - #victims - max_len
  if excess > 0 then
    local more = redis.call('ZRANGE', q.dead, #victims, #victims + math.min(excess, limit - #victims) - 1)
    for _, key in ipairs(more) do victims[#victims + 1] = key end
  end
end
for _, key in ipairs(victims) do
  redis.call('ZREM', q.dead, key)
  redis.call('HDEL', q.reason, key)
  forget(q, key)
end
if #victims > 0 then count(q, STAT_DEAD_TRIMMED, #victims) end
return #victims
