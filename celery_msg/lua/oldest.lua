-- oldest: read only. When the oldest READY message of one queue was enqueued, for the age that
-- metrics and dashboards show (and autoscalers scale on). Ready is ordered by priority band,
-- then front (came back) before back (published), each in sequence order, so the oldest of a
-- band is the first of its front or of its back: the script looks at those two per band
-- present (each_band_head), never at the whole queue. A message's enqueue time is its `born`
-- entry, or for one without (waiting at the back of its band) the queue's clock at its
-- sequence number: over-reported by less than CLOCK_MS (see _queue.lua).
-- A scheduled message past its due time is ready too (the next fetch promotes it; with no
-- consumer nothing does): its due time counts, so an autoscaler sees a queue nobody serves.
-- KEYS: the queue's `ready`, `born`, `sched` and `clock` keys (READ_PARTS below), checked like
-- every script's.
-- ARGV[1] now (ms).
-- Returns the enqueue time (ms) of the oldest of those, or 0 when the queue has no ready
-- message and none due, or none of its heads has an enqueue time (no `born` entry and no tick
-- at or before it: written by hand).
--@include _queue.lua
local READ_PARTS = {'ready', 'born', 'sched', 'clock'}
local q = keys_of(READ_PARTS, 0)
local now = tonumber(ARGV[1])
if not now then return redis.error_reply('oldest: ARGV[1] (now) is not a number') end
local oldest = 0
local first_due = redis.call('ZRANGE', q.sched, 0, 0, 'WITHSCORES')
if #first_due > 0 and tonumber(first_due[2]) <= now then oldest = tonumber(first_due[2]) end
each_band_head(q, function(key, score)
  local t = tonumber(redis.call('HGET', q.born, key))
  if not t then
    local _, n = band_and_n(score)
    t = clock_at(q, n)
  end
  if t and (oldest == 0 or t < oldest) then oldest = t end
end)
return oldest
