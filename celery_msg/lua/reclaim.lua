-- reclaim: RESERVED (lease expired) -> READY at the front of its band, for up to ARGV[2] leases.
-- reserve.lua does the same first thing on every fetch; this script lets a sweeper (or an
-- operator) do it without taking messages.
-- KEYS: the NK keys of one queue.
-- ARGV[1] now (ms), ARGV[2] most leases to reclaim.
-- Returns how many leases were reclaimed.
--@include _queue.lua
return reclaim_expired(queue_keys(0), tonumber(ARGV[1]), tonumber(ARGV[2]))
