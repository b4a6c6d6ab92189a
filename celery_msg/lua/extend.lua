-- extend: renew the leases a live consumer holds (one call per queue per renewal round).
-- KEYS: the NK keys of one queue.
-- ARGV[1] now (ms), ARGV[2] lease (ms), then message key, token, message key, token, ...
-- Returns one code per pair: OK; LEASE_LOST (the lease expired and was reclaimed, or the
-- message was requeued or dead-lettered meanwhile: counted): the consumer must not ack it any
-- more; or GONE (no longer stored in this queue: acked already, by the pool child that ran it
-- (celery_msg/childack.py), or purged; not counted): nothing left to renew or settle.
--@include _queue.lua
local q = queue_keys(0)
local deadline = tonumber(ARGV[1]) + tonumber(ARGV[2])
local codes = settle_held(q, 3, function(key)
  redis.call('ZADD', q.leased, 'XX', deadline, key)
end)
return codes
