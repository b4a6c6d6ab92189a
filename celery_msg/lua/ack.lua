-- ack: RESERVED -> ACKED (every trace removed) for a batch of deliveries of one queue.
-- Fenced: a delivery is acked only if its token still holds the lease; an ack from a consumer
-- whose lease expired (and whose message was handed to someone else) changes nothing.
-- KEYS: the NK keys of one queue.
-- ARGV: message key, token, message key, token, ...
-- Returns one code per pair: OK, or LEASE_LOST.
--@include _queue.lua
local q = queue_keys(0)
local codes = {}
local lost = 0
for i = 1, #ARGV, 2 do
  local key = ARGV[i]
  if holds(q, key, ARGV[i + 1]) then
    forget(q, key)
    codes[#codes + 1] = OK
  else
    codes[#codes + 1] = LEASE_LOST
    lost = lost + 1
  end
end
local acked = #codes - lost
if acked > 0 then count(q, STAT_ACKED, acked) end
if lost > 0 then count(q, STAT_LEASE_LOST, lost) end
return codes
