-- ack: RESERVED -> ACKED (every trace removed) for a batch of deliveries of one queue.
-- Fenced: a delivery is acked only if its token still holds the lease; an ack from a consumer
-- whose lease expired (and whose message was handed to someone else) changes nothing.
-- Written by the consumer, or by a prefork pool child right after its task succeeded
-- (celery_msg/childack.py): the consumer's own ack of the same lease then finds it GONE.
-- KEYS: the NK keys of one queue.
-- ARGV: message key, token, message key, token, ...
-- Returns one code per pair: OK; GONE (no longer stored in this queue: acked already, or
-- purged; not counted); or LEASE_LOST (stored, but this token no longer holds it; counted).
--@include _queue.lua
local q = queue_keys(0)
local codes, acked = settle_held(q, 1, function(key) forget(q, key) end)
if acked > 0 then count(q, STAT_ACKED, acked) end
return codes
