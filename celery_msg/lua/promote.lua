-- promote: SCHEDULED (due) -> READY at the back of its band, for up to ARGV[2] messages.
-- reserve.lua does the same on every fetch; this script lets a sweeper (or an operator) do it
-- without taking messages.
-- KEYS: the NK keys of one queue.
-- ARGV[1] now (ms), ARGV[2] most messages to promote.
-- Returns how many messages were promoted.
--@include _queue.lua
return promote_due(queue_keys(0), tonumber(ARGV[1]), tonumber(ARGV[2]))
