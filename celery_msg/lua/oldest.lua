-- oldest: read only. When the oldest READY message of one queue was enqueued, for the age that
-- metrics and dashboards show (and autoscalers scale on). Ready is ordered by priority band,
-- then front (came back) before back (published), each in sequence order, so the oldest of a
-- band is the first of its front or of its back: the script looks at those two per band
-- present (at most 2 x 256 look-ups, each O(log n)), never at the whole queue.
-- A scheduled message past its due time is ready too (the next fetch promotes it; with no
-- consumer nothing does): its due time counts, so an autoscaler sees a queue nobody serves.
-- KEYS: the queue's `ready`, `born` and `sched` keys (READ_PARTS below), checked like every
-- script's.
-- ARGV[1] now (ms).
-- Returns the enqueue time (ms) of the oldest of those, or 0 when the queue has no ready
-- message and none due, or none of its heads has an enqueue time (written before `born`
-- existed, or by hand).
--@include _queue.lua
local READ_PARTS = {'ready', 'born', 'sched'}
local q = keys_of(READ_PARTS, 0)
local now = tonumber(ARGV[1])
if not now then return redis.error_reply('oldest: ARGV[1] (now) is not a number') end
local oldest = 0
local first_due = redis.call('ZRANGE', q.sched, 0, 0, 'WITHSCORES')
if #first_due > 0 and tonumber(first_due[2]) <= now then oldest = tonumber(first_due[2]) end
local from = '-inf'
for _ = 0, 256 do -- one round per band present; garbage scores cannot make it loop forever
  local head = redis.call('ZRANGEBYSCORE', q.ready, from, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  if #head == 0 then break end
  local score = tonumber(head[2])
  local band = math.floor(score / BAND)
  local firsts = {head[1]}
  local back_start = band * BAND + MID
  if score < back_start then -- a front: the first of the back may be older
    local lo = string.format('%.0f', back_start)
    local hi = '(' .. string.format('%.0f', back_start + MID)
    local first_back = redis.call('ZRANGEBYSCORE', q.ready, lo, hi, 'LIMIT', 0, 1)
    if #first_back > 0 then firsts[2] = first_back[1] end
  end
  for _, key in ipairs(firsts) do
    local t = tonumber(redis.call('HGET', q.born, key))
    if t and (oldest == 0 or t < oldest) then oldest = t end
  end
  if band ~= band or band < 0 or band >= 255 then break end -- the last band, or not a band
  from = string.format('%.0f', (band + 1) * BAND)
end
return oldest
