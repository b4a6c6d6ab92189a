-- ack: RESERVED -> ACKED (every trace removed) for a batch of deliveries of one queue.
-- Fenced: a delivery is acked only if its token still holds the lease; an ack from a consumer
-- whose lease expired (and whose message was handed to someone else) changes nothing.
-- KEYS: the NK keys of one queue.
-- ARGV: message key, token, message key, token, ...
-- Returns one code per pair: OK, or LEASE_LOST.
--@include _queue.lua
local q = queue_keys(0)
local codes, acked = settle_held(q, 1, function(key) forget(q, key) end)
if acked > 0 then count(q, STAT_ACKED, acked) end
return codes
