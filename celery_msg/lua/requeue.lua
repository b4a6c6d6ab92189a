-- requeue: RESERVED -> READY, at the front of the message's priority band (reject with requeue,
-- a warm shutdown returning prefetched messages, a lost connection restoring its deliveries).
-- KEYS: the NK keys of one queue.
-- ARGV[1] 1 to take back the delivery count (the message was never started), else 0;
-- then message key, token, message key, token, ...
-- Returns one code per pair: OK; GONE when the key is no longer stored in the queue at all
-- (acked already: a prefork pool child acks its own success, celery_msg/childack.py, and a
-- worker stopped before it read that result restores the delivery), not counted; or
-- LEASE_LOST when it is stored but this token does not hold it, counted (lease_lost).
--@include _queue.lua
local q = queue_keys(0)
local uncount = ARGV[1] == '1'
local codes = {}
local held = {}
local lost = 0
for i = 2, #ARGV, 2 do
  if holds(q, ARGV[i], ARGV[i + 1]) then
    codes[#codes + 1] = OK
    held[#held + 1] = ARGV[i]
  elseif redis.call('HEXISTS', q.body, ARGV[i]) == 0 then
    codes[#codes + 1] = GONE
  else
    codes[#codes + 1] = LEASE_LOST
    lost = lost + 1
  end
end
-- Each goes back to its publish position at the front: the order of the batch does not matter.
for _, key in ipairs(held) do
  release(q, key)
  if uncount then add(q.deliv, key, -1) end
  enqueue_front(q, key)
end
if #held > 0 then
  count(q, STAT_REQUEUED, #held)
  signal(q)
end
if lost > 0 then count(q, STAT_LEASE_LOST, lost) end
return codes
