-- requeue: RESERVED -> READY, at the front of the message's priority band (reject with requeue,
-- a warm shutdown returning prefetched messages, a lost connection restoring its deliveries).
-- KEYS: the NK keys of one queue.
-- ARGV[1] 1 to take back the delivery count (the message was never started), else 0;
-- then message key, token, message key, token, ...
-- Returns one code per pair: OK, or LEASE_LOST.
--@include _queue.lua
local q = queue_keys(0)
local uncount = ARGV[1] == '1'
local codes = {}
local moved = 0
for i = 2, #ARGV, 2 do
  local key = ARGV[i]
  if holds(q, key, ARGV[i + 1]) then
    release(q, key)
    if uncount then redis.call('HINCRBY', q.deliv, key, -1) end
    enqueue_front(q, key)
    codes[#codes + 1] = OK
    moved = moved + 1
  else
    codes[#codes + 1] = LEASE_LOST
  end
end
if moved > 0 then
  count(q, 'requeued', moved)
  signal(q)
end
return codes
